"""Training AdvGAN's generator against a target model: the paper's loss and one jitted step.

The generator G minimises (Xiao et al. 2018, Eq. 4)

    L = adv_weight * L_adv + gan_weight * L_GAN + hinge_weight * L_hinge

- L_adv, the C&W margin on the target's logits Z at x' = clip(x + eps G(x), 0, 1):
  untargeted max(Z_y - max_{i != y} Z_i, -kappa), targeted max(max_{i != t} Z_i - Z_t,
  -kappa) (the paper's Eq. 2-3);
- L_GAN, the non-saturating GAN loss -log D(x'), so perturbed images look like data;
- L_hinge = max(0, ||x' - x||_2 - c), the soft hinge on the perturbation's L2 norm, with
  c = `hinge_bound` times the largest L2 norm the L-inf budget allows (eps sqrt(d)).

The discriminator D minimises -log D(x) - log(1 - D(x')). Each step updates D once, then G
against the updated D. A targeted generator trains on a random other class per image, drawn
from the step's key. The step is pure and jitted; the training loop with its checkpoints is
`advsweep.models.gan.loop`.

References: Xiao, Li, Zhu, He, Liu, Song, Generating Adversarial Examples with Adversarial
Networks, IJCAI 2018. Carlini, Wagner, Towards Evaluating the Robustness of Neural Networks,
IEEE S&P 2017 (the margin loss).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from advsweep.attacks.advgan import core
from advsweep.attacks.advgan.networks import Discriminator, PerturbationGenerator


@dataclasses.dataclass(frozen=True)
class AdvGANRecipe:
  """How a generator is trained against one target model.

  Attributes:
    eps: the L-inf budget it is trained (and used) at.
    targeted: train the targeted generator (target class as input).
    width: the generator's and discriminator's first-layer channels (the paper's 8).
    adv_weight, gan_weight, hinge_weight: the loss's weights (the public implementations'
      10, 1, 1).
    hinge_bound: c of the hinge, as a share of eps * sqrt(d).
    kappa: the margin's confidence, in logits (C&W's kappa): the loss keeps pushing an
      image until its margin reaches -kappa. At 0 it stops at the boundary, where the GAN
      loss and the hinge pull the examples back, so many unseen images fall short.
    learning_rate, b1: Adam's, for both networks.
    batch_size, epochs: the training run.
  """

  eps: float = 0.3
  targeted: bool = False
  width: int = 8
  adv_weight: float = 10.0
  gan_weight: float = 1.0
  hinge_weight: float = 1.0
  hinge_bound: float = 0.5
  kappa: float = 5.0
  learning_rate: float = 1e-3
  b1: float = 0.5
  batch_size: int = 128
  epochs: int = 4


def margin_loss(logits: jax.Array, labels: jax.Array, targets: jax.Array | None,
                kappa: float) -> jax.Array:
  """[B] the C&W margin: how far the image is from the attack's goal, floored at -kappa."""
  num_classes = logits.shape[-1]
  if targets is None:
    own = jax.nn.one_hot(labels, num_classes, dtype=bool)
    gap = (jnp.sum(jnp.where(own, logits, 0.0), -1)
           - jnp.max(jnp.where(own, -jnp.inf, logits), -1))
  else:
    aim = jax.nn.one_hot(targets, num_classes, dtype=bool)
    gap = (jnp.max(jnp.where(aim, -jnp.inf, logits), -1)
           - jnp.sum(jnp.where(aim, logits, 0.0), -1))
  return jnp.maximum(gap, -kappa)


def random_other_class(key: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """[B] a class other than each label, uniform (the targeted generator's training targets)."""
  offset = jax.random.randint(key, labels.shape, 1, num_classes)
  return ((labels + offset) % num_classes).astype(jnp.int32)


def init(key: jax.Array, recipe: AdvGANRecipe, image_shape: tuple[int, int, int],
         num_classes: int) -> tuple[Any, Any]:
  """Fresh generator and discriminator variables for images of `image_shape`."""
  g_key, d_key = jax.random.split(key)
  x = jnp.zeros((1, *image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  gen = PerturbationGenerator(num_classes, recipe.targeted, recipe.width)
  return gen.init(g_key, x, t if recipe.targeted else None), \
      Discriminator(recipe.width).init(d_key, x)


def optimizer(recipe: AdvGANRecipe) -> optax.GradientTransformation:
  return optax.adam(recipe.learning_rate, b1=recipe.b1)


def make_step(apply_fn: Callable[[Any, jax.Array], jax.Array], recipe: AdvGANRecipe,
              num_classes: int, tx: optax.GradientTransformation | None = None
              ) -> Callable[..., Any]:
  """`step(target_params, gen, disc, gen_opt, disc_opt, images, labels, key) -> (gen, disc,
  gen_opt, disc_opt, metrics)`, pure and jitted; metrics [4]: the generator's loss, the
  discriminator's, L_adv and the batch's attack success rate. `tx` replaces the recipe's
  optimiser (`optimizer(recipe)`) for both networks."""
  disc_net = Discriminator(recipe.width)
  tx = tx or optimizer(recipe)
  hinge_c = recipe.hinge_bound * recipe.eps

  def adversarial(gen, images, targets):
    return core.perturb(gen, images, targets, recipe.eps, num_classes=num_classes,
                        targeted=recipe.targeted, width=recipe.width)

  @jax.jit
  def step(target_params, gen, disc, gen_opt, disc_opt, images, labels, key):
    targets = random_other_class(key, labels, num_classes) if recipe.targeted else None
    adv = jax.lax.stop_gradient(adversarial(gen, images, targets))

    def disc_loss(d):
      return (jnp.mean(jax.nn.softplus(-disc_net.apply(d, images)))
              + jnp.mean(jax.nn.softplus(disc_net.apply(d, adv))))

    d_loss, d_grads = jax.value_and_grad(disc_loss)(disc)
    d_updates, disc_opt = tx.update(d_grads, disc_opt, disc)
    disc = optax.apply_updates(disc, d_updates)
    scale = math.sqrt(math.prod(images.shape[1:]))

    def gen_loss(g):
      x_adv = adversarial(g, images, targets)
      logits = apply_fn(target_params, x_adv)
      l_adv = jnp.mean(margin_loss(logits, labels, targets, recipe.kappa))
      l_gan = jnp.mean(jax.nn.softplus(-disc_net.apply(disc, x_adv)))
      norm = jnp.linalg.norm((x_adv - images).reshape(len(images), -1), axis=-1)
      l_hinge = jnp.mean(jnp.maximum(norm - hinge_c * scale, 0.0))
      loss = (recipe.adv_weight * l_adv + recipe.gan_weight * l_gan
              + recipe.hinge_weight * l_hinge)
      pred = jnp.argmax(logits, -1)
      success = pred == targets if targets is not None else pred != labels
      return loss, (l_adv, jnp.mean(success))

    (g_loss, (l_adv, success)), g_grads = jax.value_and_grad(gen_loss, has_aux=True)(gen)
    g_updates, gen_opt = tx.update(g_grads, gen_opt, gen)
    gen = optax.apply_updates(gen, g_updates)
    return gen, disc, gen_opt, disc_opt, jnp.stack([g_loss, d_loss, l_adv, success])

  return step
