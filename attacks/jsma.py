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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from attacks import common

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
    num_slots: images iterated at once, the largest batch of a model call and the memory
      bound; an image that stops hands its row to the next (continuous batching). On the
      2-core CPU the LeNet's forward pass and two VJPs ran 1000 images/s at 8-32 and 580
      at 64; on a GPU, raise it. It does not change results (`common.SAME_RESULTS`).
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


def _pareto_pair(alpha, beta, domain, max_candidates):
  """Best pair among the features that can be in it, and whether that set was complete.

  With u = alpha, v = -beta the score of a valid pair is (u_p + u_q) * (v_p + v_q) with both
  sums positive, which grows in both coordinates: the best pair's sum is Pareto-optimal
  among pair sums. If a feature r (r not p, q) dominated p (u_r >= u_p and v_r >= v_p),
  (r, q) would score at least as much, so each member of the best pair is dominated by at
  most one other feature (dominance taken in the order u, v, index, so that ties go to the
  first): only the first two Pareto layers, the candidates, can hold it.

  The candidates are found without sorting the N features (a sort was 22 of 93 ms of an
  All-CNN-C iteration on the 2-core CPU). A linear pass drops every feature with two others
  of larger u (in a higher one of `NUM_BINS` equal bins of u) and v at least its own, which
  leaves a superset of the candidates, the survivors (at most 29 of 784 LeNet and 14 of
  3072 All-CNN-C features in the iterations measured). Among at most `max_candidates`
  survivors, the candidates are those with at most one dominating survivor: a dominated
  feature's dominators include two candidates (the two highest of them in the order), so
  dropping non-candidates never hides one. All candidate pairs are then scored. Exact up
  to ties between equal scores; `complete` is False when more than `max_candidates`
  features survive the first pass.
  """
  n = alpha.shape[0]
  u = jnp.where(domain, alpha, -jnp.inf)
  v = jnp.where(domain, -beta, -jnp.inf)
  # Linear pass: the two largest v in each bin of u, then over all strictly higher bins.
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
  # their seconds, by reductions over a [bins, bins] mask (an associative scan compiled 0.3 s
  # slower, in every batch size; `lax.top_k` ran 1.6 of the LeNet's 2.6 ms on 32 rows).
  higher = jnp.arange(NUM_BINS)[None, :] > jnp.arange(NUM_BINS)[:, None]
  firsts = jnp.where(higher, first[None, :], -jnp.inf)
  top = jnp.max(firsts, 1, keepdims=True)
  second_of_firsts = jnp.where(jnp.sum(firsts == top, 1) >= 2, top[:, 0],
                               jnp.max(jnp.where(firsts < top, firsts, -jnp.inf), 1))
  second_above = jnp.maximum(second_of_firsts,
                             jnp.max(jnp.where(higher, second[None, :], -jnp.inf), 1))
  survivor = domain & (v > second_above[bins])
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
  # The operands go through the cond (not closed over): merging the reduced results into
  # the full scan's branch made every LeNet iteration 10-20 ms slower on XLA CPU.
  return jax.lax.cond(jnp.all(complete), lambda *_: tuple(reduced), full, alpha, beta, domain)


def top_pair(alpha: jax.Array, domain: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`best_pairs` for beta = -alpha (JSMA-F): the map's score is alpha_pq^2 where
  alpha_pq > 0, so the best pair is the two largest alphas in the domain, if their sum is
  positive. [B,N] in; (p, q, score) per image with p < q, score -inf when none qualifies."""
  values, ids = jax.lax.top_k(jnp.where(domain, alpha, -jnp.inf), 2)
  total = values[:, 0] + values[:, 1]
  score = jnp.where(total > 0, total * total, -jnp.inf)
  return jnp.min(ids, -1), jnp.max(ids, -1), score


def chunks(rows: int) -> list[tuple[int, int]]:
  """(offset, size) of the power-of-two chunks that cover rows [0, rows), largest first (the
  binary digits of `rows`): 13 rows are 8 + 4 + 1.

  JSMA runs its working rows chunk by chunk, so the iteration compiles for powers of two
  only and no row is padding. On the 2-core CPU a row costs the same at any batch size (the
  LeNet's forward pass and two VJPs: 910 images/s at 1, 680-810 at 2-32), so the tail, where
  a few images still iterate, costs only what they need: padding rows to a ladder of sizes
  from 4 had run 9% (LeNet) and 23% (All-CNN-C) more rows than active images on 32 images.
  """
  out, offset = [], 0
  for bit in reversed(range(rows.bit_length())):
    if rows >> bit & 1:
      out.append((offset, 1 << bit))
      offset += 1 << bit
  return out


def _start(apply_fn, params, images, labels, keys, targets, *, theta, target_mode):
  """Targets and the initial state: flat images, search domain, active flags, queries."""
  batch = images.shape[0]
  keys = common.per_image_keys(keys, batch)
  targets = common.choose_targets(target_mode, keys, labels, apply_fn(params, images),
                                  targets)
  flat = images.reshape(batch, -1)
  domain = (flat < 1.0) if theta > 0 else (flat > 0.0)
  return targets, (flat, domain, jnp.ones(batch, bool), jnp.zeros(batch, jnp.int32))


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


def _move(images, state, hit, pair, gamma, *, theta):
  """Moves both features of each active row's pair by theta (clipped to [0, 1]) while the
  target is not reached, a pair qualifies and the gamma budget allows."""
  x, domain, active, queries = state
  batch, n = x.shape
  p, q, score = pair
  changed = jnp.sum(x != images.reshape(batch, n), -1)
  go = active & ~hit & jnp.isfinite(score) & (changed + 2 <= jnp.floor(gamma * n))
  rows = jnp.arange(batch)
  moved_p = jnp.clip(x[rows, p] + theta, 0.0, 1.0)
  moved_q = jnp.clip(x[rows, q] + theta, 0.0, 1.0)
  x = x.at[rows, p].set(jnp.where(go, moved_p, x[rows, p]))
  x = x.at[rows, q].set(jnp.where(go, moved_q, x[rows, q]))
  at_limit = (x >= 1.0) if theta > 0 else (x <= 0.0)
  return x, domain & ~at_limit, go, queries + active.astype(jnp.int32)


def _chunk_iteration(apply_fn, params, images, targets, state, gamma, offset, *, size, theta,
                     block_rows, max_candidates, derivative):
  """One JSMA iteration of the working rows [offset, offset + size): the derivatives, the
  best pair of every row (`best_pairs`, or for JSMA-F `top_pair`) and the move. Returns the
  whole working state with those rows updated."""
  def take(a):
    return jax.lax.dynamic_slice_in_dim(a, offset, size)

  chunk_images = take(images)
  chunk = jax.tree.map(take, state)
  alpha, beta, hit = _derivatives(apply_fn, params, chunk_images, take(targets), chunk[0],
                                  theta=theta, derivative=derivative)
  if derivative == PROBABILITIES:
    pair = top_pair(alpha, chunk[1])
  else:
    pair = best_pairs(alpha, beta, chunk[1], block_rows, max_candidates)
  moved = _move(chunk_images, chunk, hit, pair, gamma, theta=theta)
  return jax.tree.map(lambda a, m: jax.lax.dynamic_update_slice_in_dim(a, m, offset, 0),
                      state, moved)


def _iteration(apply_fn, params, **static):
  """`_chunk_iteration` of one chunk size, jitted (the params an argument: see common.bind)."""
  return common.bind(_chunk_iteration, apply_fn, params, close_params=False, **static)


def _padded(values: np.ndarray, length: int, fill: int) -> np.ndarray:
  """`values` followed by `fill` up to `length`."""
  out = np.full(length, fill)
  out[:len(values)] = values
  return out


def _write_back(final, rows, state):
  """Writes each working row's x and queries to its image in `final` (padding rows, whose
  image is out of range, are dropped)."""
  return (final[0].at[rows].set(state[0], mode="drop"),
          final[1].at[rows].set(state[3], mode="drop"))


@jax.jit
def _hand_over(final, state, initial, work_images, work_targets, images, targets, leaving_ids,
               leaving_rows, into_rows, entering_ids):
  """Continuous batching's row exchange: rows `leaving_rows` write their x and queries to
  images `leaving_ids` of `final`; rows `into_rows` take images `entering_ids` (their
  initial state, image and target). Out-of-range ids and rows are dropped."""
  final = _write_back(final, leaving_ids, jax.tree.map(lambda a: a[leaving_rows], state))
  state = jax.tree.map(lambda a, b: a.at[into_rows].set(b[entering_ids], mode="drop"), state,
                       initial)
  work_images = work_images.at[into_rows].set(images[entering_ids], mode="drop")
  work_targets = work_targets.at[into_rows].set(targets[entering_ids], mode="drop")
  return final, state, work_images, work_targets


@jax.jit
def _compact(final, rows, state, work_images, work_targets, order, kept):
  """Writes every working row back to its image in `final`, then reorders the rows by
  `order` (the active ones first); the rows from `kept` on are left inactive."""
  final = _write_back(final, rows, state)
  state = jax.tree.map(lambda a: a[order], state)
  state = (*state[:2], state[2] & (jnp.arange(order.shape[0]) < kept), state[3])
  return final, state, work_images[order], work_targets[order]


def _jsma(apply_fn, params, images, labels, keys, targets, gamma, *, theta, block_rows,
          max_candidates, target_mode, derivative, num_slots) -> common.AttackResult:
  """Iterates `_chunk_iteration` over `num_slots` working rows until no image is left.

  A host loop over jitted iterations rather than a `lax.while_loop`: on the XLA CPU backend
  the backward pass inside a `while` body ran 4x slower (see attacks.gradient). An image
  stops when it reaches its target, its gamma budget or an empty search domain; each of its
  iterations moves a feature by theta, so it stops within ceil(1 / |theta|) * N.

  Continuous batching: the images go through `num_slots` rows, and a row whose image has
  stopped takes the next image waiting. Once none waits, finished images stop costing work:
  the active rows move to the front and only they are iterated, in power-of-two `chunks`.
  Rows are independent, so the results do not depend on `num_slots` (tested).
  """
  targets, initial = common.bind(_start, apply_fn, params, theta=theta,
                                 target_mode=target_mode)(images, labels, keys, targets)
  batch = images.shape[0]
  slots = min(num_slots, batch)
  step = functools.cache(lambda size: _iteration(  # the iteration of a chunk of `size` rows
      apply_fn, params, size=size, theta=theta, block_rows=block_rows,
      max_candidates=max_candidates, derivative=derivative))
  final = (initial[0], initial[3])  # every image's x and queries, written back as rows leave
  rows = np.arange(slots)  # the image each working row holds; `batch` marks none
  filled = slots  # rows [0, filled) are iterated
  waiting = slots  # the next image to enter
  state = jax.tree.map(lambda a: a[:slots], initial)
  work_images, work_targets = images[:slots], targets[:slots]
  max_iterations = batch * (int(np.ceil(1.0 / abs(theta))) * images[0].size + 1)
  for _ in range(max_iterations):
    active = np.array(state[2])  # a writable copy
    stopped = np.flatnonzero(~active & (rows < batch))
    if waiting < batch and len(stopped):  # refill: the stopped images leave, new ones enter
      into = stopped[:batch - waiting]
      entering = np.arange(waiting, waiting + len(into))
      # Fixed-length index lists (out of range: dropped), so this compiles once.
      final, state, work_images, work_targets = _hand_over(
          final, state, initial, work_images, work_targets, images, targets,
          _padded(rows[stopped], slots, batch), _padded(stopped, slots, 0),
          _padded(into, slots, slots), _padded(entering, slots, 0))
      waiting += len(into)
      rows[into] = entering
      active[into] = True
    kept = int(active.sum())
    if not kept:
      break
    if waiting >= batch and kept < filled:  # compact: the active rows first
      order = np.argsort(~active, kind="stable")
      final, state, work_images, work_targets = _compact(
          final, rows, state, work_images, work_targets, order, kept)
      rows = rows[order]
      rows[kept:] = batch
      filled = kept
    for offset, size in chunks(filled):
      state = step(size)(work_images, work_targets, state, gamma, np.int32(offset))
  final_x, final_queries = _write_back(final, rows, state)
  adv = final_x.reshape(images.shape)
  return common.finalize(apply_fn, params, images, adv, labels, targets, final_queries)


def prepare_jsma(apply_fn, params, images, labels, key, config=None, *, targets=None
                 ) -> common.PreparedCall:
  """Checks the inputs and returns the jitted core with its arguments."""
  config = config or JSMAConfig()
  common.validate(apply_fn, params, images, labels, targets=targets,
                  target_mode=config.target)
  if config.target == common.UNTARGETED:
    raise ValueError("JSMA is a targeted attack: use target='random', 'least_likely' or "
                     "'explicit'")
  if config.theta == 0 or not -1.0 <= config.theta <= 1.0:
    raise ValueError(f"theta must be in [-1, 0) or (0, 1]; got {config.theta}")
  if not 0.0 <= float(config.gamma) <= 1.0:
    raise ValueError(f"gamma must be a fraction in [0, 1]; got {config.gamma}")
  if config.derivative not in DERIVATIVES:
    raise ValueError(f"derivative must be one of {DERIVATIVES}; got {config.derivative!r}")
  if config.block_rows < 1 or config.max_candidates < 0 or config.num_slots < 1:
    raise ValueError(f"block_rows and num_slots must be >= 1 and max_candidates >= 0; got "
                     f"{config.block_rows}, {config.num_slots}, {config.max_candidates}")
  images = jnp.asarray(images)
  labels = jnp.asarray(labels, jnp.int32)
  gamma = jnp.asarray(config.gamma, images.dtype)
  theta = float(config.theta)
  run = functools.partial(
      _jsma, apply_fn, params, images, labels, key,
      None if targets is None else jnp.asarray(targets, jnp.int32), gamma, theta=theta,
      block_rows=config.block_rows, max_candidates=config.max_candidates,
      target_mode=config.target, derivative=config.derivative, num_slots=config.num_slots)
  slots = min(config.num_slots, len(images))
  flat = images[:slots].reshape(slots, -1)
  state = (flat, jnp.ones(flat.shape, bool), jnp.ones(slots, bool),
           jnp.zeros(slots, jnp.int32))
  largest = _iteration(apply_fn, params, size=chunks(slots)[0][1], theta=theta,
                       block_rows=config.block_rows, max_candidates=config.max_candidates,
                       derivative=config.derivative)
  lower_step = functools.partial(largest.lower, images[:slots], labels[:slots], state, gamma,
                                 np.int32(0))
  return common.PreparedCall(run, lower_step)


def jsma(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
         key: jax.Array, config: JSMAConfig | None = None, *,
         targets: jax.Array | None = None) -> common.AttackResult:
  """Targeted JSMA: pairs of features moved by theta until the target class wins.

  Args:
    apply_fn: `apply_fn(params, images[B,H,W,C]) -> logits[B,K]`.
    params: the model's variables.
    images: [B,H,W,C] float in [0, 1].
    labels: [B] true classes.
    key: PRNG key, or one per image [B] (draws the targets in "random" mode).
    config: `JSMAConfig`; None is the paper's setting (theta +1, gamma 14.5%).
    targets: [B] classes for `target="explicit"`; see `attacks.every_other_class` for the
      paper's all-targets runs.

  Returns:
    `AttackResult`; `l0_fraction` is the paper's "percentage of features modified" and
    `queries` counts iterations (one forward pass and two vector-Jacobian products each;
    one with `derivative="probabilities"`).

  References: Papernot et al., The Limitations of Deep Learning in Adversarial Settings, 2016.
  """
  return prepare_jsma(apply_fn, params, images, labels, key, config, targets=targets)()
