"""Auto-PGD (APGD) and its targeted version APGD-T: PGD without a step size to tune.

APGD (Croce & Hein 2020, Algorithm 1) starts from a random point on the eps sphere with step
2 eps, takes momentum steps (alpha = 0.75) and halves an image's step at fixed checkpoints
when its loss stalls: condition 1, the loss rose in fewer than rho = 0.75 of the steps since
the last checkpoint; condition 2, the step was not halved at the last checkpoint and the best
loss has not improved since. A halving restarts the image from its best point so far. The
checkpoints are w_j = ceil(p_j N) with p_0 = 0, p_1 = 0.22 and p_{j+1} = p_j +
max(p_j - p_{j-1} - 0.03, 0.06) (`checkpoints`).

The losses are cross-entropy and the difference of logits ratio (DLR), which does not change
when the logits are rescaled, so a saturated softmax does not hide the gradient:

    DLR(z, y)      = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)
    DLR-T(z, y, t) = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)

with z_pi1 >= z_pi2 >= ... the sorted logits. APGD-T runs the targeted DLR loss toward each
of the top `num_target_classes` other classes of the clean logits in turn
(`common.ranked_targets`), an image keeping the first target that fools the model. As in
AutoAttack, any misclassification counts as a success of APGD-T, and an image's result is
the last misclassified point the iterations visited (else the point of highest loss).

The core is pure and traceable (`jax.jit`, `jax.vmap`, a training step): the iterations are a
`lax.fori_loop` whose loop state is `APGDState`, the checkpoints static. Every random choice
(the start point of each restart and target) comes from the image's own key, so a batch
gives each image what it would get alone, and a driver may run later targets or restarts on
the images still robust only (`bench.evaluation.standard`) with the same result.

References:
  Croce, Hein, Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks, ICML 2020 (Algorithm 1, Sec. 3; DLR in Sec. 4).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from advsweep.attacks import checks, common, spec
from advsweep.attacks.gradient import L2, LINF

CE, DLR = "ce", "dlr"
LOSSES = (CE, DLR)


@struct.dataclass
class APGDConfig:
  """APGD, untargeted (AutoAttack's APGD-CE, or APGD-DLR with `loss="dlr"`).

  Attributes:
    eps: the L-inf or L2 budget in [0, 1] pixel units (traced).
    num_steps: iterations N (AutoAttack's 100); each is one forward and backward pass.
    restarts: random restarts; an image keeps the first that fools the model.
    norm: "linf" or "l2".
    loss: "ce" (cross-entropy) or "dlr" (difference of logits ratio).
    rho: condition 1's share of loss increases between checkpoints (0.75).
    momentum: alpha, the weight of the new step against the last one (0.75).
  """

  eps: float = 8 / 255
  num_steps: int = struct.field(pytree_node=False, default=100)
  restarts: int = struct.field(pytree_node=False, default=1)
  norm: str = struct.field(pytree_node=False, default=LINF)
  loss: str = struct.field(pytree_node=False, default=CE)
  rho: float = 0.75
  momentum: float = 0.75


@struct.dataclass
class APGDTConfig:
  """APGD-T: APGD with the targeted DLR loss toward each of the top `num_target_classes`
  other classes of the clean logits (AutoAttack's 9), one after the other.

  Attributes as `APGDConfig`, less `loss`, plus `num_target_classes`.
  """

  eps: float = 8 / 255
  num_steps: int = struct.field(pytree_node=False, default=100)
  restarts: int = struct.field(pytree_node=False, default=1)
  norm: str = struct.field(pytree_node=False, default=LINF)
  num_target_classes: int = struct.field(pytree_node=False, default=9)
  rho: float = 0.75
  momentum: float = 0.75


def checkpoints(num_steps: int) -> list[int]:
  """The checkpoints w_1 < w_2 < ... < N of Algorithm 1: the iteration counts after which
  the step size may be halved.

  In integers, as AutoAttack computes them: the first window is int(0.22 N) iterations, each
  later one int(0.03 N) shorter than the one before, down to int(0.06 N) (each at least
  one), which is ceil(p_j N) of the paper's p_j up to rounding.
  """
  first = max(int(0.22 * num_steps), 1)
  shrink = max(int(0.03 * num_steps), 1)
  shortest = max(int(0.06 * num_steps), 1)
  out, window, at = [], first, first
  while at <= num_steps:
    out.append(at)
    window = max(window - shrink, shortest)
    at += window
  return out


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[B] the difference of logits ratio -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)
  (Croce & Hein 2020, Eq. 5); the model needs at least 3 classes."""
  ranked = -jnp.sort(-logits, axis=-1)
  own = jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
  top_is_own = jnp.argmax(logits, -1) == labels
  best_other = jnp.where(top_is_own, ranked[:, 1], ranked[:, 0])
  return -(own - best_other) / (ranked[:, 0] - ranked[:, 2] + 1e-12)


def dlr_targeted_loss(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
  """[B] the targeted DLR loss -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)
  (Croce & Hein 2020, Sec. 4); the model needs at least 4 classes."""
  ranked = -jnp.sort(-logits, axis=-1)
  own = jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
  target = jnp.take_along_axis(logits, targets[:, None], -1)[:, 0]
  return -(own - target) / (ranked[:, 0] - 0.5 * (ranked[:, 2] + ranked[:, 3]) + 1e-12)


class APGDState(NamedTuple):
  """The iteration's state, one entry per image."""

  adv: jax.Array  # [B,H,W,C] x^(k), the current point
  previous: jax.Array  # [B,H,W,C] x^(k-1), for the momentum term
  grad: jax.Array  # [B,H,W,C] the loss's gradient at x^(k)
  loss: jax.Array  # [B] f(x^(k))
  best: jax.Array  # [B,H,W,C] x_max, the point of highest loss
  best_grad: jax.Array  # [B,H,W,C] the gradient there
  best_loss: jax.Array  # [B] f_max
  fooled_at: jax.Array  # [B,H,W,C] the last misclassified point visited
  fooled: jax.Array  # [B] some visited point was misclassified
  spent: jax.Array  # [B] forward-backward passes spent: the start and each iteration
  step: jax.Array  # [B] eta, the step size
  increases: jax.Array  # [B] steps since the last checkpoint that raised the loss
  checked_loss: jax.Array  # [B] f_max at the last checkpoint
  halved_last: jax.Array  # [B] the step was halved at the last checkpoint


def _per_image_norm(x: jax.Array, norm: str) -> jax.Array:
  flat = x.reshape(x.shape[0], -1)
  value = jnp.max(jnp.abs(flat), -1) if norm == LINF else jnp.linalg.norm(flat, axis=-1)
  return value.reshape((-1,) + (1,) * (x.ndim - 1))


def _project(images: jax.Array, adv: jax.Array, eps: jax.Array, norm: str) -> jax.Array:
  """Onto the eps ball around `images` and the [0, 1] box (AutoAttack's order for L2:
  rescale into the ball, then clip)."""
  delta = adv - images
  if norm == LINF:
    delta = jnp.clip(delta, -eps, eps)
  else:
    size = _per_image_norm(delta, L2)
    delta = delta / (size + 1e-12) * jnp.minimum(eps, size)
  return jnp.clip(images + delta, 0.0, 1.0)


def _start(key: jax.Array, image: jax.Array, eps: jax.Array, norm: str) -> jax.Array:
  """A random point at distance eps in the norm (AutoAttack's start), clipped to [0, 1]."""
  if norm == LINF:
    t = jax.random.uniform(key, image.shape, image.dtype, -1.0, 1.0)
    t = t / (jnp.max(jnp.abs(t)) + 1e-12)
  else:
    t = jax.random.normal(key, image.shape, image.dtype)
    t = t / (jnp.linalg.norm(t) + 1e-12)
  return jnp.clip(image + eps * t, 0.0, 1.0)


def _direction(grad: jax.Array, norm: str) -> jax.Array:
  if norm == LINF:
    return jnp.sign(grad)
  return grad / (_per_image_norm(grad, L2) + 1e-12)


def _loss(apply_fn, params, x, labels, targets, loss):
  """(per-image loss [B], logits [B,K]) at `x`: CE, DLR, or targeted DLR toward
  `targets`."""
  logits = apply_fn(params, x)
  if loss == CE:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels), logits
  if loss == DLR:
    return dlr_loss(logits, labels), logits
  return dlr_targeted_loss(logits, labels, targets), logits


def _evaluate(apply_fn, params, x, labels, targets, loss):
  """The loss, its gradient and which points are misclassified (one forward and backward
  pass; images are independent, so the gradient of the sum is each image's)."""
  def total(z):
    per_image, logits = _loss(apply_fn, params, z, labels, targets, loss)
    return jnp.sum(per_image), (per_image, logits)

  (_, (per_image, logits)), grad = jax.value_and_grad(total, has_aux=True)(x)
  return per_image, grad, jnp.argmax(logits, -1) != labels


def _init(apply_fn, params, images, labels, targets, keys, eps, *, loss, norm) -> APGDState:
  """The state at the random start x^(0), step 2 eps (Algorithm 1)."""
  adv = jax.vmap(lambda k, x: _start(k, x, eps, norm))(keys, images)
  value, grad, fooled = _evaluate(apply_fn, params, adv, labels, targets, loss)
  batch = images.shape[0]
  return APGDState(
      adv=adv, previous=adv, grad=grad, loss=value, best=adv, best_grad=grad,
      best_loss=value, fooled_at=adv, fooled=fooled, spent=jnp.ones((batch,), jnp.int32),
      step=jnp.full((batch,), 2.0, images.dtype) * eps,
      increases=jnp.zeros((batch,), jnp.int32), checked_loss=value,
      halved_last=jnp.ones((batch,), bool))


def _iteration(apply_fn, params, images, labels, targets, eps, rho, momentum,
               s: APGDState, i, at_check, window, *, loss, norm) -> APGDState:
  """Iteration `i` of Algorithm 1: a momentum step, and at a checkpoint (`at_check`, after
  `window` iterations since the last) the step-size rule. An image already fooled keeps its
  state: its outcome is decided, so a host loop may drop it (`_host`) with the same result."""
  shape = (-1,) + (1,) * (images.ndim - 1)
  mask = lambda m: m.reshape(shape)  # noqa: E731
  z = _project(images, s.adv + mask(s.step) * _direction(s.grad, norm), eps, norm)
  a = jnp.where(i > 0, momentum, 1.0)
  new = _project(images, s.adv + a * (z - s.adv) + (1 - a) * (s.adv - s.previous), eps, norm)
  value, grad, fooled = _evaluate(apply_fn, params, new, labels, targets, loss)
  better = value > s.best_loss
  best = jnp.where(mask(better), new, s.best)
  best_grad = jnp.where(mask(better), grad, s.best_grad)
  best_loss = jnp.where(better, value, s.best_loss)
  increases = s.increases + (value > s.loss).astype(jnp.int32)
  # Condition 1 (too few increases since the last checkpoint) or condition 2 (not halved at
  # the last checkpoint and no better loss since) halves the step and restarts from x_max.
  halve = at_check & ((increases <= rho * window)
                      | (~s.halved_last & (s.checked_loss >= best_loss)))
  moved = APGDState(
      adv=jnp.where(mask(halve), best, new), previous=s.adv,
      grad=jnp.where(mask(halve), best_grad, grad), loss=value, best=best,
      best_grad=best_grad, best_loss=best_loss,
      fooled_at=jnp.where(mask(fooled), new, s.fooled_at), fooled=s.fooled | fooled,
      spent=s.spent + 1, step=jnp.where(halve, s.step / 2, s.step),
      increases=jnp.where(at_check, 0, increases),
      checked_loss=jnp.where(at_check, best_loss, s.checked_loss),
      halved_last=jnp.where(at_check, halve, s.halved_last))
  return jax.tree.map(
      lambda old, now: jnp.where(s.fooled.reshape((-1,) + (1,) * (now.ndim - 1)), old, now),
      s, moved)


def _schedule(num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Per iteration: whether a checkpoint ends it, and the iterations since the last one."""
  at_check = np.zeros(num_steps, bool)
  window = np.zeros(num_steps, np.float32)
  previous = 0
  for w in checkpoints(num_steps):
    at_check[w - 1], window[w - 1], previous = True, w - previous, w
  return at_check, window


def iterate(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
            targets: jax.Array, keys: jax.Array, eps: jax.Array, rho: jax.Array,
            momentum: jax.Array, *, num_steps: int, loss: str, norm: str) -> APGDState:
  """One APGD run (Algorithm 1) from a random start drawn from `keys` ([B], one per image):
  the state after `num_steps` iterations, in a `lax.fori_loop` (traceable).

  `loss` is "ce", "dlr" or "dlr_targeted" (toward `targets`; ignored by the others).
  """
  at_check, window = (jnp.asarray(v) for v in _schedule(num_steps))
  state = _init(apply_fn, params, images, labels, targets, keys, eps, loss=loss, norm=norm)
  return jax.lax.fori_loop(
      0, num_steps,
      lambda i, s: _iteration(apply_fn, params, images, labels, targets, eps, rho, momentum,
                              s, i, at_check[i], window[i], loss=loss, norm=norm), state)


def _outcome(state: APGDState) -> jax.Array:
  """The run's point per image: the misclassified point found (the first: the iterations
  stop there, where AutoAttack's go on and return the last), else the point of highest
  loss."""
  shape = (-1,) + (1,) * (state.adv.ndim - 1)
  return jnp.where(state.fooled.reshape(shape), state.fooled_at, state.best)


DLR_TARGETED = "dlr_targeted"


class _Run(NamedTuple):
  """One APGD run of an attack: the loss, the target rank (-1: untargeted), the restart."""

  loss: str
  rank: int
  restart: int


def _runs(config: Any) -> list[_Run]:
  """The runs an attack makes, in order: APGD's restarts, or APGD-T's restarts per target."""
  if isinstance(config, APGDTConfig):
    return [_Run(DLR_TARGETED, rank, restart) for rank in range(config.num_target_classes)
            for restart in range(config.restarts)]
  return [_Run(config.loss, -1, restart) for restart in range(config.restarts)]


def _run_keys(keys: jax.Array, run: _Run) -> jax.Array:
  """The start keys of a run: the image's key folded with the target rank and restart, so
  a run gives an image the same start in any batch."""
  return jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, run.rank + 1),
                                               run.restart))(keys)


def _core(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
          key: jax.Array, config: Any) -> common.AttackResult:
  """Every run of `config` on every image, an image keeping its first success."""
  keys = common.per_image_keys(key, images.shape[0])
  eps = common.budget(config.eps, images.dtype)
  targeted = isinstance(config, APGDTConfig)
  ranked = (common.ranked_targets(apply_fn(params, images), config.num_target_classes)
            if targeted else labels[:, None])
  no_target = jnp.full(labels.shape, common.NO_TARGET, jnp.int32)
  result = None
  for run in _runs(config):
    state = iterate(apply_fn, params, images, labels, ranked[:, max(run.rank, 0)],
                    _run_keys(keys, run), eps, config.rho, config.momentum,
                    num_steps=config.num_steps, loss=run.loss, norm=config.norm)
    queries = state.spent + int(targeted and result is None)
    out = common.finalize(apply_fn, params, images, _outcome(state), labels, no_target,
                          queries)
    result = out if result is None else common.first_success(result, out)
  return result


def apgd_core(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
              key: jax.Array, config: APGDConfig | None = None, *,
              targets: jax.Array | None = None, evaluator: Any = None) -> common.AttackResult:
  """APGD's pure core (see the module doc): `restarts` runs of `num_steps` iterations, an
  image keeping the first restart that fools the model; traceable end to end.

  `queries` counts the forward and backward passes: one at the start and one per iteration
  until the image is fooled, for each restart it needed.
  """
  del targets, evaluator  # untargeted; the full model
  return _core(apply_fn, params, images, labels, key,
               config if config is not None else APGDConfig())


def apgd_t_core(apply_fn: common.ApplyFn, params: Any, images: jax.Array,
                labels: jax.Array, key: jax.Array, config: APGDTConfig | None = None, *,
                targets: jax.Array | None = None, evaluator: Any = None
                ) -> common.AttackResult:
  """APGD-T's pure core: for each of the top `num_target_classes` other classes of the
  clean logits, `restarts` APGD runs of the targeted DLR loss; an image keeps the first
  run that fools it. `queries`: the clean forward pass, and the passes of each run the
  image needed (as `apgd_core`)."""
  del targets, evaluator
  return _core(apply_fn, params, images, labels, key,
               config if config is not None else APGDTConfig())


COMPACT_EVERY = 4  # iterations between a host loop's checks for images to drop


def _host(apply_fn, params, images, labels, key, config) -> common.AttackResult:
  """`_core` on concrete arrays, the same result per image with less work: each run's
  iterations a host loop over one iteration jitted with the model's params closed over
  (XLA's CPU backend runs a rolled loop of convolution backward passes several times
  slower); each run only on the images no earlier run has fooled, and within a run the
  images fooled so far dropped every few iterations (batches padded to a few sizes)."""
  batch = images.shape[0]
  keys = common.per_image_keys(key, batch)
  scalars = [jnp.asarray(v, images.dtype) for v in (config.eps, config.rho, config.momentum)]
  targeted = isinstance(config, APGDTConfig)
  ranked = np.asarray(common.ranked_targets(common.bind(_logits, apply_fn, params)(images),
                                            config.num_target_classes)
                      if targeted else labels[:, None])
  adv = np.asarray(images).copy()
  fooled = np.zeros(batch, bool)
  queries = np.full(batch, int(targeted), np.int64)
  for run in _runs(config):
    todo = np.flatnonzero(~fooled)
    if not len(todo):
      break
    point, run_fooled, spent = _host_run(apply_fn, params, images, labels, keys, ranked,
                                         todo, run, scalars, config)
    queries[todo] += spent
    adv[todo] = point
    fooled[todo] = run_fooled
  no_target = jnp.full(labels.shape, common.NO_TARGET, jnp.int32)
  return common.finalize(apply_fn, params, images, jnp.asarray(adv), labels, no_target,
                         jnp.asarray(queries, jnp.int32))


def _host_run(apply_fn, params, images, labels, keys, ranked, todo, run: _Run, scalars,
              config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One run on images `todo`: their points, whether fooled, and the passes spent."""
  at_check, window = _schedule(config.num_steps)
  init = common.bind(_init, apply_fn, params, loss=run.loss, norm=config.norm)
  step = common.bind(_iteration, apply_fn, params, loss=run.loss, norm=config.norm)
  point = np.asarray(images)[todo].copy()
  run_fooled = np.zeros(len(todo), bool)
  spent = np.zeros(len(todo), np.int64)
  active = np.arange(len(todo))  # positions in `todo` still attacked
  rows = np.resize(todo, common.bucket(len(todo)))  # padded by repeating images
  x, y, t = images[rows], labels[rows], ranked[rows, max(run.rank, 0)]
  state = init(x, y, t, _run_keys(keys[rows], run), scalars[0])

  def record(state, positions):
    point[active[positions]] = np.asarray(_outcome(state))[positions]
    run_fooled[active[positions]] = np.asarray(state.fooled)[positions]
    spent[active[positions]] = np.asarray(state.spent)[positions]

  for i in range(config.num_steps):
    state = step(x, y, t, *scalars, state, i, bool(at_check[i]), float(window[i]))
    if (i + 1) % COMPACT_EVERY or i + 1 == config.num_steps:
      continue
    done = np.asarray(state.fooled)[:len(active)]
    keep = np.flatnonzero(~done)
    if common.bucket(max(len(keep), 1)) >= len(x) and len(keep):
      continue  # the batch would not shrink
    record(state, np.flatnonzero(done))
    if not len(keep):
      return point, run_fooled, spent
    select = np.resize(keep, common.bucket(len(keep)))
    state = jax.tree.map(lambda a: a[select], state)  # noqa: B023
    x, y, t, active = x[select], y[select], t[select], active[keep]
  record(state, np.arange(len(active)))
  return point, run_fooled, spent


def _logits(apply_fn, params, images):
  return apply_fn(params, images)


def check_config(config: Any) -> None:
  """Raises ValueError naming a bad value of an APGD or APGD-T config."""
  checks.check_at_least("eps", config.eps, 0.0)
  checks.check_at_least("rho", config.rho, 0.0)
  checks.check_at_least("momentum", config.momentum, 0.0)
  if checks.is_concrete(config.momentum) and float(config.momentum) > 1:
    raise ValueError(f"momentum must lie in [0, 1]; got {config.momentum}")
  for name in ("num_steps", "restarts", "num_target_classes"):
    value = getattr(config, name, 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
  checks.check_choice("norm", config.norm, (LINF, L2))
  checks.check_choice("loss", getattr(config, "loss", CE), LOSSES)


def _minimum_classes(config: Any) -> int:
  if isinstance(config, APGDTConfig):
    return max(4, config.num_target_classes + 1)  # DLR-T reads the 4th logit
  return 3 if config.loss == DLR else 2


def prepare(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
            key: jax.Array, config: Any = None, *, targets: jax.Array | None = None,
            evaluator: Any = None, default: type = APGDConfig) -> common.PreparedCall:
  """Checks the inputs; returns APGD (or APGD-T, by `default` or the config's class) ready
  to run: the host loop on concrete inputs, the pure core under a trace."""
  del evaluator
  config = config if config is not None else default()
  if not isinstance(config, APGDConfig | APGDTConfig):
    raise TypeError(f"expected APGDConfig or APGDTConfig; got {type(config).__name__}")
  check_config(config)
  if targets is not None:
    raise ValueError("APGD is untargeted and APGD-T picks its own targets (the top "
                     "num_target_classes other classes); do not pass targets")
  images, labels, _, num_classes, concrete = checks.checked_inputs(
      apply_fn, params, images, labels, key, config)
  if num_classes < _minimum_classes(config):
    what = (f"APGD-T toward the top {config.num_target_classes} other classes"
            if isinstance(config, APGDTConfig) else "the DLR loss")
    raise ValueError(f"{what} needs a model of at least {_minimum_classes(config)} classes; "
                     f"this one has {num_classes}. Lower num_target_classes, or use loss "
                     "'ce'")
  args = (apply_fn, params, images, labels, key, config)
  if not concrete:
    return common.PreparedCall(functools.partial(_core, *args))
  step = common.bind(_iteration, apply_fn, params, loss=_runs(config)[0].loss,
                     norm=config.norm)

  def lower():
    state = jax.eval_shape(
        lambda: _init(apply_fn, params, images, labels, labels,
                      common.per_image_keys(key, images.shape[0]), config.eps,
                      loss=_runs(config)[0].loss, norm=config.norm))
    eps = common.budget(config.eps, images.dtype)
    return step.lower(images, labels, labels, eps, eps, eps, state, 0, True, 1.0)

  return common.PreparedCall(functools.partial(_host, *args), lower)


def apgd(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
         key: jax.Array, config: APGDConfig | None = None, *,
         targets: jax.Array | None = None, evaluator: Any = None) -> common.AttackResult:
  """Auto-PGD, untargeted, with the cross-entropy or DLR loss (see the module doc).

  Args:
    apply_fn: `apply_fn(params, images[B,H,W,C]) -> logits[B,K]`, differentiable.
    params: the model's variables.
    images: [B,H,W,C] float in [0, 1].
    labels: [B] true classes.
    key: PRNG key, or one per image [B]: the random starts.
    config: `APGDConfig`; None is AutoAttack's APGD-CE at eps 8/255, L-inf.
    targets: must be None (untargeted).
    evaluator: ignored (the attacks' one signature).

  Traces: under `jax.jit` or `jax.vmap` it runs `apgd_core`.

  References: Croce, Hein, Reliable evaluation of adversarial robustness with an ensemble of
  diverse parameter-free attacks, ICML 2020.
  """
  return prepare(apply_fn, params, images, labels, key, config, targets=targets,
                 evaluator=evaluator)()


def apgd_t(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
           key: jax.Array, config: APGDTConfig | None = None, *,
           targets: jax.Array | None = None, evaluator: Any = None) -> common.AttackResult:
  """APGD-T: APGD with the targeted DLR loss toward each of the top 9 other classes
  (arguments as `apgd`; `config` an `APGDTConfig`)."""
  return prepare(apply_fn, params, images, labels, key, config, targets=targets,
                 evaluator=evaluator, default=APGDTConfig)()


def _forward_equivalents(config: Any, num_features: int, num_classes: int) -> float:
  del num_features
  runs = config.restarts
  if isinstance(config, APGDTConfig):
    runs *= min(config.num_target_classes, max(num_classes - 1, 1))
  return 3.0 * (config.num_steps + 1) * runs + 2  # a pass: forward + backward; clean, check


APGD = spec.AttackSpec(
    name="apgd", run=apgd, core=apgd_core, config_cls=APGDConfig,
    prepare=functools.partial(prepare, default=APGDConfig), check_config=check_config,
    within_budget=common.within_eps, forward_equivalents=_forward_equivalents,
    unit=lambda config: spec.FORWARD_BACKWARD, budget_field="eps", quick={"num_steps": 10})
APGD_T = spec.AttackSpec(
    name="apgd_t", run=apgd_t, core=apgd_t_core, config_cls=APGDTConfig,
    prepare=functools.partial(prepare, default=APGDTConfig), check_config=check_config,
    within_budget=common.within_eps, forward_equivalents=_forward_equivalents,
    unit=lambda config: spec.FORWARD_BACKWARD, setup_queries=1, budget_field="eps",
    quick={"num_steps": 10, "num_target_classes": 3})

__all__ = ["APGD", "APGD_T", "APGDConfig", "APGDState", "APGDTConfig", "apgd", "apgd_core",
           "apgd_t", "apgd_t_core", "checkpoints", "dlr_loss", "dlr_targeted_loss", "iterate"]
