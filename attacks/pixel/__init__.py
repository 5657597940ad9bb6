"""The one-pixel attack's public entry: `one_pixel`, its checked `prepare_one_pixel` and its
registry spec. The search itself is `pixel.core`; on concrete arrays it runs through the slot
scheduler `pixel.slots`, under a trace as `pixel.core.one_pixel_core`; candidates are evaluated
pixel-locally by default (`attacks.pixel_local`), see `resolve_evaluator`."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import numpy as np

from advsweep.attacks import checks, common, pixel_local, spec
from advsweep.attacks.pixel import core, slots
from advsweep.attacks.pixel.core import AT_LEAST_ONE_TARGET, OnePixelConfig, chunk_rows

FULL = common.FULL_EVALUATION  # `evaluator=FULL`: the full forward pass for every candidate
_WARNED: set[Any] = set()


def resolve_evaluator(apply_fn: common.ApplyFn, params: Any, image_shape: tuple[int, ...],
                      config: OnePixelConfig, evaluator: Any) -> Any:
  """The evaluator a call runs with: None (the full pass) for `evaluator="full"`, k > 1 or
  `splice=False`; the given one; else the pixel-local evaluator derived from `apply_fn`
  (`pixel_local.splicer_for`), or None with a one-time warning where it cannot pay."""
  if evaluator == FULL or not config.splice or config.num_pixels != 1:
    return None
  if evaluator is not None:
    return evaluator
  splicer = pixel_local.splicer_for(apply_fn)
  try:
    reason = splicer.full_reason(params, image_shape)
  except Exception as err:  # noqa: BLE001  (a user's function may not trace as analysed)
    reason = f"its computation could not be analysed ({type(err).__name__}: {err})"
  if reason is None:
    return splicer
  _warn_once((_name(apply_fn), tuple(image_shape)),
             f"one_pixel: {_name(apply_fn)} runs the full forward pass for every candidate: "
             f"{reason}. Pass evaluator='full' to say so and silence this warning.")
  return None


def _name(apply_fn: Any) -> str:
  return getattr(apply_fn, "__name__", None) or type(apply_fn).__name__


def _warn_once(key: Any, message: str) -> None:
  if key not in _WARNED:
    _WARNED.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def prepare_one_pixel(apply_fn: common.ApplyFn, params: Any, images: jax.Array,
                      labels: jax.Array, key: jax.Array, config: OnePixelConfig | None = None,
                      *, targets: jax.Array | None = None, evaluator: Any = None
                      ) -> common.PreparedCall:
  """Checks the inputs; returns the attack, ready to run (the slot scheduler on concrete
  arrays, the core under a trace)."""
  config = config or OnePixelConfig()
  core.check_config(config)
  mode = common.UNTARGETED if config.target == AT_LEAST_ONE_TARGET else config.target
  images, labels, targets, _, concrete = checks.checked_inputs(
      apply_fn, params, images, labels, key, config, targets=targets, target_mode=mode)
  evaluator = resolve_evaluator(apply_fn, params, images.shape[1:], config, evaluator)
  if not concrete:
    return common.PreparedCall(functools.partial(
        core.one_pixel_core, apply_fn, params, images, labels, key, config, targets=targets,
        evaluator=evaluator))
  return slots.prepare_one_pixel_slots(apply_fn, params, images, labels, key, config,
                                       targets, evaluator)


def one_pixel(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
              key: jax.Array, config: OnePixelConfig | None = None, *,
              targets: jax.Array | None = None, evaluator: Any = None) -> common.AttackResult:
  """Su et al.'s one-pixel attack by differential evolution.

  Args:
    apply_fn: `apply_fn(params, images[B,H,W,C]) -> logits[B,K]`.
    params: the model's variables.
    images: [B,H,W,C] float in [0, 1].
    labels: [B] true classes.
    key: PRNG key, or one per image [B].
    config: `OnePixelConfig`; None is the paper's setting (k=1, population 400, 100
      generations, F=0.5, untargeted).
    targets: [B] classes for `target="explicit"`.
    evaluator: how candidates are evaluated: None (the default) derives the exact
      pixel-local evaluator from `apply_fn` (`attacks.pixel_local`) where k = 1, and falls
      back to the full forward pass with a one-time warning where the model has no local
      first layer; "full" forces the full pass; or a `PixelSplicer` to use.
      `AttackResult.evaluation` says which ran.

  Returns:
    `AttackResult`; `queries` counts model evaluations per image (population_size per
    generation, the initial population included). With "at_least_one_target" each field
    describes the best target (successful, then most confident) and `queries` sums over all
    K-1 targets.

  On concrete arrays it runs the slot scheduler (`attacks.pixel.slots.one_pixel_slots`);
  under a trace, `one_pixel_core`.

  References: Su, Vargas, Sakurai, One Pixel Attack for Fooling Deep Neural Networks, 2019.
  """
  return prepare_one_pixel(apply_fn, params, images, labels, key, config, targets=targets,
                           evaluator=evaluator)()


def _within_pixels(config: OnePixelConfig, result: Any, num_features: int) -> np.ndarray:
  del num_features
  return np.asarray(result.l0) <= config.num_pixels


def _forward_equivalents(config: OnePixelConfig, num_features: int, num_classes: int
                         ) -> float:
  del num_features
  targets = num_classes - 1 if config.target == AT_LEAST_ONE_TARGET else 1
  return (config.num_generations + 1) * config.population_size * targets + 1


def _unit_batch(config: OnePixelConfig, num_images: int) -> int:
  del num_images
  return chunk_rows(config)


SPEC = spec.AttackSpec(
    name="one_pixel", run=one_pixel, core=core.one_pixel_core, config_cls=OnePixelConfig,
    prepare=prepare_one_pixel, check_config=core.check_config, within_budget=_within_pixels,
    forward_equivalents=_forward_equivalents, unit=lambda config: spec.FORWARD,
    unit_batch=_unit_batch, budget_field="num_pixels", quick={"num_generations": 10},
    fixed_work={"stop_on_flip": False, "stop_true_prob": 0.0}, sparse=True)
