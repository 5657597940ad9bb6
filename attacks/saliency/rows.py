"""JSMA's row scheduler: a host loop over one jitted JSMA iteration on `num_slots` rows; a row
whose image stopped takes the next image waiting (continuous batching), and once none waits
the active rows move to the front and run in power-of-two chunks, so no row is padding. A host
loop, not a `lax.while_loop`: XLA's CPU backend runs a convolution's backward pass several
times slower inside a rolled loop. Equals `core.jsma_core` image by image (tested)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from advsweep.attacks import common
from advsweep.attacks.saliency import core


def chunks(rows: int) -> list[tuple[int, int]]:
  """(offset, size) of the power-of-two chunks that cover rows [0, rows), largest first (the
  binary digits of `rows`): 13 rows are 8 + 4 + 1.

  The iteration then compiles for powers of two only and no row is padding: on a CPU, where
  a row costs about the same at any batch size, the tail of a batch costs only what its
  active images need.
  """
  out, offset = [], 0
  for bit in reversed(range(rows.bit_length())):
    if rows >> bit & 1:
      out.append((offset, 1 << bit))
      offset += 1 << bit
  return out


def _chunk_iteration(apply_fn, params, images, targets, state, gamma, offset, *, size,
                     **statics) -> core.JSMAState:
  """`core.iteration` of the working rows [offset, offset + size); returns the whole working
  state with those rows updated."""
  def take(a):
    return jax.lax.dynamic_slice_in_dim(a, offset, size)

  moved = core.iteration(apply_fn, params, take(images), take(targets),
                         jax.tree.map(take, state), gamma, **statics)
  return jax.tree.map(lambda a, m: jax.lax.dynamic_update_slice_in_dim(a, m, offset, 0),
                      state, moved)


def _iteration(apply_fn, params, size: int, statics: dict[str, Any]):
  """`_chunk_iteration` for chunks of `size` rows, jitted with the params as an argument
  (faster than closing over them for this iteration on XLA CPU, see `common.bind`)."""
  return common.bind(_chunk_iteration, apply_fn, params, close_params=False, size=size,
                     **statics)


class Finished(NamedTuple):
  """Every image's result so far, written back as rows leave."""

  x: jax.Array  # [B, N] the images' working values
  queries: jax.Array  # [B] int32


def _padded(values: np.ndarray, length: int, fill: int) -> np.ndarray:
  """`values` followed by `fill` up to `length`."""
  out = np.full(length, fill)
  out[:len(values)] = values
  return out


def _write_back(final: Finished, rows, state: core.JSMAState) -> Finished:
  """Writes each working row's x and queries to its image in `final` (rows whose image is
  out of range are dropped)."""
  return Finished(final.x.at[rows].set(state.x, mode="drop"),
                  final.queries.at[rows].set(state.queries, mode="drop"))


@jax.jit
def _hand_over(final, state, initial, work_images, work_targets, images, targets, leaving_ids,
               leaving_rows, into_rows, entering_ids):
  """The row exchange: rows `leaving_rows` write their x and queries to images
  `leaving_ids`; rows `into_rows` take images `entering_ids` (their initial state, image and
  target). Out-of-range ids and rows are dropped, so the index lists have a fixed length and
  this compiles once."""
  final = _write_back(final, leaving_ids, jax.tree.map(lambda a: a[leaving_rows], state))
  state = jax.tree.map(lambda a, b: a.at[into_rows].set(b[entering_ids], mode="drop"), state,
                       initial)
  work_images = work_images.at[into_rows].set(images[entering_ids], mode="drop")
  work_targets = work_targets.at[into_rows].set(targets[entering_ids], mode="drop")
  return final, state, work_images, work_targets


@jax.jit
def _compact(final, rows, state, work_images, work_targets, order, kept):
  """Writes every working row back, then reorders the rows by `order` (the active ones
  first); the rows from `kept` on are left inactive."""
  final = _write_back(final, rows, state)
  state = jax.tree.map(lambda a: a[order], state)
  state = state._replace(active=state.active & (jnp.arange(order.shape[0]) < kept))
  return final, state, work_images[order], work_targets[order]


class _Rows:
  """The host side of `jsma_rows`: which image each working row holds."""

  def __init__(self, batch: int, slots: int):
    self.batch = batch
    self.image = np.arange(slots)  # the image each row holds; `batch` marks none
    self.filled = slots  # rows [0, filled) are iterated
    self.waiting = slots  # the next image to enter

  def refill(self, carry, active: np.ndarray, initial, images, targets):
    """Stopped rows hand over to waiting images; returns the carry and the active rows."""
    stopped = np.flatnonzero(~active & (self.image < self.batch))
    if self.waiting >= self.batch or not len(stopped):
      return carry, active
    slots = len(self.image)
    into = stopped[:self.batch - self.waiting]
    entering = np.arange(self.waiting, self.waiting + len(into))
    carry = _hand_over(*carry[:2], initial, *carry[2:], images, targets,
                       _padded(self.image[stopped], slots, self.batch),
                       _padded(stopped, slots, 0), _padded(into, slots, slots),
                       _padded(entering, slots, 0))
    self.waiting += len(into)
    self.image[into] = entering
    active = active.copy()
    active[into] = True
    return carry, active

  def compact(self, carry, active: np.ndarray):
    """Once no image waits, moves the active rows to the front and iterates only them."""
    kept = int(active.sum())
    if self.waiting < self.batch or kept >= self.filled:
      return carry
    order = np.argsort(~active, kind="stable")
    carry = _compact(carry[0], self.image, *carry[1:], order, kept)
    self.image = self.image[order]
    self.image[kept:] = self.batch
    self.filled = kept
    return carry


def jsma_rows(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
              key: jax.Array, targets: jax.Array | None, config: core.JSMAConfig
              ) -> common.AttackResult:
  """JSMA with continuous batching over `config.num_slots` rows and a chunked tail; equals
  `core.jsma_core` image by image."""
  statics = core.iteration_statics(config)
  targets, initial = common.bind(core.start, apply_fn, params, theta=statics["theta"],
                                 target_mode=config.target)(images, labels, key, targets)
  gamma = jnp.asarray(config.gamma, images.dtype)
  batch = images.shape[0]
  rows = _Rows(batch, min(config.num_slots, batch))
  slots = len(rows.image)
  carry = (Finished(initial.x, initial.queries), jax.tree.map(lambda a: a[:slots], initial),
           images[:slots], targets[:slots])
  for _ in range(batch * core.max_iterations(images[0].size, statics["theta"])):
    carry, active = rows.refill(carry, np.asarray(carry[1].active), initial, images, targets)
    if not active.any():
      break
    carry = rows.compact(carry, active)
    final, state, work_images, work_targets = carry
    for offset, size in chunks(rows.filled):
      state = _iteration(apply_fn, params, size, statics)(work_images, work_targets, state,
                                                           gamma, np.int32(offset))
    carry = (final, state, work_images, work_targets)
  final = _write_back(carry[0], rows.image, carry[1])
  return common.finalize(apply_fn, params, images, final.x.reshape(images.shape), labels,
                         targets, final.queries)


def prepare_jsma_rows(apply_fn, params, images, labels, key, config, targets
                      ) -> common.PreparedCall:
  """`jsma_rows` on checked, concrete inputs; `lower` lowers the iteration of the largest
  chunk."""
  run = functools.partial(jsma_rows, apply_fn, params, images, labels, key, targets, config)
  slots = min(config.num_slots, len(images))
  flat = images[:slots].reshape(slots, -1)
  state = core.JSMAState(flat, jnp.ones(flat.shape, bool), jnp.ones(slots, bool),
                         jnp.zeros(slots, jnp.int32))
  largest = _iteration(apply_fn, params, chunks(slots)[0][1], core.iteration_statics(config))
  lower = functools.partial(largest.lower, images[:slots], labels[:slots], state,
                            jnp.asarray(config.gamma, images.dtype), np.int32(0))
  return common.PreparedCall(run, lower)
