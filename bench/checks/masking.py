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
- `nd_score_clean`, `nd_score_adv`: the detection statistic (`bench.checks.detection`).
`bench.checks.validity.cell_flags` turns them into the report's warnings, one cell at a time, with
the papers' rules (one named check each, explained in docs/flags.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from advsweep.attacks import common
from advsweep.attacks import spec as spec_lib
from advsweep.bench import stats
from advsweep.bench.checks import detection


def uses_gradients(spec: spec_lib.AttackSpec, config: Any) -> bool:
  return spec.unit(config) != spec_lib.FORWARD


def runs_transfer(spec: spec_lib.AttackSpec, cell: Any, model: Any) -> bool:
  """The unit also runs its attack on the model's twin (`transfer_success`): gradient
  attacks on a defended model, in plain cells (not adaptive, not detector-aware)."""
  return (model.undefended is not None
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
  if model.randomized:
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


# Two rates on different images, intervals apart (`bench.stats`).
disjoint_above = stats.disjoint_above
