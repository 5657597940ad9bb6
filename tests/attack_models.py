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


def advgan_config(image_shape, num_classes, eps=0.05, target="untargeted", seed=0):
  """An AdvGAN config whose generator is freshly initialised (untrained) for these shapes."""
  from advsweep import attacks
  from advsweep.attacks.advgan import training

  recipe = training.AdvGANRecipe(eps=eps, targeted=target != "untargeted")
  generator, _ = training.init(jax.random.key(seed), recipe, tuple(image_shape), num_classes)
  # Biases start at zero, and instance norm over a 1x1 map gives zero: on tiny images a fresh
  # generator's output is exactly zero. Noise on every parameter makes it perturb.
  leaves, tree = jax.tree.flatten(generator)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  generator = jax.tree.unflatten(tree, [v + 0.3 * jax.random.normal(k, v.shape)
                                        for v, k in zip(leaves, keys, strict=True)])
  return attacks.AdvGANConfig(eps=eps, target=target, generator=generator,
                              image_shape=tuple(image_shape))
