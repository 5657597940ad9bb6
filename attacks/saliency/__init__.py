"""JSMA's public entry: `jsma`, its checked `prepare_jsma` and its registry spec. The
iteration is `saliency.core`; on concrete arrays it runs through the row scheduler
`saliency.rows`, under a trace as `saliency.core.jsma_core`."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from advsweep.attacks import checks, common, spec
from advsweep.attacks.saliency import core, rows
from advsweep.attacks.saliency.core import PROBABILITIES, JSMAConfig


def prepare_jsma(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
                 key: jax.Array, config: JSMAConfig | None = None, *,
                 targets: jax.Array | None = None, evaluator: Any = None
                 ) -> common.PreparedCall:
  """Checks the inputs; returns the attack, ready to run (the row scheduler on concrete
  arrays, the core under a trace)."""
  del evaluator
  config = config or JSMAConfig()
  core.check_config(config)
  images, labels, targets, _, concrete = checks.checked_inputs(
      apply_fn, params, images, labels, key, config, targets=targets,
      target_mode=config.target)
  if not concrete:
    return common.PreparedCall(functools.partial(
        core.jsma_core, apply_fn, params, images, labels, key, config, targets=targets))
  return rows.prepare_jsma_rows(apply_fn, params, images, labels, key, config, targets)


def jsma(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
         key: jax.Array, config: JSMAConfig | None = None, *,
         targets: jax.Array | None = None, evaluator: Any = None) -> common.AttackResult:
  """Targeted JSMA: pairs of features moved by theta until the target class wins.

  Args:
    apply_fn: `apply_fn(params, images[B,H,W,C]) -> logits[B,K]`.
    params: the model's variables.
    images: [B,H,W,C] float in [0, 1].
    labels: [B] true classes.
    key: PRNG key, or one per image [B] (draws the targets in "random" mode).
    config: `JSMAConfig`; None is the paper's setting (theta +1, gamma 14.5%).
    targets: [B] classes for `target="explicit"`; see `attacks.every_other_class` for the
      paper's all-targets runs.
    evaluator: ignored (the family's one signature).

  Returns:
    `AttackResult`; `l0_fraction` is the paper's "percentage of features modified" and
    `queries` counts iterations (one forward pass and two vector-Jacobian products each;
    one with `derivative="probabilities"`).

  On concrete arrays it runs the row scheduler (`attacks.saliency.rows.jsma_rows`); under a
  trace, `jsma_core`.

  References: Papernot et al., The Limitations of Deep Learning in Adversarial Settings, 2016.
  """
  return prepare_jsma(apply_fn, params, images, labels, key, config, targets=targets,
                      evaluator=evaluator)()


def _within_gamma(config: JSMAConfig, result: Any, num_features: int) -> np.ndarray:
  """Features change in pairs: the last pair may pass gamma by one feature."""
  return np.asarray(result.l0_fraction) <= float(config.gamma) + 2.0 / num_features + 1e-7


def _forward_equivalents(config: JSMAConfig, num_features: int, num_classes: int) -> float:
  del num_classes
  return 5.0 * np.ceil(float(config.gamma) * num_features / 2) + 2


def _unit(config: JSMAConfig) -> str:
  """JSMA-F takes one VJP per iteration, JSMA-Z two."""
  return spec.FORWARD_VJP if config.derivative == PROBABILITIES else spec.FORWARD_TWO_VJPS


SPEC = spec.AttackSpec(
    name="jsma", run=jsma, core=core.jsma_core, config_cls=JSMAConfig, prepare=prepare_jsma,
    check_config=core.check_config, within_budget=_within_gamma,
    forward_equivalents=_forward_equivalents, unit=_unit,
    unit_batch=lambda config, num_images: min(config.num_slots, num_images),
    budget_field="gamma", quick={"gamma": 0.05}, sparse=True)
