"""The Jacobian-based saliency map attack (JSMA) with the paper's pair search.

Each iteration takes the forward derivative F of the model with one forward pass and
vector-Jacobian products (not one backward pass per class), then picks the pair of
features (p, q) in the search domain that maximises the adversarial saliency map

    alpha = d F_t / d x_p + d F_t / d x_q,   beta = sum_{j != t} (d F_j / d x_p + d F_j / d x_q)
    score = alpha * |beta|  subject to  theta * alpha > 0  and  theta * beta < 0,

and moves both features by theta (clipped to [0, 1]). F is a choice (`derivative`):
- "logits" (JSMA-Z in Carlini and Wagner's naming; the default): F = Z, the logits, as the
  paper describes; two VJPs, for the target and for the sum of the other classes.
- "probabilities" (JSMA-F): F = softmax(Z). The probabilities sum to one, so beta = -alpha
  exactly and the map's best pair is the two features with the largest d F_t / d x (their
  sum positive): one VJP. It is taken of log F_t, which scales alpha and beta by 1 / F_t > 0
  (the same pair) and does not underflow on confident models. On the MNIST LeNet it changes
  fewer features at a higher success rate than JSMA-Z (see the README).

`jsma_core` iterates every image until it stops, in a `lax.while_loop`: pure, it runs under
`jax.jit`, `jax.vmap` and inside a training step. On concrete arrays the public `jsma` runs
the same iteration through `attacks.saliency.rows.jsma_rows`, which batches the images
continuously over `num_slots` rows and runs the last ones in power-of-two chunks; it equals
the core image by image.

The N x N pair scores (N = H*W*C) are never held whole. `best_pairs` first reduces the
search exactly: the score grows in both alpha and -beta, so both members of the best pair
lie in the first two Pareto layers of the points (alpha_i, -beta_i), usually a few dozen
features, and only their pairs are scored. Where an image has more than `max_candidates`
such features, `best_pair` scans the whole map in blocks of `block_rows` rows. Both give the
argmax of the full map (tested against brute force).

References: Papernot, McDaniel, Jha, Fredrikson, Celik, Swami, The Limitations of Deep
Learning in Adversarial Settings, EuroS&P 2016 (theta = +1, gamma = 14.5% on MNIST: 97.10%
success with 4.02% of the features changed).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from advsweep.attacks import checks, common

LOGITS, PROBABILITIES = "logits", "probabilities"
DERIVATIVES = (LOGITS, PROBABILITIES)


@struct.dataclass
class JSMAConfig:
  """JSMA settings; defaults are the paper's MNIST ones.

  Attributes:
    gamma: maximum fraction of features changed (traced).
    theta: +1 increases features (the paper's main variant), -1 decreases them.
    block_rows: rows of the pair-score matrix scored at once in the full scan.
    max_candidates: cap on the features kept by the linear first pass of the Pareto
      reduction (a superset of the first two Pareto layers of (alpha, -beta), which hold
      the best pair); their candidates' pairs are scored, and the full scan runs only for
      a batch where some image keeps more (0: always the full scan).
    target: target mode; JSMA is targeted ("random", "least_likely" or "explicit").
    derivative: the F of the saliency map: "logits" (JSMA-Z, the paper's) or
      "probabilities" (JSMA-F, the softmax; see the module doc).
    num_slots: images the scheduler iterates at once (`attacks.saliency.rows.jsma_rows`), the
      largest batch of a model call and its memory bound; an image that stops hands its
      row to the next (continuous batching). Raise it where a larger batch runs faster (a
      GPU). It does not change results (`common.SAME_RESULTS`).
  """

  gamma: float = 0.145
  theta: float = struct.field(pytree_node=False, default=1.0)
  block_rows: int = struct.field(pytree_node=False, default=64)
  max_candidates: int = struct.field(pytree_node=False, default=64)
  target: str = struct.field(pytree_node=False, default=common.RANDOM)
  derivative: str = struct.field(pytree_node=False, default=LOGITS)
  num_slots: int = struct.field(pytree_node=False, default=32,
                                metadata={common.SAME_RESULTS: True})


def best_pair(alpha: jax.Array, beta: jax.Array, domain: jax.Array, block_rows: int
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Exact best saliency pair for one image, scanning the N x N map in row blocks.

  Args:
    alpha: [N] target-class derivative, already multiplied by theta.
    beta: [N] other-classes derivative, already multiplied by theta.
    domain: [N] bool, the features that may still be changed.
    block_rows: rows per block.

  Returns:
    (p, q, score) with p < q: the row-major first argmax of alpha_pq * -beta_pq over pairs
    p != q in the domain with alpha_pq > 0 and beta_pq < 0; score is -inf when no pair
    qualifies.
  """
  n = alpha.shape[0]
  rows = min(block_rows, n)
  num_blocks = -(-n // rows)
  pad = num_blocks * rows - n
  alpha_rows = jnp.pad(alpha, (0, pad))
  beta_rows = jnp.pad(beta, (0, pad))
  domain_rows = jnp.pad(domain, (0, pad))
  columns = jnp.arange(n)

  def block(best, start):
    a = jax.lax.dynamic_slice(alpha_rows, (start,), (rows,))
    b = jax.lax.dynamic_slice(beta_rows, (start,), (rows,))
    d = jax.lax.dynamic_slice(domain_rows, (start,), (rows,))
    pair_alpha = a[:, None] + alpha[None, :]
    pair_beta = b[:, None] + beta[None, :]
    row_ids = start + jnp.arange(rows)
    valid = (d[:, None] & domain[None, :] & (row_ids[:, None] != columns[None, :])
             & (pair_alpha > 0) & (pair_beta < 0))
    scores = jnp.where(valid, pair_alpha * -pair_beta, -jnp.inf)
    flat = jnp.argmax(scores)
    score = scores.reshape(-1)[flat]
    candidate = (score, start + flat // n, flat % n)
    better = score > best[0]
    return jax.tree.map(lambda c, o: jnp.where(better, c, o), candidate, best), None

  init = (jnp.asarray(-jnp.inf, alpha.dtype), jnp.asarray(0), jnp.asarray(0))
  (score, p, q), _ = jax.lax.scan(block, init, jnp.arange(num_blocks) * rows)
  return jnp.minimum(p, q), jnp.maximum(p, q), score


NUM_BINS = 32  # bins of alpha in the first, linear-time pass of the Pareto reduction


def _before(u_a, v_a, id_a, u_b, v_b, id_b):
  """Whether feature a comes before feature b in the order (u descending, v descending,
  index ascending)."""
  return (u_a > u_b) | ((u_a == u_b) & ((v_a > v_b) | ((v_a == v_b) & (id_a < id_b))))


def _survivors(alpha, domain, v):
  """The linear pass of `_pareto_pair`: [N] bool, the features in the domain that do not
  have two others in strictly higher bins of alpha with v at least their own."""
  # The two largest v in each bin of alpha, then over all strictly higher bins.
  low = jnp.min(jnp.where(domain, alpha, jnp.inf))
  span = jnp.max(jnp.where(domain, alpha, -jnp.inf)) - low
  scaled = jnp.where(span > 0, (alpha - low) / jnp.where(span > 0, span, 1.0), 0.0)
  bins = jnp.where(domain, jnp.clip((scaled * NUM_BINS).astype(jnp.int32), 0, NUM_BINS - 1),
                   0)
  empty = jnp.full(NUM_BINS, -jnp.inf, v.dtype)
  first = empty.at[bins].max(v)
  is_first = v == first[bins]
  ties = jnp.zeros(NUM_BINS, jnp.int32).at[bins].add(is_first.astype(jnp.int32))
  second = jnp.where(ties >= 2, first, empty.at[bins].max(jnp.where(is_first, -jnp.inf, v)))

  # The second largest v over the strictly higher bins: of their firsts (ties counted) and
  # their seconds, by reductions over a [bins, bins] mask (cheaper on XLA CPU than an
  # associative scan or `lax.top_k`).
  higher = jnp.arange(NUM_BINS)[None, :] > jnp.arange(NUM_BINS)[:, None]
  firsts = jnp.where(higher, first[None, :], -jnp.inf)
  top = jnp.max(firsts, 1, keepdims=True)
  second_of_firsts = jnp.where(jnp.sum(firsts == top, 1) >= 2, top[:, 0],
                               jnp.max(jnp.where(firsts < top, firsts, -jnp.inf), 1))
  second_above = jnp.maximum(second_of_firsts,
                             jnp.max(jnp.where(higher, second[None, :], -jnp.inf), 1))
  return domain & (v > second_above[bins])


def _pareto_pair(alpha, beta, domain, max_candidates):
  """Best pair among the features that can be in it, and whether that set was complete.

  With u = alpha, v = -beta the score of a valid pair is (u_p + u_q) * (v_p + v_q) with both
  sums positive, which grows in both coordinates: the best pair's sum is Pareto-optimal
  among pair sums. If a feature r (r not p, q) dominated p (u_r >= u_p and v_r >= v_p),
  (r, q) would score at least as much, so each member of the best pair is dominated by at
  most one other feature (dominance taken in the order u, v, index, so that ties go to the
  first): only the first two Pareto layers, the candidates, can hold it.

  The candidates are found without sorting the N features (a sort dominated the pair
  search). A linear pass drops every feature with two others of larger u (in a higher one
  of `NUM_BINS` equal bins of u) and v at least its own, which leaves a superset of the
  candidates, the survivors (a few dozen features in practice). Among at most `max_candidates`
  survivors, the candidates are those with at most one dominating survivor: a dominated
  feature's dominators include two candidates (the two highest of them in the order), so
  dropping non-candidates never hides one. All candidate pairs are then scored. Exact up
  to ties between equal scores; `complete` is False when more than `max_candidates`
  features survive the first pass.
  """
  n = alpha.shape[0]
  u = jnp.where(domain, alpha, -jnp.inf)
  v = jnp.where(domain, -beta, -jnp.inf)
  survivor = _survivors(alpha, domain, v)
  count = jnp.sum(survivor)
  k = min(max_candidates, n)
  slot = jnp.where(survivor, jnp.cumsum(survivor) - 1, k)  # survivors in index order
  ids = jnp.full(k, n, jnp.int32).at[slot].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
  present = ids < n
  ids = jnp.minimum(ids, n - 1)
  # Exact candidates among the survivors: at most one dominating survivor.
  su, sv = u[ids], v[ids]
  dominates = (present[:, None] & _before(su[:, None], sv[:, None], ids[:, None],
                                          su[None, :], sv[None, :], ids[None, :])
               & (sv[:, None] >= sv[None, :]))
  candidate = present & (jnp.sum(dominates, 0) < 2)
  pair_alpha = alpha[ids][:, None] + alpha[ids][None, :]
  pair_beta = beta[ids][:, None] + beta[ids][None, :]
  valid = (candidate[:, None] & candidate[None, :] & (ids[:, None] < ids[None, :])
           & (pair_alpha > 0) & (pair_beta < 0))
  scores = jnp.where(valid, pair_alpha * -pair_beta, -jnp.inf)
  flat = jnp.argmax(scores)
  return ids[flat // k], ids[flat % k], scores.reshape(-1)[flat], count <= k


def best_pairs(alpha: jax.Array, beta: jax.Array, domain: jax.Array, block_rows: int,
               max_candidates: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`best_pair` for a batch [B,N]: the Pareto reduction, the full scan only when needed.

  `_pareto_pair` scores the pairs of at most `max_candidates` features per image; only if
  some image has more survivors does the batch run the blockwise full scan instead. The
  result equals `best_pair` image by image (up to ties between equal scores).
  """
  full = jax.vmap(functools.partial(best_pair, block_rows=block_rows))
  if max_candidates <= 0:
    return full(alpha, beta, domain)
  *reduced, complete = jax.vmap(functools.partial(_pareto_pair, max_candidates=max_candidates))(
      alpha, beta, domain)
  # The operands go through the cond rather than being closed over: XLA CPU ran every
  # iteration slower with the reduced results merged into the full scan's branch.
  return jax.lax.cond(jnp.all(complete), lambda *_: tuple(reduced), full, alpha, beta, domain)


def top_pair(alpha: jax.Array, domain: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`best_pairs` for beta = -alpha (JSMA-F): the map's score is alpha_pq^2 where
  alpha_pq > 0, so the best pair is the two largest alphas in the domain, if their sum is
  positive. [B,N] in; (p, q, score) per image with p < q, score -inf when none qualifies."""
  values, ids = jax.lax.top_k(jnp.where(domain, alpha, -jnp.inf), 2)
  total = values[:, 0] + values[:, 1]
  score = jnp.where(total > 0, total * total, -jnp.inf)
  return jnp.min(ids, -1), jnp.max(ids, -1), score


class JSMAState(NamedTuple):
  """The iteration's state: R rows (images), N = H*W*C features."""

  x: jax.Array  # [R, N] the working images, flattened
  domain: jax.Array  # [R, N] bool, the features that may still change
  active: jax.Array  # [R] bool, the row still iterates
  queries: jax.Array  # [R] int32, iterations spent


def start(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
          keys: jax.Array, targets: jax.Array | None, *, theta: float, target_mode: str
          ) -> tuple[jax.Array, JSMAState]:
  """Targets [B] and the initial state of every image."""
  batch = images.shape[0]
  keys = common.per_image_keys(keys, batch)
  targets = common.choose_targets(target_mode, keys, labels, apply_fn(params, images),
                                  targets)
  flat = images.reshape(batch, -1)
  domain = (flat < 1.0) if theta > 0 else (flat > 0.0)
  return targets, JSMAState(flat, domain, jnp.ones(batch, bool), jnp.zeros(batch, jnp.int32))


def _derivatives(apply_fn, params, images, targets, x, *, theta, derivative):
  """An iteration's model work: the forward derivative (times theta's sign) of the target
  and of the other classes, and whether the target is reached."""
  direction = 1.0 if theta > 0 else -1.0

  def logits_of(flat):
    return apply_fn(params, flat.reshape(images.shape))

  if derivative == PROBABILITIES:  # of log F_t (see the module doc)
    outputs, vjp = jax.vjp(lambda flat: jax.nn.log_softmax(logits_of(flat)), x)
  else:
    outputs, vjp = jax.vjp(logits_of, x)
  onehot = jax.nn.one_hot(targets, outputs.shape[-1], dtype=x.dtype)
  (alpha,) = vjp(onehot)
  # JSMA-F's pair needs no beta (beta = -alpha): alpha stands in for it unused.
  beta = alpha if derivative == PROBABILITIES else vjp(1.0 - onehot)[0]
  return direction * alpha, direction * beta, jnp.argmax(outputs, -1) == targets


def _move(images, state: JSMAState, hit, pair, gamma, *, theta) -> JSMAState:
  """Moves both features of each active row's pair by theta (clipped to [0, 1]) while the
  target is not reached, a pair qualifies and the gamma budget allows."""
  batch, n = state.x.shape
  p, q, score = pair
  x = state.x
  changed = jnp.sum(x != images.reshape(batch, n), -1)
  go = state.active & ~hit & jnp.isfinite(score) & (changed + 2 <= jnp.floor(gamma * n))
  rows = jnp.arange(batch)
  moved_p = jnp.clip(x[rows, p] + theta, 0.0, 1.0)
  moved_q = jnp.clip(x[rows, q] + theta, 0.0, 1.0)
  x = x.at[rows, p].set(jnp.where(go, moved_p, x[rows, p]))
  x = x.at[rows, q].set(jnp.where(go, moved_q, x[rows, q]))
  at_limit = (x >= 1.0) if theta > 0 else (x <= 0.0)
  return JSMAState(x, state.domain & ~at_limit, go,
                   state.queries + state.active.astype(jnp.int32))


def iteration(apply_fn: common.ApplyFn, params: Any, images: jax.Array, targets: jax.Array,
              state: JSMAState, gamma: jax.Array, *, theta: float, block_rows: int,
              max_candidates: int, derivative: str) -> JSMAState:
  """One JSMA iteration of every row: the derivatives, each row's best pair (`best_pairs`,
  or for JSMA-F `top_pair`) and the move. `images` and `targets` are the rows' own."""
  alpha, beta, hit = _derivatives(apply_fn, params, images, targets, state.x, theta=theta,
                                  derivative=derivative)
  if derivative == PROBABILITIES:
    pair = top_pair(alpha, state.domain)
  else:
    pair = best_pairs(alpha, beta, state.domain, block_rows, max_candidates)
  return _move(images, state, hit, pair, gamma, theta=theta)


def max_iterations(image_size: int, theta: float) -> int:
  """An image stops within this many iterations: each moves a feature by theta towards its
  bound, or stops the image."""
  return int(np.ceil(1.0 / abs(theta))) * image_size + 1


def iteration_statics(config: JSMAConfig) -> dict[str, Any]:
  """The static keywords of `iteration` for `config`."""
  return dict(theta=float(config.theta), block_rows=config.block_rows,
              max_candidates=config.max_candidates, derivative=config.derivative)


def jsma_core(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
              key: jax.Array, config: JSMAConfig | None = None, *,
              targets: jax.Array | None = None, evaluator: Any = None) -> common.AttackResult:
  """JSMA's pure core: every image iterates in one batch, in a `lax.while_loop`, until all
  have stopped. Arguments as `jsma`; no checks of its own."""
  del evaluator  # JSMA needs the model's derivatives: the full model
  config = config or JSMAConfig()
  statics = iteration_statics(config)
  targets, state = start(apply_fn, params, images, labels, key, targets,
                         theta=statics["theta"], target_mode=config.target)
  gamma = jnp.asarray(config.gamma, images.dtype)
  limit = max_iterations(images[0].size, statics["theta"])

  def body(carry):
    count, state = carry
    return count + 1, iteration(apply_fn, params, images, targets, state, gamma, **statics)

  _, state = jax.lax.while_loop(lambda c: jnp.any(c[1].active) & (c[0] < limit), body,
                                (jnp.asarray(0), state))
  return common.finalize(apply_fn, params, images, state.x.reshape(images.shape), labels,
                         targets, state.queries)


def check_config(config: JSMAConfig) -> None:
  """Raises ValueError naming a bad value of a JSMA config."""
  checks.check_choice("target mode", config.target, common.TARGET_MODES)
  if config.target == common.UNTARGETED:
    raise ValueError("JSMA is a targeted attack: use target='random', 'least_likely' or "
                     "'explicit'")
  if config.theta == 0 or not -1.0 <= config.theta <= 1.0:
    raise ValueError(f"theta must be in [-1, 0) or (0, 1]; got {config.theta}")
  if checks.is_concrete(config.gamma) and not 0.0 <= float(config.gamma) <= 1.0:
    raise ValueError(f"gamma must be a fraction in [0, 1]; got {config.gamma}")
  checks.check_choice("derivative", config.derivative, DERIVATIVES)
  if config.block_rows < 1 or config.max_candidates < 0 or config.num_slots < 1:
    raise ValueError(f"block_rows and num_slots must be >= 1 and max_candidates >= 0; got "
                     f"{config.block_rows}, {config.num_slots}, {config.max_candidates}")
