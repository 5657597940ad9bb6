"""Users' models as a user writes them, for tests/test_byo.py: one in plain `jax.numpy`
(7 classes, 20x24x3 images, no Flax), one with Flax's NNX API. Both leave the dataset to
the config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from advsweep.models import custom, zoo

SHAPE = (20, 24, 3)
CLASSES = 7


def _plain_params(seed: int = 0) -> dict[str, jnp.ndarray]:
  rng = np.random.default_rng(seed)
  return {"conv": jnp.asarray(rng.normal(size=(3, 3, 3, 6)) * 0.5, jnp.float32),
          "dense": jnp.asarray(rng.normal(size=(10 * 12 * 6, CLASSES)) * 0.1, jnp.float32)}


def _plain_apply(params, images):
  x = jax.lax.conv_general_dilated(images * 2 - 1, params["conv"], (2, 2), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.tanh(x).reshape(images.shape[0], -1) @ params["dense"]


def seven_class() -> zoo.Model:
  """A convnet in plain jax.numpy: 7 classes on 20x24x3 images."""
  return custom.model("seven_class", _plain_apply, _plain_params(), num_classes=CLASSES,
                      architecture="plain-jax convnet")


def nnx_model() -> zoo.Model:
  """The same task with Flax's NNX API: split into a graph and a state, merged per call."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.conv = nnx.Conv(3, 4, (3, 3), strides=(2, 2), rngs=rngs)
      self.dense = nnx.Linear(10 * 12 * 4, CLASSES, rngs=rngs)

    def __call__(self, x):
      return self.dense(nnx.relu(self.conv(x)).reshape(x.shape[0], -1))

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))

  def apply_fn(state, images):
    return nnx.merge(graphdef, state)(images)

  return custom.model("nnx_net", apply_fn, state, architecture="flax nnx")


def labelled_data(model: zoo.Model, n: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random images labelled by the model itself (so it classifies them all correctly)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, *SHAPE), dtype=np.uint8)
  logits = model.apply_fn(model.params, jnp.asarray(images, jnp.float32) / 255)
  labels = np.asarray(jnp.argmax(logits, -1), np.int64)
  return {"x_test": images, "y_test": labels}
