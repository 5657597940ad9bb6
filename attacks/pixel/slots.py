"""The one-pixel attack's slot scheduler: the images go through `num_slots` slots, one jitted
`lax.while_loop` over generations; a slot whose image finished takes the next pending image at
once, so the model's batch is kept busy with work that counts. Every random draw of image i
comes from image i's key, so the result equals `core.one_pixel_core` image by image
(tested)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from advsweep.attacks import common
from advsweep.attacks.pixel import core


def _refill(search: core.Search, state: core.SlotState, done: jax.Array,
            next_image: jax.Array) -> tuple[core.SlotState, jax.Array]:
  """Gives each finished slot the next pending image, in slot order (a fresh population);
  slots left without one go idle (-1)."""
  batch = state.best.shape[0]
  new_image = next_image + jnp.cumsum(done) - 1
  refill = done & (new_image < batch)
  image = jnp.where(done, jnp.where(refill, new_image, -1), state.image).astype(jnp.int32)
  new_de = core.fresh_de(search, jnp.clip(new_image, 0, batch - 1))
  de = jax.tree.map(
      lambda new, old: jnp.where(refill.reshape((-1,) + (1,) * (old.ndim - 1)), new, old),
      new_de, state.de)
  state = state._replace(image=image, de=de, fresh=refill,
                         member_success=jnp.where(refill[:, None], False, state.member_success),
                         generation=jnp.where(refill, 0, state.generation))
  return state, next_image + jnp.sum(done).astype(jnp.int32)


def _slots(apply_fn, params, images, labels, keys, targets, config, evaluator):
  search, targets = core.setup(apply_fn, params, images, labels, keys, targets, config,
                                    evaluator)
  slots = min(config.num_slots, images.shape[0])

  def body(carry):
    state, next_image = carry
    state, done = core.generation(search, state)
    return _refill(search, state, done, next_image)

  init = (core.initial_state(search, jnp.arange(slots), images),
          jnp.asarray(slots, jnp.int32))
  state, _ = jax.lax.while_loop(lambda c: jnp.any(c[0].image >= 0), body, init)
  return core.finish(apply_fn, params, images, labels, targets, search, state)


@functools.partial(jax.jit, static_argnames=("apply_fn", "evaluator"))
def one_pixel_slots(apply_fn: common.ApplyFn, params: Any, images: jax.Array,
                    labels: jax.Array, keys: jax.Array, targets: jax.Array | None,
                    config: core.OnePixelConfig, evaluator: Any = None
                    ) -> common.AttackResult:
  """The one-pixel attack over `config.num_slots` slots with refilling ([B] keys); equals
  `core.one_pixel_core` image by image. Jitted: the config's budgets are traced, its
  sizes static."""
  if config.target == core.AT_LEAST_ONE_TARGET:
    return core.over_every_target(_slots, apply_fn, params, images, labels, keys,
                                       config, evaluator)
  return _slots(apply_fn, params, images, labels, keys, targets, config, evaluator)


def prepare_one_pixel_slots(apply_fn, params, images, labels, key, config, targets, evaluator
                            ) -> common.PreparedCall:
  """`one_pixel_slots` on checked, concrete inputs, with its `lower`."""
  args = (apply_fn, params, images, labels, common.per_image_keys(key, images.shape[0]),
          targets, config, evaluator)
  return common.PreparedCall(functools.partial(one_pixel_slots, *args),
                             functools.partial(one_pixel_slots.lower, *args))
