"""The gradient-sign family: FGSM, the basic iterative method (BIM) and PGD.

One core, `pgd_core`, takes signed-gradient steps and projects onto the eps ball and [0, 1].
FGSM is BIM with one step of size eps; BIM is PGD without the random start (PGD adds an L2
variant). The core is pure: it runs under `jax.jit`, `jax.vmap` and inside a jitted
training step (adversarial training), with its steps in a `lax.fori_loop` (unrolled by
default: XLA's CPU backend runs convolution backward passes in a rolled loop several times
slower). Called on concrete arrays, the public `fgsm`, `bim` and `pgd` run the same start
and step as a host loop over one step jitted with the model's params closed over
(`common.bind`): it compiles one step for every step count, so an eps sweep, whose step
count follows eps under Kurakin's rule, compiles nothing new.
Target modes are choices of the loss, not new attacks: untargeted ("inverse": climb the loss
of the true label, or of the clean prediction) or toward a target (least-likely, random,
explicit) by descending that class's loss.

References:
  Goodfellow, Shlens, Szegedy, Explaining and Harnessing Adversarial Examples, ICLR 2015.
  Kurakin, Goodfellow, Bengio, Adversarial Examples in the Physical World, ICLR-W 2017.
  Madry et al., Towards Deep Learning Models Resistant to Adversarial Attacks, ICLR 2018.
  Possas, gradient-sign attacks against confidence levels (slides: least-likely and inverse).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from advsweep.attacks import checks, common, spec

LINF, L2 = common.LINF, common.L2
AWAY_FROM = ("label", "prediction")


@struct.dataclass
class BIMConfig:
  """Basic iterative method (Kurakin et al., 2017).

  Attributes:
    eps: L-inf budget in [0, 1] pixel units (traced: an eps sweep does not recompile).
    step_size: per-step size; Kurakin's 1/255.
    num_steps: steps; None means Kurakin's rule min(eps*255 + 4, 1.25*eps*255), computed
      from eps before tracing (set it when eps itself is traced).
    target: a mode of `attacks.common.TARGET_MODES`.
    away_from: for untargeted attacks, climb the loss of the "label" or of the clean
      "prediction" (the slides' inverse perturbation).
    detector_threshold: where finite, each step also descends `detector_weight` times the
      neighbour-difference score's excess over it (`common.neighbour_difference_score`):
      the attack that knows Papernot et al.'s detector and keeps under its threshold.
    detector_weight: the weight of that penalty against the loss.
  """

  eps: float = 16 / 255
  step_size: float = 1 / 255
  num_steps: int | None = struct.field(pytree_node=False, default=None)
  target: str = struct.field(pytree_node=False, default=common.UNTARGETED)
  away_from: str = struct.field(pytree_node=False, default="label")
  detector_threshold: float = struct.field(default=math.inf,
                                           metadata={common.OMIT_AT_DEFAULT: True})
  detector_weight: float = struct.field(default=1.0, metadata={common.OMIT_AT_DEFAULT: True})


@struct.dataclass
class FGSMConfig:
  """Fast gradient sign method (Goodfellow et al., 2015): one step of size eps.

  The default eps = 0.25 is the paper's MNIST setting; `detector_threshold` and
  `detector_weight` as in `BIMConfig`.
  """

  eps: float = 0.25
  target: str = struct.field(pytree_node=False, default=common.UNTARGETED)
  away_from: str = struct.field(pytree_node=False, default="label")
  detector_threshold: float = struct.field(default=math.inf,
                                           metadata={common.OMIT_AT_DEFAULT: True})
  detector_weight: float = struct.field(default=1.0, metadata={common.OMIT_AT_DEFAULT: True})


@struct.dataclass
class PGDConfig:
  """Projected gradient descent with a random start (Madry et al., 2018).

  Defaults are the paper's CIFAR-10 L-inf setting (eps 8/255, step 2/255, 7 steps).
  With `norm="l2"` steps follow the normalised gradient and project onto the L2 ball;
  `detector_threshold` and `detector_weight` as in `BIMConfig`. `restarts` runs the attack
  from that many random starts (the first is the one-restart attack's) and keeps, per image,
  the first that succeeds; `queries` counts the restarts an image needed (Madry et al.'s
  MNIST challenge: 50 restarts).
  """

  eps: float = 8 / 255
  step_size: float = 2 / 255
  num_steps: int = struct.field(pytree_node=False, default=7)
  norm: str = struct.field(pytree_node=False, default=LINF)
  random_start: bool = struct.field(pytree_node=False, default=True)
  target: str = struct.field(pytree_node=False, default=common.UNTARGETED)
  away_from: str = struct.field(pytree_node=False, default="label")
  detector_threshold: float = struct.field(default=math.inf,
                                           metadata={common.OMIT_AT_DEFAULT: True})
  detector_weight: float = struct.field(default=1.0, metadata={common.OMIT_AT_DEFAULT: True})
  restarts: int = struct.field(pytree_node=False, default=1,
                               metadata={common.OMIT_AT_DEFAULT: True})


def kurakin_num_steps(eps: float) -> int:
  """Kurakin et al.'s step count for BIM: min(eps*255 + 4, 1.25*eps*255), at least 1."""
  return max(1, int(math.ceil(min(eps * 255 + 4, 1.25 * eps * 255))))


def _project(images, adv, eps, norm):
  delta = adv - images
  if norm == LINF:
    delta = jnp.clip(delta, -eps, eps)
  else:
    flat = delta.reshape(delta.shape[0], -1)
    norms = jnp.linalg.norm(flat, axis=-1, keepdims=True)
    flat = flat * jnp.minimum(1.0, eps / jnp.maximum(norms, 1e-12))
    delta = flat.reshape(delta.shape)
  return jnp.clip(images + delta, 0.0, 1.0)


def _random_start(keys, images, eps, norm):
  """A uniform draw from the eps ball around each image (keys: one per image)."""

  def one(key, image):
    if norm == LINF:
      return jax.random.uniform(key, image.shape, image.dtype, -eps, eps)
    # Uniform in the L2 ball: a Gaussian direction and a radius eps * U^(1/d).
    dir_key, radius_key = jax.random.split(key)
    direction = jax.random.normal(dir_key, image.shape, image.dtype)
    direction = direction / jnp.linalg.norm(direction)
    return direction * eps * jax.random.uniform(radius_key) ** (1.0 / image.size)

  return _project(images, images + jax.vmap(one)(keys, images), eps, norm)


def _start(apply_fn, params, images, labels, keys, targets, eps, restart=0, *, norm,
           random_start, target_mode, away_from):
  """Targets, the class whose loss each step follows (and its sign), and the start point.

  Restart r > 0 draws a new start point; the targets stay those of restart 0. `restart` may
  be traced, so that one compiled start serves every restart of the host loop."""
  keys = jax.vmap(lambda k: jax.random.split(k, 2))(common.per_image_keys(keys, len(images)))
  target_keys, start_keys = keys[:, 0], _restart_keys(keys[:, 1], restart)
  clean_logits = apply_fn(params, images)
  targets = common.choose_targets(target_mode, target_keys, labels, clean_logits, targets)
  if target_mode != common.UNTARGETED:
    loss_class, sign = targets, -1.0  # descend the target's loss
  else:
    loss_class = labels if away_from == "label" else jnp.argmax(clean_logits, -1)
    sign = 1.0  # climb the loss of the class to leave
  adv = _random_start(start_keys, images, eps, norm) if random_start else images
  return adv, targets, loss_class.astype(jnp.int32), jnp.asarray(sign, images.dtype)


def _restart_keys(keys: jax.Array, restart: int | jax.Array) -> jax.Array:
  """Restart 0 keeps the images' start keys; restart r > 0 folds r into each."""
  fold = lambda ks: jax.vmap(lambda k: jax.random.fold_in(k, restart))(ks)  # noqa: E731
  if isinstance(restart, int):
    return fold(keys) if restart else keys
  return jax.lax.cond(restart > 0, fold, lambda ks: ks, keys)


def _step(apply_fn, params, images, adv, loss_class, sign, eps, step_size, detector, *,
          norm):
  """One signed (L-inf) or normalised (L2) gradient step, projected onto the budget.

  `detector` is (threshold, weight): the step also descends the weighted excess of the
  neighbour-difference score over the threshold (none while the threshold is infinite).
  """
  threshold, weight = detector

  def loss(x):
    logits = apply_fn(params, x)
    ce = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, loss_class))
    excess = jax.nn.relu(common.neighbour_difference_score(x) - threshold)
    return ce - sign * weight * jnp.sum(jnp.where(jnp.isfinite(threshold), excess, 0.0))

  grad = jax.grad(loss)(adv)
  if norm == LINF:
    direction = jnp.sign(grad)
  else:
    flat = grad.reshape(grad.shape[0], -1)
    flat = flat / jnp.maximum(jnp.linalg.norm(flat, axis=-1, keepdims=True), 1e-12)
    direction = flat.reshape(grad.shape)
  return _project(images, adv + sign * step_size * direction, eps, norm)


def _detector(config: PGDConfig, dtype: Any) -> tuple[jax.Array, jax.Array]:
  return (jnp.asarray(config.detector_threshold, dtype),
          jnp.asarray(config.detector_weight, dtype))


def _as_pgd(config: Any) -> PGDConfig:
  """FGSM and BIM as the PGD settings they are: no random start, L-inf, and for FGSM one
  step of size eps."""
  if isinstance(config, PGDConfig):
    return config
  if isinstance(config, FGSMConfig):
    return PGDConfig(eps=config.eps, step_size=config.eps, num_steps=1, random_start=False,
                     target=config.target, away_from=config.away_from,
                     detector_threshold=config.detector_threshold,
                     detector_weight=config.detector_weight)
  if isinstance(config, BIMConfig):
    num_steps = config.num_steps
    if num_steps is None:
      if not checks.is_concrete(config.eps):
        raise ValueError("BIMConfig(num_steps=None) takes Kurakin's step count from eps, "
                         "which is traced here; set num_steps")
      num_steps = kurakin_num_steps(float(config.eps))
    return PGDConfig(eps=config.eps, step_size=config.step_size, num_steps=num_steps,
                     random_start=False, target=config.target, away_from=config.away_from,
                     detector_threshold=config.detector_threshold,
                     detector_weight=config.detector_weight)
  raise TypeError(f"expected FGSMConfig, BIMConfig or PGDConfig; got {type(config).__name__}")


def check_config(config: Any) -> None:
  """Raises ValueError naming a bad value of an FGSM, BIM or PGD config."""
  for name in ("eps", "step_size", "detector_weight"):
    if hasattr(config, name):
      checks.check_at_least(name, getattr(config, name), 0.0)
  num_steps = getattr(config, "num_steps", 1)
  if num_steps is not None and (not isinstance(num_steps, int) or num_steps < 1):
    raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}")
  restarts = getattr(config, "restarts", 1)
  if not isinstance(restarts, int) or restarts < 1:
    raise ValueError(f"restarts must be an integer >= 1; got {restarts!r}")
  if restarts > 1 and not config.random_start:
    raise ValueError("restarts > 1 needs random_start = true: without it every restart is "
                     "the same attack")
  checks.check_choice("target mode", config.target, common.TARGET_MODES)
  checks.check_choice("away_from", config.away_from, AWAY_FROM)
  checks.check_choice("norm", getattr(config, "norm", LINF), (LINF, L2))


def _statics(config: PGDConfig) -> dict[str, Any]:
  return dict(norm=config.norm, random_start=config.random_start, target_mode=config.target,
              away_from=config.away_from)


def pgd_core(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
             key: jax.Array, config: Any = None, *, targets: jax.Array | None = None,
             evaluator: Any = None, unroll: int | bool = True) -> common.AttackResult:
  """The gradient-sign family's pure core (FGSM, BIM or PGD by the config's class).

  Traceable end to end: the start, `num_steps` projected steps in a `lax.fori_loop`
  (`unroll` as `lax.fori_loop` takes it; True unrolls every step) and the re-check. Takes
  no checks of its own: the public attacks check, then call it under a trace.
  """
  del evaluator  # the gradient attacks evaluate the full model
  config = _as_pgd(config or PGDConfig())
  start = lambda r: functools.partial(_start, apply_fn, params, **_statics(config),  # noqa: E731
                                      restart=r)
  step = functools.partial(_step, apply_fn, params, norm=config.norm)

  def repeat(step_once, adv):
    return jax.lax.fori_loop(0, config.num_steps, lambda _, a: step_once(a), adv,
                             unroll=unroll)

  return _iterate(apply_fn, params, images, labels, key, targets, config, start, step, repeat)


def _host_loop(apply_fn, params, images, labels, key, targets, config: PGDConfig
               ) -> common.AttackResult:
  """`pgd_core` on concrete arrays: the same start and step, the steps a host loop over one
  step jitted with the params closed over (see the module doc).

  Restart r > 0 runs only on the images no earlier restart fooled (padded to a power of two
  by repeating them, `common.bucket`, so a few compiled programs serve every batch): a
  fooled image keeps its first success whatever a later restart finds, so this is the
  traced core's result, with `evaluated` counting the rows really computed (the padding
  shared among the images it was added for)."""
  bound_start = common.bind(_start, apply_fn, params, **_statics(config))
  start = lambda r: functools.partial(_start_at, bound_start, np.int32(r))  # noqa: E731
  step = common.bind(_step, apply_fn, params, norm=config.norm)

  def repeat(step_once, adv):
    for _ in range(config.num_steps):
      adv = step_once(adv)
    return adv

  keys = common.per_image_keys(key, len(images))
  run = functools.partial(_restart, apply_fn, params, config=config, step=step, repeat=repeat)
  result = run(images, labels, keys, targets, start=start(0))
  for restart in range(1, config.restarts):
    todo = np.flatnonzero(~np.asarray(result.success))
    if not len(todo):
      break  # every image fooled: a restart could change nothing but the work counted
    rows = np.resize(todo, common.bucket(len(todo)))
    if len(rows) >= len(images):  # the batch would not shrink
      result = common.first_success(result, run(images, labels, keys, targets,
                                                start=start(restart)))
      continue
    later = run(images[rows], labels[rows], keys[rows],
                None if targets is None else targets[rows], start=start(restart))
    later = jax.tree.map(lambda a: a[:len(todo)], later)  # noqa: B023
    later = later.replace(evaluated=later.evaluated * (len(rows) / len(todo)))
    merged = common.first_success(jax.tree.map(lambda a: a[todo], result), later)  # noqa: B023
    result = jax.tree.map(lambda a, b: a.at[todo].set(b), result, merged)  # noqa: B023
  return result


def _start_at(bound_start, restart, images, labels, keys, targets, eps):
  """The host loop's start for one restart: the restart index is an argument of the compiled
  start, not a constant of it."""
  return bound_start(images, labels, keys, targets, eps, restart)


def _iterate(apply_fn, params, images, labels, key, targets, config: PGDConfig, start, step,
             repeat) -> common.AttackResult:
  """Per restart r, the start `start(r)`, `repeat(step_once, adv)` of the projected step and
  the re-check; an image keeps its first successful restart (`pgd_core`'s body, a `lax`
  loop)."""
  result = None
  for restart in range(config.restarts):
    run = _restart(apply_fn, params, images, labels, key, targets, config=config,
                   start=start(restart), step=step, repeat=repeat)
    result = run if result is None else common.first_success(result, run)
  return result


def _restart(apply_fn, params, images, labels, keys, targets, *, config: PGDConfig, start,
             step, repeat) -> common.AttackResult:
  """One restart: the start point, `num_steps` projected steps and the re-check."""
  eps = common.budget(config.eps, images.dtype)
  step_size = jnp.asarray(config.step_size, images.dtype)
  detector = _detector(config, images.dtype)
  queries = jnp.full(labels.shape, config.num_steps + 1, jnp.int32)  # clean forward + steps
  adv, run_targets, loss_class, sign = start(images, labels, keys, targets, eps)
  step_once = functools.partial(_step_from, step, images, loss_class, sign, eps, step_size,
                                detector)
  return common.finalize(apply_fn, params, images, repeat(step_once, adv), labels,
                         run_targets, queries)


def _step_from(step, images, loss_class, sign, eps, step_size, detector, adv):
  return step(images, adv, loss_class, sign, eps, step_size, detector)


def prepare(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
            key: jax.Array, config: Any = None, *, targets: jax.Array | None = None,
            evaluator: Any = None, default: type = PGDConfig) -> common.PreparedCall:
  """Checks the inputs; returns the attack, ready to run (`default`: the config class whose
  paper setting `config=None` means)."""
  del evaluator
  config = config if config is not None else default()
  check_config(config)
  config = _as_pgd(config)
  images, labels, targets, _, concrete = checks.checked_inputs(
      apply_fn, params, images, labels, key, config, targets=targets,
      target_mode=config.target, target_modes=common.TARGET_MODES)
  args = (apply_fn, params, images, labels, key)
  if not concrete:
    return common.PreparedCall(functools.partial(pgd_core, *args, config, targets=targets))
  step = common.bind(_step, apply_fn, params, norm=config.norm)
  eps = common.budget(config.eps, images.dtype)
  lower_step = functools.partial(step.lower, images, images, labels, jnp.ones((), images.dtype),
                                 eps, jnp.asarray(config.step_size, images.dtype),
                                 _detector(config, images.dtype))
  return common.PreparedCall(functools.partial(_host_loop, *args, targets, config), lower_step)


def _attack(default: type, apply_fn: common.ApplyFn, params: Any, images: jax.Array,
            labels: jax.Array, key: jax.Array, config: Any = None, *,
            targets: jax.Array | None = None, evaluator: Any = None) -> common.AttackResult:
  return prepare(apply_fn, params, images, labels, key, config, targets=targets,
                 evaluator=evaluator, default=default)()


def _core(default: type, apply_fn, params, images, labels, key, config=None, *, targets=None,
          evaluator=None, unroll: int | bool = True) -> common.AttackResult:
  return pgd_core(apply_fn, params, images, labels, key,
                  config if config is not None else default(), targets=targets,
                  evaluator=evaluator, unroll=unroll)


# The cores of FGSM and BIM: `pgd_core` with their paper settings for `config=None`.
fgsm_core = functools.partial(_core, FGSMConfig)
bim_core = functools.partial(_core, BIMConfig)


def bim(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
        key: jax.Array, config: BIMConfig | None = None, *,
        targets: jax.Array | None = None, evaluator: Any = None) -> common.AttackResult:
  """Basic iterative method: `num_steps` signed steps of `step_size`, clipped to eps.

  Args:
    apply_fn: `apply_fn(params, images[B,H,W,C]) -> logits[B,K]`.
    params: the model's variables.
    images: [B,H,W,C] float in [0, 1].
    labels: [B] true classes.
    key: PRNG key, or one per image [B] (used by the random target mode).
    config: `BIMConfig`; None is Kurakin et al.'s setting.
    targets: [B] classes for `target="explicit"`.
    evaluator: ignored (the family's one signature).

  Traces: under `jax.jit` or `jax.vmap` it runs `pgd_core`.

  References: Kurakin, Goodfellow, Bengio, Adversarial Examples in the Physical World, 2017.
  """
  return _attack(BIMConfig, apply_fn, params, images, labels, key, config, targets=targets,
                 evaluator=evaluator)


def fgsm(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
         key: jax.Array, config: FGSMConfig | None = None, *,
         targets: jax.Array | None = None, evaluator: Any = None) -> common.AttackResult:
  """Fast gradient sign method: BIM with one step of size eps (arguments as `bim`).

  References: Goodfellow, Shlens, Szegedy, Explaining and Harnessing Adversarial Examples,
  ICLR 2015.
  """
  return _attack(FGSMConfig, apply_fn, params, images, labels, key, config, targets=targets,
                 evaluator=evaluator)


def pgd(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
        key: jax.Array, config: PGDConfig | None = None, *,
        targets: jax.Array | None = None, evaluator: Any = None) -> common.AttackResult:
  """Projected gradient descent from a random start in the eps ball, L-inf or L2 (arguments
  as `bim`).

  References: Madry et al., Towards Deep Learning Models Resistant to Adversarial Attacks,
  ICLR 2018.
  """
  return _attack(PGDConfig, apply_fn, params, images, labels, key, config, targets=targets,
                 evaluator=evaluator)


def _forward_equivalents(config: Any, num_features: int, num_classes: int) -> float:
  del num_features, num_classes
  config = _as_pgd(config)
  # Per restart, a step is a forward and a backward pass, then the re-check; the clean pass.
  return config.restarts * (3.0 * config.num_steps + 1) + 1


def _spec(name: str, run: Any, core: Any, config_cls: type, quick: dict[str, Any]
          ) -> spec.AttackSpec:
  return spec.AttackSpec(
      name=name, run=run, core=core, config_cls=config_cls,
      prepare=functools.partial(prepare, default=config_cls),
      check_config=check_config, within_budget=common.within_eps,
      forward_equivalents=_forward_equivalents, unit=lambda config: spec.FORWARD_BACKWARD,
      setup_queries=1, budget_field="eps", quick=quick)


FGSM = _spec("fgsm", fgsm, fgsm_core, FGSMConfig, {})
BIM = _spec("bim", bim, bim_core, BIMConfig, {"num_steps": 5})
PGD = _spec("pgd", pgd, pgd_core, PGDConfig, {"num_steps": 5})
