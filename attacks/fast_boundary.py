"""FAB-T: the targeted Fast Adaptive Boundary attack, as AutoAttack's standard version runs it.

FAB looks for the adversarial point closest to the image. For a target class t it
linearises g = f_t - f_y (logits of the target and of the label) at the current point x,
and projects both x and the image x0 onto the hyperplane {z : g(x) + w.(z - x) = 0},
w = grad g(x), intersected with the [0, 1] box, with the smallest L-inf or L2 norm
(`project_to_hyperplane`, exact). The next point is a convex combination of the two
projections, each extrapolated by `eta`:

    x <- clip((1 - alpha) (x + eta d_x) + alpha (x0 + eta d_x0), 0, 1),
    alpha = min(max(|d_x| / (|d_x| + |d_x0|), 0), alpha_max),

so the step goes to the boundary but leans toward the image (alpha) to keep the distance
small. When x is adversarial it is recorded if it is the closest so far and pulled back
toward the image, x <- x0 + beta (x - x0): the search then refines from the inside out.

AutoAttack's FAB-T runs this for the classes ranked 2nd to 10th by the clean logits
(`common.ranked_targets`), one restart each (the first restart starts at the image; later
ones, if asked for, from a random point at half the budget), 100 iterations, alpha_max 0.1,
eta 1.05, beta 0.9. An image counts as fooled when its closest recorded point lies within
eps and is misclassified; the first target class that fools it is kept
(`common.first_success`), and images the model already misclassifies are not attacked.
As in AutoAttack's `attack_single_run`, an iterate is "adversarial" when the model's
prediction differs from the label, the target being only the direction of the
linearisation, and the result is untargeted (`target` is -1 for every image).

`fab_core` is pure (targets in a `lax.scan`, iterations in a `lax.fori_loop`): it runs
under `jax.jit`, `jax.vmap` and inside a jitted training step. The public `fab` checks the
inputs and, on concrete arrays, runs the same iterations as a host loop over one jitted
step, each target class only on the images still robust (the same result per image).

References: Croce, Hein, Minimally Distorted Adversarial Examples with a Fast Adaptive
Boundary Attack, ICML 2020; Croce, Hein, Reliable Evaluation of Adversarial Robustness with
an Ensemble of Diverse Parameter-free Attacks (AutoAttack), ICML 2020.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from advsweep.attacks import checks, common, spec
from advsweep.attacks.gradient import L2, LINF

NORMS = (LINF, L2)
_MIN_NORM = 1e-8  # AutoAttack's floor on the projections' norms in alpha


@struct.dataclass
class FABConfig:
  """FAB-T settings; defaults are AutoAttack's standard FAB-T (CIFAR-10, L-inf 8/255).

  Attributes:
    eps: budget, L-inf or L2 by `norm`, in [0, 1] pixel units (traced): an image is fooled
      when its closest adversarial point found lies within eps. Also the scale of the random
      start of restarts after the first (half of eps, as AutoAttack's).
    alpha_max: the largest weight of the image's projection in a step (traced).
    eta: extrapolation of both projections past the hyperplane (traced).
    beta: the pull-back toward the image after an adversarial iterate (traced).
    num_steps: iterations per target class and restart.
    num_target_classes: target classes, ranked 2nd, 3rd, ... by the clean logits; the model
      needs more classes than this.
    restarts: runs per target class; the first starts at the image, the others at a random
      point drawn from the image's key.
    norm: "linf" or "l2": the distance minimised and the budget's norm.
  """

  eps: float = 8 / 255
  alpha_max: float = 0.1
  eta: float = 1.05
  beta: float = 0.9
  num_steps: int = struct.field(pytree_node=False, default=100)
  num_target_classes: int = struct.field(pytree_node=False, default=9)
  restarts: int = struct.field(pytree_node=False, default=1)
  norm: str = struct.field(pytree_node=False, default=LINF)


class FABState(NamedTuple):
  """The loop state of one run (one target class, one restart)."""

  point: jax.Array      # [B,H,W,C] the current iterate
  best: jax.Array       # [B,H,W,C] the closest adversarial iterate so far (the image if none)
  best_dist: jax.Array  # [B] its distance to the image (inf if none)


def _norm(x: jax.Array, norm: str) -> jax.Array:
  """Per-row norm over the trailing axis."""
  if norm == LINF:
    return jnp.max(jnp.abs(x), axis=-1)
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=-1))


def _crossing(slope: jax.Array, knot: jax.Array, c: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
  """Solves F(r) = c for F(r) = sum_i slope_i min(r, knot_i), r >= 0, over the last axis.

  F is piecewise linear, continuous and non-decreasing with breakpoints at the knots. A
  bisection over the bit patterns of non-negative floats (ordered as the floats are) closes
  on two adjacent floats lo < hi with F(lo) < c <= F(hi) in one pass over the features per
  halving, where sorting the knots cost ten times more on XLA's CPU backend. No knot lies
  strictly between two adjacent floats, so the knots <= lo are the saturated terms and F is
  linear from lo on: r = (c - sum_{knot_i <= lo} slope_i knot_i) / sum_{knot_i > lo}
  slope_i, clipped to [lo, hi] against rounding. Slopes are >= 0, knots >= 0 (inf where
  the slope is 0), c >= 0.

  Returns:
    r [...]: the smallest r with F(r) = c, and feasible [...]: whether one exists (c is at
    most F(inf) = sum_i slope_i knot_i).
  """
  active = slope > 0
  saturated = jnp.where(active, slope * jnp.where(active, knot, 0.0), 0.0)
  total = jnp.sum(saturated, axis=-1)
  bits = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[knot.dtype.itemsize]
  as_float = lambda i: jax.lax.bitcast_convert_type(i, knot.dtype)  # noqa: E731
  value = lambda r: jnp.sum(  # noqa: E731
      jnp.where(active, slope * jnp.minimum(r[..., None], knot), 0.0), axis=-1)

  def halve(_, bounds):
    low, high = bounds
    mid = low + (high - low) // 2
    below = value(as_float(mid)) < c
    return jnp.where(below, mid, low), jnp.where(below, high, mid)

  top = jnp.max(jnp.where(active, knot, 0.0), axis=-1)
  low, high = jax.lax.fori_loop(
      0, 8 * knot.dtype.itemsize, halve,
      (jnp.zeros(c.shape, bits), jax.lax.bitcast_convert_type(top, bits)))
  low, high = as_float(low), as_float(high)
  done = active & (knot <= low[..., None])
  base = jnp.sum(jnp.where(done, saturated, 0.0), axis=-1)
  rate = jnp.sum(jnp.where(active & ~done, slope, 0.0), axis=-1)
  r = jnp.clip((c - base) / jnp.maximum(rate, jnp.finfo(slope.dtype).tiny), low, high)
  return jnp.where(c > 0, r, 0.0), c <= total


def project_to_hyperplane(points: jax.Array, w: jax.Array, c: jax.Array, norm: str
                          ) -> jax.Array:
  """The smallest step d (L-inf or L2 norm) with w.d = c and 0 <= points + d <= 1.

  Signs are flipped so that c >= 0; u_i, the room in the helpful direction, is 1 - p_i
  where w_i > 0 and p_i where w_i < 0. The largest w.d reachable within radius r is
  sum_i |w_i| min(r, u_i) (L-inf); the L2 minimiser is d_i = clip(lambda w_i, -p_i, 1 - p_i)
  (the KKT conditions), with w.d = sum_i w_i^2 min(lambda, u_i / |w_i|). Both have the form
  `_crossing` solves exactly. Where no point of the box reaches the hyperplane, the step is
  the box corner that comes closest, d_i = sign(w_i) u_i. Coordinates with w_i = 0 stay.

  Args:
    points: [..., N] points in [0, 1].
    w: [..., N] the hyperplane's normal.
    c: [...] the required w.d.
    norm: "linf" or "l2".

  Returns:
    d: [..., N].
  """
  flip = jnp.where(c < 0, -1.0, 1.0).astype(w.dtype)
  w = w * flip[..., None]
  mag = jnp.abs(w)
  room = jnp.maximum(jnp.where(w > 0, 1.0 - points, points), 0.0)
  if norm == LINF:
    r, feasible = _crossing(mag, room, c * flip)
    step = jnp.minimum(r[..., None], room)
  else:
    knot = jnp.where(mag > 0, room / jnp.where(mag > 0, mag, 1.0), jnp.inf)
    r, feasible = _crossing(jnp.square(mag), knot, c * flip)
    step = jnp.minimum(r[..., None] * mag, room)
  step = jnp.where(feasible[..., None], step, room)
  return jnp.sign(w) * step  # w.d = c holds for the flipped w and c alike


def _fab_step(apply_fn, params, images, labels, target, config: FABConfig, state: FABState
              ) -> FABState:
  """One FAB iteration for every image (see the module doc)."""
  batch = images.shape[0]
  rows = jnp.arange(batch)

  def margin(x):
    logits = apply_fn(params, x)
    diff = logits[rows, target] - logits[rows, labels]
    return jnp.sum(diff), diff  # images are independent: the sum's gradient is per image

  grad, diff = jax.grad(margin, has_aux=True)(state.point)
  w = grad.reshape(batch, -1)
  x = state.point.reshape(batch, -1)
  x0 = images.reshape(batch, -1)
  # The linearised boundary: diff + w.(z - x) = 0, from x (c = -diff) and from x0.
  c = jnp.stack([-diff, -diff + jnp.sum(w * (x - x0), -1)])
  d = project_to_hyperplane(jnp.stack([x, x0]), jnp.stack([w, w]), c, config.norm)
  sizes = jnp.maximum(_norm(d, config.norm), _MIN_NORM)
  alpha = jnp.clip(sizes[0] / (sizes[0] + sizes[1]), 0.0, config.alpha_max)[:, None]
  new = jnp.clip((x + config.eta * d[0]) * (1 - alpha) + (x0 + config.eta * d[1]) * alpha,
                 0.0, 1.0).reshape(images.shape)
  fooled = jnp.argmax(apply_fn(params, new), -1) != labels
  dist = _norm((new - images).reshape(batch, -1), config.norm)
  closer = fooled & (dist < state.best_dist)
  expand = lambda m: m.reshape((batch,) + (1,) * (images.ndim - 1))  # noqa: E731
  return FABState(
      point=jnp.where(expand(fooled), images + config.beta * (new - images), new),
      best=jnp.where(expand(closer), new, state.best),
      best_dist=jnp.where(closer, dist, state.best_dist))


def _random_start(keys: jax.Array, images: jax.Array, eps: jax.Array, norm: str
                  ) -> jax.Array:
  """AutoAttack's FAB start for restarts after the first: a random direction scaled to
  eps / 2 in the attack's norm (uniform entries for L-inf, Gaussian for L2), clipped."""

  def one(key, image):
    if norm == LINF:
      t = jax.random.uniform(key, image.shape, image.dtype, -1.0, 1.0)
      return t / jnp.max(jnp.abs(t))
    t = jax.random.normal(key, image.shape, image.dtype)
    return t / jnp.linalg.norm(t)

  return jnp.clip(images + 0.5 * eps * jax.vmap(one)(keys, images), 0.0, 1.0)


def _run(apply_fn, params, images, labels, target, keys, config: FABConfig, restart: int
         ) -> jax.Array:
  """One restart against `target` [B]: the closest adversarial point within eps, else the
  image ([B,H,W,C]). `keys` [B] are the image's keys for this target."""
  eps = common.budget(config.eps, images.dtype)
  start = images
  if restart:
    restart_keys = jax.vmap(lambda k: jax.random.fold_in(k, restart))(keys)
    start = _random_start(restart_keys, images, eps, config.norm)
  state = FABState(start, images, jnp.full(images.shape[:1], jnp.inf, images.dtype))
  step = functools.partial(_fab_step, apply_fn, params, images, labels, target, config)
  state = jax.lax.fori_loop(0, config.num_steps, lambda _, s: step(s), state)
  within = (state.best_dist <= eps).reshape((-1,) + (1,) * (images.ndim - 1))
  return jnp.where(within, state.best, images)


def fab_core(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
             key: jax.Array, config: FABConfig | None = None, *,
             targets: jax.Array | None = None, evaluator: Any = None) -> common.AttackResult:
  """FAB-T's pure core (arguments as `fab`); takes no value checks of its own.

  The clean images are checked first (a misclassified image is counted at once, with one
  query); then each target class in turn, in a `lax.scan`, runs `restarts` restarts of
  `num_steps` iterations, re-checked by `common.finalize` and kept by `common.first_success`.
  """
  del evaluator  # FAB evaluates the full model
  _refuse_targets(targets)
  config = config if config is not None else FABConfig()
  labels = jnp.asarray(labels, jnp.int32)
  batch = images.shape[0]
  keys = common.per_image_keys(key, batch)
  ranked = common.ranked_targets(apply_fn(params, images), config.num_target_classes)
  untargeted = jnp.full((batch,), common.NO_TARGET, jnp.int32)
  result = common.finalize(apply_fn, params, images, images, labels, untargeted,
                           jnp.ones((batch,), jnp.int32))  # the clean forward: one query
  steps = jnp.full((batch,), config.num_steps, jnp.int32)

  def per_target(result, inputs):
    index, target = inputs
    target_keys = jax.vmap(lambda k: jax.random.fold_in(k, index))(keys)
    for restart in range(config.restarts):
      adv = _run(apply_fn, params, images, labels, target, target_keys, config, restart)
      run = common.finalize(apply_fn, params, images, adv, labels, untargeted, steps)
      result = common.first_success(result, run)
    return result, None

  result, _ = jax.lax.scan(per_target, result, (jnp.arange(config.num_target_classes),
                                                ranked.T))
  return result


def _start_state(images, keys, eps, restart, *, norm):
  """The state a restart starts from (the image, or for later restarts a random point)."""
  start = images
  if restart:
    restart_keys = jax.vmap(lambda k: jax.random.fold_in(k, restart))(keys)
    start = _random_start(restart_keys, images, eps, norm)
  return FABState(start, images, jnp.full(images.shape[:1], jnp.inf, images.dtype))


# Compiled once per shape and setting for every call (a jit made inside `_host` compiled
# anew on each call).
_jitted_start = jax.jit(_start_state, static_argnames=("restart", "norm"))


def _host_step(apply_fn, params, images, labels, target, config, state):
  return _fab_step(apply_fn, params, images, labels, target, config, state)


def _host_outcome(apply_fn, params, images, labels, eps, state):
  """A restart's point (the closest adversarial point within eps, else the image) and
  whether the model misclassifies it."""
  within = (state.best_dist <= eps).reshape((-1,) + (1,) * (images.ndim - 1))
  adv = jnp.where(within, state.best, images)
  return adv, jnp.argmax(apply_fn(params, adv), -1) != labels


def _host(apply_fn, params, images, labels, keys, config: FABConfig) -> common.AttackResult:
  """`fab_core` on concrete arrays, with the same result per image: each iteration one
  call of a step jitted with the params closed over (XLA's CPU backend runs a rolled loop of
  backward passes several times slower), and each target class only on the images no
  earlier one has fooled (padded to a few batch sizes)."""
  batch = images.shape[0]
  logits = common.bind(_logits, apply_fn, params)(images)
  ranked = np.asarray(common.ranked_targets(logits, config.num_target_classes))
  fooled = np.array(jnp.argmax(logits, -1) != labels)
  adv = np.asarray(images).copy()
  queries = np.ones(batch, np.int64)
  eps = common.budget(config.eps, images.dtype)
  step = common.bind(_host_step, apply_fn, params)
  outcome = common.bind(_host_outcome, apply_fn, params)
  for index in range(config.num_target_classes):
    for restart in range(config.restarts):
      todo = np.flatnonzero(~fooled)
      if not len(todo):
        break
      rows = np.resize(todo, common.bucket(len(todo)))
      x, y = images[rows], labels[rows]
      target = jnp.asarray(ranked[rows, index])
      target_keys = jax.vmap(lambda k: jax.random.fold_in(k, index))(keys[rows])  # noqa: B023
      state = _jitted_start(x, target_keys, eps, restart=restart, norm=config.norm)
      for _ in range(config.num_steps):
        state = step(x, y, target, config, state)
      run_adv, run_fooled = (np.asarray(v)[:len(todo)] for v in outcome(x, y, eps, state))
      queries[todo] += config.num_steps
      adv[todo] = np.where(run_fooled.reshape((-1,) + (1,) * (adv.ndim - 1)), run_adv,
                           adv[todo])
      fooled[todo] = run_fooled
  untargeted = jnp.full((batch,), common.NO_TARGET, jnp.int32)
  return common.finalize(apply_fn, params, images, jnp.asarray(adv), labels, untargeted,
                         jnp.asarray(queries, jnp.int32))


def _logits(apply_fn, params, images):
  return apply_fn(params, images)


def _refuse_targets(targets: Any) -> None:
  if targets is not None:
    raise ValueError("FAB-T picks its own target classes (the top num_target_classes other "
                     "classes of the clean logits); pass targets=None")


def check_config(config: FABConfig) -> None:
  """Raises ValueError naming a bad value of a FAB config."""
  if not isinstance(config, FABConfig):
    raise TypeError(f"expected FABConfig; got {type(config).__name__}")
  for name in ("eps", "alpha_max", "beta"):
    checks.check_at_least(name, getattr(config, name), 0.0)
  checks.check_at_least("eta", config.eta, 0.0, strict=True)
  for name in ("num_steps", "num_target_classes", "restarts"):
    value = getattr(config, name)
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
  checks.check_choice("norm", config.norm, NORMS)


def prepare(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
            key: jax.Array, config: FABConfig | None = None, *,
            targets: jax.Array | None = None, evaluator: Any = None) -> common.PreparedCall:
  """Checks the inputs; returns the attack, ready to run: the core jitted with the params
  closed over (`common.bind`) on concrete inputs, the core itself under a trace."""
  del evaluator
  config = config if config is not None else FABConfig()
  check_config(config)
  _refuse_targets(targets)
  images, labels, _, num_classes, concrete = checks.checked_inputs(
      apply_fn, params, images, labels, key, config)
  if num_classes <= config.num_target_classes:
    raise ValueError(f"num_target_classes = {config.num_target_classes} needs a model with "
                     f"more classes; this one has {num_classes}: set num_target_classes <= "
                     f"{num_classes - 1}")
  if not concrete:
    return common.PreparedCall(functools.partial(fab_core, apply_fn, params, images, labels,
                                                 key, config))
  keys = common.per_image_keys(key, images.shape[0])
  step = common.bind(_host_step, apply_fn, params)

  def lower():
    state = _start_state(images, keys, common.budget(config.eps, images.dtype), 0,
                         norm=config.norm)
    return step.lower(images, labels, labels, config, state)

  return common.PreparedCall(
      functools.partial(_host, apply_fn, params, images, labels, keys, config), lower)


def fab(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
        key: jax.Array, config: FABConfig | None = None, *,
        targets: jax.Array | None = None, evaluator: Any = None) -> common.AttackResult:
  """FAB-T, AutoAttack's targeted Fast Adaptive Boundary attack (L-inf or L2).

  Args:
    apply_fn: `apply_fn(params, images[B,H,W,C]) -> logits[B,K]`, K > num_target_classes.
    params: the model's variables.
    images: [B,H,W,C] float in [0, 1].
    labels: [B] true classes.
    key: PRNG key, or one per image [B] (used only by restarts after the first).
    config: `FABConfig`; None is AutoAttack's standard FAB-T (L-inf, eps 8/255).
    targets: must be None: FAB-T ranks its own target classes.
    evaluator: ignored (the family's one signature).

  Returns:
    `AttackResult` with `target` -1 (success is any misclassification within eps); where
    nothing within eps was found, `adv_images` is the clean image. `queries` counts one for
    the clean forward pass and one per iteration (a forward and backward pass of f_t - f_y
    and the forward pass that checks the new point) for every target class and restart the
    image needed.

  Traces: under `jax.jit`, `jax.vmap` or `jax.grad` it runs `fab_core`.

  References: Croce, Hein, Minimally Distorted Adversarial Examples with a Fast Adaptive
  Boundary Attack, ICML 2020.
  """
  return prepare(apply_fn, params, images, labels, key, config, targets=targets,
                 evaluator=evaluator)()


def _forward_equivalents(config: FABConfig, num_features: int, num_classes: int) -> float:
  """Clean forward and its re-check; per target and restart, the iterations (forward and
  backward, then the check's forward: 4 each) and the re-check."""
  del num_features, num_classes
  return 2.0 + config.num_target_classes * config.restarts * (4.0 * config.num_steps + 1)


SPEC = spec.AttackSpec(
    name="fab_t", run=fab, core=fab_core, config_cls=FABConfig, prepare=prepare,
    check_config=check_config, within_budget=common.within_eps,
    forward_equivalents=_forward_equivalents, unit=lambda config: spec.FORWARD_BACKWARD,
    setup_queries=1, budget_field="eps", quick={"num_steps": 10, "num_target_classes": 2})
