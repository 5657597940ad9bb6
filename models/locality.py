"""Exact pixel-local evaluation: propagate a one-pixel change only as far as it reaches.

Changing one pixel alters a 3x3 convolution's output only inside one kernel window, and each
later layer's only inside a window that grows with the receptive field (the locality Su,
Vargas and Sakurai's one-pixel attack rests on). So a candidate needs the early, expensive
layers only on small windows. They are computed as *changes* of the clean image's
activations: a convolution is linear, so the change of its pre-activation is the
convolution of its input's change, a dense matrix product on the flattened window (the
layer's Toeplitz matrix, built once per attack: a GEMM, which runs at full speed where a
convolution over a 5x5 window does not); ReLU, BatchNorm and max pools are then applied to
the clean pre-activations plus that change. At the split layer the new window is spliced into
the clean activations and the rest of the network runs as usual. The result equals the full
forward pass up to float rounding.

Windows have a fixed size per layer; a window's position follows the pixel through static
tables, and before a strided layer the window is shifted to the stride's phase, so every
candidate uses the same matrices. Window positions off a feature map carry no change (they
are the next layer's padding).

`splicer_for(module)` gives a `PixelSplicer` for the zoo's sequential convolutional
architectures (PapernotLeNet, AllConvC, NiN, VGG16) and None for others (ResNet20, the
softmax). The split layer is chosen by a cost model (`PixelSplicer.plan`). Candidates that
change more than one pixel (k > 1) use the full forward pass: the windows of nearby pixels
interact, and splitting k windows did not pay where it was measured
(`results/perf/NOTES.md`).
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

from advsweep.models import architectures as arch

BN_EPSILON = 1e-5  # flax.linen.BatchNorm's default
# Costs in full-map multiply-adds, measured on the 2-core CPU (XLA, mnist_lenet, 2048
# candidates): a multiply-add of a window's Toeplitz product costs about one in a full-map
# convolution, and copying one activation (a window gathered from the clean maps, or the
# clean map the window is spliced into) about 100.
TOEPLITZ_COST = 1
COPY_COST = 100


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

  @property
  def reach(self) -> int:
    """Input rows before a window's first row that its first output reads, in whole strides
    (the aligned geometry of `_geometry`)."""
    return (self.kernel - 1) // self.stride * self.stride

  def pad_value(self) -> float:
    """The value this layer's input is padded with."""
    return -jnp.inf if self.kind == "max" else 0.0

  def kernel_of(self, variables: Any) -> jax.Array:
    params = variables["params"][self.name]
    return (params["conv"] if self.batchnorm else params)["kernel"]

  def _scale(self, variables: Any) -> jax.Array | float:
    """BatchNorm's per-channel factor on the convolution's output (1 without BatchNorm)."""
    if not self.batchnorm:
      return 1.0
    stats = variables["batch_stats"][self.name]["bn"]
    return lax.rsqrt(stats["var"] + BN_EPSILON) * variables["params"][self.name]["bn"]["scale"]

  def change_kernel(self, variables: Any) -> jax.Array:
    """The kernel that maps a change of the input to the change of the pre-activation."""
    return self.kernel_of(variables) * self._scale(variables)

  def apply(self, variables: Any, x: jax.Array, padding: Any, activation: bool = True
            ) -> jax.Array:
    """This layer on NHWC `x` with explicit `padding` ([(lo, hi)] * 2, or "VALID"); a
    convolution's ReLU only with `activation`."""
    if self.kind in ("max", "avg"):
      pads = [(0, 0), *padding, (0, 0)] if padding != "VALID" else "VALID"
      window = (1, self.kernel, self.kernel, 1)
      strides = (1, self.stride, self.stride, 1)
      if self.kind == "max":
        return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, pads)
      return lax.reduce_window(x, 0.0, lax.add, window, strides, pads) / self.kernel ** 2
    params = variables["params"][self.name]
    y = lax.conv_general_dilated(x, self.kernel_of(variables), (self.stride, self.stride),
                                 padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.batchnorm:
      stats = variables["batch_stats"][self.name]["bn"]
      y = (y - stats["mean"]) * self._scale(variables) + params["bn"]["bias"]
    else:
      y = y + params["bias"]
    return jax.nn.relu(y) if activation else y


@dataclasses.dataclass(frozen=True)
class Plan:
  """Where to split, and the static window geometry (one axis; images are square).

  Layer i's input window starts at `origins[i][r]` for a pixel in row r and has
  `windows[i]` rows; before layer i it is shifted by `shifts[i][r]` rows into a window of
  `aligned[i]` rows that starts on the stride's phase. `origins[split]`, `windows[split]` is
  the window spliced into the split layer's output.
  """

  split: int  # layers [0, split) run on windows; 0 means no splicing
  sizes: tuple[int, ...]  # map size at the input of each layer up to the split, then its output
  windows: tuple[int, ...]
  origins: tuple[np.ndarray, ...]
  shifts: tuple[np.ndarray, ...]
  aligned: tuple[int, ...]
  margins: tuple[tuple[int, int], ...]  # zero padding of each clean output map (layers < split)
  region_margins: tuple[tuple[int, int], ...]  # -inf padding of a max pool's clean input
  macs: int  # cost per candidate in full-map multiply-adds (TOEPLITZ_COST, COPY_COST)
  full_macs: int  # multiply-adds of a full forward pass


def _geometry(layer: Layer, size: int, origins: np.ndarray, window: int
              ) -> tuple[np.ndarray, int, np.ndarray, int, int]:
  """Shift, aligned size, output origins and output size of `layer`'s window."""
  lo = layer.pads(size)[0]
  shifts = (origins + lo) % layer.stride
  aligned = window + layer.stride - 1
  steps = layer.reach // layer.stride
  out_origins = (origins - shifts + lo) // layer.stride - steps
  return shifts, aligned, out_origins, (aligned - 1) // layer.stride + steps + 1


def _margin(origins: np.ndarray, window: int, size: int) -> tuple[int, int]:
  """Padding of a map of `size` so that every window starting at `origins` is inside it."""
  return max(0, -int(origins.min())), max(0, int(origins.max()) + window - size)


@dataclasses.dataclass(frozen=True, eq=False)
class PixelSplicer:
  """Exact logits for images that differ from clean ones in one pixel (see module doc).

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
    """The split layer with the lowest cost per candidate (or the given `split`).

    `channels` are the input's and every layer's output channels (see `plan_for`). Only
    one-pixel candidates are split; for k > 1 the plan has split 0.
    """
    sizes = [image_shape[0]]
    for layer in self.layers:
      sizes.append(layer.out_size(sizes[-1]))
    full = [layer.macs(sizes[i + 1] ** 2, channels[i], channels[i + 1])
            for i, layer in enumerate(self.layers)]
    if num_pixels != 1:
      split = 0
    candidates = range(len(self.layers) + 1) if split is None else [split]
    plans = [self._plan_at(s, sizes, channels, full) for s in candidates]
    return min(plans, key=lambda plan: plan.macs)

  def _plan_at(self, split, sizes, chans, full) -> Plan:
    origins, windows, shifts, aligned = [np.arange(sizes[0])], [1], [], []
    margins, region_margins, cost = [], [], 0
    for i, layer in enumerate(self.layers[:split]):
      shift, width, out_origins, out_window = _geometry(
          layer, sizes[i], origins[-1], windows[-1])
      shifts.append(shift)
      aligned.append(width)
      origins.append(out_origins)
      windows.append(out_window)
      margins.append(_margin(out_origins, out_window, sizes[i + 1]))
      copied = out_window ** 2 * chans[i + 1]  # clean window gathered
      if layer.kind == "conv":
        cost += TOEPLITZ_COST * width ** 2 * chans[i] * copied
      if layer.kind == "max":
        region = (out_window - 1) * layer.stride + layer.kernel
        start = origins[-2] - shift - layer.reach
        region_margins.append(_margin(start, region, sizes[i]))
        copied += region ** 2 * chans[i]
      else:
        region_margins.append((0, 0))
      cost += COPY_COST * copied
    if split:
      cost += COPY_COST * sizes[split] ** 2 * chans[split]  # the splice
    cost += sum(full[split:])
    return Plan(split, tuple(sizes[:split + 1]), tuple(windows), tuple(origins),
                tuple(shifts), tuple(aligned), tuple(margins), tuple(region_margins),
                int(cost), sum(full))

  def plan_for(self, variables: Any, image_shape: Sequence[int], num_pixels: int,
               split: int | None = None) -> Plan:
    """`plan` for concrete or traced `variables` (only their shapes are read)."""
    channels = [int(image_shape[2])]
    for layer in self.layers:
      if layer.kind == "conv":
        channels.append(int(layer.kernel_of(variables).shape[-1]))
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

  def clean_state(self, variables: Any, images: jax.Array, plan: Plan) -> dict[str, Any]:
    """Per image: the normalised image, each windowed layer's padded clean output before its
    ReLU, max pools' padded clean inputs, and the split layer's clean output; per layer, the
    Toeplitz matrix of a convolution."""
    x = self.normalise(images)
    state = {"image": x, "pre": [], "region": [], "toeplitz": []}
    for i, layer in enumerate(self.layers[:plan.split]):
      pads = [layer.pads(x.shape[1])] * 2
      state["region"].append(
          _pad(x, plan.region_margins[i], -jnp.inf) if layer.kind == "max" else None)
      pre = layer.apply(variables, x, pads, activation=False)
      state["pre"].append(_pad(pre, plan.margins[i], 0.0))
      state["toeplitz"].append(
          _toeplitz(layer.change_kernel(variables), plan.aligned[i], plan.windows[i + 1],
                    layer.stride) if layer.kind == "conv" else None)
      x = jax.nn.relu(pre) if layer.kind == "conv" else pre
    state["split"] = x
    return state

  def logits(self, variables: Any, state: dict[str, Any], ids: jax.Array, rows: jax.Array,
             cols: jax.Array, colours: jax.Array, plan: Plan) -> jax.Array:
    """Logits of clean images `ids` (into `state`'s images) with k pixels set.

    Args:
      variables: the model's variables.
      state: `clean_state` of the clean images.
      ids: [N] int, the clean image of each candidate.
      rows, cols: [N, k] int pixel positions; colours: [N, k, C] in [0, 1].
      plan: from `plan`; its split is 0 unless k = 1.
    """
    images = state["image"][ids]
    if plan.split == 0:
      batch = jnp.arange(images.shape[0])[:, None]
      return self.forward(variables, images.at[batch, rows, cols].set(self.normalise(colours)))
    row, col = rows[:, 0], cols[:, 0]
    change = self.normalise(colours)[:, 0] - images[jnp.arange(ids.shape[0]), row, col]
    change = change[:, None, None, :]  # the layer-0 input window: the pixel, [N, 1, 1, C]
    for i, layer in enumerate(self.layers[:plan.split]):
      change, new = self._propagate(variables, state, plan, i, layer, ids, row, col, change)
    base = state["split"][ids]
    spliced = jax.vmap(_place)(base, new.astype(base.dtype), jnp.asarray(plan.origins[-1])[row],
                               jnp.asarray(plan.origins[-1])[col])
    return self.forward(variables, spliced, plan.split)

  def _propagate(self, variables, state, plan, i, layer, ids, row, col, change):
    """Layer i on a window: (the change of its output, masked off the map; its new output)."""
    if layer.stride > 1:
      change = _shift(change, jnp.asarray(plan.shifts[i])[row],
                      jnp.asarray(plan.shifts[i])[col], plan.aligned[i])
    window = plan.windows[i + 1]
    out_r, out_c = jnp.asarray(plan.origins[i + 1])[row], jnp.asarray(plan.origins[i + 1])[col]
    margin = plan.margins[i][0]
    clean = _gather(state["pre"][i], ids, out_r + margin, out_c + margin, window)
    reach = layer.reach
    if layer.kind == "conv":
      flat = change.reshape(change.shape[0], -1) @ state["toeplitz"][i]
      new = jax.nn.relu(clean + flat.reshape(clean.shape))
      delta = new - jax.nn.relu(clean)
    elif layer.kind == "avg":  # linear: the pool of the change
      delta = _pool(layer, _frame(change, reach, window, layer))
      new = clean + delta
    else:  # max: the pool of the clean input region plus the change
      start_r = jnp.asarray(plan.origins[i])[row] - jnp.asarray(plan.shifts[i])[row] - reach
      start_c = jnp.asarray(plan.origins[i])[col] - jnp.asarray(plan.shifts[i])[col] - reach
      size = (window - 1) * layer.stride + layer.kernel
      lo = plan.region_margins[i][0]
      region = _gather(state["region"][i], ids, start_r + lo, start_c + lo, size)
      new = _pool(layer, region + _frame(change, reach, window, layer))
      delta = new - clean
    on_map = (_in_range(out_r[:, None] + jnp.arange(window), plan.sizes[i + 1])[:, :, None]
              & _in_range(out_c[:, None] + jnp.arange(window), plan.sizes[i + 1])[:, None, :])
    return jnp.where(on_map[..., None], delta, 0.0), new


def _pad(maps: jax.Array, margin: tuple[int, int], value: float) -> jax.Array:
  return jnp.pad(maps, ((0, 0), margin, margin, (0, 0)), constant_values=value)


def _gather(maps: jax.Array, ids: jax.Array, rows: jax.Array, cols: jax.Array, size: int
            ) -> jax.Array:
  """[N, size, size, C] windows of `maps[ids]` starting at (rows, cols): one gather."""
  channels = maps.shape[-1]
  return jax.vmap(lambda i, r, c: lax.dynamic_slice(
      maps, (i, r, c, 0), (1, size, size, channels))[0])(ids, rows, cols)


def _shift(change: jax.Array, rows: jax.Array, cols: jax.Array, size: int) -> jax.Array:
  """[N, T, T, C] windows moved down by `rows` and right by `cols` into zeros [N, size...]."""
  return jax.vmap(_place)(jnp.zeros((change.shape[0], size, size, change.shape[-1]),
                                    change.dtype), change, rows, cols)


def _frame(change: jax.Array, front: int, window: int, layer: Layer) -> jax.Array:
  """The (aligned) change inside the input region that `window` pooled outputs read."""
  size = (window - 1) * layer.stride + layer.kernel
  back = size - front - change.shape[1]
  return jnp.pad(change, ((0, 0), (front, back), (front, back), (0, 0)))


def _pool(layer: Layer, region: jax.Array) -> jax.Array:
  return layer.apply(None, region, "VALID")


def _toeplitz(kernel: jax.Array, size_in: int, size_out: int, stride: int) -> jax.Array:
  """The convolution from a [size_in]^2 window to its [size_out]^2 output window as a matrix.

  Output position y reads input position y * stride - reach + kappa for kernel tap kappa,
  in window coordinates (the windows are aligned as `_geometry` lays them out).
  """
  k = kernel.shape[0]
  reach = (k - 1) // stride * stride
  tap = np.arange(size_in)[:, None] - np.arange(size_out)[None] * stride + reach
  valid = (tap >= 0) & (tap < k)
  tap = np.clip(tap, 0, k - 1)
  mask = valid[:, None, :, None] & valid[None, :, None, :]  # [a, b, y, x]
  matrix = kernel[tap[:, None, :, None], tap[None, :, None, :]] * mask[..., None, None]
  c_in, c_out = kernel.shape[2], kernel.shape[3]
  return matrix.transpose(0, 1, 4, 2, 3, 5).reshape(size_in ** 2 * c_in, size_out ** 2 * c_out)


def _in_range(values: jax.Array, size: int) -> jax.Array:
  """values in [0, size)."""
  return (values >= 0) & (values < size)


def _place(base: jax.Array, window: jax.Array, row: jax.Array, col: jax.Array) -> jax.Array:
  """`base` [H,W,C] with `window` [T,T,C] at (row, col) (parts off `base` dropped): a select,
  which XLA fuses with the gather that made `base` (a dynamic_update_slice copied it first,
  2.4x slower on CPU)."""
  size = window.shape[0]
  rel_r = jnp.arange(base.shape[0]) - row
  rel_c = jnp.arange(base.shape[1]) - col
  inside = _in_range(rel_r, size)[:, None] & _in_range(rel_c, size)[None]
  placed = window[jnp.clip(rel_r, 0, size - 1)[:, None], jnp.clip(rel_c, 0, size - 1)[None]]
  return jnp.where(inside[..., None], placed, base)


def _dense_head(names: Sequence[str], gauss: bool = False
                ) -> Callable[[Any, jax.Array], jax.Array]:
  """Flatten, then Dense layers (ReLU between them); with `gauss`, ReLU after the last one
  too and then the Gauss network's centroid layer (`architectures.gauss_logits`)."""
  def head(variables, x):
    x = x.reshape(x.shape[0], -1)
    for i, name in enumerate(names):
      p = variables["params"][name]
      x = x @ p["kernel"] + p["bias"]
      if i + 1 < len(names) or gauss:
        x = jax.nn.relu(x)
    if gauss:
      head = variables["params"]["gauss"]
      x = arch.gauss_logits(x, head["centroids"], head["log_gamma"])
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
                        _dense_head(("fc1", "fc2") if module.head == arch.GAUSS
                                    else ("fc1", "fc2", "fc3"), gauss=module.head == arch.GAUSS))
  if kind in (arch.AllConvC, arch.NiN, arch.VGG16):
    head = _dense_head(("fc",)) if kind is arch.VGG16 else _conv_mean_head(
        "conv9" if kind is arch.AllConvC else "block3_mlp2")
    return PixelSplicer(tuple(module.mean), tuple(module.std),
                        layers_from_spec(module.layers(), batchnorm=True), head)
  return None
