"""The adversary of adversarial training: the attack config a recipe asks for, N-FGSM's
training example, and the ramp of eps over the first steps."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from advsweep.attacks import gradient
from advsweep.models import zoo


def training_attack(recipe: zoo.TrainRecipe) -> Any:
  """The attack config of an adversarial recipe (`attacks.gradient`), None for plain
  training: FGSM at eps (Goodfellow et al.), FGSM from a random start with step 1.25 eps
  (Wong et al.'s default), or PGD with steps of 2.5 eps / steps (Madry et al.)."""
  if recipe.adversary is None or recipe.adversary == "advgan":  # no gradient attack
    return None
  eps = recipe.epsilon
  if recipe.adversary == "fgsm":  # FGSM as the PGD setting it is: one step of eps
    return gradient.PGDConfig(eps=eps, step_size=eps, num_steps=1, random_start=False)
  if recipe.adversary == "fgsm_rs":
    step = recipe.adv_step if recipe.adv_step is not None else 1.25 * eps
    return gradient.PGDConfig(eps=eps, step_size=step, num_steps=1, random_start=True)
  if recipe.adversary == "pgd":
    step = recipe.adv_step if recipe.adv_step is not None else 2.5 * eps / recipe.adv_steps
    return gradient.PGDConfig(eps=eps, step_size=step, num_steps=recipe.adv_steps)
  if recipe.adversary == "n_fgsm":  # the PGD fields carry N-FGSM's eps and step
    step = recipe.adv_step if recipe.adv_step is not None else eps
    return gradient.PGDConfig(eps=eps, step_size=step, num_steps=1)
  raise ValueError(f"unknown adversary {recipe.adversary!r}; valid choices: fgsm, fgsm_rs, "
                   "pgd, n_fgsm, advgan")


def generator_examples(recipe: zoo.TrainRecipe) -> Any:
  """`(images, eps) -> adversarial images` of the shipped AdvGAN generator trained against
  zoo model `recipe.adv_generator` at `recipe.epsilon` (untargeted): the slides' defense,
  training on GAN-made adversarial examples. Traceable; the generator is a constant."""
  from advsweep.attacks.advgan import core, training  # the generator's networks
  from advsweep.models.gan import generators

  if not recipe.adv_generator:
    raise ValueError("the advgan adversary needs adv_generator: the zoo model whose AdvGAN "
                     "generator makes the training examples")
  target = zoo.load(recipe.adv_generator)
  generator, meta = generators.advgan_generator(
      target, training.AdvGANRecipe(eps=recipe.epsilon), train=False)
  num_classes = int(meta["num_classes"])

  def examples(images: jax.Array, eps: Any) -> jax.Array:
    return core.perturb(generator, images, None, eps, num_classes=num_classes,
                        targeted=False, width=training.AdvGANRecipe().width)

  return examples


def n_fgsm(apply_fn: Any, params: Any, images: jax.Array, labels: jax.Array, key: jax.Array,
           eps: jax.Array, step: jax.Array, noise: float) -> jax.Array:
  """N-FGSM's training example (de Jorge et al. 2022, "Make some noise"): uniform noise of
  half-width `noise * eps` (kept in [0, 1]), one signed gradient step of `step` from there,
  no projection back onto the eps ball (only onto [0, 1]). The larger noise and the missing
  clip are what de Jorge et al. credit for single-step training without catastrophic
  overfitting at 8/255 on PreAct ResNet-18 (not on the zoo's narrower ResNet-20: see the
  CIFAR-10 recipe in `models.zoo`)."""
  start = jnp.clip(images + jax.random.uniform(key, images.shape, images.dtype, -noise * eps,
                                               noise * eps), 0.0, 1.0)

  def loss(x):
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x),
                                                                   labels))

  return jnp.clip(start + step * jnp.sign(jax.grad(loss)(start)), 0.0, 1.0)


def eps_scale(recipe: zoo.TrainRecipe, step: int, total: int) -> float:
  """The share of `epsilon` the training attack uses at `step` (`TrainRecipe.epsilon_ramp`)."""
  ramp = recipe.epsilon_ramp * total
  return 1.0 if ramp <= 0 else min(1.0, (step + 1) / ramp)
