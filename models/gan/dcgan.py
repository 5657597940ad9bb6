"""A class-conditional DCGAN (Radford, Metz, Chintala 2016) for the zoo's image sizes.

The generator maps a latent vector and a class to an image: a dense layer to a 4 x 4-scaled
feature map (for 28 x 28 images 7 x 7 x 4w), then stride-2 transposed convolutions with
BatchNorm and ReLU that halve the channels and double the size, and a last transposed
convolution to the image's channels with tanh, mapped to [0, 1]. The discriminator mirrors
it: stride-2 convolutions with LeakyReLU 0.2 and BatchNorm (none on its first layer, as the
paper), then one logit. Both take the class as input (the one-hot vector concatenated to the
latent; as constant channels of the image for the discriminator). Adam 2e-4 with beta1 0.5,
the non-saturating loss, weights drawn from N(0, 0.02), as the paper.

The slides on Papernot et al.'s paper (the seeds' "Defenses" slide) name DCGAN samples as
a source of adversarial training data; `models.gan.quality` measures the samples (the zoo
classifier's accuracy on each class, a Frechet distance on its features).

References: Radford, Metz, Chintala, Unsupervised Representation Learning with Deep
Convolutional Generative Adversarial Networks, ICLR 2016. Mirza, Osindero, Conditional
Generative Adversarial Nets, 2014.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from advsweep.attacks.advgan.networks import with_target_channels

_INIT = nn.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class DCGANRecipe:
  """How the DCGAN is trained (the paper's optimiser; the width sized for this CPU).

  Attributes:
    latent: the latent vector's size.
    width: the generator's last hidden channels (its first has 2 x width, the
      discriminator's width and 2 x width).
    learning_rate, b1: Adam's (the paper's 2e-4 and 0.5).
    batch_size, epochs: the training run.
  """

  latent: int = 64
  width: int = 32
  learning_rate: float = 2e-4
  b1: float = 0.5
  batch_size: int = 128
  epochs: int = 10


class Generator(nn.Module):
  """`(z [B,latent], classes [B], train) -> images [B,H,W,C]` in [0, 1]."""

  image_shape: tuple[int, int, int]
  num_classes: int = 10
  width: int = 32

  @nn.compact
  def __call__(self, z: jax.Array, classes: jax.Array, train: bool = False) -> jax.Array:
    height, width_px, channels = self.image_shape
    if height % 4 or width_px % 4:
      raise ValueError(f"the DCGAN needs image sides divisible by 4; got {height}x{width_px}")
    bn = lambda y: nn.BatchNorm(use_running_average=not train)(y)  # noqa: E731
    x = jnp.concatenate([z, jax.nn.one_hot(classes, self.num_classes, dtype=z.dtype)], -1)
    x = nn.Dense(height // 4 * width_px // 4 * 2 * self.width, kernel_init=_INIT)(x)
    x = nn.relu(bn(x.reshape(-1, height // 4, width_px // 4, 2 * self.width)))
    x = nn.ConvTranspose(self.width, (4, 4), strides=(2, 2), kernel_init=_INIT)(x)
    x = nn.relu(bn(x))
    x = nn.ConvTranspose(channels, (4, 4), strides=(2, 2), kernel_init=_INIT)(x)
    return (jnp.tanh(x) + 1.0) / 2.0


class Discriminator(nn.Module):
  """`(images [B,H,W,C] in [0, 1], classes [B], train) -> [B]` logits that the image is
  real."""

  num_classes: int = 10
  width: int = 32

  @nn.compact
  def __call__(self, images: jax.Array, classes: jax.Array, train: bool = True) -> jax.Array:
    x = with_target_channels(images * 2.0 - 1.0, classes, self.num_classes)
    x = nn.leaky_relu(nn.Conv(self.width, (4, 4), strides=(2, 2), kernel_init=_INIT)(x), 0.2)
    x = nn.Conv(2 * self.width, (4, 4), strides=(2, 2), kernel_init=_INIT)(x)
    x = nn.leaky_relu(nn.BatchNorm(use_running_average=not train)(x), 0.2)
    return nn.Dense(1, kernel_init=_INIT)(x.reshape(x.shape[0], -1))[:, 0]


def networks(recipe: DCGANRecipe, image_shape: tuple[int, int, int], num_classes: int
             ) -> tuple[Generator, Discriminator]:
  return (Generator(tuple(image_shape), num_classes, recipe.width),
          Discriminator(num_classes, recipe.width))


def init(key: jax.Array, recipe: DCGANRecipe, image_shape: tuple[int, int, int],
         num_classes: int) -> tuple[Any, Any]:
  """Fresh generator and discriminator variables."""
  gen, disc = networks(recipe, image_shape, num_classes)
  g_key, d_key = jax.random.split(key)
  classes = jnp.zeros((2,), jnp.int32)
  g_vars = gen.init(g_key, jnp.zeros((2, recipe.latent)), classes)
  d_vars = disc.init(d_key, jnp.zeros((2, *image_shape)), classes)
  return g_vars, d_vars


def optimizer(recipe: DCGANRecipe) -> optax.GradientTransformation:
  return optax.adam(recipe.learning_rate, b1=recipe.b1)


def make_step(recipe: DCGANRecipe, image_shape: tuple[int, int, int], num_classes: int,
              tx: optax.GradientTransformation | None = None) -> Callable[..., Any]:
  """`step(gen, disc, gen_opt, disc_opt, images, labels, key) -> (gen, disc, gen_opt,
  disc_opt, metrics)`, pure and jitted; metrics [4]: the generator's loss, the
  discriminator's, and D's mean probability on real and on generated images.

  D takes one step on the real batch and a generated batch of the same classes (each its
  own BatchNorm batch, as the paper's reference code); then G one step on fresh latents
  against the updated D, with the non-saturating loss -log D(G(z)). `tx` replaces the
  recipe's optimiser (`optimizer(recipe)`) for both networks.
  """
  gen_net, disc_net = networks(recipe, image_shape, num_classes)
  tx = tx or optimizer(recipe)

  @jax.jit
  def step(gen, disc, gen_opt, disc_opt, images, labels, key):
    d_key, g_key = jax.random.split(key)

    def generate(g, k):
      z = jax.random.normal(k, (len(labels), recipe.latent), images.dtype)
      fake, updates = gen_net.apply(g, z, labels, train=True, mutable=["batch_stats"])
      return fake, {**g, **updates}

    fake, _ = generate(gen, d_key)
    fake = jax.lax.stop_gradient(fake)

    def disc_loss(params):
      variables = {**disc, "params": params}
      real_logits, upd = disc_net.apply(variables, images, labels, mutable=["batch_stats"])
      fake_logits, upd = disc_net.apply({**variables, **upd}, fake, labels,
                                        mutable=["batch_stats"])
      loss = (jnp.mean(jax.nn.softplus(-real_logits))
              + jnp.mean(jax.nn.softplus(fake_logits)))
      probs = (jnp.mean(jax.nn.sigmoid(real_logits)), jnp.mean(jax.nn.sigmoid(fake_logits)))
      return loss, (upd, probs)

    (d_loss, (d_upd, (p_real, p_fake))), d_grads = jax.value_and_grad(
        disc_loss, has_aux=True)(disc["params"])
    d_updates, disc_opt = tx.update(d_grads, disc_opt, disc["params"])
    disc = {**disc, **d_upd, "params": optax.apply_updates(disc["params"], d_updates)}

    def gen_loss(params):
      fake, new_gen = generate({**gen, "params": params}, g_key)
      logits, _ = disc_net.apply(disc, fake, labels, mutable=["batch_stats"])
      return jnp.mean(jax.nn.softplus(-logits)), new_gen

    (g_loss, new_gen), g_grads = jax.value_and_grad(gen_loss, has_aux=True)(gen["params"])
    g_updates, gen_opt = tx.update(g_grads, gen_opt, gen["params"])
    gen = {**new_gen, "params": optax.apply_updates(gen["params"], g_updates)}
    return gen, disc, gen_opt, disc_opt, jnp.stack([g_loss, d_loss, p_real, p_fake])

  return step


def sample(generator: Any, recipe: DCGANRecipe, image_shape: tuple[int, int, int],
           num_classes: int, classes: jax.Array, key: jax.Array) -> jax.Array:
  """[B,H,W,C] generated images of `classes` (the generator in inference mode)."""
  gen_net, _ = networks(recipe, image_shape, num_classes)
  z = jax.random.normal(key, (len(classes), recipe.latent))
  return gen_net.apply(generator, z, jnp.asarray(classes, jnp.int32), train=False)
