"""The one-pixel attack: differential evolution over k (row, col, colour) pixels.

Differential evolution as in Su et al.: population 400, up to 100 generations, rand/1
mutation with F = 0.5 and no crossover; coordinates drawn uniformly over the image and
colours from N(128, 127) on the 0..255 scale; candidates clipped to the image. The DE step is
evosax's `DifferentialEvolution` with `elitism=False` (random base vector: rand/1),
`crossover_rate=1.0` (the trial is the whole mutant: no crossover) and
`differential_weight=F`; evosax neither initialises the paper's way nor clips, so both are
done here.

The search runs over slots (`SlotState`), one image per slot, one generation at a time
(`generation`): every generation is one (chunked) model call over all candidates of all
active slots. `one_pixel_core` gives every image its own slot and runs until all are done:
pure, it runs under `jax.jit`, `jax.vmap` and inside a training step.
`attacks.pixel.slots.one_pixel_slots`, which the public `one_pixel` runs on concrete arrays,
puts the images through `num_slots` slots and refills a slot whose image succeeded (or ran
out of generations) with the next pending image at once, so a broken image stops costing
model evaluations. Every random draw for image i comes from image i's key folded with its
generation, so the result does not depend on slot assignment: the scheduler equals the core
image by image.

With k = 1 a candidate's logits come from pixel-local evaluation by default
(`attacks.pixel_local`, derived from `apply_fn` itself): the pixel's change is propagated
through the early layers only on the windows it reaches and spliced into the clean
activations. Exact up to float rounding, and faster than the full forward pass. A model with
no local first layer runs the full pass, with a one-time warning that names the reason;
`evaluator="full"` asks for the full pass; `AttackResult.evaluation` says which ran.

References: Su, Vargas, Sakurai, One Pixel Attack for Fooling Deep Neural Networks, IEEE
TEVC 2019 (70.97% of natural images perturbed to at least one target class, 97.47% mean
confidence).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from advsweep.attacks import checks, common

AT_LEAST_ONE_TARGET = "at_least_one_target"
ONE_PIXEL_TARGET_MODES = (*common.TARGET_MODES, AT_LEAST_ONE_TARGET)
DE_BASES = ("random", "best")


@struct.dataclass
class OnePixelConfig:
  """One-pixel attack settings; defaults are Su et al.'s.

  Attributes:
    num_pixels: k, pixels changed per candidate (1, 3, 5 in the paper).
    population_size: DE population per image (paper: 400).
    num_generations: maximum generations after the initial population (paper: 100).
    differential_weight: F (paper: 0.5; traced, a sweep does not recompile).
    base: the mutation's base vector: "random" (rand/1, the paper's) or "best" (best/1,
      SciPy's default `best1bin` strategy, which ART's PixelAttack uses).
    target: a mode of `common.TARGET_MODES`, or "at_least_one_target" (tries every other
      class; success if any works).
    stop_on_flip: stop an image once a candidate flips the prediction (untargeted) or reaches
      the target (targeted).
    stop_true_prob: untargeted early stop when the true-class probability is below this.
    stop_target_prob: targeted early stop when the target probability exceeds this.
    num_slots: images attacked at once; each generation evaluates the populations of the
      slots still active.
    chunk_size: candidates per model call at most, the memory bound of the evaluation.
      0 (the default): one population per call, so the model computes exactly the active
      slots' candidates and an image that stopped costs nothing; on a CPU a candidate costs
      about the same at any batch size. On an accelerator, where a call costs about the same
      at any size, a larger value packs whole populations into each call (`chunk_rows`);
      the last call of a generation is then padded where fewer slots are active, and
      `AttackResult.evaluated` counts that padding.
    splice: evaluate candidates pixel-locally where k = 1 and the model allows it
      (`attacks.pixel_local`): the early layers are computed only on the windows the
      changed pixel reaches. Exact up to float rounding; False always runs the full
      forward pass. It does not change results, so
      it is not part of a sweep cell's identity (`common.SAME_RESULTS`).
  """

  num_pixels: int = struct.field(pytree_node=False, default=1)
  population_size: int = struct.field(pytree_node=False, default=400)
  num_generations: int = struct.field(pytree_node=False, default=100)
  differential_weight: float = 0.5
  base: str = struct.field(pytree_node=False, default="random")
  target: str = struct.field(pytree_node=False, default=common.UNTARGETED)
  stop_on_flip: bool = struct.field(pytree_node=False, default=True)
  stop_true_prob: float = 0.05
  stop_target_prob: float = 0.9
  num_slots: int = struct.field(pytree_node=False, default=16)
  chunk_size: int = struct.field(pytree_node=False, default=0)
  splice: bool = struct.field(pytree_node=False, default=True,
                              metadata={common.SAME_RESULTS: True})


def decode_candidates(candidates: jax.Array, height: int, width: int, channels: int
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[..., k*(2+C)] candidates -> int rows [..., k], int cols [..., k], colours [..., k, C]."""
  pixels = candidates.reshape(*candidates.shape[:-1], -1, 2 + channels)
  rows = jnp.clip(jnp.floor(pixels[..., 0]), 0, height - 1).astype(jnp.int32)
  cols = jnp.clip(jnp.floor(pixels[..., 1]), 0, width - 1).astype(jnp.int32)
  return rows, cols, pixels[..., 2:]


def apply_candidate(image: jax.Array, candidate: jax.Array) -> jax.Array:
  """Sets k pixels of `image` [H,W,C] from `candidate` [k*(2+C)] = (row, col, colour)*k."""
  rows, cols, colours = decode_candidates(candidate, *image.shape)
  return image.at[rows, cols].set(colours.astype(image.dtype))


def clip_candidates(candidates: jax.Array, height: int, width: int, channels: int
                    ) -> jax.Array:
  """[..., k*(2+C)] candidates with every pixel inside the image and colours in [0, 1]."""
  shape = candidates.shape
  pixels = candidates.reshape(*shape[:-1], -1, 2 + channels)
  upper = jnp.asarray([height - 1e-3, width - 1e-3] + [1.0] * channels, candidates.dtype)
  return jnp.clip(pixels, 0.0, upper).reshape(shape)


def _initial_population(key, population_size, num_pixels, height, width, channels):
  """Coordinates uniform over the image; colours N(128, 127)/255, clipped (Su et al.)."""
  coord_key, colour_key = jax.random.split(key)
  coords = jax.random.uniform(coord_key, (population_size, num_pixels, 2)) * jnp.asarray(
      [height, width])
  colours = 128 / 255 + 127 / 255 * jax.random.normal(
      colour_key, (population_size, num_pixels, channels))
  population = jnp.concatenate([coords, colours], -1).reshape(population_size, -1)
  return clip_candidates(population, height, width, channels)


class SlotState(NamedTuple):
  """The DE loop's state: S slots, P members, D = k*(2+C) candidate values, B images."""

  image: jax.Array  # [S] int32, the image each slot holds; -1 for an idle slot
  de: Any  # evosax's DE State, every leaf [S, ...]
  member_success: jax.Array  # [S, P] bool, the member's candidate succeeded
  fresh: jax.Array  # [S] bool, the slot's initial population is not evaluated yet
  generation: jax.Array  # [S] int32, generations the slot's image has run
  best: jax.Array  # [B, D], each finished image's best candidate
  queries: jax.Array  # [B] int32, candidates evaluated per image
  evaluated: jax.Array  # [B] float32, model rows computed for the image (padding shared)


@dataclasses.dataclass(frozen=True)
class Search:
  """An attack's fixed parts, built inside the trace by `setup`.

  Attributes:
    de: evosax's `DifferentialEvolution` for P members of D values.
    de_params: its params (rand/1 or best/1, no crossover, F).
    keys: [B] one key per image.
    fitness: `(ids[M], candidates[M,D]) -> (fitness[M], success[M])`; lower is better.
    image_shape: (H, W, C).
    num_generations: generations after the initial population.
    chunk: candidates per model call (`chunk_rows`).
    evaluation: `common.FULL_EVALUATION` or `common.PIXEL_LOCAL_EVALUATION`.
    least_likely: the targets came from a clean forward pass (one more model row per image).
  """

  de: Any  # evosax's DifferentialEvolution
  de_params: Any
  keys: jax.Array
  fitness: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
  image_shape: tuple[int, int, int]
  num_generations: int
  chunk: int
  evaluation: str
  least_likely: bool = False

  @property
  def population_size(self) -> int:
    return self.de.population_size


def candidate_logits(apply_fn: common.ApplyFn, params: Any, images: jax.Array,
                     num_pixels: int, evaluator: Any) -> tuple[Callable, str]:
  """`(ids[M], candidates[M,D]) -> logits[M,K]` of clean images `ids` with the candidates'
  pixels set, and which evaluation it runs: pixel-local through `evaluator` where it has a
  split that pays (k = 1), else the full forward pass."""
  height, width, channels = images.shape[1:]
  plan = None if evaluator is None else evaluator.plan_for(params, images.shape[1:],
                                                           num_pixels)
  if plan is None or plan.split == 0:
    def full(ids, candidates):
      return apply_fn(params, jax.vmap(apply_candidate)(images[ids], candidates))
    return full, common.FULL_EVALUATION
  clean = evaluator.clean_state(params, images, plan)

  def pixel_local(ids, candidates):
    rows, cols, colours = decode_candidates(candidates, height, width, channels)
    return evaluator.logits(params, clean, ids, rows, cols, colours.astype(images.dtype), plan)
  return pixel_local, common.PIXEL_LOCAL_EVALUATION


def _fitness(logits_of, labels, targets, config, ids, candidates):
  """Fitness (the true class's probability, or minus the target's) and success."""
  probs = jax.nn.softmax(logits_of(ids, candidates), -1)
  rows = jnp.arange(ids.shape[0])
  pred = jnp.argmax(probs, -1)
  if config.target != common.UNTARGETED:
    p_target = probs[rows, targets[ids]]
    fitness, success = -p_target, p_target > config.stop_target_prob
    if config.stop_on_flip:
      success |= pred == targets[ids]
  else:
    p_true = probs[rows, labels[ids]]
    fitness, success = p_true, p_true < config.stop_true_prob
    if config.stop_on_flip:
      success |= pred != labels[ids]
  finite = jnp.isfinite(fitness)
  return jnp.where(finite, fitness, jnp.inf), success & finite


def setup(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
          keys: jax.Array, targets: jax.Array | None, config: OnePixelConfig,
          evaluator: Any) -> tuple[Search, jax.Array]:
  """The `Search` of a batch and its targets ([B] keys in, targets [B] out)."""
  height, width, channels = images.shape[1:]
  dims = config.num_pixels * (2 + channels)
  target_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0x7FFFFFFF))(keys)
  targets = common.choose_targets(config.target, target_keys, labels, apply_fn(params, images),
                                  targets)
  # Imported here: evosax.algorithms runs JAX as it is imported, which would start JAX's
  # backend whenever advsweep.attacks is imported (before XLA's flags are set, before
  # jax.distributed.initialize in a multi-process job).
  from evosax.algorithms import DifferentialEvolution

  de = DifferentialEvolution(config.population_size, jnp.zeros(dims, images.dtype))
  de_params = de.default_params.replace(
      elitism=config.base == "best", crossover_rate=1.0,
      differential_weight=jnp.asarray(config.differential_weight, images.dtype))
  logits_of, evaluation = candidate_logits(apply_fn, params, images, config.num_pixels,
                                           evaluator)
  fitness = functools.partial(_fitness, logits_of, labels, targets, config)
  return Search(de, de_params, keys, fitness, (height, width, channels),
                config.num_generations, chunk_rows(config), evaluation,
                config.target == common.LEAST_LIKELY), targets


def fresh_de(search: Search, image_ids: jax.Array) -> Any:
  """DE states [S] holding the initial populations of images `image_ids` [S]."""
  def one(image_index):
    key = jax.random.fold_in(search.keys[image_index], 0)
    population = _initial_population(key, search.population_size,
                                     search.de.num_dims // (2 + search.image_shape[2]),
                                     *search.image_shape)
    return search.de.init(key, population, jnp.full(search.population_size, jnp.inf),
                          search.de_params)
  return jax.vmap(one)(image_ids)


def initial_state(search: Search, image_ids: jax.Array, images: jax.Array) -> SlotState:
  """Slots holding images `image_ids` [S] of `images` [B,H,W,C], fresh."""
  batch = images.shape[0]
  slots, population = image_ids.shape[0], search.population_size
  return SlotState(
      image=image_ids.astype(jnp.int32), de=fresh_de(search, image_ids),
      member_success=jnp.zeros((slots, population), bool), fresh=jnp.ones(slots, bool),
      generation=jnp.zeros(slots, jnp.int32),
      best=jnp.zeros((batch, search.de.num_dims), images.dtype),
      queries=jnp.zeros(batch, jnp.int32), evaluated=jnp.zeros(batch, jnp.float32))


def model_calls(search: Search, active: jax.Array) -> jax.Array:
  """Model calls of `search.chunk` rows that one generation of the `active` [S] slots needs."""
  return -(-(jnp.sum(active) * search.population_size) // search.chunk)


def evaluate(search: Search, image_ids: jax.Array, candidates: jax.Array, active: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
  """Fitness and success of [S,P] candidates, `search.chunk` per model call.

  The active slots move to the front and only the calls that hold them run (`model_calls`):
  with one population per call (the default) the model computes exactly the active
  candidates; with larger chunks, idle slots cost at most the rest of the last call.
  """
  slots, population, dims = candidates.shape
  total = slots * population
  chunk = search.chunk
  num_chunks = -(-total // chunk)
  order = jnp.argsort(~active, stable=True)
  pad = num_chunks * chunk - total
  flat_ids = jnp.pad(jnp.repeat(image_ids[order], population), (0, pad))
  flat = jnp.pad(candidates[order].reshape(total, dims), ((0, pad), (0, 0)))
  needed = model_calls(search, active)

  def body(c, buffers):
    start = c * chunk
    fitness, success = search.fitness(jax.lax.dynamic_slice(flat_ids, (start,), (chunk,)),
                                       jax.lax.dynamic_slice(flat, (start, 0), (chunk, dims)))
    return (jax.lax.dynamic_update_slice(buffers[0], fitness, (start,)),
            jax.lax.dynamic_update_slice(buffers[1], success, (start,)))

  buffers = (jnp.full(num_chunks * chunk, jnp.inf, candidates.dtype),
             jnp.zeros(num_chunks * chunk, bool))
  fitness, success = jax.lax.fori_loop(0, needed, body, buffers)
  inverse = jnp.argsort(order)
  return (fitness[:total].reshape(slots, population)[inverse],
          success[:total].reshape(slots, population)[inverse])


def _winner(de_state: Any, member_success: jax.Array) -> jax.Array:
  """[S, D] each slot's best member: the fittest successful one if any, else the fittest."""
  ranked = jnp.where(jnp.any(member_success, -1, keepdims=True),
                     jnp.where(member_success, de_state.fitness, jnp.inf), de_state.fitness)
  return jnp.take_along_axis(de_state.population, jnp.argmin(ranked, -1)[:, None, None],
                             1)[:, 0]


def generation(search: Search, state: SlotState) -> tuple[SlotState, jax.Array]:
  """One generation of every active slot: ask, evaluate, tell. Returns the new state and
  which slots finished ([S] bool: a member succeeded or the generations ran out); a
  finished slot's winner is written to `best`."""
  active = state.image >= 0
  ids = jnp.maximum(state.image, 0)
  ask_keys = jax.vmap(jax.random.fold_in)(search.keys[ids], state.generation + 1)
  trials, _ = jax.vmap(search.de.ask, in_axes=(0, 0, None))(ask_keys, state.de,
                                                             search.de_params)
  candidates = jnp.where(state.fresh[:, None, None], state.de.population, trials)
  candidates = clip_candidates(candidates, *search.image_shape)
  fitness, success = evaluate(search, ids, candidates, active)
  member_success = jnp.where(fitness <= state.de.fitness, success, state.member_success)
  de, _ = jax.vmap(search.de.tell, in_axes=(0, 0, 0, 0, None))(
      ask_keys, candidates, fitness, state.de, search.de_params)
  generations = state.generation + 1
  done = active & (jnp.any(member_success, -1) | (generations > search.num_generations))
  best = state.best.at[jnp.where(done, ids, state.best.shape[0])].set(
      _winner(de, member_success), mode="drop")
  queries = state.queries.at[ids].add(jnp.where(active, search.population_size, 0))
  # The rows the model computed this generation, padding included, shared by the active slots.
  rows = (model_calls(search, active) * search.chunk).astype(jnp.float32)
  share = rows / jnp.maximum(jnp.sum(active), 1).astype(jnp.float32)
  evaluated = state.evaluated.at[ids].add(jnp.where(active, share, 0.0))
  return SlotState(state.image, de, member_success, jnp.zeros_like(state.fresh), generations,
                   best, queries, evaluated), done


def finish(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
           targets: jax.Array, search: Search, state: SlotState) -> common.AttackResult:
  """The adversarial images from each image's best candidate, re-checked."""
  adv = jax.vmap(apply_candidate)(images, state.best)
  # Beside the search: the re-check of the adversarial image (`finalize`), and the clean
  # forward pass where the least-likely target needs it.
  passes = 2.0 if search.least_likely else 1.0
  return common.finalize(apply_fn, params, images, adv, labels, targets, state.queries,
                         evaluation=search.evaluation, evaluated=state.evaluated + passes)


def over_every_target(attack: Callable[..., common.AttackResult], apply_fn: common.ApplyFn,
                      params: Any, images: jax.Array, labels: jax.Array, keys: jax.Array,
                      config: OnePixelConfig, evaluator: Any) -> common.AttackResult:
  """"at_least_one_target": `attack` toward every other class, reduced to one row per image
  (`common.best_over_targets`)."""
  batch = images.shape[0]
  num_classes = checks.num_classes_of(apply_fn, params, images)
  rep_images, rep_labels, rep_targets = common.every_other_class(images, labels, num_classes)
  rep_keys = jax.vmap(lambda k: jax.random.split(k, num_classes - 1))(keys).reshape(-1)
  result = attack(apply_fn, params, rep_images, rep_labels, rep_keys, rep_targets,
                  config.replace(target=common.EXPLICIT), evaluator)
  return common.best_over_targets(result, batch, num_classes - 1)


def _core(apply_fn, params, images, labels, keys, targets, config, evaluator):
  search, targets = setup(apply_fn, params, images, labels, keys, targets, config, evaluator)

  def body(state):
    state, done = generation(search, state)
    return state._replace(image=jnp.where(done, -1, state.image))

  batch = images.shape[0]
  state = jax.lax.while_loop(lambda s: jnp.any(s.image >= 0), body,
                             initial_state(search, jnp.arange(batch), images))
  return finish(apply_fn, params, images, labels, targets, search, state)


def one_pixel_core(apply_fn: common.ApplyFn, params: Any, images: jax.Array,
                   labels: jax.Array, key: jax.Array, config: OnePixelConfig | None = None, *,
                   targets: jax.Array | None = None, evaluator: Any = None
                   ) -> common.AttackResult:
  """The one-pixel attack's pure core: every image in its own slot until all are done.

  Traceable (`lax.while_loop` over generations): runs under `jax.jit`, `jax.vmap` and inside
  a training step. Arguments as `one_pixel`; no checks of its own.
  """
  config = config or OnePixelConfig()
  keys = common.per_image_keys(key, images.shape[0])
  if config.target == AT_LEAST_ONE_TARGET:
    return over_every_target(_core, apply_fn, params, images, labels, keys, config, evaluator)
  return _core(apply_fn, params, images, labels, keys, targets, config, evaluator)


def check_config(config: OnePixelConfig) -> None:
  """Raises ValueError naming a bad value of a one-pixel config."""
  checks.check_choice("target mode", config.target, ONE_PIXEL_TARGET_MODES)
  if config.num_pixels < 1:
    raise ValueError(f"num_pixels (k) must be >= 1; got {config.num_pixels}")
  if config.population_size < 4:
    raise ValueError(f"population_size must be >= 4 for rand/1 mutation; got "
                     f"{config.population_size}")
  if config.num_generations < 0:
    raise ValueError(f"num_generations must be >= 0; got {config.num_generations}")
  if config.num_slots < 1:
    raise ValueError(f"num_slots must be >= 1; got {config.num_slots}")
  if config.chunk_size < 0:
    raise ValueError(f"chunk_size must be >= 1, or 0 for one population per model call; "
                     f"got {config.chunk_size}")
  checks.check_choice("base", config.base, DE_BASES)
  checks.check_at_least("differential_weight (F)", config.differential_weight, 0.0,
                        strict=True)


def chunk_rows(config: OnePixelConfig) -> int:
  """Candidates per model call, from the config alone: one population where `chunk_size` is
  0; else whole populations, as many as fit in `chunk_size`, balanced over `num_slots` slots
  (a population larger than `chunk_size` takes several calls of `chunk_size`).

  XLA's float results depend on a call's batch shape; a shape fixed by the config makes
  every image's search, and so its row, the same in any batch (tested).
  """
  population = config.population_size
  if config.chunk_size == 0:
    return population
  if config.chunk_size < population:
    return config.chunk_size
  slots_per_chunk = min(config.chunk_size // population, config.num_slots)
  num_chunks = -(-config.num_slots // slots_per_chunk)
  return population * -(-config.num_slots // num_chunks)
