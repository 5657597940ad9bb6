"""Gradient-masking checks: measured per image by the driver, flagged per cell by the report.

A defense that hides its gradient looks robust only to attacks that need the gradient
(Athalye, Carlini, Wagner 2018, "Obfuscated gradients give a false sense of security",
Section 3.1 lists the signs; AutoAttack's flags check them too). Each unit records, per
image:
- `grad_zero_share`: the share of the input gradient of the cross-entropy, at the clean
  image, that is exactly zero or not finite, for what the attack differentiates (gradient
  attacks only): a shattered gradient (JPEG's rounding without BPDA) is near 1;
- `forward_repeatable`: two forward passes of the clean image under independent draws
  give the same logits (False for a randomized defense);
- `transfer_success`: the same attack made on the twin fools the defended model (gradient
  attacks on a defended model, non-adaptive cells; the twin is the model without its input
  transform, or a trained defense's zoo `twin`);
- `nd_score_clean`, `nd_score_adv`: the detection statistic (`bench.detection`).
`flags` turns them into the report's warnings, one cell at a time, with the papers' rules:
a randomized model attacked without EOT; a masked gradient; an unbounded attack (eps >= 1)
that fails; a black-box or transfer attack that beats the white-box one; an adaptive attack
that beats the plain one by more than its interval.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from advsweep.attacks import common
from advsweep.attacks import spec as spec_lib
from advsweep.bench import detection, tables

MASKED_SHARE = 0.5  # a cell whose mean zero-gradient share reaches this is flagged
UNBOUNDED_EPS = 1.0  # an L-inf attack at this eps can reach every image: it must succeed


def uses_gradients(spec: spec_lib.AttackSpec, config: Any) -> bool:
  return spec.unit(config) != spec_lib.FORWARD


def runs_transfer(spec: spec_lib.AttackSpec, cell: Any, model: Any) -> bool:
  """The unit also runs its attack on the model's twin (`transfer_success`): gradient
  attacks on a defended model, in plain cells (not adaptive, not detector-aware)."""
  return (getattr(model, "undefended", None) is not None
          and uses_gradients(spec, cell.config) and not cell.adaptive
          and not cell.params.get("evade_detector"))


def gradient_zero_share(apply_fn: common.ApplyFn, params: Any, images: jax.Array,
                        labels: jax.Array) -> jax.Array:
  """[B] the share of each image's input-gradient entries of the cross-entropy that are
  exactly zero or not finite (jitted with the params closed over, `common.bind`)."""
  return common.bind(_gradient_zero_share, apply_fn, params)(images, labels)


def _gradient_zero_share(apply_fn, params, images, labels):
  def loss(x):
    logits = apply_fn(params, x)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  grads = jax.grad(loss)(images).reshape(images.shape[0], -1)
  return jnp.mean((grads == 0) | ~jnp.isfinite(grads), axis=-1)


def _forward(apply_fn, params, images):
  return apply_fn(params, images)


def _logits(apply_fn: common.ApplyFn, params: Any, images: jax.Array) -> jax.Array:
  return common.bind(_forward, apply_fn, params)(images)


def unit_checks(spec: spec_lib.AttackSpec, config: Any, cell: Any, model: Any,
                apply_fn: common.ApplyFn, attack_params: Any, eval_params: Any,
                images: jax.Array, labels: jax.Array, keys: jax.Array,
                targets: jax.Array | None, adv_images: jax.Array) -> dict[str, Any]:
  """The masking and detection columns of one unit's rows ([B] each; None where a check
  does not apply)."""
  batch = images.shape[0]
  gradient = uses_gradients(spec, config)
  out: dict[str, Any] = {"grad_zero_share": [None] * batch,
                         "forward_repeatable": [True] * batch,
                         "transfer_success": [None] * batch}
  if gradient:
    out["grad_zero_share"] = np.asarray(
        gradient_zero_share(apply_fn, attack_params, images, labels), np.float32)
  randomized = getattr(model, "randomized", False)
  if randomized:
    same = (_logits(model.apply_fn, attack_params, images)
            == _logits(model.apply_fn, eval_params, images))
    out["forward_repeatable"] = np.asarray(jnp.all(same, axis=-1))
  if runs_transfer(spec, cell, model):
    twin = spec.run(model.undefended.apply_fn, model.undefended.params, images, labels, keys,
                    config, targets=targets)
    on_defended = common.finalize(model.apply_fn, eval_params, images, twin.adv_images,
                                  labels, twin.target, twin.queries)
    out["transfer_success"] = np.asarray(on_defended.success)
  out["nd_score_clean"] = detection.score(images)
  out["nd_score_adv"] = detection.score(adv_images)
  return out


def _rate(values: np.ndarray) -> tuple[int, int]:
  values = np.asarray([v for v in values if v is not None and not (
      isinstance(v, float) and math.isnan(v))], bool)
  return int(values.sum()), len(values)


def disjoint_above(a: tuple[int, int], b: tuple[int, int]) -> bool:
  """Rate a is above rate b with their 95% Wilson intervals apart."""
  (ka, na), (kb, nb) = a, b
  if not na or not nb:
    return False
  return tables.wilson_interval(ka, na)[0] > tables.wilson_interval(kb, nb)[1]


def flags(cols: dict[str, np.ndarray], mask: np.ndarray, cell: dict[str, Any],
          peers: list[tuple[dict[str, Any], np.ndarray]],
          adaptive_twin: np.ndarray | None) -> list[str]:
  """The masking warnings of one cell (its rows in `mask`, clean-correct ones counted).

  Args:
    cols: the run's columns.
    mask: the cell's rows.
    cell: the cell's attack, parsed params (with bpda, eot_samples) and whether adaptive.
    peers: (cell, rows) of the other cells on the same model, for the black-box check.
    adaptive_twin: the rows of the adaptive attack of the same configuration, for a plain
      cell that has one.
  """
  ok = mask & cols["clean_correct"]
  if not ok.any():
    return []
  out = []
  params = cell["params"]
  won = (int((ok & cols["success"]).sum()), int(ok.sum()))
  if not cols["forward_repeatable"][ok].all() and params.get("eot_samples", 1) == 1:
    share = 1 - np.mean(cols["forward_repeatable"][ok].astype(bool))
    out.append(f"randomized: {100 * share:.0f}% of clean images give other logits on "
               "another draw; attack it with eot_samples > 1")
  shares = np.asarray([v for v in cols["grad_zero_share"][ok] if v is not None], float)
  shares = shares[~np.isnan(shares)]
  if len(shares) and shares.mean() >= MASKED_SHARE:
    out.append(f"masked gradient: {100 * shares.mean():.0f}% of input-gradient entries are "
               "zero or not finite; attack it with bpda = true")
  eps = params.get("eps")
  if isinstance(eps, int | float) and eps >= UNBOUNDED_EPS and won[0] < won[1]:
    out.append(f"eps {eps:g} can reach any image, yet {won[1] - won[0]} of {won[1]} "
               "attacks failed: the attack does not find what exists")
  transfer = _rate(cols["transfer_success"][ok])
  if transfer[1] and disjoint_above(transfer, won):
    out.append(f"transfer from the twin ({100 * transfer[0] / transfer[1]:.0f}%) "
               f"beats the white-box attack ({100 * won[0] / won[1]:.0f}%)")
  if eps is not None and cell["attack"] != "one_pixel":
    for peer, rows in peers:
      if peer["attack"] != "one_pixel" or not isinstance(eps, int | float):
        continue
      if eps < float(np.max(cols["linf"][rows], initial=0.0)):
        continue  # the one-pixel changes are outside this budget
      peer_ok = rows & cols["clean_correct"]
      peer_won = (int((peer_ok & cols["success"]).sum()), int(peer_ok.sum()))
      if disjoint_above(peer_won, won):
        out.append(f"the black-box one-pixel attack ({100 * peer_won[0] / peer_won[1]:.0f}%)"
                   f" beats this white-box attack ({100 * won[0] / won[1]:.0f}%) within a "
                   "budget that contains it")
  if adaptive_twin is not None:
    twin_ok = adaptive_twin & cols["clean_correct"]
    twin_won = (int((twin_ok & cols["success"]).sum()), int(twin_ok.sum()))
    if disjoint_above(twin_won, won):
      out.append(f"the adaptive attack ({100 * twin_won[0] / twin_won[1]:.0f}%) beats this "
                 f"one ({100 * won[0] / won[1]:.0f}%): its accuracy overstates the defense")
  return out

