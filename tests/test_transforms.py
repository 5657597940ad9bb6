"""Input transformations against references: JPEG against Pillow's libjpeg on real CIFAR-10
and MNIST test images, the median filter against SciPy, bit-depth reduction by its levels."""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advsweep.models import datasets, transforms
from tests.conftest import DATA_DIR, requires_data


def _pillow_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
  from PIL import Image

  mode = "L" if image.shape[-1] == 1 else "RGB"
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if mode == "L" else image, mode).save(
      buffer, "JPEG", quality=quality)  # Pillow's default: 4:2:0 subsampling for RGB
  decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert(mode))
  return decoded[..., None] if mode == "L" else decoded


# Measured on the first 200 test images (results/perf/NOTES.md), bounds with some margin:
# (mean |difference| in /255 units, largest difference, share of values within 1).
BOUNDS = {("cifar10", 75): (0.45, 20, 0.88), ("mnist", 75): (0.2, 20, 0.95),
          ("cifar10", 25): (0.3, 30, 0.93), ("mnist", 25): (0.12, 45, 0.97)}


@requires_data
@pytest.mark.parametrize("name,quality", list(BOUNDS))
def test_jpeg_matches_libjpeg_on_real_images(name, quality):
  images, _ = datasets.load(name, "test", DATA_DIR)
  images = images[:50]
  reference = np.stack([_pillow_jpeg(i, quality) for i in images]).astype(np.float64)
  ours = np.asarray(transforms.jpeg(jnp.asarray(images, jnp.float32) / 255, quality=quality))
  difference = np.abs(np.round(ours * 255) - reference)
  mean, largest, within_one = BOUNDS[name, quality]
  assert difference.mean() <= mean and difference.max() <= largest
  assert np.mean(difference <= 1) >= within_one
  # And it is a lossy transform, not the identity: it moves the image as libjpeg does.
  moved = np.abs(reference - images).mean()
  assert moved > 3 * difference.mean()


def test_jpeg_keeps_shapes_ranges_and_jits_in_a_batch():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(size=(3, 13, 10, 3)), jnp.float32)  # not multiples of 8
  out = transforms.jpeg(images, quality=50)
  assert out.shape == images.shape and out.dtype == images.dtype
  assert float(out.min()) >= 0 and float(out.max()) <= 1
  one = transforms.jpeg(images[1:2], quality=50)
  np.testing.assert_array_equal(np.asarray(out[1:2]), np.asarray(one))
  grey = transforms.jpeg(images[..., :1], quality=50)
  assert grey.shape == (3, 13, 10, 1)
  with pytest.raises(ValueError, match=r"quality must be in \[1, 100\]"):
    transforms.jpeg(images, quality=0)
  assert transforms.quantization_table(transforms._LUMA, 50)[0, 0] == 16  # noqa: SLF001
  # libjpeg's integer scale at q 30: 5000 // 30 = 166, (99 * 166 + 50) // 100 = 164.
  assert transforms.quantization_table(transforms._CHROMA, 30)[7, 7] == 164  # noqa: SLF001
  grads = jax.grad(lambda x: transforms.jpeg(x, quality=50).sum())(images)
  assert not np.asarray(grads).any()  # rounding: zero gradient, hence BPDA


def test_median_smooth_matches_scipy():
  ndimage = pytest.importorskip("scipy.ndimage")
  rng = np.random.default_rng(1)
  images = rng.uniform(size=(2, 9, 7, 3)).astype(np.float32)
  ours = np.asarray(transforms.median_smooth(jnp.asarray(images), size=3))
  theirs = ndimage.median_filter(images, size=(1, 3, 3, 1), mode="nearest")
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-7)
  # An even window (SciPy takes one of the two middle values there, we their mean):
  ours = np.asarray(transforms.median_smooth(jnp.asarray(images), size=2))
  windows = np.stack([np.pad(images, ((0, 0), (1, 0), (1, 0), (0, 0)), mode="edge")
                      [:, i:i + 9, j:j + 7] for i in range(2) for j in range(2)], -1)
  np.testing.assert_allclose(ours, np.median(windows, -1), atol=1e-7)


def test_bit_depth_has_its_levels():
  values = jnp.linspace(0, 1, 101).reshape(1, 101, 1, 1)
  out = np.asarray(transforms.bit_depth(values, bits=2))
  np.testing.assert_allclose(np.unique(out), [0, 1 / 3, 2 / 3, 1], atol=1e-7)
  assert np.abs(out - np.asarray(values)).max() <= 1 / 6 + 1e-6
