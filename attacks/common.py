"""What every attack shares: the result type, target choice, the final re-check, `bind`.

An attack has the signature

    attack(apply_fn, params, images, labels, key, config=None, *, targets=None,
           evaluator=None) -> AttackResult

with `apply_fn(params, images[B,H,W,C]) -> logits[B,K]` and images in [0, 1]. Success is
always re-checked with the model's own prediction on `adv_images` (as AutoAttack does), never
taken from the attack's bookkeeping, and non-finite model outputs are reported, not counted.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

ApplyFn = Callable[[Any, jax.Array], jax.Array]

# Target modes. "untargeted" pushes away from the true label (the Possas slides' "inverse"
# perturbation); the others push toward a target class.
UNTARGETED = "untargeted"
LEAST_LIKELY = "least_likely"  # argmin of the clean prediction (Kurakin et al., 2017)
RANDOM = "random"  # a class other than the label, drawn from the key
EXPLICIT = "explicit"  # the `targets` argument
TARGET_MODES = (UNTARGETED, LEAST_LIKELY, RANDOM, EXPLICIT)
# Config-field metadata key: the field changes how an attack computes, not what it returns
# (up to float rounding), so a benchmark leaves it out of a configuration's identity.
SAME_RESULTS = "same_results"
# Config-field metadata key: a field added after results were recorded, left out of a
# configuration's identity while it holds its default (the earlier results are its default).
OMIT_AT_DEFAULT = "omit_at_default"
NO_TARGET = -1
# Threat models: the perturbation's L-inf or L2 norm is at most eps.
LINF, L2 = "linf", "l2"
# AttackResult.evaluation: the plain forward pass, or exact pixel-local evaluation.
FULL_EVALUATION = "full"
PIXEL_LOCAL_EVALUATION = "pixel_local"


@struct.dataclass
class AttackResult:
  """Per-image outcome of an attack; every field has leading dimension B.

  Attributes:
    adv_images: [B,H,W,C] adversarial images in [0, 1].
    success: [B] the model's prediction on `adv_images` is the target (targeted) or differs
      from the label (untargeted), and its output is finite.
    adv_pred: [B] top-1 class on `adv_images`.
    adv_conf: [B] softmax probability of `adv_pred`.
    adv_top5_correct: [B] the label is among the top 5 classes on `adv_images`.
    target: [B] target class, or -1 for untargeted attacks.
    queries: [B] model evaluations spent on the image (a forward+backward pass counts one).
    evaluated: [B] rows the model really computed for the image, the re-check included: the
      one-pixel attack's padding of a chunked model call is shared by the images in it, so
      `evaluated - queries` is work that searched nothing (equal to `queries` for attacks
      that pad nothing).
    l0: [B] pixels (spatial positions) changed.
    l0_fraction: [B] fraction of input features (H*W*C values) changed.
    l2: [B] L2 norm of the perturbation.
    linf: [B] L-infinity norm of the perturbation.
    finite: [B] the model's output on `adv_images` is finite.
    evaluation: how the attack evaluated the model: "full" (the plain forward pass) or
      "pixel_local" (an evaluator that propagates a pixel change only where it reaches,
      `attacks.pixel_local`). Static: the same for every image of a call.
  """

  adv_images: jax.Array
  success: jax.Array
  adv_pred: jax.Array
  adv_conf: jax.Array
  adv_top5_correct: jax.Array
  target: jax.Array
  queries: jax.Array
  l0: jax.Array
  l0_fraction: jax.Array
  l2: jax.Array
  linf: jax.Array
  finite: jax.Array
  evaluated: jax.Array
  evaluation: str = struct.field(pytree_node=False, default=FULL_EVALUATION)


@dataclasses.dataclass(frozen=True)
class PreparedCall:
  """A checked attack, ready to run: `call()` runs it, `lower()` lowers its largest jitted
  piece without running (`lower().compile().memory_analysis()` gives its memory).
  """

  run: Callable[[], Any]
  lowered: Callable[[], Any] | None = None

  def __call__(self) -> Any:
    return self.run()

  def lower(self) -> Any:
    if self.lowered is None:
      raise ValueError("this call runs inside a trace (jit, vmap or grad), where the "
                       "attack's core is inlined: there is nothing of its own to lower")
    return self.lowered()


def is_concrete(*trees: Any) -> bool:
  """No leaf of `trees` is a tracer: every value can be read on the host."""
  return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def budget(eps: Any, dtype: Any) -> jax.Array:
  """The perturbation budget a core enforces: `max(eps, 0)`. A concrete eps < 0 is refused by
  each attack's `check_config`; a traced one cannot be checked, so it is enforced as 0 (no
  perturbation) rather than read as `|eps|` by the projections."""
  return jnp.maximum(jnp.asarray(eps, dtype), 0)


def per_image_keys(key: jax.Array, batch: int) -> jax.Array:
  """One PRNG key per image: a single key is split into `batch` keys; [B] keys pass through.

  Every random choice of an attack on image i uses only key i, so attacking a batch equals
  attacking each image alone with its own key.
  """
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    single = key.ndim == 0
  elif key.ndim == 0 and jnp.issubdtype(key.dtype, jnp.integer):  # a plain integer seed
    key, single = jax.random.key(key), True
  elif key.dtype == jnp.uint32 and key.ndim in (1, 2) and key.shape[-1] == 2:
    single = key.ndim == 1  # raw uint32 keys from jax.random.PRNGKey
  else:
    raise ValueError(f"key must be a jax.random.key, one per image, or an integer seed; got "
                     f"dtype {key.dtype} and shape {key.shape}")
  if single:
    return jax.random.split(key, batch)
  if key.shape[0] != batch:
    raise ValueError(f"got {key.shape[0]} keys for {batch} images; pass one key or one per "
                     "image")
  return key


def neighbour_difference_score(images: jax.Array) -> jax.Array:
  """[B] the sum of squared differences between each pair of neighbouring pixels (the four
  neighbours, each pair once, every channel): Papernot et al.'s detection statistic (their
  slides on "The Limitations of Deep Learning in Adversarial Settings", EuroS&P 2016: it "is
  always higher for adversarial samples")."""
  rows = jnp.sum(jnp.square(images[:, 1:] - images[:, :-1]), axis=(1, 2, 3))
  cols = jnp.sum(jnp.square(images[:, :, 1:] - images[:, :, :-1]), axis=(1, 2, 3))
  return rows + cols


def choose_targets(mode: str, keys: jax.Array, labels: jax.Array, clean_logits: jax.Array,
                   targets: jax.Array | None) -> jax.Array:
  """Target class per image for `mode` (keys: [B]), or -1 (NO_TARGET) if untargeted."""
  if mode == UNTARGETED:
    return jnp.full(labels.shape, NO_TARGET, jnp.int32)
  if mode == LEAST_LIKELY:
    return jnp.argmin(clean_logits, -1).astype(jnp.int32)
  if mode == RANDOM:
    num_classes = clean_logits.shape[-1]
    offset = jax.vmap(lambda k: jax.random.randint(k, (), 1, num_classes))(keys)
    return ((labels + offset) % num_classes).astype(jnp.int32)
  return jnp.asarray(targets, jnp.int32)


def every_other_class(images: jax.Array, labels: jax.Array, num_classes: int
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Repeats each image once per other class: the "at least one target" and class-pair runs.

  Returns images [B*(K-1),H,W,C], labels [B*(K-1)] and targets [B*(K-1)], image-major.
  """
  offsets = jnp.arange(1, num_classes)
  targets = (labels[:, None] + offsets[None, :]) % num_classes
  reps = num_classes - 1
  return (jnp.repeat(images, reps, axis=0), jnp.repeat(labels, reps),
          targets.reshape(-1).astype(jnp.int32))


@functools.partial(jax.jit, static_argnums=(1, 2))
def best_over_targets(result: AttackResult, batch: int, reps: int) -> AttackResult:
  """Reduces a run over `every_other_class` to one row per image.

  Success if any target worked; the row kept is the successful target with the highest
  adversarial confidence (else the most confident failure), and `queries` sums all targets.
  """
  grouped = jax.tree.map(lambda x: x.reshape(batch, reps, *x.shape[1:]), result)
  score = grouped.success.astype(grouped.adv_conf.dtype) * 2 + grouped.adv_conf
  pick = jnp.argmax(score, axis=1)
  chosen = jax.tree.map(
      lambda x: jnp.take_along_axis(x, pick.reshape((batch, 1) + (1,) * (x.ndim - 2)),
                                    axis=1)[:, 0],
      grouped)
  return chosen.replace(queries=jnp.sum(grouped.queries, axis=1),
                        evaluated=jnp.sum(grouped.evaluated, axis=1))


def first_success(before: AttackResult, run: AttackResult) -> AttackResult:
  """Per image, `before` where it succeeded, else `run` (a later restart or target class);
  an image that had succeeded spends no queries on `run` (though a batch still runs it:
  `evaluated` counts every run)."""
  evaluated = before.evaluated + run.evaluated
  run = run.replace(queries=before.queries + run.queries)
  keep = before.success
  return jax.tree.map(
      lambda old, new: jnp.where(keep.reshape(keep.shape + (1,) * (old.ndim - 1)), old, new),
      before, run).replace(evaluated=evaluated)


def ranked_targets(clean_logits: jax.Array, num_targets: int) -> jax.Array:
  """[B, num_targets] the classes ranked 2nd, 3rd, ... by the clean logits: the target
  classes of AutoAttack's targeted attacks (APGD-T, FAB-T: the top 9 other classes), most
  likely first. Ties fall to the lower class index."""
  num_classes = clean_logits.shape[-1]
  if not 1 <= num_targets <= num_classes - 1:
    raise ValueError(f"num_target_classes must lie in [1, {num_classes - 1}] for a model of "
                     f"{num_classes} classes; got {num_targets}")
  order = jnp.argsort(-clean_logits, axis=-1, stable=True)
  return order[:, 1:num_targets + 1].astype(jnp.int32)


BUDGET_SLACK = 1e-5  # float32's rounding of a change made exactly at the budget


def within_linf(linf: Any, eps: float) -> Any:
  """Whether L-inf sizes (a number or an array, numpy) lie within `eps`, with float32's slack:
  what every check of an L-inf budget compares, attacks' and reports' alike."""
  import numpy as np

  return np.asarray(linf) <= float(eps) + BUDGET_SLACK


def within_eps(config: Any, result: Any, num_features: int) -> Any:
  """[B] the perturbation respects `config.eps` in `config.norm` (L-inf by default), with
  float32's slack: the `within_budget` of every eps-bounded attack's spec (numpy)."""
  import numpy as np

  del num_features
  if getattr(config, "norm", LINF) == LINF:
    return within_linf(result.linf, config.eps)
  return np.asarray(result.l2) <= float(config.eps) * (1 + 1e-4) + BUDGET_SLACK


def bucket(count: int) -> int:
  """The batch a host loop runs `count` images in: the next power of two (at least 8), so
  a batch that shrinks as images are decided reuses a few compiled programs."""
  return max(8, 1 << (max(count, 1) - 1).bit_length())


def bind(fn: Callable[..., Any], apply_fn: ApplyFn, params: Any, *, close_params: bool = True,
         **static: Any) -> Callable[..., Any]:
  """`fn(apply_fn, params, *args, **static)` jitted as a function of `args`, with the model
  and the static keywords closed over, and the params too unless `close_params` is False.

  Closing over the params lets XLA treat the weights as constants, which on the CPU backend
  runs a forward pass markedly faster than taking them as arguments (`results/perf/NOTES.md`);
  JSMA's iteration is the exception and passes `close_params=False`. The compiled function is
  cached for the last `_BOUND_SIZE` (fn, model, params, static) combinations: `apply_fn` by
  equality (a bound method or a `Model.apply_fn` recreated for the same module hits the
  cache), the params by identity (an entry holds them, so their id stays unique while it
  lives). Under an outer trace (traced params) the partial runs inline. The result has
  `.lower(*args)` like a jitted function.
  """
  if not is_concrete(params):
    return functools.partial(fn, apply_fn, params, **static)
  held = params if close_params else None
  try:
    hash(apply_fn)
    model_key: Any = apply_fn
  except TypeError:  # unhashable callables are told apart by identity (the entry holds them)
    model_key = ("id", id(apply_fn))
  key = (fn, model_key, id(held), tuple(sorted(static.items())))
  entry = _BOUND.get(key)
  if entry is None or entry[1] is not held:
    bound = (functools.partial(fn, apply_fn, params, **static) if close_params
             else functools.partial(fn, apply_fn, **static))
    entry = (apply_fn, held, jax.jit(bound))
    _BOUND[key] = entry
    while len(_BOUND) > _BOUND_SIZE:
      _BOUND.popitem(last=False)
  _BOUND.move_to_end(key)
  return entry[2] if close_params else _WithParams(entry[2], params)


class _WithParams:
  """A jitted `f(params, *args)` called (and lowered) as a function of `args`."""

  def __init__(self, jitted: Any, params: Any):
    self.jitted, self.params = jitted, params

  def __call__(self, *args: Any) -> Any:
    return self.jitted(self.params, *args)

  def lower(self, *args: Any) -> Any:
    return self.jitted.lower(self.params, *args)


_BOUND: collections.OrderedDict = collections.OrderedDict()
_BOUND_SIZE = 64  # (attack core, model, static settings) combinations kept compiled


def finalize(apply_fn: ApplyFn, params: Any, images: jax.Array, adv_images: jax.Array,
             labels: jax.Array, targets: jax.Array, queries: jax.Array,
             evaluation: str = FULL_EVALUATION, evaluated: jax.Array | None = None
             ) -> AttackResult:
  """Re-checks the adversarial images with the model and measures the perturbation (jitted
  with the params closed over, see `bind`; inline under a trace). `evaluated` defaults to
  `queries`."""
  evaluated = queries if evaluated is None else evaluated
  result = bind(_finalize, apply_fn, params)(images, adv_images, labels, targets, queries,
                                             evaluated)
  return result.replace(evaluation=evaluation)


def _finalize(apply_fn, params, images, adv_images, labels, targets, queries, evaluated
              ) -> AttackResult:
  # A model that returns NaN can make the attack's image NaN; its pixels fall back to the
  # clean image, so `adv_images` stays finite and in [0, 1] (and `finite` reports it).
  adv_images = jnp.where(jnp.isfinite(adv_images), adv_images, images)
  logits = apply_fn(params, adv_images)
  finite = jnp.all(jnp.isfinite(logits), axis=-1)
  probs = jax.nn.softmax(logits, -1)
  adv_pred = jnp.argmax(logits, -1).astype(jnp.int32)
  adv_conf = jnp.max(probs, -1)
  k = min(5, logits.shape[-1])
  top5 = jax.lax.top_k(logits, k)[1]
  adv_top5_correct = jnp.any(top5 == labels[:, None], -1)
  targeted = targets >= 0
  success = jnp.where(targeted, adv_pred == targets, adv_pred != labels) & finite
  delta = (adv_images - images).reshape(images.shape[0], -1)
  changed = (adv_images != images)
  return AttackResult(
      adv_images=adv_images,
      success=success,
      adv_pred=adv_pred,
      adv_conf=adv_conf,
      adv_top5_correct=adv_top5_correct,
      target=targets,
      queries=queries.astype(jnp.int32),
      l0=jnp.sum(jnp.any(changed, -1), axis=(1, 2)).astype(jnp.int32),
      l0_fraction=jnp.mean(changed.reshape(images.shape[0], -1), -1),
      l2=jnp.linalg.norm(delta, axis=-1),
      linf=jnp.max(jnp.abs(delta), -1),
      finite=finite,
      evaluated=jnp.asarray(evaluated, jnp.float32),
  )
