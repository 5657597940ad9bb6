"""Exact pixel-local evaluation: recompute the early layers only where a pixel change reaches.

Changing one pixel alters a 3x3 convolution's output only inside one kernel window, and each
later layer's only inside a window that grows with the receptive field (the locality Su,
Vargas and Sakurai's one-pixel attack rests on). So a candidate with k changed pixels needs
the early, expensive layers only on k small windows: each is computed from a crop of the
perturbed image and spliced into the clean image's activations at the split layer, and the
rest of the network runs as usual. The result equals the full forward pass up to float
rounding (the same sums, in a different order).

`splicer_for(module)` gives a `PixelSplicer` for the zoo's sequential convolutional
architectures (PapernotLeNet, AllConvC, NiN, VGG16) and None for others (ResNet20, the
softmax), which then fall back to the full forward pass. The split layer is chosen by
counting multiply-adds (`PixelSplicer.plan`).

Windows near the border: each layer's crop may extend past its feature map; those positions
are set to the value the next layer pads with (0 for convolutions and average pools, -inf for
max pools), so SAME padding is reproduced exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from models import architectures as arch

BN_EPSILON = 1e-5  # flax.linen.BatchNorm's default
# Costs in full-map multiply-adds, measured on the 2-core CPU (XLA, mnist_lenet, 2048
# candidates): a multiply-add in a convolution over a small window costs about 10 in a
# full-map one, and copying one activation into a candidate's map about 100.
WINDOW_COST = 10
SPLICE_COST = 100


@dataclasses.dataclass(frozen=True)
class Layer:
  """A spatial layer: a convolution (with bias or BatchNorm, then ReLU) or a pool."""

  kind: str  # "conv", "max" or "avg"
  kernel: int
  stride: int
  padding: str  # "SAME" or "VALID"
  name: str = ""
  batchnorm: bool = False  # conv -> BatchNorm (no bias) -> ReLU; else conv + bias -> ReLU

  def pads(self, size: int) -> tuple[int, int]:
    return lax.padtype_to_pads((size,), (self.kernel,), (self.stride,), self.padding)[0]

  def out_size(self, size: int) -> int:
    lo, hi = self.pads(size)
    return (size + lo + hi - self.kernel) // self.stride + 1

  def macs(self, out_positions: int, channels_in: int, channels_out: int) -> int:
    if self.kind != "conv":
      return out_positions * channels_out * self.kernel ** 2
    return out_positions * channels_out * channels_in * self.kernel ** 2

  def pad_value(self) -> float:
    """The value this layer's input is padded with."""
    return -jnp.inf if self.kind == "max" else 0.0

  def apply(self, variables: Any, x: jax.Array, padding: Any) -> jax.Array:
    """This layer on NHWC `x` with explicit `padding` ([(lo, hi)] * 2, or "VALID")."""
    if self.kind in ("max", "avg"):
      pads = [(0, 0), *padding, (0, 0)] if padding != "VALID" else "VALID"
      window = (1, self.kernel, self.kernel, 1)
      strides = (1, self.stride, self.stride, 1)
      if self.kind == "max":
        return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, pads)
      return lax.reduce_window(x, 0.0, lax.add, window, strides, pads) / self.kernel ** 2
    params = variables["params"][self.name]
    conv = params["conv"] if self.batchnorm else params
    y = lax.conv_general_dilated(x, conv["kernel"], (self.stride, self.stride), padding,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.batchnorm:
      stats = variables["batch_stats"][self.name]["bn"]
      bn = params["bn"]
      y = (y - stats["mean"]) * (lax.rsqrt(stats["var"] + BN_EPSILON) * bn["scale"])
      y = y + bn["bias"]
    else:
      y = y + conv["bias"]
    return jax.nn.relu(y)


def _affected(layer: Layer, size: int, lo: int, hi: int) -> tuple[int, int]:
  """Output rows of `layer` that read any input row in [lo, hi]."""
  pad_lo, _ = layer.pads(size)
  first = max(0, -(-(lo + pad_lo - layer.kernel + 1) // layer.stride))
  last = min(layer.out_size(size) - 1, (hi + pad_lo) // layer.stride)
  return first, last


@dataclasses.dataclass(frozen=True)
class Plan:
  """Where to split and the static geometry of the windows (one axis; images are square)."""

  split: int  # layers [0, split) run on windows; 0 means no splicing
  window: tuple[int, ...]  # crop size at the input of each windowed layer, then its output
  origin: np.ndarray  # [H] split-layer window start for a pixel in each row
  input_offset: int  # input-crop start = origin * input_scale + input_offset
  input_scale: int
  margin: tuple[int, int]  # zero padding of the normalised image so every crop is in range
  macs: int  # cost per candidate in full-map multiply-adds (WINDOW_COST, SPLICE_COST)
  full_macs: int  # multiply-adds of a full forward pass
  sizes: tuple[int, ...] = ()  # map size at the input of each windowed layer, then its output


@dataclasses.dataclass(frozen=True, eq=False)
class PixelSplicer:
  """Exact logits for images that differ from clean ones in k pixels (see module doc).

  Attributes:
    mean, std: the module's input normalisation.
    layers: the spatial layers in order.
    head: `head(variables, x) -> logits` after the last spatial layer.
  """

  mean: tuple[float, ...]
  std: tuple[float, ...]
  layers: tuple[Layer, ...]
  head: Callable[[Any, jax.Array], jax.Array]

  @functools.lru_cache(maxsize=64)  # noqa: B019 (the splicer lives as long as its model)
  def plan(self, channels: tuple[int, ...], image_shape: tuple[int, int, int],
           num_pixels: int, split: int | None = None) -> Plan:
    """The split layer with the fewest multiply-adds per candidate (or the given `split`).

    `channels` are the input's and every layer's output channels (see `plan_for`).
    """
    sizes = [image_shape[0]]
    for layer in self.layers:
      sizes.append(layer.out_size(sizes[-1]))
    full = [layer.macs(sizes[i + 1] ** 2, channels[i], channels[i + 1])
            for i, layer in enumerate(self.layers)]
    candidates = range(len(self.layers) + 1) if split is None else [split]
    plans = [self._plan_at(s, sizes, channels, full, num_pixels, image_shape[0])
             for s in candidates]
    return min(plans, key=lambda plan: plan.macs)

  def _plan_at(self, split, sizes, chans, full, num_pixels, height) -> Plan:
    if split == 0:
      return Plan(0, (), np.zeros(height, np.int32), 0, 1, (0, 0), sum(full), sum(full))
    starts, extent = [], 0
    for row in range(height):
      lo = hi = row
      for i in range(split):
        lo, hi = _affected(self.layers[i], sizes[i], lo, hi)
      starts.append(lo)
      extent = max(extent, hi - lo + 1)
    out_size = sizes[split]
    origin = np.clip(np.asarray(starts), 0, out_size - extent).astype(np.int32)
    # Walk back from the split layer: crop size and start (as origin * scale + offset).
    window, scale, offset = [extent], 1, 0
    for i in reversed(range(split)):
      layer = self.layers[i]
      window.insert(0, (window[0] - 1) * layer.stride + layer.kernel)
      offset = offset * layer.stride - layer.pads(sizes[i])[0]
      scale *= layer.stride
    begin = int(np.min(origin)) * scale + offset
    end = int(np.max(origin)) * scale + offset + window[0]
    margin = (max(0, -begin), max(0, end - height))
    windowed = sum(layer.macs(window[i + 1] ** 2, chans[i], chans[i + 1])
                   for i, layer in enumerate(self.layers[:split]))
    splice = sizes[split] ** 2 * chans[split]  # activations copied per candidate
    macs = (WINDOW_COST * num_pixels * windowed + SPLICE_COST * splice
            + sum(full[split:]))
    return Plan(split, tuple(window), origin, offset, scale, margin, macs, sum(full),
                tuple(sizes[:split + 1]))

  def plan_for(self, variables: Any, image_shape: Sequence[int], num_pixels: int,
               split: int | None = None) -> Plan:
    """`plan` for concrete or traced `variables` (only their shapes are read)."""
    channels = [int(image_shape[2])]
    for layer in self.layers:
      if layer.kind == "conv":
        params = variables["params"][layer.name]
        kernel = (params["conv"] if layer.batchnorm else params)["kernel"]
        channels.append(int(kernel.shape[-1]))
      else:
        channels.append(channels[-1])
    return self.plan(tuple(channels), tuple(int(d) for d in image_shape), num_pixels, split)

  def normalise(self, images: jax.Array) -> jax.Array:
    return (images - jnp.asarray(self.mean, images.dtype)) / jnp.asarray(self.std, images.dtype)

  def forward(self, variables: Any, x: jax.Array, start: int = 0, stop: int | None = None
              ) -> jax.Array:
    """Layers [start, stop) on full NHWC maps (then the head if stop is None); layer 0 takes
    the normalised image."""
    for layer in self.layers[start:stop]:
      pads = [layer.pads(x.shape[1]), layer.pads(x.shape[2])]
      x = layer.apply(variables, x, pads)
    return self.head(variables, x) if stop is None else x

  def clean_state(self, variables: Any, images: jax.Array, plan: Plan) -> tuple[jax.Array, ...]:
    """Per image: the padded normalised image and the split layer's clean activations."""
    normalised = self.normalise(images)
    padded = jnp.pad(normalised, ((0, 0), plan.margin, plan.margin, (0, 0)))
    return padded, self.forward(variables, normalised, 0, plan.split)

  def logits(self, variables: Any, state: tuple[jax.Array, ...], rows: jax.Array,
             cols: jax.Array, colours: jax.Array, plan: Plan) -> jax.Array:
    """Logits of clean images (`state` rows, one per candidate) with k pixels set.

    Args:
      variables: the model's variables.
      state: `clean_state` gathered to one entry per candidate.
      rows, cols: [N, k] int pixel positions; colours: [N, k, C] in [0, 1].
      plan: from `plan`.
    """
    padded, clean = state
    if plan.split == 0:
      images = padded  # margin is 0: the normalised images
      batch = jnp.arange(images.shape[0])[:, None]
      images = images.at[batch, rows, cols].set(self.normalise(colours))
      return self.forward(variables, images, 0)
    spliced = jax.vmap(functools.partial(self._splice_one, variables, plan))(
        padded, clean, rows, cols, self.normalise(colours))
    return self.forward(variables, spliced, plan.split)

  def _splice_one(self, variables, plan, padded, clean, rows, cols, colours):
    """One candidate: recompute the windows around each of its k pixels and splice them."""
    origin = jnp.asarray(plan.origin)
    size = plan.window[0]
    out = clean
    for j in range(rows.shape[0]):
      origin_r, origin_c = origin[rows[j]], origin[cols[j]]
      off_r = origin_r * plan.input_scale + plan.input_offset
      off_c = origin_c * plan.input_scale + plan.input_offset
      crop = lax.dynamic_slice(
          padded, (off_r + plan.margin[0], off_c + plan.margin[0], 0),
          (size, size, padded.shape[-1]))
      # Every pixel of the candidate that falls in this crop (the others are dropped).
      local_r, local_c = rows - off_r, cols - off_c
      inside = _in_range(local_r, size) & _in_range(local_c, size)
      crop = crop.at[jnp.where(inside, local_r, size), jnp.where(inside, local_c, size)].set(
          colours, mode="drop")
      x = crop[None]
      for i, layer in enumerate(self.layers[:plan.split]):
        x = layer.apply(variables, x, "VALID")
        pad_lo = layer.pads(plan.sizes[i])[0]
        off_r, off_c = (off_r + pad_lo) // layer.stride, (off_c + pad_lo) // layer.stride
        if i + 1 < plan.split:  # positions off the map become the next layer's padding
          span = jnp.arange(x.shape[1])
          on_map = (_in_range(off_r + span, plan.sizes[i + 1])[:, None]
                    & _in_range(off_c + span, plan.sizes[i + 1])[None, :])
          x = jnp.where(on_map[None, :, :, None], x, self.layers[i + 1].pad_value())
      out = _place(out, x[0].astype(out.dtype), origin_r, origin_c)
    return out


def _in_range(values: jax.Array, size: int) -> jax.Array:
  """values in [0, size)."""
  return (values >= 0) & (values < size)


def _place(base: jax.Array, window: jax.Array, row: jax.Array, col: jax.Array) -> jax.Array:
  """`base` [H,W,C] with `window` [T,T,C] at (row, col): a select, which XLA fuses with the
  gather that made `base` (a dynamic_update_slice copied it first, 2.4x slower on CPU)."""
  size = window.shape[0]
  rel_r = jnp.arange(base.shape[0]) - row
  rel_c = jnp.arange(base.shape[1]) - col
  inside = _in_range(rel_r, size)[:, None] & _in_range(rel_c, size)[None]
  placed = window[jnp.clip(rel_r, 0, size - 1)[:, None], jnp.clip(rel_c, 0, size - 1)[None]]
  return jnp.where(inside[..., None], placed, base)


def _dense_head(names: Sequence[str]) -> Callable[[Any, jax.Array], jax.Array]:
  """Flatten, then Dense layers (ReLU between them)."""
  def head(variables, x):
    x = x.reshape(x.shape[0], -1)
    for i, name in enumerate(names):
      p = variables["params"][name]
      x = x @ p["kernel"] + p["bias"]
      if i + 1 < len(names):
        x = jax.nn.relu(x)
    return x
  return head


def _conv_mean_head(name: str) -> Callable[[Any, jax.Array], jax.Array]:
  """A 1x1 convolution with bias, then the spatial mean."""
  def head(variables, x):
    p = variables["params"][name]
    x = lax.conv_general_dilated(x, p["kernel"], (1, 1), "VALID",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
    return jnp.mean(x, axis=(1, 2))
  return head


def layers_from_spec(spec: Sequence[Any], batchnorm: bool) -> tuple[Layer, ...]:
  """Layers from the architectures' `(name, features, kernel, strides, padding)` / pool specs."""
  pools = {"pool:max": Layer("max", 3, 2, "SAME"), "pool:max2": Layer("max", 2, 2, "VALID"),
           "pool:avg": Layer("avg", 3, 2, "SAME")}
  out = []
  for item in spec:
    if isinstance(item, str):
      out.append(pools[item])
    else:
      name, _, kernel, strides, padding = item
      out.append(Layer("conv", kernel, strides, padding, name, batchnorm))
  return tuple(out)


def splicer_for(module: Any) -> PixelSplicer | None:
  """The `PixelSplicer` of a zoo module, or None where the architecture has none."""
  kind = type(module)
  if kind is arch.PapernotLeNet:
    return PixelSplicer(tuple(module.mean), tuple(module.std),
                        layers_from_spec(arch.PapernotLeNet.LAYERS, batchnorm=False),
                        _dense_head(("fc1", "fc2", "fc3")))
  if kind in (arch.AllConvC, arch.NiN, arch.VGG16):
    head = _dense_head(("fc",)) if kind is arch.VGG16 else _conv_mean_head(
        "conv9" if kind is arch.AllConvC else "block3_mlp2")
    return PixelSplicer(tuple(module.mean), tuple(module.std),
                        layers_from_spec(module.layers(), batchnorm=True), head)
  return None
