"""Tiny models with known answers, for attack tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def linear_model(height=6, width=6, channels=1, num_classes=4, seed=0):
  """A linear softmax classifier on flattened images: logits = x W + b."""
  rng = np.random.default_rng(seed)
  dim = height * width * channels
  params = {"w": jnp.asarray(rng.normal(size=(dim, num_classes)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(num_classes,)) * 0.1, jnp.float32)}

  def apply_fn(params, images):
    return images.reshape(images.shape[0], -1) @ params["w"] + params["b"]

  return apply_fn, params


def small_cnn(height=8, width=8, channels=3, num_classes=5, seed=0):
  """A two-layer ReLU convnet with random weights (non-linear, cheap)."""
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(8, (3, 3))(x))
      x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2))(x))
      return nn.Dense(num_classes)(x.reshape(x.shape[0], -1))

  net = Net()
  params = net.init(jax.random.key(seed), jnp.zeros((1, height, width, channels)))
  return net.apply, params


def random_images(n, height=6, width=6, channels=1, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(0.05, 0.95, size=(n, height, width, channels)), jnp.float32)
