"""Input checks shared by every attack, written so that they also run under a trace.

Shapes, dtypes and target modes are static, so they are always checked. Checks that read
values (the [0, 1] range, finiteness, classes in range) run when the values are concrete and
are skipped under `jax.jit`, `jax.vmap` or `jax.grad`, where there is nothing to read yet: an
attack inside a training step costs no host round trip. AutoAttack keeps its checks in a
module of their own in the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# `is_concrete` is part of this module's interface too (the attacks call checks.is_concrete).
from advsweep.attacks.common import EXPLICIT, UNTARGETED, is_concrete


def num_classes_of(apply_fn: Any, params: Any, images: Any) -> int:
  """The model's number of classes, from its output shape (no computation; the abstract
  evaluation is cached per model and shapes, where `apply_fn` is hashable)."""
  leaves, treedef = jax.tree.flatten(params)
  shapes = tuple((tuple(np.shape(p)), jnp.result_type(p)) for p in leaves)
  image = ((1, *np.shape(images)[1:]), jnp.result_type(images))
  try:
    return _num_classes(apply_fn, treedef, shapes, image)
  except TypeError:  # an unhashable apply_fn
    return _num_classes.__wrapped__(apply_fn, treedef, shapes, image)


class NotLogitsError(ValueError):
  """`apply_fn` returns something other than float logits [B, K] (class ids, a flat vector)."""


@functools.lru_cache(maxsize=256)
def _num_classes(apply_fn, treedef, shapes, image) -> int:
  abstract = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(*s) for s in shapes])
  out = jax.eval_shape(apply_fn, abstract, jax.ShapeDtypeStruct(*image))
  shape, dtype = tuple(getattr(out, "shape", ())), getattr(out, "dtype", None)
  if (len(shape) != 2 or shape[0] != image[0][0] or shape[1] < 2
      or dtype is None or not jnp.issubdtype(dtype, jnp.floating)):
    raise NotLogitsError(
        f"logits [B, K] (float, K >= 2 classes) expected from apply_fn, got {dtype} "
        f"{shape} for a batch of {image[0][0]}; return the logits, not class ids or scores "
        "of another shape")
  return int(shape[1])


class Inputs(NamedTuple):
  """An attack's checked inputs as arrays (`checked_inputs`)."""

  images: jax.Array  # [B,H,W,C]
  labels: jax.Array  # [B] int32
  targets: jax.Array | None  # [B] int32, or None
  num_classes: int
  concrete: bool  # no tracer among them: the host-side schedule can run


def checked_inputs(apply_fn: Any, params: Any, images: Any, labels: Any, key: Any,
                   config: Any, *, targets: Any = None, target_mode: str = UNTARGETED,
                   target_modes: Sequence[str] = ()) -> Inputs:
  """Every attack's prepare step: `check_inputs`, the arrays converted, and whether they are
  concrete (the public attacks run a host-side schedule then, their core under a trace)."""
  num_classes = check_inputs(apply_fn, params, images, labels, targets=targets,
                             target_mode=target_mode, target_modes=target_modes)
  images = jnp.asarray(images)
  labels = jnp.asarray(labels, jnp.int32)
  targets = None if targets is None else jnp.asarray(targets, jnp.int32)
  return Inputs(images, labels, targets, num_classes,
                is_concrete(params, images, labels, key, targets, config))


def check_inputs(apply_fn: Any, params: Any, images: Any, labels: Any, *, targets: Any = None,
                 target_mode: str = UNTARGETED, target_modes: Sequence[str] = ()) -> int:
  """Raises ValueError naming the problem for inputs no attack can use; returns the number
  of classes.

  Always: rank and dtype of `images`, shape and dtype of `labels` (and `targets`), the
  target mode (one of `target_modes`). When concrete: `images` finite and in [0, 1], labels
  and targets in [0, num_classes).
  """
  shape = np.shape(images)
  if len(shape) != 4:
    raise ValueError(f"images must have rank 4 [B,H,W,C]; got shape {shape}. Add a batch "
                     "or channel axis.")
  if shape[0] == 0:
    raise ValueError(f"images is an empty batch (shape {shape}); pass at least one image")
  dtype = jnp.result_type(images)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"images must be floating point in [0, 1]; got dtype {dtype}. Convert "
                     "uint8 images with images.astype(np.float32) / 255.")
  if np.shape(labels) != (shape[0],):
    raise ValueError(f"labels must have shape [B] = ({shape[0]},); got {np.shape(labels)}")
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(f"labels must be integers; got dtype {jnp.result_type(labels)}")
  if target_modes and target_mode not in target_modes:
    raise ValueError(f"unknown target mode {target_mode!r}; valid choices: "
                     f"{', '.join(target_modes)}")
  if target_mode == EXPLICIT:
    if targets is None:
      raise ValueError("target mode 'explicit' needs targets=[B] class indices")
    if np.shape(targets) != (shape[0],):
      raise ValueError(f"targets must have shape ({shape[0]},); got {np.shape(targets)}")
  elif targets is not None:
    raise ValueError(f"targets were given but the target mode is {target_mode!r}; set "
                     "target='explicit' in the config to use them")
  num_classes = num_classes_of(apply_fn, params, images)
  if is_concrete(images):
    _check_pixels(np.asarray(images))
  for name, values in (("labels", labels), ("targets", targets)):
    if values is not None and is_concrete(values):
      check_classes(name, values, num_classes)
  return num_classes


def _check_pixels(values: np.ndarray) -> None:
  if not np.isfinite(values).all():
    raise ValueError("images contain NaN or infinite values")
  if values.size and (values.min() < 0.0 or values.max() > 1.0):
    raise ValueError(f"images must lie in [0, 1]; got range [{values.min():.4g}, "
                     f"{values.max():.4g}]. Divide uint8 pixels by 255.")


def check_classes(name: str, values: Any, num_classes: int) -> None:
  """Raises ValueError if a class index lies outside [0, num_classes)."""
  values = np.asarray(values)
  if values.size and (values.min() < 0 or values.max() >= num_classes):
    raise ValueError(f"{name} must lie in [0, {num_classes}); got range "
                     f"[{values.min()}, {values.max()}]")


def check_at_least(name: str, value: Any, low: float, *, strict: bool = False) -> None:
  """Raises ValueError if a concrete `value` (a number or array) is below `low` (or equal,
  with `strict`); a traced value is not checked."""
  if not is_concrete(value):
    return
  ok = np.all(np.asarray(value) > low) if strict else np.all(np.asarray(value) >= low)
  if not ok:
    raise ValueError(f"{name} must be {'>' if strict else '>='} {low:g}; got {value}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  """Raises ValueError if `value` is not one of `choices`."""
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(map(str, choices))}")


__all__ = ["check_at_least", "check_choice", "check_classes", "check_inputs", "is_concrete",
           "num_classes_of"]
