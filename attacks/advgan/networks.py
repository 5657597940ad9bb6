"""AdvGAN's two networks (Xiao et al. 2018, Sec. 3 and their appendix): a generator that maps
an image to a bounded perturbation, and a discriminator that tells clean images from
perturbed ones.

The generator is an image-to-image network in the style the paper takes from Isola et al.
and Zhu et al.: a 3x3 convolution of `width` channels, two stride-2 downsampling
convolutions (2 and 4 times `width`), four residual blocks, two stride-2 transposed
convolutions back up and a 3x3 convolution to the image's channels, instance norm and ReLU
throughout (c3s1-8, d16, d32, r32 x 4, u16, u8, c3s1-C at the paper's width 8). Instance
norm keeps every image's perturbation a function of that image alone, so a batch attacks
each image as it would alone. Its output is tanh'd into (-1, 1) per feature; the attack
scales it by eps (`core.perturb`).

A targeted generator takes the target class as `num_classes` extra input channels (the
one-hot vector broadcast over the image): one network for every target, where the paper
trains one per target class.

The discriminator is C8 (no norm), C16, C32: 4x4 convolutions of stride 2 with instance
norm (but the first) and LeakyReLU 0.2, then one logit.

References: Xiao, Li, Zhu, He, Liu, Song, Generating Adversarial Examples with Adversarial
Networks, IJCAI 2018.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def with_target_channels(images: jax.Array, targets: jax.Array, num_classes: int
                         ) -> jax.Array:
  """[B,H,W,C+K] the images with the target's one-hot vector as K constant channels."""
  onehot = jax.nn.one_hot(targets, num_classes, dtype=images.dtype)
  maps = jnp.broadcast_to(onehot[:, None, None, :], (*images.shape[:3], num_classes))
  return jnp.concatenate([images, maps], axis=-1)


class _Residual(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.relu(nn.InstanceNorm()(nn.Conv(self.features, (3, 3))(x)))
    y = nn.InstanceNorm()(nn.Conv(self.features, (3, 3))(y))
    return x + y


class PerturbationGenerator(nn.Module):
  """`(images [B,H,W,C] in [0, 1], targets [B] or None) -> [B,H,W,C]` in (-1, 1).

  Attributes:
    num_classes: classes of the target model (the targeted generator's extra channels).
    targeted: take a target class per image.
    width: channels of the first layer (the paper's 8); the blocks have 4 x width.
  """

  num_classes: int = 10
  targeted: bool = False
  width: int = 8

  @nn.compact
  def __call__(self, images: jax.Array, targets: jax.Array | None = None) -> jax.Array:
    height, width_px, channels = images.shape[1:]
    x = images
    if self.targeted:
      if targets is None:
        raise ValueError("a targeted generator needs targets=[B] class indices")
      x = with_target_channels(x, targets, self.num_classes)
    norm_relu = lambda y: nn.relu(nn.InstanceNorm()(y))  # noqa: E731
    x = norm_relu(nn.Conv(self.width, (3, 3))(x))
    x = norm_relu(nn.Conv(2 * self.width, (3, 3), strides=(2, 2))(x))
    x = norm_relu(nn.Conv(4 * self.width, (3, 3), strides=(2, 2))(x))
    for _ in range(4):
      x = _Residual(4 * self.width)(x)
    x = norm_relu(nn.ConvTranspose(2 * self.width, (3, 3), strides=(2, 2))(x))
    x = norm_relu(nn.ConvTranspose(self.width, (3, 3), strides=(2, 2))(x))
    x = x[:, :height, :width_px]  # two stride-2 steps round odd sizes up: crop back
    return jnp.tanh(nn.Conv(channels, (3, 3))(x))


class Discriminator(nn.Module):
  """`images [B,H,W,C] -> [B]` logits that the image is clean (not generated)."""

  width: int = 8

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = nn.leaky_relu(nn.Conv(self.width, (4, 4), strides=(2, 2))(images), 0.2)
    for scale in (2, 4):
      x = nn.Conv(scale * self.width, (4, 4), strides=(2, 2))(x)
      x = nn.leaky_relu(nn.InstanceNorm()(x), 0.2)
    return nn.Dense(1)(x.reshape(x.shape[0], -1))[:, 0]
