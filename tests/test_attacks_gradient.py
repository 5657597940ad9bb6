"""FGSM, BIM, PGD against closed forms, invariants, determinism and input checks."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advsweep import attacks
from advsweep.attacks import common, gradient
from tests.attack_models import linear_model, random_images, small_cnn


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _fgsm_reference(params, images, labels, eps, toward=None):
  """Closed form for a linear softmax model: d CE / dx = W (p - onehot(y))."""
  w, b = np.asarray(params["w"]), np.asarray(params["b"])
  x = np.asarray(images).reshape(len(images), -1)
  p = _softmax(x @ w + b)
  cls = labels if toward is None else toward
  onehot = np.eye(w.shape[1])[cls]
  grad = (p - onehot) @ w.T
  sign = 1.0 if toward is None else -1.0
  adv = np.clip(x + sign * eps * np.sign(grad), 0, 1)
  return adv.reshape(images.shape)


def test_fgsm_matches_closed_form_on_linear_model():
  apply_fn, params = linear_model()
  images = random_images(16)
  labels = jnp.arange(16) % 4
  result = attacks.fgsm(apply_fn, params, images, labels, jax.random.key(0),
                        attacks.FGSMConfig(eps=0.1))
  np.testing.assert_allclose(result.adv_images, _fgsm_reference(params, images, labels, 0.1),
                             atol=1e-6)
  np.testing.assert_array_equal(result.queries, 2)


def test_targeted_fgsm_matches_closed_form():
  apply_fn, params = linear_model()
  images = random_images(8)
  labels = jnp.zeros(8, jnp.int32)
  targets = jnp.array([1, 2, 3, 1, 2, 3, 1, 2])
  result = attacks.fgsm(apply_fn, params, images, labels, jax.random.key(0),
                        attacks.FGSMConfig(eps=0.2, target=attacks.EXPLICIT), targets=targets)
  np.testing.assert_allclose(
      result.adv_images, _fgsm_reference(params, images, labels, 0.2, toward=targets),
      atol=1e-6)
  np.testing.assert_array_equal(result.target, targets)


def test_least_likely_target_is_argmin_of_clean_logits():
  apply_fn, params = linear_model()
  images = random_images(8)
  labels = jnp.zeros(8, jnp.int32)
  result = attacks.fgsm(apply_fn, params, images, labels, jax.random.key(0),
                        attacks.FGSMConfig(eps=0.1, target=attacks.LEAST_LIKELY))
  np.testing.assert_array_equal(result.target, jnp.argmin(apply_fn(params, images), -1))


def test_bim_with_one_step_equals_fgsm():
  apply_fn, params = small_cnn()
  images = random_images(6, 8, 8, 3)
  labels = jnp.arange(6) % 5
  key = jax.random.key(1)
  fast = attacks.fgsm(apply_fn, params, images, labels, key, attacks.FGSMConfig(eps=0.05))
  one_step = attacks.bim(apply_fn, params, images, labels, key,
                         attacks.BIMConfig(eps=0.05, step_size=0.05, num_steps=1))
  chex.assert_trees_all_equal(fast, one_step)


def test_kurakin_step_count():
  assert gradient.kurakin_num_steps(16 / 255) == 20  # min(16 + 4, 1.25 * 16)
  assert gradient.kurakin_num_steps(2 / 255) == 3  # min(6, 2.5) rounded up
  assert gradient.kurakin_num_steps(64 / 255) == 68  # min(68, 80)


@pytest.mark.parametrize("attack,config", [
    (attacks.fgsm, attacks.FGSMConfig(eps=0.07)),
    (attacks.bim, attacks.BIMConfig(eps=0.07, step_size=0.02, num_steps=6)),
    (attacks.pgd, attacks.PGDConfig(eps=0.07, step_size=0.02, num_steps=6)),
    (attacks.pgd, attacks.PGDConfig(eps=0.5, step_size=0.2, num_steps=6, norm="l2")),
])
def test_invariants(attack, config):
  apply_fn, params = small_cnn()
  images = random_images(12, 8, 8, 3)
  labels = jnp.argmax(apply_fn(params, images), -1)
  result = attack(apply_fn, params, images, labels, jax.random.key(2), config)
  adv = np.asarray(result.adv_images)
  assert adv.min() >= 0.0 and adv.max() <= 1.0
  if getattr(config, "norm", "linf") == "l2":
    assert float(result.l2.max()) <= config.eps * (1 + 1e-5)
  else:
    assert float(result.linf.max()) <= config.eps + 1e-6
  logits = apply_fn(params, result.adv_images)
  np.testing.assert_array_equal(result.adv_pred, jnp.argmax(logits, -1))
  np.testing.assert_array_equal(result.success, jnp.argmax(logits, -1) != labels)
  assert result.success.any()  # a random convnet at eps 0.07 is easy to fool


def test_bim_is_stronger_than_fgsm_on_a_convnet():
  apply_fn, params = small_cnn(seed=3)
  images = random_images(64, 8, 8, 3, seed=3)
  labels = jnp.argmax(apply_fn(params, images), -1)
  key = jax.random.key(0)
  fast = attacks.fgsm(apply_fn, params, images, labels, key, attacks.FGSMConfig(eps=0.02))
  iterative = attacks.bim(apply_fn, params, images, labels, key,
                          attacks.BIMConfig(eps=0.02, step_size=0.005, num_steps=10))
  assert iterative.success.mean() >= fast.success.mean()


@pytest.mark.parametrize("config", [
    attacks.PGDConfig(eps=0.05, step_size=0.01, num_steps=3),
    attacks.BIMConfig(eps=0.05, step_size=0.01, num_steps=3, target=attacks.RANDOM),
])
def test_batch_equals_per_image_loop_and_key_determinism(config):
  attack = attacks.pgd if isinstance(config, attacks.PGDConfig) else attacks.bim
  apply_fn, params = small_cnn()
  images = random_images(5, 8, 8, 3)
  labels = jnp.arange(5) % 5
  keys = jax.random.split(jax.random.key(4), 5)
  batched = attack(apply_fn, params, images, labels, keys, config)
  for i in range(5):
    single = attack(apply_fn, params, images[i:i + 1], labels[i:i + 1], keys[i:i + 1], config)
    chex.assert_trees_all_close(single, jax.tree.map(lambda x, i=i: x[i:i + 1], batched),
                                atol=1e-6)
  again = attack(apply_fn, params, images, labels, keys, config)
  chex.assert_trees_all_equal(batched, again)


def test_jit_and_no_jit_agree():
  apply_fn, params = small_cnn()
  images = random_images(4, 8, 8, 3)
  labels = jnp.arange(4)
  config = attacks.PGDConfig(eps=0.05, step_size=0.01, num_steps=3)
  jitted = attacks.pgd(apply_fn, params, images, labels, jax.random.key(0), config)
  with jax.disable_jit():
    eager = attacks.pgd(apply_fn, params, images, labels, jax.random.key(0), config)
  chex.assert_trees_all_close(jitted, eager, atol=1e-5)


def test_a_second_eps_does_not_retrace():
  apply_fn, params = linear_model()
  images = random_images(4)
  labels = jnp.arange(4)
  traces = []

  def counting_apply(params, images):
    traces.append(1)
    return apply_fn(params, images)

  for eps in (0.1, 0.2, 0.3):
    attacks.bim(counting_apply, params, images, labels, jax.random.key(0),
                attacks.BIMConfig(eps=eps, num_steps=4))
  first = len(traces)
  assert first > 0
  traces.clear()
  attacks.bim(counting_apply, params, images, labels, jax.random.key(0),
              attacks.BIMConfig(eps=0.4, num_steps=4))
  assert traces == []  # cached: no new trace for a new eps


@pytest.mark.parametrize("images,labels,config,match", [
    (np.full((2, 6, 6, 1), 1.5, np.float32), np.zeros(2, np.int32), None, r"\[0, 1\]"),
    (np.zeros((6, 6, 1), np.float32), np.zeros(6, np.int32), None, "rank 4"),
    (np.zeros((2, 6, 6, 1), np.uint8), np.zeros(2, np.int32), None, "floating"),
    (np.zeros((2, 6, 6, 1), np.float32), np.array([0, 9]), None, "labels must lie"),
    (np.zeros((2, 6, 6, 1), np.float32), np.zeros(3, np.int32), None, "shape"),
    (np.zeros((2, 6, 6, 1), np.float32), np.zeros(2, np.int32),
     attacks.BIMConfig(eps=-0.1, num_steps=2), "eps must be >= 0"),
    (np.zeros((2, 6, 6, 1), np.float32), np.zeros(2, np.int32),
     attacks.BIMConfig(target="sideways"), "target mode"),
])
def test_bad_input_is_refused(images, labels, config, match):
  apply_fn, params = linear_model()
  with pytest.raises(ValueError, match=match):
    attacks.bim(apply_fn, params, images, labels, jax.random.key(0), config)


def test_explicit_mode_needs_targets():
  apply_fn, params = linear_model()
  with pytest.raises(ValueError, match="targets"):
    attacks.fgsm(apply_fn, params, random_images(2), jnp.zeros(2, jnp.int32),
                 jax.random.key(0), attacks.FGSMConfig(target=attacks.EXPLICIT))


def test_non_finite_outputs_are_reported_not_counted():
  apply_fn, params = linear_model()
  nan_apply = lambda p, x: apply_fn(p, x) * jnp.nan  # noqa: E731
  result = attacks.fgsm(nan_apply, params, random_images(3), jnp.zeros(3, jnp.int32),
                        jax.random.key(0))
  assert not result.finite.any()
  assert not result.success.any()


def test_pgd_restarts_keep_the_first_success_and_count_queries():
  apply_fn, params = small_cnn()
  images = random_images(24, 8, 8, 3)
  labels = jnp.argmax(apply_fn(params, images), -1)
  key = jax.random.key(3)
  one = attacks.PGDConfig(eps=0.03, step_size=0.01, num_steps=3)
  four = attacks.PGDConfig(eps=0.03, step_size=0.01, num_steps=3, restarts=4)
  single = attacks.pgd(apply_fn, params, images, labels, key, one)
  many = attacks.pgd(apply_fn, params, images, labels, key, four)
  s1, s4 = np.asarray(single.success), np.asarray(many.success)
  assert 0 < s1.sum() < len(s1)  # a budget where restarts can matter
  assert np.all(s4 >= s1) and s4.sum() > s1.sum()
  # Restart 0 is the one-restart attack: images it fooled keep its adversarial image.
  np.testing.assert_array_equal(np.asarray(many.adv_images)[s1], np.asarray(single.adv_images)[s1])
  # Queries: 4 per restart (clean forward + 3 steps), for the restarts an image needed.
  queries = np.asarray(many.queries)
  assert np.all(queries[s1] == 4) and np.all(queries[~s4] == 16)
  assert set(np.unique(queries[s4 & ~s1])) <= {8, 12, 16}
  # The traced core (as in a training step) gives the same result as the host loop.
  core = jax.jit(lambda p, x, y: gradient.pgd_core(apply_fn, p, x, y, key, four))(
      params, images, labels)
  np.testing.assert_allclose(np.asarray(core.adv_images), np.asarray(many.adv_images),
                             atol=1e-6)
  np.testing.assert_array_equal(np.asarray(core.queries), queries)
  # The traced core runs every image 4 times; the host loop runs restarts 1-3 only on the
  # images restart 0 left (13, padded to 16 rows), so an image fooled at once costs 4 rows.
  evaluated = np.asarray(many.evaluated)
  assert np.all(np.asarray(core.evaluated) == 16) and np.all(evaluated[s1] == 4)
  np.testing.assert_allclose(evaluated.sum(), 24 * 4 + 3 * 16 * 4, rtol=1e-6)


def test_pgd_host_loop_compiles_one_start_for_every_restart():
  apply_fn, params = small_cnn()
  images = random_images(24, 8, 8, 3)
  labels = jnp.argmax(apply_fn(params, images), -1)
  config = attacks.PGDConfig(eps=0.03, step_size=0.01, num_steps=2, restarts=6)
  starts = lambda: [k for k in common._BOUND if k[0] is gradient._start]  # noqa: E731
  before = len(starts())
  result = attacks.pgd(apply_fn, params, images, labels, jax.random.key(3), config)
  assert not np.asarray(result.success).all()  # later restarts ran
  # The restart index is an argument of the compiled start, not part of its cache key.
  assert len(starts()) - before == 1


def test_pgd_restarts_stop_once_every_image_is_fooled():
  apply_fn, params = small_cnn()
  images = random_images(8, 8, 8, 3)
  labels = jnp.argmax(apply_fn(params, images), -1)
  key = jax.random.key(5)
  config = attacks.PGDConfig(eps=1.0, step_size=0.5, num_steps=2, restarts=5)
  host = attacks.pgd(apply_fn, params, images, labels, key, config)
  assert np.asarray(host.success).all()  # restart 0 fooled every image
  core = jax.jit(lambda p, x, y: gradient.pgd_core(apply_fn, p, x, y, key, config))(
      params, images, labels)
  # The same outcome as the traced core, which runs every restart; the host loop ran one.
  for field in ("success", "queries", "adv_images"):
    np.testing.assert_allclose(np.asarray(getattr(host, field)),
                               np.asarray(getattr(core, field)), atol=1e-6)
  np.testing.assert_array_equal(5 * np.asarray(host.evaluated), np.asarray(core.evaluated))


def test_the_sweep_estimate_counts_every_restart():
  one = attacks.PGDConfig(num_steps=100)
  fifty = attacks.PGDConfig(num_steps=100, restarts=50)
  assert gradient.PGD.forward_equivalents(one, 784, 10) == 3 * 100 + 2
  assert gradient.PGD.forward_equivalents(fifty, 784, 10) == 50 * (3 * 100 + 1) + 1


def test_restarts_need_a_random_start():
  apply_fn, params = small_cnn()
  images = random_images(2, 8, 8, 3)
  with pytest.raises(ValueError, match="random_start"):
    attacks.pgd(apply_fn, params, images, jnp.zeros(2, jnp.int32), jax.random.key(0),
                attacks.PGDConfig(restarts=3, random_start=False))
  with pytest.raises(ValueError, match="restarts must be an integer"):
    attacks.pgd(apply_fn, params, images, jnp.zeros(2, jnp.int32), jax.random.key(0),
                attacks.PGDConfig(restarts=0))
