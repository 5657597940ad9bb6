"""Input-transformation defenses as models: a defended model is a model whose forward pass
transforms its input first (`models.transforms`), so every attack, the sweep and the
reports take it as they take any model.

A transform with a rounding step (JPEG, bit depth, median) has a gradient of zero almost
everywhere, so a gradient attack that differentiates through it finds nothing: the
defense looks strong without being so. `bpda_apply_fn` is the same forward pass with the
backward pass of the identity through the transform, the backward pass differentiable
approximation of Athalye, Carlini and Wagner (2018, "Obfuscated gradients give a false
sense of security", Section 4.1): its values equal the defended model's exactly, its
gradient is the network's gradient at the transformed image.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from advsweep.models import transforms, zoo


@dataclasses.dataclass(frozen=True)
class Defense:
  """A named input transformation: `jpeg:75`, `bits:4`, `median:2`."""

  kind: str
  level: int

  @property
  def name(self) -> str:
    return f"{self.kind}:{self.level}"

  def transform(self, images: jax.Array) -> jax.Array:
    return _TRANSFORMS[self.kind](images, self.level)


_TRANSFORMS: dict[str, Callable[[jax.Array, int], jax.Array]] = {
    "jpeg": lambda images, q: transforms.jpeg(images, quality=q),
    "bits": lambda images, b: transforms.bit_depth(images, bits=b),
    "median": lambda images, s: transforms.median_smooth(images, size=s),
}
_RANGES = {"jpeg": (1, 100), "bits": (1, 8), "median": (1, 7)}


def parse(text: str) -> Defense:
  """`"jpeg:75"` -> Defense("jpeg", 75); a clear ValueError for anything else."""
  kind, sep, level = text.partition(":")
  if kind not in _TRANSFORMS or not sep or not level.isdigit():
    raise ValueError(f"unknown defense {text!r}; valid forms: "
                     + ", ".join(f"{k}:N" for k in _TRANSFORMS) + " (e.g. jpeg:75)")
  low, high = _RANGES[kind]
  if not low <= int(level) <= high:
    raise ValueError(f"defense {text!r}: {kind} takes a level in [{low}, {high}]")
  return Defense(kind, int(level))


@dataclasses.dataclass(frozen=True)
class DefendedApply:
  """`apply_fn(params, images)` of the defended model; equal for equal parts, so jit caches
  that key on the model are shared. With `bpda`, the transform's backward pass is the
  identity (values unchanged)."""

  inner: Callable[[Any, jax.Array], jax.Array]
  defense: Defense
  bpda: bool = False

  def __call__(self, params: Any, images: jax.Array) -> jax.Array:
    transformed = self.defense.transform(images)
    if self.bpda:
      transformed = _straight_through(images, transformed)
    return self.inner(params, transformed)


@jax.custom_vjp
def _straight_through(images: jax.Array, transformed: jax.Array) -> jax.Array:
  """`transformed`, exactly, with the gradient passed to `images` as the identity's."""
  return transformed


def _straight_through_fwd(images, transformed):
  return transformed, None


def _straight_through_bwd(_, cotangent):
  return cotangent, jnp.zeros_like(cotangent)


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


@dataclasses.dataclass(frozen=True, eq=False)
class DefendedModel(zoo.Model):
  """A model behind a defense. `apply_fn` is the defended forward pass (what is evaluated);
  `bpda_apply_fn` the same values with the identity's gradient through the transform."""

  defense: Defense | None = None
  undefended: zoo.Model | None = None

  @functools.cached_property
  def apply_fn(self) -> DefendedApply:
    return DefendedApply(self.undefended.apply_fn, self.defense)

  @functools.cached_property
  def bpda_apply_fn(self) -> DefendedApply:
    return DefendedApply(self.undefended.apply_fn, self.defense, bpda=True)

  @functools.cached_property
  def pixel_evaluator(self) -> None:
    return None  # the transform mixes pixels: a pixel change reaches the whole image


def defend(model: zoo.Model, defense: Defense | str) -> DefendedModel:
  """`model` behind `defense` (a Defense or its name, `"jpeg:75"`)."""
  defense = parse(defense) if isinstance(defense, str) else defense
  return DefendedModel(name=f"{model.name}+{defense.name}", module=None, params=model.params,
                       meta={**model.meta, "defense": defense.name, "twin": model.name},
                       defense=defense, undefended=model)


def gradient_share_zero(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                        images: jax.Array, labels: jax.Array) -> float:
  """The share of input-gradient entries of the cross-entropy that are exactly zero or not
  finite: near 1 marks a masked gradient (AutoAttack's check, and Athalye et al.'s)."""
  def loss(x):
    logits = apply_fn(params, x)
    return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])

  grads = jax.grad(loss)(images)
  return float(jnp.mean((grads == 0) | ~jnp.isfinite(grads)))
