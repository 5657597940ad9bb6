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

A randomized defense (`randomize`, Xie et al. 2018) draws anew on every forward pass. Its
randomness is a key in the defended model's params, `{"net": params, "draws": key}`: each
image's draw comes from that key and the image's pixels (`transforms.draw_keys`), so every
new input (each PGD step, each DE candidate) gets a fresh draw, the same input under the
same key the same one, and a model under another key (`with_draws`) is an independent
realisation of the defense. The sweep evaluates with a key derived from the run's seed and
lets the attack see another, so an attack never wins by knowing the evaluation's draws.
`eot_apply_fn(n)` is expectation over transformation (Athalye et al. 2018, Section 4.3; Athalye,
Engstrom et al. 2018): the model whose probabilities are the mean over n draws, so that
gradient attacks follow the gradient of the expected probabilities, the mean of the draws'
gradients, and the one-pixel attack's fitness averages them too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from advsweep.models import transforms, zoo


@dataclasses.dataclass(frozen=True)
class Kind:
  """Everything about one kind of input transformation, in one record.

  Attributes:
    name: how configs name it (`jpeg` in `jpeg:75`).
    transform: `(images, level) -> images`, or `(images, keys, level) -> images` where
      `randomized` (one key per image).
    levels: the range of its level, inclusive.
    rounds: has a rounding step whose gradient is zero almost everywhere (attack it
      through BPDA).
    randomized: draws anew on every forward pass (attack it with EOT).
    default_level: the level a bare name takes, or None where a level must be given.
  """

  name: str
  transform: Callable[..., jax.Array]
  levels: tuple[int, int]
  rounds: bool = False
  randomized: bool = False
  default_level: int | None = None


REGISTRY: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
  """Makes an input defense known to configs and `MODEL+NAME:LEVEL` references."""
  if kind.name in REGISTRY and REGISTRY[kind.name] is not kind:
    raise ValueError(f"defense {kind.name!r} is already registered")
  REGISTRY[kind.name] = kind
  return kind


register(Kind("jpeg", lambda images, q: transforms.jpeg(images, quality=q), (1, 100),
              rounds=True))
register(Kind("bits", lambda images, b: transforms.bit_depth(images, bits=b), (1, 8),
              rounds=True))
register(Kind("median", lambda images, s: transforms.median_smooth(images, size=s), (1, 7),
              rounds=True))
# Xie et al. resize 299 to at least 299/331, about 90% of the side: a bare name's level.
register(Kind("randomize", lambda images, keys, pct: transforms.random_resize_pad(
    images, keys, min_size=math.ceil(images.shape[1] * pct / 100)), (50, 100),
    randomized=True, default_level=90))
KINDS = tuple(REGISTRY)  # the shipped kinds (`REGISTRY` holds any registered since)


@dataclasses.dataclass(frozen=True)
class Defense:
  """A named input transformation: `jpeg:75`, `bits:4`, `median:2`, `randomize:90` (the
  smallest resize in percent of the image side)."""

  kind: str
  level: int

  @property
  def name(self) -> str:
    return f"{self.kind}:{self.level}"

  @property
  def record(self) -> Kind:
    return REGISTRY[self.kind]

  @property
  def randomized(self) -> bool:
    """Draws anew on every forward pass (attack it with EOT)."""
    return self.record.randomized

  @property
  def shatters_gradients(self) -> bool:
    """Has a rounding step whose gradient is zero almost everywhere (attack it with BPDA)."""
    return self.record.rounds

  def transform(self, images: jax.Array, keys: jax.Array | None = None) -> jax.Array:
    """The transformed images; a randomized defense takes one key per image."""
    if self.randomized:
      if keys is None:
        raise ValueError(f"defense {self.name} is randomized: pass one key per image")
      return self.record.transform(images, keys, self.level)
    return self.record.transform(images, self.level)


def parse(text: str) -> Defense:
  """`"jpeg:75"` -> Defense("jpeg", 75), `"randomize"` -> Defense("randomize", 90); a clear
  ValueError for anything else."""
  name, sep, level = text.partition(":")
  kind = REGISTRY.get(name)
  if kind is not None and not sep and kind.default_level is not None:
    level, sep = str(kind.default_level), ":"
  if kind is None or not sep or not level.isdigit():
    bare = [k.name for k in REGISTRY.values() if k.default_level is not None]
    raise ValueError(f"unknown defense {text!r}; valid forms: "
                     + ", ".join(f"{k}:N" for k in REGISTRY) + " (e.g. jpeg:75)"
                     + "".join(f", {b}" for b in bare))
  low, high = kind.levels
  if not low <= int(level) <= high:
    raise ValueError(f"defense {text!r}: {name} takes a level in [{low}, {high}]")
  return Defense(name, int(level))


@dataclasses.dataclass(frozen=True)
class DefendedApply:
  """`apply_fn(params, images)` of the defended model; equal for equal parts, so jit caches
  that key on the model are shared. With `bpda`, the transform's backward pass is the
  identity (values unchanged)."""

  inner: Callable[[Any, jax.Array], jax.Array]
  defense: Defense
  bpda: bool = False

  def __call__(self, params: Any, images: jax.Array) -> jax.Array:
    if self.defense.randomized:
      params, keys = params["net"], transforms.draw_keys(params["draws"], images)
      transformed = self.defense.transform(images, keys)
    else:
      transformed = self.defense.transform(images)
    if self.bpda:
      transformed = _straight_through(images, transformed)
    return self.inner(params, transformed)


@dataclasses.dataclass(frozen=True)
class EOTApply:
  """Expectation over transformation: log of the mean probabilities of a randomized model
  over `samples` independent draws (keys folded from the params' key)."""

  inner: DefendedApply
  samples: int

  def __call__(self, params: Any, images: jax.Array) -> jax.Array:
    # One forward pass per draw, unrolled: on the CPU a vmap over the draws runs the
    # network on n times the batch at once and is several times slower (and lax.map's
    # rolled loop slows the backward pass); see results/perf/NOTES.md.
    log_probs = jnp.stack([
        jax.nn.log_softmax(self.inner(
            {"net": params["net"], "draws": jax.random.fold_in(params["draws"], j)}, images))
        for j in range(self.samples)])
    return jax.nn.logsumexp(log_probs, axis=0) - math.log(self.samples)


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

  @property
  def randomized(self) -> bool:
    return self.defense.randomized

  def eot_apply_fn(self, samples: int) -> EOTApply:
    """The EOT model over `samples` draws (a randomized defense only)."""
    if not self.randomized:
      raise ValueError(f"{self.name} is deterministic: EOT over its draws is its forward pass")
    zoo.check_eot_samples(samples)
    return EOTApply(self.apply_fn, samples)

  def attack_apply_fn(self, bpda: bool = False, eot_samples: int = 1
                      ) -> Callable[[Any, jax.Array], jax.Array]:
    """What an attack differentiates: the defended forward pass, through BPDA where the
    transform shatters gradients and `bpda` is set, averaged over `eot_samples` draws where
    it is randomized and `eot_samples` > 1."""
    zoo.check_eot_samples(eot_samples)
    if eot_samples > 1 and self.randomized:
      return self.eot_apply_fn(eot_samples)
    if bpda and self.defense.shatters_gradients:
      return self.bpda_apply_fn
    return self.apply_fn

  def with_draws(self, key: jax.Array) -> DefendedModel:
    """The same model under another key: an independent realisation of its randomness (a
    deterministic defense is returned as it is)."""
    if not self.randomized:
      return self
    return dataclasses.replace(self, params={"net": self.params["net"], "draws": key})


def defend(model: zoo.Model, defense: Defense | str, key: jax.Array | None = None
           ) -> DefendedModel:
  """`model` behind `defense` (a Defense or its name, `"jpeg:75"`); a randomized defense
  draws from `key` (default `jax.random.key(0)`; the sweep sets one from the run's seed)."""
  defense = parse(defense) if isinstance(defense, str) else defense
  params = model.params
  if defense.randomized:
    params = {"net": model.params, "draws": jax.random.key(0) if key is None else key}
  return DefendedModel(name=f"{model.name}+{defense.name}", module=None, params=params,
                       meta={**model.meta, "defense": defense.name, "twin": model.name},
                       defense=defense, undefended=model)
