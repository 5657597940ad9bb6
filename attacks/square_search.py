"""The Square attack: score-based random search with square-shaped updates, L-inf and L2.

Square needs only the model's logits. From a start on the surface of the budget it proposes,
once per query, a change of one random square window of side `s`, and keeps the proposal
where it lowers the margin loss, logit(label) - max_{j != label} logit(j); an image stops at
the first point it misclassifies (margin < 0). Square windows suit image classifiers, whose
gradients have spatially coherent, nearly constant patches. The window covers a fraction p
of the image's pixels, s = round(sqrt(p * H * W)), and p halves on a fixed schedule of
iterations (`square_fraction`): large squares first, single pixels late.

- L-inf (the paper's Algorithm 2): the start is vertical stripes, every column of every
  channel at x +- eps; a proposal adds +-2 eps (one random sign per channel) to the window
  and projects onto the eps ball and [0, 1]: the window moves to the vertex of those signs.
- L2 (Algorithm 3): the start is a grid of "meta pseudo-Gaussian" squares (`meta_gaussian`:
  two half-windows of opposite sign, each of concentric rings weighted 1/r^2), with random
  signs, scaled to norm eps. A proposal picks two windows: the first gets the current
  perturbation there (normalised) plus a fresh meta pseudo-Gaussian, and takes over the L2
  mass of both windows together with the budget left unused; the second is cleared. The
  result is rescaled to norm eps and clipped to [0, 1].

The settings are AutoAttack's standard version (p_init 0.8, 5,000 queries, 1 restart, the
margin loss, untargeted, the square-size schedule of `resc_schedule=False`). Where it differs
from AutoAttack's `square.py`:
- Randomness is per image: every draw for image i comes from image i's key folded with the
  iteration, so a batch attacks each image as it would alone (AutoAttack draws one window
  position and one transpose of the pattern per iteration for the whole batch; the
  distribution per image is the same).
- A window's corner is uniform over {0, ..., H - s} x {0, ..., W - s}, as the paper's
  algorithms draw it. The reference code draws from {0, ..., H - s - 1}, so no window below
  full size ever reaches the last row or column: under L-inf those pixels keep their start
  value for the whole search.
- Success is margin < 0 (AutoAttack stops at margin <= 0; a margin of exactly 0 is a tie
  that `finalize`'s argmax may not count as a success, so the search goes on).
- No clean forward pass: an image whose start point is already misclassified does zero
  iterations (AutoAttack's driver also skips images misclassified before any perturbation;
  here such an image is attacked if its start point is classified correctly).
- The L2 start grid has blocks of side max(H // 5, 1) (the reference divides by zero below
  5 pixels); a block that reaches past the image is cut at its edge (the reference fails
  there, at H = 12 for one).
- The window side comes from p_init traced in float32 (a sweep over p_init does not
  recompile); the reference rounds a float64 product, which can differ at an exact .5.

`square_core` runs under `jax.jit`, `jax.vmap` and inside a jitted training step: one
`lax.while_loop` over iterations, each one model call on a proposal for every image, until
every image has succeeded or the query budget is spent. An image that has succeeded stops
changing and stops counting queries. The public `square` checks its inputs and runs the
core jitted once, with the model's params closed over (`common.bind`).

References: Andriushchenko, Croce, Flammarion, Hein, Square Attack: a query-efficient
black-box adversarial attack via random search, ECCV 2020. Croce, Hein, Reliable evaluation
of adversarial robustness with an ensemble of diverse parameter-free attacks, ICML 2020
(AutoAttack).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from advsweep.attacks import checks, common, gradient, spec

LINF, L2 = gradient.LINF, gradient.L2
NORMS = (LINF, L2)
# AutoAttack's schedule without rescaling: p is p_init up to iteration 10, and halves after
# each of these iterations (p_init / 512 after iteration 8000).
HALVE_AFTER = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


@struct.dataclass
class SquareConfig:
  """Square attack settings; defaults are AutoAttack's standard version at CIFAR-10's
  RobustBench budget.

  Attributes:
    eps: the L-inf or L2 budget, in [0, 1] pixel units (traced: a sweep does not recompile).
    p_init: the fraction of the image's pixels the first windows cover, in (0, 1] (traced).
    num_queries: iterations at most, one model call each, after the start point's.
    norm: the threat model, "linf" or "l2".
    target: the target mode; Square is untargeted here ("untargeted" only).
  """

  eps: float = 8 / 255
  p_init: float = 0.8
  num_queries: int = struct.field(pytree_node=False, default=5000)
  norm: str = struct.field(pytree_node=False, default=LINF)
  target: str = struct.field(pytree_node=False, default=common.UNTARGETED)


class SquareState(NamedTuple):
  """The search's state, for B images of [H,W,C]."""

  iteration: jax.Array  # [] int32, iterations done
  best: jax.Array  # [B,H,W,C] the image of the lowest margin found so far
  margin: jax.Array  # [B] its margin; the image has succeeded where it is < 0
  queries: jax.Array  # [B] int32, model calls spent on the image


def square_fraction(p_init: jax.Array, iteration: jax.Array) -> jax.Array:
  """The fraction p of pixels a window covers at `iteration` (counted from 0)."""
  halvings = jnp.sum(iteration > jnp.asarray(HALVE_AFTER))
  return p_init / jnp.exp2(halvings.astype(jnp.result_type(p_init, jnp.float32)))


def window_side(p: jax.Array, height: int, width: int, norm: str) -> jax.Array:
  """The side s = round(sqrt(p * H * W)) of a square window, at least 1 (L-inf), or at
  least 3 and odd (L2), at most min(H, W). An int32 scalar."""
  side = jnp.round(jnp.sqrt(p * (height * width))).astype(jnp.int32)
  if norm == LINF:
    side = jnp.maximum(side, 1)
  else:
    side = jnp.maximum(side, 3)
    side = side + (side % 2 == 0)
  return jnp.minimum(side, min(height, width))


def _window(top: jax.Array, left: jax.Array, side: jax.Array, height: int, width: int
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each pixel's row and column inside the window ([H,1] and [1,W], int32) and whether it
  lies inside ([H,W] bool)."""
  rows = jnp.arange(height)[:, None] - top
  cols = jnp.arange(width)[None, :] - left
  inside = (rows >= 0) & (rows < side) & (cols >= 0) & (cols < side)
  return rows, cols, inside


def _corner(key: jax.Array, side: jax.Array, height: int, width: int) -> jax.Array:
  """A window's top-left corner [2], uniform over the positions inside the image."""
  return jax.random.randint(key, (2,), 0, jnp.stack([height - side + 1, width - side + 1]))


@functools.cache
def _inverse_square_sums(size: int) -> np.ndarray:
  """[size] the partial sums sum_{m=1}^{n} 1/m^2 for n = 0 .. size - 1."""
  return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, size) ** 2)])


def meta_gaussian(top: jax.Array, left: jax.Array, side: jax.Array, height: int, width: int,
                  transpose: jax.Array) -> jax.Array:
  """The L2 attack's meta pseudo-Gaussian square, placed in an [H,W] image (zero outside).

  The window of side s is split at row s // 2 into two rectangles, positive above and
  negative below, each of unit L2 norm. In a rectangle of r rows, the cell (i, j) lies on
  ring d = max(|i - r // 2|, |j - s // 2|) around the rectangle's centre and takes
  sum_{k=d}^{s//2} 1 / (k+1)^2: rings of weight 1/(k+1)^2 stacked from the centre out. The
  whole is scaled to unit norm; `transpose` swaps its rows and columns (the paper's random
  rotation). `side` may be traced.
  """
  rows, cols, inside = _window(top, left, side, height, width)
  rows, cols = jnp.broadcast_arrays(rows, cols)
  rows, cols = jnp.where(transpose, cols, rows), jnp.where(transpose, rows, cols)
  half = side // 2
  upper = rows < half
  rect_rows = jnp.where(upper, half, side - half)
  rect_row = jnp.where(upper, rows, rows - half)
  ring = jnp.maximum(jnp.abs(rect_row - rect_rows // 2), jnp.abs(cols - side // 2))
  sums = jnp.asarray(_inverse_square_sums(max(height, width) // 2 + 2), jnp.float32)
  last = sums.shape[0] - 1
  weight = sums[jnp.clip(half + 1, 0, last)] - sums[jnp.clip(ring, 0, last)]
  weight = jnp.where(inside, weight, 0.0)

  def unit(part):
    return part / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(part))), 1e-30)

  pattern = unit(jnp.where(upper, weight, 0.0)) - unit(jnp.where(upper, 0.0, weight))
  return unit(pattern)


def _onto_sphere(image: jax.Array, delta: jax.Array, eps: jax.Array) -> jax.Array:
  """`image` plus `delta` rescaled to L2 norm eps, clipped to [0, 1] (clipping only
  shortens it)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(delta)))
  return jnp.clip(image + delta * (eps / (norm + 1e-12)), 0.0, 1.0)


def _linf_start(key: jax.Array, image: jax.Array, eps: jax.Array) -> jax.Array:
  """Vertical stripes: each column of each channel at +-eps from `image` [H,W,C]."""
  signs = jax.random.rademacher(key, (1, *image.shape[1:]), image.dtype)
  return jnp.clip(image + eps * signs, 0.0, 1.0)


def _l2_start(key: jax.Array, image: jax.Array, eps: jax.Array) -> jax.Array:
  """The L2 start around `image` [H,W,C] with random signs and transposes (`l2_start`)."""
  num_blocks = len(_l2_start_corners(*image.shape[:2]))
  flip_key, sign_key = jax.random.split(key)
  return l2_start(image, eps, jax.random.bernoulli(flip_key, 0.5, (num_blocks,)),
                  jax.random.rademacher(sign_key, (num_blocks, image.shape[-1]), image.dtype))


def _l2_start_corners(height: int, width: int) -> np.ndarray:
  """[N,2] the top-left corners of the L2 start's blocks, row by row."""
  side = max(height // 5, 1)
  start = max((height - 5 * side) // 2, 0)
  tops = start + side * np.arange(height // side)
  lefts = start + side * np.arange(width // side)
  return np.stack(np.meshgrid(tops, lefts, indexing="ij"), -1).reshape(-1, 2)


def l2_start(image: jax.Array, eps: jax.Array, transposes: jax.Array, signs: jax.Array
             ) -> jax.Array:
  """The L2 start: a grid of meta pseudo-Gaussian squares of side max(H // 5, 1) from
  row and column (H - 5 * side) // 2, scaled to norm eps around `image` [H,W,C].

  Args:
    image: [H,W,C] the clean image.
    eps: the L2 budget.
    transposes: [N] bool, the blocks whose pattern is transposed (row by row).
    signs: [N,C] +-1, each block's sign per channel.
  """
  height, width, _ = image.shape
  side = max(height // 5, 1)
  corners = jnp.asarray(_l2_start_corners(height, width))
  patterns = jax.vmap(
      lambda corner, flip: meta_gaussian(corner[0], corner[1], side, height, width, flip)
  )(corners, transposes)
  # The blocks do not overlap: a plain sum (not a matmul, whose precision varies by device).
  delta = jnp.sum(patterns[..., None].astype(image.dtype) * signs[:, None, None, :], axis=0)
  return _onto_sphere(image, delta, eps)


def _linf_proposal(key: jax.Array, image: jax.Array, best: jax.Array, eps: jax.Array,
                   side: jax.Array) -> jax.Array:
  """`linf_update` at a random window with random signs."""
  corner_key, sign_key = jax.random.split(key)
  corner = _corner(corner_key, side, *image.shape[:2])
  signs = jax.random.rademacher(sign_key, image.shape[-1:], image.dtype)
  return linf_update(image, best, eps, side, corner, signs)


def linf_update(image: jax.Array, best: jax.Array, eps: jax.Array, side: jax.Array,
                corner: jax.Array, signs: jax.Array) -> jax.Array:
  """The paper's Algorithm 2: `best` [H,W,C] with the window of side `side` at `corner` [2]
  moved by 2 eps * signs [C], projected onto the eps ball around `image` and onto [0, 1]:
  the window jumps to the vertex of the given signs."""
  height, width, _ = image.shape
  inside = _window(corner[0], corner[1], side, height, width)[2][..., None]
  proposal = jnp.where(inside, best + 2.0 * eps * signs, best)
  return jnp.clip(jnp.clip(proposal, image - eps, image + eps), 0.0, 1.0)


def _l2_proposal(key: jax.Array, image: jax.Array, best: jax.Array, eps: jax.Array,
                 side: jax.Array) -> jax.Array:
  """`l2_update` at two random windows with random signs and transpose."""
  height, width, channels = image.shape
  corner_key, sign_key, flip_key = jax.random.split(key, 3)
  corners = jax.vmap(lambda k: _corner(k, side, height, width))(jax.random.split(corner_key))
  signs = jax.random.rademacher(sign_key, (channels,), image.dtype)
  return l2_update(image, best, eps, side, corners, signs, jax.random.bernoulli(flip_key))


def l2_update(image: jax.Array, best: jax.Array, eps: jax.Array, side: jax.Array,
              corners: jax.Array, signs: jax.Array, transpose: jax.Array) -> jax.Array:
  """The paper's Algorithm 3: the L2 mass of two windows moved into the first.

  Per channel, the first window (at corners[0]) gets its current perturbation scaled to unit
  norm plus a meta pseudo-Gaussian (`meta_gaussian`, times signs [C], transposed where
  `transpose`), rescaled to carry the L2 mass of both windows together and the channel's
  share of the budget left unused; the second window (corners[1]) is cleared where it does
  not overlap the first. The whole perturbation is then rescaled to norm eps and clipped to
  [0, 1].
  """
  height, width, channels = image.shape
  inside = _window(corners[0, 0], corners[0, 1], side, height, width)[2][..., None]
  cleared = _window(corners[1, 0], corners[1, 1], side, height, width)[2][..., None]
  delta = best - image
  squares = jnp.square(delta)

  def channel_norm(mask):  # [C] the L2 norm of each channel inside `mask`
    return jnp.sqrt(jnp.sum(jnp.where(mask, squares, 0.0), axis=(0, 1)))

  window_norm = channel_norm(inside)
  both_norm = channel_norm(inside | cleared)
  total_norm = jnp.sqrt(jnp.sum(squares))
  pattern = meta_gaussian(corners[0, 0], corners[0, 1], side, height, width, transpose)
  update = (pattern[..., None].astype(image.dtype) * signs
            + jnp.where(inside, delta, 0.0) / (1e-12 + window_norm))
  update_norm = jnp.sqrt(jnp.sum(jnp.square(update), axis=(0, 1)))
  mass = jnp.sqrt(jnp.maximum(eps ** 2 - total_norm ** 2, 0.0) / channels + both_norm ** 2)
  update = update / (1e-12 + update_norm) * mass
  delta = jnp.where(inside, update, jnp.where(cleared, 0.0, delta))
  return _onto_sphere(image, delta, eps)


def margins(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[B] logit(label) - max_{j != label} logit(j): below 0 where the label is not the top
  class (the margin loss Square minimises)."""
  true = jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
  is_label = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  return true - jnp.max(jnp.where(is_label, -jnp.inf, logits), -1)


def square_core(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
                key: jax.Array, config: SquareConfig | None = None, *,
                targets: jax.Array | None = None, evaluator: Any = None
                ) -> common.AttackResult:
  """The Square attack's pure core: the start and a `lax.while_loop` of proposals.

  Traceable end to end: runs under `jax.jit`, `jax.vmap` and inside a training step.
  Arguments as `square`; no checks of its own (the public `square` checks, then calls it).
  """
  del targets, evaluator  # untargeted, on the full model
  config = config if config is not None else SquareConfig()
  batch, height, width, _ = images.shape
  keys = jax.vmap(jax.random.split)(common.per_image_keys(key, batch))
  start_keys, search_keys = keys[:, 0], keys[:, 1]
  eps = common.budget(config.eps, images.dtype)
  p_init = jnp.asarray(config.p_init, jnp.float32)
  labels = labels.astype(jnp.int32)
  start_fn, propose = ((_linf_start, _linf_proposal) if config.norm == LINF
                       else (_l2_start, _l2_proposal))

  start = jax.vmap(start_fn, (0, 0, None))(start_keys, images, eps)
  state = SquareState(
      iteration=jnp.zeros((), jnp.int32), best=start,
      margin=margins(apply_fn(params, start), labels),
      queries=jnp.ones(labels.shape, jnp.int32))

  def searching(state: SquareState) -> jax.Array:
    return (state.iteration < config.num_queries) & jnp.any(state.margin >= 0)

  def step(state: SquareState) -> SquareState:
    active = state.margin >= 0  # not NaN either: a NaN margin stops the image
    side = window_side(square_fraction(p_init, state.iteration), height, width, config.norm)
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(search_keys, state.iteration)
    proposals = jax.vmap(propose, (0, 0, 0, None, None))(step_keys, images, state.best, eps,
                                                         side)
    margin = margins(apply_fn(params, proposals), labels)
    better = active & (margin < state.margin)
    return SquareState(
        iteration=state.iteration + 1,
        best=jnp.where(better[:, None, None, None], proposals, state.best),
        margin=jnp.where(better, margin, state.margin),
        queries=state.queries + active.astype(jnp.int32))

  state = jax.lax.while_loop(searching, step, state)
  return common.finalize(apply_fn, params, images, state.best, labels,
                         jnp.full(labels.shape, common.NO_TARGET, jnp.int32), state.queries)


def check_config(config: SquareConfig) -> None:
  """Raises ValueError naming a bad value of a Square config."""
  if config.target != common.UNTARGETED:
    raise ValueError(f"Square runs untargeted only (AutoAttack's standard version); got "
                     f"target={config.target!r}: set target='untargeted'")
  checks.check_choice("norm", config.norm, NORMS)
  checks.check_at_least("eps", config.eps, 0.0)
  num_queries = config.num_queries
  if isinstance(num_queries, bool) or not isinstance(num_queries, int | np.integer) or (
      num_queries < 1):
    raise ValueError(f"num_queries must be an integer >= 1 (model calls after the start "
                     f"point); got {num_queries!r}")
  if checks.is_concrete(config.p_init) and not np.all(
      (np.asarray(config.p_init) > 0) & (np.asarray(config.p_init) <= 1)):
    raise ValueError(f"p_init must lie in (0, 1] (the fraction of pixels of the first "
                     f"windows; AutoAttack's is 0.8); got {config.p_init}")


def _run(apply_fn, params, images, labels, key, config) -> common.AttackResult:
  return square_core(apply_fn, params, images, labels, key, config)


def prepare_square(apply_fn: common.ApplyFn, params: Any, images: jax.Array,
                   labels: jax.Array, key: jax.Array, config: SquareConfig | None = None, *,
                   targets: jax.Array | None = None, evaluator: Any = None
                   ) -> common.PreparedCall:
  """Checks the inputs; returns the attack, ready to run: the core jitted with the params
  closed over on concrete arrays, the core itself under a trace."""
  del evaluator  # Square evaluates the full model
  config = config if config is not None else SquareConfig()
  check_config(config)
  images, labels, _, _, concrete = checks.checked_inputs(
      apply_fn, params, images, labels, key, config, targets=targets,
      target_mode=config.target)
  if not concrete:
    return common.PreparedCall(functools.partial(square_core, apply_fn, params, images,
                                                 labels, key, config))
  run = common.bind(_run, apply_fn, params)
  args = (images, labels, key, config)
  return common.PreparedCall(functools.partial(run, *args),
                             functools.partial(run.lower, *args))


def square(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
           key: jax.Array, config: SquareConfig | None = None, *,
           targets: jax.Array | None = None, evaluator: Any = None) -> common.AttackResult:
  """The Square attack: random search over square windows, L-inf or L2, untargeted.

  Args:
    apply_fn: `apply_fn(params, images[B,H,W,C]) -> logits[B,K]`; only logits are used.
    params: the model's variables.
    images: [B,H,W,C] float in [0, 1].
    labels: [B] true classes.
    key: PRNG key, or one per image [B]: image i's search uses only key i.
    config: `SquareConfig`; None is AutoAttack's standard version at eps 8/255 (L-inf).
    targets: must be None (Square is untargeted here; the family's one signature).
    evaluator: ignored (the family's one signature).

  Returns:
    `AttackResult` with success re-checked by the model; `queries` counts model calls per
    image: 1 for the start point and 1 for each iteration it took part in (at most
    `num_queries + 1`; 1 for an image whose start point is already misclassified).
    `evaluated` equals `queries`: it leaves out the rows the batch's model calls still
    compute for images that have stopped, so that a batch equals its images alone.

  Traces: under `jax.jit` or `jax.vmap` it runs `square_core`.

  References: Andriushchenko, Croce, Flammarion, Hein, Square Attack: a query-efficient
  black-box adversarial attack via random search, ECCV 2020.
  """
  return prepare_square(apply_fn, params, images, labels, key, config, targets=targets,
                        evaluator=evaluator)()


SPEC = spec.AttackSpec(
    name="square", run=square, core=square_core, config_cls=SquareConfig,
    prepare=prepare_square, check_config=check_config, within_budget=common.within_eps,
    forward_equivalents=lambda config, num_features, num_classes: float(
        config.num_queries + 1),
    unit=lambda config: spec.FORWARD, budget_field="eps", quick={"num_queries": 50})
