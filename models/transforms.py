"""Input transformations that defenses put before a network, in JAX: they jit, batch and run
on an accelerator with the model.

- `jpeg`: JPEG compression and decompression at a quality, as libjpeg does it with its
  defaults (Das et al. 2017, "Keeping the bad guys out: protecting and vaccinating deep
  learning with JPEG compression"; Guo et al. 2018): JFIF colour transform, 4:2:0 chroma
  subsampling, 8x8 DCT, quantisation by the standard tables scaled by the quality, rounding,
  and the inverse with libjpeg's "fancy" (triangular) chroma upsampling. Checked against
  Pillow's libjpeg on real images (`tests/test_transforms.py`, figures in
  `results/perf/NOTES.md`).
- `bit_depth`: colour-depth reduction to `bits` bits per channel (Xu et al. 2018, feature
  squeezing).
- `median_smooth`: a `size` x `size` median filter per channel, edges replicated (Xu et al.).
- `random_resize_pad`: Xie et al. 2018 ("Mitigating adversarial effects through
  randomization"): resize to a random size, then zero-pad at a random offset, one draw per
  image from its key (`draw_keys`).

Every one maps [B,H,W,C] images in [0, 1] to the same shape in [0, 1]. Their rounding steps
have zero gradient almost everywhere: an attack that differentiates through them sees
nothing, which is why an honest evaluation uses BPDA (Athalye et al. 2018).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# The quantisation tables of the JPEG standard (ITU-T T.81, Annex K), in natural order.
_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
], np.float32).reshape(8, 8)
_CHROMA = np.array([
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
], np.float32).reshape(8, 8)


def quantization_table(base: np.ndarray, quality: int) -> np.ndarray:
  """libjpeg's `jpeg_quality_scaling` and baseline clamp: the table used at `quality`."""
  if not 1 <= quality <= 100:
    raise ValueError(f"JPEG quality must be in [1, 100]; got {quality}")
  scale = 5000 // quality if quality < 50 else 200 - 2 * quality  # integers, as libjpeg
  return np.clip(np.floor((base * scale + 50) / 100), 1, 255).astype(np.float32)


def _dct_matrix() -> np.ndarray:
  k, n = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
  m = np.cos((2 * n + 1) * k * np.pi / 16) * np.sqrt(2 / 8)
  m[0] /= np.sqrt(2)
  return m.astype(np.float32)


_DCT = _dct_matrix()


def _round(x: jax.Array) -> jax.Array:
  """Round half away from zero, as libjpeg's integer arithmetic does."""
  return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def _blocks(plane: jax.Array) -> jax.Array:
  b, h, w = plane.shape
  return plane.reshape(b, h // 8, 8, w // 8, 8).transpose(0, 1, 3, 2, 4)


def _unblocks(blocks: jax.Array) -> jax.Array:
  b, hb, wb, _, _ = blocks.shape
  return blocks.transpose(0, 1, 3, 2, 4).reshape(b, hb * 8, wb * 8)


def _code_plane(plane: jax.Array, table: np.ndarray) -> jax.Array:
  """8-bit samples [B,H,W] (H, W multiples of 8) through DCT, quantisation and back."""
  blocks = _blocks(plane - 128.0)
  coefficients = jnp.einsum("ij,bxyjk,lk->bxyil", _DCT, blocks, _DCT)
  quantized = _round(coefficients / table) * table
  restored = jnp.einsum("ji,bxyjk,kl->bxyil", _DCT, quantized, _DCT)
  return jnp.clip(_round(_unblocks(restored) + 128.0), 0, 255)


def _pad_to(plane: jax.Array, multiple: int) -> jax.Array:
  _, h, w = plane.shape
  return jnp.pad(plane, ((0, 0), (0, -h % multiple), (0, -w % multiple)), mode="edge")


def _downsample(plane: jax.Array) -> jax.Array:
  """2x2 box average, libjpeg's h2v2_downsample (its alternating bias 1, 2, 1, 2 ...)."""
  b, h, w = plane.shape
  sums = plane.reshape(b, h // 2, 2, w // 2, 2).sum(axis=(2, 4))
  bias = jnp.where(jnp.arange(w // 2) % 2 == 0, 1.0, 2.0)
  return jnp.floor((sums + bias) / 4)


def _fancy_upsample(plane: jax.Array) -> jax.Array:
  """libjpeg's h2v2_fancy_upsample: each output sample is 9/16, 3/16, 3/16, 1/16 of its four
  nearest input samples, edges replicated, in libjpeg's integer rounding."""
  padded = jnp.pad(plane, ((0, 0), (1, 1), (0, 0)), mode="edge")
  above, here, below = padded[:, :-2], padded[:, 1:-1], padded[:, 2:]
  rows = jnp.stack([3 * here + above, 3 * here + below], axis=2)  # [B,h,2,w]: column sums
  b, h, _, w = rows.shape
  rows = rows.reshape(b, 2 * h, w)
  side = jnp.pad(rows, ((0, 0), (0, 0), (1, 1)), mode="edge")
  left, mid, right = side[:, :, :-2], side[:, :, 1:-1], side[:, :, 2:]
  even = jnp.floor((3 * mid + left + 8) / 16)
  odd = jnp.floor((3 * mid + right + 7) / 16)
  return jnp.stack([even, odd], axis=-1).reshape(b, 2 * h, 2 * w)


def _rgb_to_ycc(rgb: jax.Array) -> jax.Array:
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  y = 0.299 * r + 0.587 * g + 0.114 * b
  cb = -0.168735892 * r - 0.331264108 * g + 0.5 * b + 128
  cr = 0.5 * r - 0.418687589 * g - 0.081312411 * b + 128
  return jnp.floor(jnp.stack([y, cb, cr]) + 0.5)  # [3,B,H,W]


def _ycc_to_rgb(y: jax.Array, cb: jax.Array, cr: jax.Array) -> jax.Array:
  r = y + 1.402 * (cr - 128)
  g = y - 0.344136286 * (cb - 128) - 0.714136286 * (cr - 128)
  b = y + 1.772 * (cb - 128)
  return jnp.clip(jnp.floor(jnp.stack([r, g, b], -1) + 0.5), 0, 255)


@functools.partial(jax.jit, static_argnames=("quality", "subsample"))
def jpeg(images: jax.Array, quality: int = 75, subsample: bool = True) -> jax.Array:
  """JPEG-compresses and decompresses images [B,H,W,C] in [0, 1] (C = 1: greyscale, C = 3:
  YCbCr with 4:2:0 chroma subsampling where `subsample`, as Pillow's default)."""
  luma_table = quantization_table(_LUMA, quality)
  chroma_table = quantization_table(_CHROMA, quality)
  _, height, width, channels = images.shape
  samples = _round(jnp.clip(images, 0, 1) * 255)
  if channels == 1:
    plane = _code_plane(_pad_to(samples[..., 0], 8), luma_table)
    return (plane[:, :height, :width, None] / 255).astype(images.dtype)
  if channels != 3:
    raise ValueError(f"JPEG takes 1 or 3 channels; got {channels}")
  y, cb, cr = _rgb_to_ycc(samples)
  block = 16 if subsample else 8
  y = _code_plane(_pad_to(y, block), luma_table)
  chroma = []
  for plane in (cb, cr):
    plane = _pad_to(plane, block)
    if subsample:
      plane = _fancy_upsample(_code_plane(_downsample(plane), chroma_table))
    else:
      plane = _code_plane(plane, chroma_table)
    chroma.append(plane)
  rgb = _ycc_to_rgb(y, *chroma)[:, :height, :width]
  return (rgb / 255).astype(images.dtype)


@functools.partial(jax.jit, static_argnames=("bits",))
def bit_depth(images: jax.Array, bits: int = 4) -> jax.Array:
  """Each channel rounded to `bits` bits: 2**bits levels spread over [0, 1]."""
  levels = 2 ** bits - 1
  return jnp.round(jnp.clip(images, 0, 1) * levels) / levels


@functools.partial(jax.jit, static_argnames=("size",))
def median_smooth(images: jax.Array, size: int = 2) -> jax.Array:
  """The median of each `size` x `size` window per channel, edges replicated (an odd window
  is centred, as SciPy's `median_filter`; an even one reaches one further up and left, and
  its median is the mean of the two middle values)."""
  before, after = size // 2, (size - 1) // 2
  padded = jnp.pad(images, ((0, 0), (before, after), (before, after), (0, 0)), mode="edge")
  _, h, w, _ = images.shape
  windows = jnp.stack([padded[:, i:i + h, j:j + w] for i in range(size) for j in range(size)],
                      axis=-1)
  return jnp.median(windows, axis=-1).astype(images.dtype)


def random_resize_pad(images: jax.Array, keys: jax.Array, min_size: int) -> jax.Array:
  """Xie et al.'s randomization layers for a network of fixed input size S: each image is
  resized (bilinear) to r x r, r drawn uniformly from [min_size, S], and zero-padded back to
  S x S at a random offset, one draw per image from `keys` [B].

  Xie et al. enlarge 299 to r in [299, 331) and pad to 331 for an Inception network that
  takes any size; the zoo's networks take their training size, so the draw shrinks by the
  same ratio (299/331 ~ 0.9) instead. The resize and the padding are differentiable in the
  image: the gradient is not masked, it is random (Athalye et al. 2018: broken by EOT).
  """
  size = images.shape[1]
  if images.shape[2] != size:
    raise ValueError(f"random_resize_pad takes square images; got {images.shape[1:3]}")

  def one(image, key):
    k_size, k_top, k_left = jax.random.split(key, 3)
    r = jax.random.randint(k_size, (), min_size, size + 1)
    top = jax.random.randint(k_top, (), 0, size - r + 1)
    left = jax.random.randint(k_left, (), 0, size - r + 1)
    scale = jnp.full((2,), r / size, jnp.float32)
    offset = jnp.stack([top, left]).astype(jnp.float32)
    return jax.image.scale_and_translate(image, image.shape, (0, 1), scale, offset,
                                         method="linear", antialias=True)

  return jax.vmap(one)(images, keys)


def draw_keys(key: jax.Array, images: jax.Array) -> jax.Array:
  """One key per image from `key` and the image's exact pixel values.

  A randomized defense draws anew for every input it sees (every PGD step, every DE
  candidate), and the same (key, image) always gives the same draw, whatever the batch it
  is in: rows do not depend on batching, and a run is repeatable from its seed. The hash is
  a position-weighted sum of the pixels' bit patterns (wrapping uint32 arithmetic: exact in
  any reduction order), mixed once more through `fold_in`.
  """
  flat = jax.lax.stop_gradient(images).reshape(images.shape[0], -1).astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(flat + 0.0, jnp.uint32)  # + 0.0: -0.0 is 0.0
  positions = jnp.arange(bits.shape[1], dtype=jnp.uint32)
  weights = positions * jnp.uint32(2654435761) + jnp.uint32(1)
  first = jnp.sum(bits * (weights | jnp.uint32(1)), axis=1, dtype=jnp.uint32)
  second = jnp.sum((bits ^ (bits >> 13)) * (weights * jnp.uint32(40503) | jnp.uint32(1)),
                   axis=1, dtype=jnp.uint32)
  return jax.vmap(lambda a, b: jax.random.fold_in(jax.random.fold_in(key, a), b))(
      first, second)


def poisson_noise(key: jax.Array, images: jax.Array, exposure: float) -> jax.Array:
  """Observational noise (Ciprijanovic et al., DeepAdversaries): `images` in [0, 1] read as
  photon counts at `exposure` counts for a white pixel, `Poisson(exposure * x) / exposure`,
  clipped to [0, 1]. Smaller exposures are noisier; the noise is unbiased with variance
  x / exposure."""
  counts = jax.random.poisson(key, exposure * jnp.asarray(images, jnp.float32))
  return jnp.clip(counts / exposure, 0.0, 1.0).astype(jnp.float32)
