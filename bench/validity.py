"""AutoAttack's checks, one named function each: signs that an evaluation's figure cannot be
trusted as it stands.

Each check returns a `Flag` (or None) whose `name` is a section of `docs/flags.md`, where
every flag is explained with what to do about it. `check_budget` is not a flag but a
guard: an attack's output outside its budget or the [0, 1] box is a bug, and the
evaluation stops rather than count it.

References:
  Croce, Hein, Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks, ICML 2020 (autoattack/checks.py of their code: randomness,
  softmax output, zero gradients, Square's success).
  Carlini et al., On evaluating adversarial robustness, 2019 (Sec. 3-5: gradient-free
  attacks beating gradient attacks signal masking).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

DOC = "docs/flags.md"
SATURATED = 1 - 1e-6  # a top softmax probability this close to 1 leaves CE without gradient
SATURATED_SHARE = 0.5
ZERO_GRADIENT_SHARE = 0.05
DLR_GAP = 0.05  # APGD-T fooling this share of all images that APGD-CE left


@dataclasses.dataclass(frozen=True)
class Flag:
  """A finding: `name` is its section in docs/flags.md, `message` the line to print."""

  name: str
  message: str

  def __str__(self) -> str:
    return f"FLAG {self.name}: {self.message} (see {DOC}#{self.name.replace('_', '-')})"


def randomized_forward(apply_fn: Any, params: Any, images: np.ndarray) -> Flag | None:
  """The model gives different logits for the same images twice: a randomized defense,
  whose figure needs the `rand` version (attacks on the expectation over draws)."""
  x = jnp.asarray(images)
  first, second = np.asarray(apply_fn(params, x)), np.asarray(apply_fn(params, x))
  if np.allclose(first, second, rtol=1e-5, atol=1e-5, equal_nan=True):
    return None
  return Flag("randomized_forward", "the model's output changes between two calls on the "
              "same images: evaluate it with version 'rand' (EOT over 20 draws)")


def softmax_output(logits: np.ndarray) -> Flag | None:
  """The outputs are probabilities (in [0, 1], rows summing to 1), not logits: CE and DLR
  on them are wrong losses."""
  if logits.size and logits.min() >= 0 and logits.max() <= 1 and np.allclose(
      logits.sum(-1), 1, atol=1e-4):
    return Flag("softmax_output", "the model returns probabilities, not logits: pass the "
                "function before its softmax")
  return None


def saturated_softmax(logits: np.ndarray) -> Flag | None:
  """Most clean images get a top softmax probability of 1 to float precision: the
  cross-entropy's gradient vanishes there and CE-based attacks stall (DLR does not)."""
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1))
  share = float((probs.max(-1) >= SATURATED).mean()) if len(probs) else 0.0
  if share <= SATURATED_SHARE:
    return None
  return Flag("saturated_softmax", f"{100 * share:.0f}% of clean images have a top "
              f"probability >= {SATURATED}: cross-entropy gradients vanish; trust the DLR "
              "and Square columns over APGD-CE")


def zero_gradients(apply_fn: Any, params: Any, images: np.ndarray, labels: np.ndarray
                   ) -> Flag | None:
  """Images whose cross-entropy gradient is all zero or not finite: gradient attacks see
  nothing there (shattered or masked gradients)."""
  def loss(x):
    logits = apply_fn(params, x)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.asarray(labels, jnp.int32)))

  try:
    grad = np.asarray(jax.grad(loss)(jnp.asarray(images))).reshape(len(images), -1)
  except Exception as err:  # JAX raises several types for a function it cannot differentiate
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise ValueError(f"the model cannot be differentiated ({first}): APGD and FAB need "
                     "input gradients; pass attack_apply_fn, a differentiable stand-in "
                     "(BPDA: the identity's gradient through a non-differentiable step)"
                     ) from err
  bad = ~np.isfinite(grad).all(-1) | (np.abs(grad).max(-1) == 0)
  share = float(bad.mean()) if len(bad) else 0.0
  if share <= ZERO_GRADIENT_SHARE:
    return None
  return Flag("zero_gradients", f"{100 * share:.0f}% of images have a zero or non-finite "
              "input gradient: gradient attacks are blind there; see Square's column and "
              "try BPDA or EOT (Athalye et al. 2018)")


def square_beats_white_box(evaluation: Any) -> Flag | None:
  """A score-based attack (Square), which uses no gradient, fools images every gradient
  attack left robust: the gradients mislead (masking), so the white-box figures overstate
  the model."""
  score = _union(evaluation, lambda kind: kind == "score")
  white = _union(evaluation, lambda kind: kind != "score")
  only = score & ~white
  if not only.any():
    return None
  return Flag("square_beats_white_box", f"Square fooled {int(only.sum())} image(s) that "
              "APGD and FAB left robust: a sign of gradient masking")


def dlr_beats_ce(evaluation: Any) -> Flag | None:
  """The DLR attacks (APGD-T, APGD-DLR) fool many images APGD-CE left: the cross-entropy
  loss misleads on this model (saturation, rescaled logits)."""
  if "ce" not in evaluation.kinds.values():
    return None
  ce = _union(evaluation, lambda kind: kind == "ce")
  dlr = _union(evaluation, lambda kind: kind == "dlr")
  share = float((dlr & ~ce).mean()) if len(ce) else 0.0
  if share < DLR_GAP:
    return None
  return Flag("dlr_beats_ce", f"the DLR attacks fooled {100 * share:.1f}% of the images "
              "that APGD-CE left robust: cross-entropy misleads on this model")


def _union(evaluation: Any, wanted) -> np.ndarray:
  """Images fooled by any attack whose kind is `wanted`."""
  out = np.zeros(evaluation.clean_correct.shape, bool)
  for name, outcome in evaluation.outcomes.items():
    if wanted(evaluation.kinds[name]):
      out |= outcome.success
  return out


def before_attacks(apply_fn: Any, params: Any, images: np.ndarray, labels: np.ndarray,
                   logits: np.ndarray) -> list[Flag]:
  """The checks on the model alone (on a sample of images; `logits` on all of them)."""
  found = [randomized_forward(apply_fn, params, images), softmax_output(logits),
           saturated_softmax(logits), zero_gradients(apply_fn, params, images, labels)]
  return [f for f in found if f is not None]


def after_attacks(evaluation: Any) -> list[Flag]:
  """The checks on the attacks' outcomes."""
  found = [square_beats_white_box(evaluation), dlr_beats_ce(evaluation)]
  return [f for f in found if f is not None]


def check_budget(name: str, spec: Any, config: Any, result: Any, images: np.ndarray) -> None:
  """Raises RuntimeError if an attack's images leave its budget or the [0, 1] box (an
  attack's bug: counted, it would make the model look weaker than it is)."""
  adv = np.asarray(result.adv_images)
  inside = spec.within_budget(config, result, int(np.prod(images.shape[1:])))
  in_box = (adv.reshape(len(adv), -1).min(-1) >= 0) & (adv.reshape(len(adv), -1).max(-1) <= 1)
  bad = ~(np.asarray(inside) & in_box)
  if bad.any():
    raise RuntimeError(f"{name} returned {int(bad.sum())} image(s) outside its budget or "
                       "[0, 1]; this is a bug in the attack, please report it")


__all__ = ["DOC", "Flag", "after_attacks", "before_attacks", "check_budget", "dlr_beats_ce",
           "randomized_forward", "saturated_softmax", "softmax_output",
           "square_beats_white_box", "zero_gradients"]
