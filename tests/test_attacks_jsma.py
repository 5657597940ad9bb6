"""JSMA: the blockwise pair search against brute force, invariants, determinism."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advsweep import attacks
from advsweep.attacks.saliency import core as jsma_core_module
from advsweep.attacks.saliency import rows as jsma_rows
from advsweep.attacks.saliency.core import best_pair, best_pairs
from tests.attack_models import linear_model, random_images, small_cnn


def _brute_force_pair(alpha, beta, domain):
  alpha, beta, domain = map(np.asarray, (alpha, beta, domain))
  pa = alpha[:, None] + alpha[None, :]
  pb = beta[:, None] + beta[None, :]
  valid = domain[:, None] & domain[None, :] & ~np.eye(len(alpha), dtype=bool) & (pa > 0) & (
      pb < 0)
  scores = np.where(valid, pa * -pb, -np.inf)
  flat = int(np.argmax(scores))
  return flat // len(alpha), flat % len(alpha), scores.reshape(-1)[flat]


@pytest.mark.parametrize("n,block_rows,seed", [(50, 7, 0), (64, 64, 1), (97, 16, 2),
                                                (30, 1, 3), (40, 100, 4)])
def test_best_pair_equals_brute_force(n, block_rows, seed):
  rng = np.random.default_rng(seed)
  alpha = jnp.asarray(rng.normal(size=n), jnp.float32)
  beta = jnp.asarray(rng.normal(size=n), jnp.float32)
  domain = jnp.asarray(rng.uniform(size=n) < 0.8)
  p, q, score = best_pair(alpha, beta, domain, block_rows)
  ref_p, ref_q, ref_score = _brute_force_pair(alpha, beta, domain)
  assert (int(p), int(q)) == (ref_p, ref_q)
  np.testing.assert_allclose(float(score), ref_score, rtol=1e-6)


@pytest.mark.parametrize("max_candidates", [0, 2, 6, 16, 200])
def test_reduced_search_equals_brute_force(max_candidates):
  """Small caps force the fallback scan for some images; large ones never need it."""
  rng = np.random.default_rng(max_candidates)
  batch, n = 12, 60
  alpha = jnp.asarray(rng.normal(size=(batch, n)), jnp.float32)
  beta = jnp.asarray(rng.normal(size=(batch, n)) + 0.3, jnp.float32)
  domain = jnp.asarray(rng.uniform(size=(batch, n)) < 0.7)
  p, q, score = best_pairs(alpha, beta, domain, block_rows=16,
                          max_candidates=max_candidates)
  for i in range(batch):
    ref_p, ref_q, ref_score = _brute_force_pair(alpha[i], beta[i], domain[i])
    assert (int(p[i]), int(q[i])) == (ref_p, ref_q), i
    np.testing.assert_allclose(float(score[i]), ref_score, rtol=1e-6)


@pytest.mark.parametrize("n", [2, 10, 300])
def test_top_pair_equals_the_pair_search_when_beta_is_minus_alpha(n):
  rng = np.random.default_rng(n)
  alpha = jnp.asarray(rng.normal(size=(8, n)), jnp.float32)
  domain = jnp.asarray(rng.uniform(size=(8, n)) < 0.7).at[0].set(False)
  alpha = alpha.at[1].set(-jnp.abs(alpha[1]))  # no pair with a positive sum
  p, q, score = jsma_core_module.top_pair(alpha, domain)
  ref_p, ref_q, ref_score = best_pairs(alpha, -alpha, domain, 64, 64)
  np.testing.assert_allclose(score, ref_score, rtol=1e-6)
  found = np.isfinite(np.asarray(ref_score))
  np.testing.assert_array_equal(np.asarray(p)[found], np.asarray(ref_p)[found])
  np.testing.assert_array_equal(np.asarray(q)[found], np.asarray(ref_q)[found])
  assert not found[0] and not found[1]


def _candidate_pair_reference(alpha, beta, domain):
  """The documented rule in numpy: candidates are the features dominated (in the order u
  descending, v descending, index ascending, with v at least as large) by at most one other;
  the row-major first best pair among candidates."""
  u, v = np.where(domain, alpha, -np.inf), np.where(domain, -beta, -np.inf)
  ids = np.arange(len(u))
  before = (u[:, None] > u[None, :]) | ((u[:, None] == u[None, :]) & (
      (v[:, None] > v[None, :]) | ((v[:, None] == v[None, :]) & (ids[:, None] < ids[None, :]))))
  candidate = domain & ((before & (v[:, None] >= v[None, :])).sum(0) < 2)
  pa, pb = alpha[:, None] + alpha[None, :], beta[:, None] + beta[None, :]
  valid = (candidate[:, None] & candidate[None, :] & (ids[:, None] < ids[None, :]) & (pa > 0)
           & (pb < 0))
  scores = np.where(valid, pa * -pb, -np.inf)
  flat = int(np.argmax(scores))
  return flat // len(u), flat % len(u), scores.reshape(-1)[flat]


@pytest.mark.parametrize("n,levels", [(40, 3), (784, 50)])
def test_reduced_search_follows_the_candidate_rule_with_ties(n, levels):
  """Integer-valued derivatives tie often: the linear first pass and the candidates among its
  survivors give the same pair as the rule applied to all N features, and the full map's
  best score."""
  rng = np.random.default_rng(n)
  batch = 16
  alpha = rng.integers(-levels, levels + 1, size=(batch, n)).astype(np.float32)
  beta = rng.integers(-levels, levels + 1, size=(batch, n)).astype(np.float32)
  domain = rng.uniform(size=(batch, n)) < 0.8
  p, q, score = best_pairs(jnp.asarray(alpha), jnp.asarray(beta), jnp.asarray(domain),
                           block_rows=64, max_candidates=n)
  for i in range(batch):
    ref_p, ref_q, ref_score = _candidate_pair_reference(alpha[i], beta[i], domain[i])
    assert float(score[i]) == ref_score == _brute_force_pair(alpha[i], beta[i], domain[i])[2]
    assert (int(p[i]), int(q[i])) == (ref_p, ref_q), i


def test_best_pair_with_no_valid_pair_scores_minus_inf():
  alpha = jnp.ones(10)
  beta = jnp.ones(10)  # beta > 0 everywhere: no pair qualifies
  _, _, score = best_pair(alpha, beta, jnp.ones(10, bool), 4)
  assert score == -jnp.inf


@pytest.mark.parametrize("theta", [1.0, -1.0])
def test_invariants_and_success_on_a_convnet(theta):
  apply_fn, params = small_cnn(seed=1)
  images = random_images(10, 8, 8, 3, seed=1)
  labels = jnp.argmax(apply_fn(params, images), -1)
  config = attacks.JSMAConfig(gamma=0.2, theta=theta, block_rows=32)
  result = attacks.jsma(apply_fn, params, images, labels, jax.random.key(0), config)
  adv = np.asarray(result.adv_images)
  assert adv.min() >= 0 and adv.max() <= 1
  assert float(result.l0_fraction.max()) <= 0.2
  changed = np.asarray(result.adv_images != images).reshape(10, -1)
  np.testing.assert_allclose(result.l0_fraction, changed.mean(-1))
  moved = np.asarray(result.adv_images)[changed.reshape(adv.shape)]
  assert np.all(moved == (1.0 if theta > 0 else 0.0))  # theta = +-1 saturates features
  logits = apply_fn(params, result.adv_images)
  np.testing.assert_array_equal(result.success, jnp.argmax(logits, -1) == result.target)
  assert np.all(result.target != labels)
  assert result.success.mean() >= 0.5


def test_first_step_follows_the_saliency_map():
  """On a linear model the Jacobian is W, so the first pair is the brute-force best pair."""
  apply_fn, params = linear_model(num_classes=3)
  images = random_images(1)
  labels = jnp.array([0])
  targets = jnp.array([2])
  w = np.asarray(params["w"])
  alpha = w[:, 2]
  beta = w[:, 0] + w[:, 1]
  p, q, _ = _brute_force_pair(alpha, beta, np.asarray(images).reshape(-1) < 1)
  result = attacks.jsma(apply_fn, params, images, labels, jax.random.key(0),
                        attacks.JSMAConfig(gamma=2.5 / 36, target=attacks.EXPLICIT),
                        targets=targets)
  changed = np.flatnonzero(np.asarray(result.adv_images != images).reshape(-1))
  assert set(changed.tolist()) <= {p, q}
  assert int(result.queries[0]) >= 1


def test_probabilities_first_pair_is_the_top_two_of_the_softmax_derivative():
  """JSMA-F: beta = -alpha, so the first pair is the two largest d softmax_t / dx (by jacrev)."""
  apply_fn, params = small_cnn(seed=4)
  images = random_images(3, 8, 8, 3, seed=4)
  labels = jnp.argmax(apply_fn(params, images), -1)
  targets = (labels + 1) % 5
  config = attacks.JSMAConfig(gamma=2.5 / images[0].size, target=attacks.EXPLICIT,
                              derivative="probabilities")
  result = attacks.jsma(apply_fn, params, images, labels, jax.random.key(0), config,
                        targets=targets)
  for i in range(3):
    jac = jax.jacrev(lambda x: jax.nn.softmax(apply_fn(params, x[None]))[0])(images[i])
    alpha = np.array(jac[int(targets[i])]).reshape(-1)
    alpha[np.asarray(images[i]).reshape(-1) >= 1.0] = -np.inf  # outside the domain
    top2 = set(np.argsort(alpha)[-2:].tolist())
    changed = np.flatnonzero(np.asarray(result.adv_images[i] != images[i]).reshape(-1))
    assert set(changed.tolist()) == top2
  assert int(result.queries[0]) >= 1


def test_batch_equals_per_image_loop_and_is_deterministic():
  apply_fn, params = small_cnn(seed=2)
  images = random_images(4, 8, 8, 3, seed=2)
  labels = jnp.zeros(4, jnp.int32)
  keys = jax.random.split(jax.random.key(3), 4)
  config = attacks.JSMAConfig(gamma=0.1, block_rows=50)
  batched = attacks.jsma(apply_fn, params, images, labels, keys, config)
  for i in range(4):
    single = attacks.jsma(apply_fn, params, images[i:i + 1], labels[i:i + 1], keys[i:i + 1],
                          config)
    chex.assert_trees_all_close(single, jax.tree.map(lambda x, i=i: x[i:i + 1], batched),
                                atol=1e-6)
  chex.assert_trees_all_equal(batched,
                              attacks.jsma(apply_fn, params, images, labels, keys, config))


def test_every_other_class_covers_all_pairs():
  images = random_images(3)
  labels = jnp.array([0, 2, 3])
  rep_images, rep_labels, targets = attacks.every_other_class(images, labels, 4)
  assert rep_images.shape == (9, 6, 6, 1)
  pairs = set(zip(rep_labels.tolist(), targets.tolist(), strict=True))
  assert pairs == {(y, t) for y in (0, 2, 3) for t in range(4) if t != y}


@pytest.mark.parametrize("config,match", [
    (attacks.JSMAConfig(target=attacks.UNTARGETED), "targeted"),
    (attacks.JSMAConfig(theta=0.0), "theta"),
    (attacks.JSMAConfig(gamma=1.5), "gamma"),
    (attacks.JSMAConfig(derivative="softmax"), "derivative"),
])
def test_bad_config_is_refused(config, match):
  apply_fn, params = linear_model()
  with pytest.raises(ValueError, match=match):
    attacks.jsma(apply_fn, params, random_images(2), jnp.zeros(2, jnp.int32),
                 jax.random.key(0), config)


def test_jit_and_no_jit_agree():
  apply_fn, params = linear_model(num_classes=3)
  images = random_images(2)
  labels = jnp.zeros(2, jnp.int32)
  config = attacks.JSMAConfig(gamma=0.1)
  jitted = attacks.jsma(apply_fn, params, images, labels, jax.random.key(0), config)
  with jax.disable_jit():
    eager = attacks.jsma(apply_fn, params, images, labels, jax.random.key(0), config)
  chex.assert_trees_all_close(jitted, eager, atol=1e-5)


def test_chunks_are_decreasing_powers_of_two_that_tile_the_rows():
  for rows in range(1, 300):
    parts = jsma_rows.chunks(rows)
    sizes = [size for _, size in parts]
    assert all(size & (size - 1) == 0 for size in sizes)  # powers of two
    assert sizes == sorted(set(sizes), reverse=True)  # each at most once, largest first
    assert [offset for offset, _ in parts] == np.cumsum([0, *sizes[:-1]]).tolist()
    assert sum(sizes) == rows
  assert jsma_rows.chunks(13) == [(0, 8), (8, 4), (12, 1)]


def test_continuous_batching_changes_nothing():
  """Through 3 slots (images stop at different times and hand over their rows) the 11 images
  get the same results as all at once."""
  apply_fn, params = small_cnn(seed=6)
  images = random_images(11, 8, 8, 3, seed=6)
  labels = jnp.argmax(apply_fn(params, images), -1)
  config = attacks.JSMAConfig(gamma=0.3)
  whole = attacks.jsma(apply_fn, params, images, labels, jax.random.key(7), config)
  slotted = attacks.jsma(apply_fn, params, images, labels, jax.random.key(7),
                         config.replace(num_slots=3))
  assert len(set(np.asarray(whole.queries).tolist())) > 3  # rows are handed over unevenly
  for field in ("success", "adv_pred", "target", "queries", "l0"):
    np.testing.assert_array_equal(getattr(slotted, field), getattr(whole, field))
  np.testing.assert_allclose(slotted.adv_images, whole.adv_images, atol=1e-6)


def test_compacting_finished_images_changes_nothing():
  """Finished images leave the working rows, which then run in chunks of 16, 2, 1, ...;
  the results equal those of each image iterated alone (one slot: never compacted)."""
  apply_fn, params = small_cnn(seed=4)
  images = random_images(20, 8, 8, 3, seed=4)
  labels = jnp.argmax(apply_fn(params, images), -1)
  config = attacks.JSMAConfig(gamma=0.3, block_rows=64)
  compacted = attacks.jsma(apply_fn, params, images, labels, jax.random.key(5), config)
  queries = np.asarray(compacted.queries)
  assert queries.min() * 2 < queries.max()  # images finish at different times
  whole = attacks.jsma(apply_fn, params, images, labels, jax.random.key(5),
                       config.replace(num_slots=1))
  for field in ("success", "adv_pred", "target", "queries", "l0"):
    np.testing.assert_array_equal(getattr(compacted, field), getattr(whole, field))
  np.testing.assert_allclose(compacted.adv_images, whole.adv_images, atol=1e-6)
