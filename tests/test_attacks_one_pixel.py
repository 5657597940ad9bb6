"""One-pixel DE: a planted trigger is found, invariants, continuous batching, determinism."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advsweep import attacks
from advsweep.attacks.pixel.core import apply_candidate
from tests.attack_models import linear_model, random_images, small_cnn

TRIGGER_AT = (5, 2)
TRIGGER_COLOUR = jnp.array([0.9, 0.1, 0.6])


def trigger_model(images):
  """A planted one-pixel trigger with a basin: class 1 wins near TRIGGER_COLOUR at TRIGGER_AT.

  Each pixel scores its closeness to the trigger colour times its closeness to the trigger
  position; the best pixel drives class 1. The unique optimum is the trigger itself.
  """
  height, width = images.shape[1:3]
  rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
  place = jnp.exp(-((rows - TRIGGER_AT[0]) ** 2 + (cols - TRIGGER_AT[1]) ** 2) / 8.0)
  colour = jnp.exp(-jnp.sum((images - TRIGGER_COLOUR) ** 2, -1) / 0.1)
  closeness = jnp.max(colour * place, axis=(1, 2))
  return jnp.stack([jnp.full_like(closeness, 1.0), 4.0 * closeness - 1.0,
                    jnp.zeros_like(closeness)], -1)


def test_apply_candidate_sets_k_pixels():
  image = jnp.zeros((4, 5, 3))
  candidate = jnp.array([1.7, 3.2, 0.1, 0.2, 0.3, 3.99, 0.0, 1.0, 1.0, 1.0])
  out = apply_candidate(image, candidate)
  np.testing.assert_allclose(out[1, 3], [0.1, 0.2, 0.3])
  np.testing.assert_allclose(out[3, 0], [1.0, 1.0, 1.0])
  assert int(jnp.sum(jnp.any(out != 0, -1))) == 2


@pytest.mark.parametrize("base", ["random", "best"])
def test_de_finds_the_planted_trigger_with_either_base(base):
  images = jnp.full((3, 8, 8, 3), 0.3)
  labels = jnp.zeros(3, jnp.int32)
  config = attacks.OnePixelConfig(population_size=60, num_generations=40,
                                  stop_on_flip=False, stop_true_prob=0.0, num_slots=3,
                                  base=base)
  result = attacks.one_pixel(lambda p, x: trigger_model(x), None, images, labels,
                             jax.random.key(0), config)
  assert result.success.all()
  changed = np.argwhere(np.any(np.asarray(result.adv_images != images), -1))
  assert {tuple(c[1:]) for c in changed} == {TRIGGER_AT}
  found = np.asarray(result.adv_images)[:, TRIGGER_AT[0], TRIGGER_AT[1]]
  np.testing.assert_allclose(found, np.broadcast_to(TRIGGER_COLOUR, found.shape), atol=0.1)
  np.testing.assert_array_equal(result.queries, 60 * 41)  # no early stop: all generations


def test_targeted_attack_reaches_the_target():
  images = jnp.full((2, 8, 8, 3), 0.3)
  config = attacks.OnePixelConfig(population_size=60, num_generations=40,
                                  target=attacks.EXPLICIT, num_slots=2)
  result = attacks.one_pixel(lambda p, x: trigger_model(x), None, images,
                             jnp.zeros(2, jnp.int32), jax.random.key(1), config,
                             targets=jnp.array([1, 1]))
  assert result.success.all()
  np.testing.assert_array_equal(result.adv_pred, [1, 1])


@pytest.mark.parametrize("k", [1, 3])
def test_invariants_and_early_stop(k):
  apply_fn, params = small_cnn(seed=1)
  images = random_images(9, 8, 8, 3, seed=1)
  labels = jnp.argmax(apply_fn(params, images), -1)
  population, generations = 30, 12
  config = attacks.OnePixelConfig(num_pixels=k, population_size=population,
                                  num_generations=generations, num_slots=4)
  result = attacks.one_pixel(apply_fn, params, images, labels, jax.random.key(2), config)
  adv = np.asarray(result.adv_images)
  assert adv.min() >= 0 and adv.max() <= 1
  assert int(result.l0.max()) <= k
  logits = apply_fn(params, result.adv_images)
  np.testing.assert_array_equal(result.success, jnp.argmax(logits, -1) != labels)
  queries = np.asarray(result.queries)
  assert np.all(queries % population == 0)
  assert np.all(queries <= population * (generations + 1))
  # Early stop: a broken image stops costing queries.
  assert np.all(queries[np.asarray(result.success)] < population * (generations + 1)) or (
      not result.success.any())
  assert result.success.any()


def test_batch_equals_per_image_loop_whatever_the_slots():
  apply_fn, params = small_cnn(seed=4)
  images = random_images(5, 8, 8, 3, seed=4)
  labels = jnp.argmax(apply_fn(params, images), -1)
  keys = jax.random.split(jax.random.key(5), 5)
  config = attacks.OnePixelConfig(population_size=20, num_generations=6, num_slots=2)
  batched = attacks.one_pixel(apply_fn, params, images, labels, keys, config)
  wide = attacks.one_pixel(apply_fn, params, images, labels, keys,
                           config.replace(num_slots=5, chunk_size=7))
  # One population per call: the model computes the searched candidates and the re-check.
  np.testing.assert_array_equal(batched.evaluated, batched.queries + 1)
  # Calls of 7 rows split populations of 20 into 3 calls, padding 1 row each (shared).
  assert np.all(np.asarray(wide.evaluated) > np.asarray(wide.queries) + 1)
  chex.assert_trees_all_close(batched, wide.replace(evaluated=batched.evaluated), atol=1e-6)
  for i in range(5):
    single = attacks.one_pixel(apply_fn, params, images[i:i + 1], labels[i:i + 1],
                               keys[i:i + 1], config)
    chex.assert_trees_all_close(single, jax.tree.map(lambda x, i=i: x[i:i + 1], batched),
                                atol=1e-6)
  chex.assert_trees_all_equal(
      batched, attacks.one_pixel(apply_fn, params, images, labels, keys, config))


def test_at_least_one_target_mode():
  apply_fn, params = small_cnn(seed=6, num_classes=4)
  images = random_images(3, 8, 8, 3, seed=6)
  labels = jnp.argmax(apply_fn(params, images), -1)
  config = attacks.OnePixelConfig(population_size=20, num_generations=5,
                                  target=attacks.AT_LEAST_ONE_TARGET)
  result = attacks.one_pixel(apply_fn, params, images, labels, jax.random.key(0), config)
  assert result.success.shape == (3,)
  assert np.all(np.asarray(result.target) != np.asarray(labels))
  logits = apply_fn(params, result.adv_images)
  np.testing.assert_array_equal(result.success, jnp.argmax(logits, -1) == result.target)
  assert np.all(np.asarray(result.queries) >= 3 * 20)  # every other class was tried


def test_a_new_differential_weight_does_not_retrace():
  apply_fn, params = linear_model(height=4, width=4, channels=1)
  images = random_images(2, 4, 4, 1)
  labels = jnp.zeros(2, jnp.int32)
  traces = []

  def counting_apply(p, x):
    traces.append(1)
    return apply_fn(p, x)

  config = attacks.OnePixelConfig(population_size=8, num_generations=2)
  attacks.one_pixel(counting_apply, params, images, labels, jax.random.key(0), config)
  traces.clear()
  attacks.one_pixel(counting_apply, params, images, labels, jax.random.key(0),
                    config.replace(differential_weight=0.8, stop_true_prob=0.01))
  assert traces == []


@pytest.mark.parametrize("config,match", [
    (attacks.OnePixelConfig(num_pixels=0), "num_pixels"),
    (attacks.OnePixelConfig(population_size=3), "population_size"),
    (attacks.OnePixelConfig(target="sideways"), "target mode"),
    (attacks.OnePixelConfig(base="worst"), "unknown base"),
])
def test_bad_config_is_refused(config, match):
  apply_fn, params = linear_model()
  with pytest.raises(ValueError, match=match):
    attacks.one_pixel(apply_fn, params, random_images(2), jnp.zeros(2, jnp.int32),
                      jax.random.key(0), config)


def test_jit_and_no_jit_agree():
  apply_fn, params = linear_model(height=4, width=4, channels=1, num_classes=3)
  images = random_images(2, 4, 4, 1)
  labels = jnp.argmax(apply_fn(params, images), -1)
  config = attacks.OnePixelConfig(population_size=4, num_generations=1, num_slots=1)
  jitted = attacks.one_pixel(apply_fn, params, images, labels, jax.random.key(0), config)
  with jax.disable_jit():
    eager = attacks.one_pixel(apply_fn, params, images, labels, jax.random.key(0), config)
  chex.assert_trees_all_close(jitted, eager, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [0, 40, 7])
def test_evaluated_counts_the_rows_the_model_computed(chunk_size):
  """`evaluated` sums to the rows counted at the model itself, padding included; with one
  population per call (chunk_size 0) it is the searched candidates plus the re-check."""
  apply_fn, params = small_cnn(seed=7)
  rows_seen = []

  def counted(p, x):
    jax.debug.callback(lambda n: rows_seen.append(int(n)), x.shape[0])
    return apply_fn(p, x)

  images = random_images(6, 8, 8, 3, seed=7)
  labels = jnp.argmax(apply_fn(params, images), -1)
  config = attacks.OnePixelConfig(population_size=20, num_generations=5, num_slots=4,
                                  chunk_size=chunk_size)
  result = attacks.one_pixel(counted, params, images, labels, jax.random.key(3), config)
  jax.block_until_ready(result)
  evaluated, queries = np.asarray(result.evaluated), np.asarray(result.queries)
  # The model also saw the input check's probe, outside the attack: count the attack's calls.
  search_rows = sum(n for n in rows_seen if n != len(images) and n != 1)
  np.testing.assert_allclose(evaluated.sum() - len(images), search_rows, rtol=1e-6)
  if chunk_size == 0:
    np.testing.assert_array_equal(evaluated, queries + 1)
  else:
    assert evaluated.sum() - len(images) >= queries.sum()
