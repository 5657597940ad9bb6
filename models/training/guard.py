"""The overfitting guard: PGD-10 accuracy on training images, checked a few times an epoch, and
the check whose weights ship (Wong, Rice, Kolter 2020 detect catastrophic overfitting so)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from advsweep.attacks import gradient
from advsweep.models import zoo

GUARD_IMAGES = 512
GUARD_DROP = 0.2   # a fall of PGD accuracy by more than this stops the run
GUARD_CHECKS = 4   # checks per epoch: the collapse can come within an epoch


@functools.lru_cache(maxsize=8)
def make_guard(module, recipe: zoo.TrainRecipe):
  """PGD-10 accuracy at the recipe's eps (step eps/4, random start), for the overfitting
  guard: Wong et al. detect catastrophic overfitting by PGD accuracy on training data."""
  config = gradient.PGDConfig(eps=recipe.epsilon, step_size=recipe.epsilon / 4, num_steps=10)
  apply_fn = zoo.ApplyFn(module)

  @jax.jit
  def robust_correct(variables, images_u8, labels, key):
    images = images_u8.astype(jnp.float32) / 255.0
    result = gradient.pgd_core(apply_fn, variables, images, labels, key, config)
    return jnp.sum(~result.success)

  def accuracy(variables, images_u8, labels, key) -> float:
    total = 0
    for start in range(0, len(labels), 256):
      total += int(robust_correct(variables, images_u8[start:start + 256],
                                  labels[start:start + 256], jax.random.fold_in(key, start)))
    return total / len(labels)

  return accuracy


def last_best(robust: np.ndarray) -> int:
  """The index of the guard's best check, the last of equal ones (as the loop keeps them)."""
  return int(len(robust) - 1 - np.argmax(robust[::-1]))
