"""APGD and APGD-T against the paper's formulas, a step-by-step reference, closed forms on a
linear model, and the invariants every attack keeps (budget, determinism, jit and vmap)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advsweep import attacks
from advsweep.attacks import autopgd as apgd
from tests.attack_models import linear_model, random_images, small_cnn


def test_checkpoints_follow_the_papers_recursion():
  """w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
  (Croce & Hein 2020, Sec. 3.2), in whole iterations. Where 0.03 N and 0.06 N are whole
  (N = 100, AutoAttack's, and 1000) the two agree; elsewhere we keep AutoAttack's integer
  windows (int(0.22 N), shrinking by int(0.03 N) down to int(0.06 N))."""
  assert apgd.checkpoints(50) == [11, 21, 30, 38, 45]  # windows 11, 10, 9, 8, 7
  for n in (100, 1000):
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
      p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    expected = [round(v * n) for v in p[1:]]
    assert apgd.checkpoints(n) == expected, n
  assert apgd.checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_dlr_losses_by_hand():
  logits = jnp.array([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0]])
  # Label 0 on top: -(3 - 2) / (3 - 1); label 1 below: -(1 - 3) / (3 - 1).
  np.testing.assert_allclose(apgd.dlr_loss(logits, jnp.array([0, 1])), [-0.5, 1.0], rtol=1e-6)
  # Targeted toward 2 and 3: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) = x / 2.5.
  np.testing.assert_allclose(
      apgd.dlr_targeted_loss(logits, jnp.array([0, 0]), jnp.array([2, 3])), [-0.4, -1.2],
      rtol=1e-6)
  # Rescaling the logits leaves DLR unchanged (why it resists a saturated softmax).
  np.testing.assert_allclose(apgd.dlr_loss(100 * logits, jnp.array([0, 1])), [-0.5, 1.0],
                             rtol=1e-5)


def _reference_apgd(apply_fn, params, image, label, start, eps, num_steps, rho=0.75):
  """Algorithm 1 for one image, step by step in numpy (cross-entropy, L-inf), from `start`:
  written from the paper, with AutoAttack's conventions (no momentum on the first step; the
  first checkpoint's condition 2 off), stopping once the image is misclassified. Returns
  the best point, its loss and the step."""
  def loss_grad(x):
    def ce(z):
      logits = apply_fn(params, z[None])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([label]))[0]
      return loss, logits
    (value, logits), grad = jax.value_and_grad(ce, has_aux=True)(jnp.asarray(x))
    fooled = int(np.argmax(np.asarray(logits)[0])) != label
    return float(value), np.asarray(grad), fooled

  def project(x):
    return np.clip(np.clip(x, image - eps, image + eps), 0, 1)

  checks = set(apgd.checkpoints(num_steps))
  x, prev = start.copy(), start.copy()
  f, g, fooled = loss_grad(x)
  best, best_f, best_g = x.copy(), f, g
  step, increases, checked_f, halved_last, last_check = 2 * eps, 0, f, True, 0
  for i in range(num_steps):
    if fooled:
      break
    z = project(x + step * np.sign(g))
    a = 0.75 if i else 1.0
    new = project(x + a * (z - x) + (1 - a) * (x - prev))
    new_f, new_g, fooled = loss_grad(new)
    increases += new_f > f
    prev, x, f, g = x, new, new_f, new_g
    if new_f > best_f:
      best, best_f, best_g = new.copy(), new_f, new_g
    if i + 1 in checks:
      window = i + 1 - last_check
      halve = increases <= rho * window or (not halved_last and checked_f >= best_f)
      if halve:
        step /= 2
        x, g = best.copy(), best_g
      increases, checked_f, halved_last, last_check = 0, best_f, halve, i + 1
  return best, best_f, step


def test_apgd_follows_algorithm_1_step_by_step():
  """The jitted iteration equals a plain per-image transcription of Algorithm 1 (the point
  of highest loss, its loss and the final step size after every halving)."""
  apply_fn, params = small_cnn(height=6, width=6, channels=1, num_classes=4)
  images = random_images(3)
  labels = jnp.array([0, 1, 2])
  keys = jax.random.split(jax.random.key(5), 3)
  eps = jnp.float32(0.1)
  state = apgd.iterate(apply_fn, params, images, labels, labels, keys, eps, 0.75, 0.75,
                       num_steps=30, loss=apgd.CE, norm=apgd.LINF)
  starts = jax.vmap(lambda k, x: apgd._start(k, x, eps, apgd.LINF))(keys, images)
  for i in range(3):
    best, best_f, step = _reference_apgd(apply_fn, params, np.asarray(images[i]),
                                         int(labels[i]), np.asarray(starts[i]), 0.1, 30)
    np.testing.assert_allclose(state.best[i], best, atol=1e-5)
    np.testing.assert_allclose(state.best_loss[i], best_f, rtol=1e-4)
    np.testing.assert_allclose(state.step[i], step, rtol=1e-6)


def test_a_flat_loss_halves_the_step_at_every_checkpoint():
  """Condition 1: a loss that never rises halves the step at each of the 8 checkpoints of
  100 iterations."""
  def flat(params, images):
    return jnp.zeros((images.shape[0], 3)) + params
  images = random_images(2)
  # Label 0: the flat model's argmax, so the image is never fooled and never frozen.
  state = apgd.iterate(flat, jnp.zeros(3), images, jnp.array([0, 0]), jnp.array([0, 0]),
                       jax.random.split(jax.random.key(0), 2), jnp.float32(0.1), 0.75, 0.75,
                       num_steps=100, loss=apgd.CE, norm=apgd.LINF)
  np.testing.assert_allclose(state.step, 0.2 / 2 ** 8, rtol=1e-6)


def _two_class_linear():
  apply_fn, params = linear_model(num_classes=2, seed=3)
  images = jnp.clip(random_images(12, seed=4) * 0.2 + 0.4, 0, 1)  # the box never binds
  logits = np.asarray(apply_fn(params, images))
  labels = jnp.asarray(logits.argmax(-1), jnp.int32)
  w = np.asarray(params["w"])
  margin = np.abs(logits[:, 0] - logits[:, 1])
  return apply_fn, params, images, labels, w, margin


@pytest.mark.parametrize("norm", [apgd.LINF, apgd.L2])
def test_apgd_on_a_linear_model_fools_exactly_the_images_within_reach(norm):
  """A two-class linear model is fooled within eps iff eps exceeds the margin over the dual
  norm of w_0 - w_1 (L-inf: the L1 norm; L2: the L2 norm), the box aside."""
  apply_fn, params, images, labels, w, margin = _two_class_linear()
  dual = np.abs(w[:, 0] - w[:, 1]).sum() if norm == apgd.LINF else np.linalg.norm(
      w[:, 0] - w[:, 1])
  distance = margin / dual
  eps = float(np.median(distance))
  result = attacks.apgd(apply_fn, params, images, labels, jax.random.key(1),
                        attacks.APGDConfig(eps=eps, norm=norm, num_steps=20))
  within = distance < eps * 0.999
  np.testing.assert_array_equal(np.asarray(result.success)[within | (distance > eps * 1.001)],
                                within[within | (distance > eps * 1.001)])
  budget = result.linf if norm == apgd.LINF else result.l2
  assert float(budget.max()) <= eps * (1 + 1e-5) + 1e-6


def test_core_and_host_loop_agree_and_images_are_independent():
  apply_fn, params = small_cnn(height=6, width=6, channels=1, num_classes=5)
  images = random_images(6)
  labels = jnp.array([0, 1, 2, 3, 4, 0])
  keys = jax.random.split(jax.random.key(2), 6)
  config = attacks.APGDTConfig(eps=0.05, num_steps=8, num_target_classes=3)
  host = attacks.apgd_t(apply_fn, params, images, labels, keys, config)
  core = jax.jit(attacks.apgd_t_core, static_argnums=0)(apply_fn, params, images, labels,
                                                        keys, config)
  np.testing.assert_allclose(host.adv_images, core.adv_images, atol=1e-6)
  np.testing.assert_array_equal(host.success, core.success)
  np.testing.assert_array_equal(host.queries, core.queries)
  alone = attacks.apgd_t(apply_fn, params, images[3:4], labels[3:4], keys[3:4], config)
  np.testing.assert_allclose(alone.adv_images[0], host.adv_images[3], atol=1e-6)
  # vmap over images, one at a time, equals the batch.
  one = lambda x, y, k: attacks.apgd_core(  # noqa: E731
      apply_fn, params, x[None], y[None], k[None], attacks.APGDConfig(eps=0.05, num_steps=8))
  mapped = jax.vmap(one)(images, labels, keys)
  batch = attacks.apgd(apply_fn, params, images, labels, keys,
                       attacks.APGDConfig(eps=0.05, num_steps=8))
  np.testing.assert_allclose(mapped.adv_images[:, 0], batch.adv_images, atol=1e-6)


def test_queries_count_the_passes_each_image_needed():
  """A robust image pays the clean pass and every run in full; a fooled one stops at the
  iteration that fooled it, so it never pays more; the host loop (which drops fooled images
  every few iterations) counts what the core counts."""
  apply_fn, params = small_cnn(height=6, width=6, channels=1, num_classes=5)
  images = random_images(12)
  labels = jnp.asarray(np.arange(12) % 5, jnp.int32)
  keys = jax.random.split(jax.random.key(0), 12)
  config = attacks.APGDTConfig(eps=0.06, num_steps=12, num_target_classes=4)
  result = attacks.apgd_t(apply_fn, params, images, labels, keys, config)
  queries, success = np.asarray(result.queries), np.asarray(result.success)
  assert success.any() and not success.all()
  np.testing.assert_array_equal(queries[~success], 1 + 4 * 13)
  assert np.all(queries[success] < 1 + 4 * 13)
  assert np.all(np.asarray(result.target) == -1)  # any misclassification counts
  core = jax.jit(attacks.apgd_t_core, static_argnums=0)(apply_fn, params, images, labels,
                                                        keys, config)
  np.testing.assert_array_equal(core.queries, queries)
  np.testing.assert_allclose(core.adv_images, result.adv_images, atol=1e-6)


def test_apgd_beats_fixed_step_pgd_where_pgd_stalls():
  """A softmax saturated by a large logit scale: CE's gradient vanishes and PGD stalls,
  DLR does not care about the scale (Croce & Hein's case for DLR)."""
  apply_fn, params = linear_model(num_classes=4, seed=1)
  params = jax.tree.map(lambda p: p * 200.0, params)
  images = random_images(16, seed=2)
  labels = jnp.asarray(np.asarray(apply_fn(params, images)).argmax(-1), jnp.int32)
  dlr = attacks.apgd(apply_fn, params, images, labels, jax.random.key(0),
                     attacks.APGDConfig(eps=0.1, loss="dlr", num_steps=20))
  pgd = attacks.pgd(apply_fn, params, images, labels, jax.random.key(0),
                    attacks.PGDConfig(eps=0.1, step_size=0.01, num_steps=20))
  assert int(dlr.success.sum()) >= int(pgd.success.sum())
  assert int(dlr.success.sum()) > 0


@pytest.mark.parametrize("bad, message", [
    (dict(eps=-0.1), "eps must be >= 0"),
    (dict(num_steps=0), "num_steps must be an integer >= 1"),
    (dict(norm="l1"), "unknown norm 'l1'"),
    (dict(loss="cw"), "unknown loss 'cw'"),
])
def test_bad_configs_are_refused_with_the_field_named(bad, message):
  apply_fn, params = linear_model()
  with pytest.raises(ValueError, match=message):
    attacks.apgd(apply_fn, params, random_images(2), jnp.array([0, 1]), jax.random.key(0),
                 attacks.APGDConfig(**bad))


def test_too_few_classes_for_dlr_or_the_targets_is_refused():
  apply_fn, params = linear_model(num_classes=2)
  with pytest.raises(ValueError, match="at least 3 classes"):
    attacks.apgd(apply_fn, params, random_images(2), jnp.array([0, 1]), jax.random.key(0),
                 attacks.APGDConfig(loss="dlr"))
  apply_fn, params = linear_model(num_classes=4)
  with pytest.raises(ValueError, match="at least 10 classes.*num_target_classes"):
    attacks.apgd_t(apply_fn, params, random_images(2), jnp.array([0, 1]), jax.random.key(0))
  assert math.isfinite(attacks.APGD.forward_equivalents(attacks.APGDConfig(), 36, 4))
