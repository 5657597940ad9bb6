"""FAB-T: the exact box-constrained projection against brute force, the closed form on a
linear model, and the invariants, determinism, composition and input checks of the attack."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from advsweep.attacks import common
from advsweep.attacks import fast_boundary as fab_module
from advsweep.attacks.fast_boundary import FABConfig, fab, fab_core, project_to_hyperplane
from tests.attack_models import linear_model, random_images, small_cnn

INTERIOR, BOX_ACTIVE, INFEASIBLE = "interior", "box active", "infeasible"
project = jax.jit(project_to_hyperplane, static_argnames="norm")


def _instances(seed, count=150, width=8):
  """Random small projection problems (p, w, c): some pixels at 0 or 1, some w_i = 0, and
  c drawn from a small to a large scale, so the box is inactive, active or too small. Each
  has 1 to 7 coordinates, padded to `width` with w_i = 0."""
  rng = np.random.default_rng(seed)
  points, normals, cs, sizes = [], [], [], []
  for _ in range(count):
    n = int(rng.integers(1, width))
    p = rng.uniform(0, 1, width)
    p[rng.uniform(size=width) < 0.15] = rng.choice([0.0, 1.0])
    w = rng.normal(size=width)
    w[(rng.uniform(size=width) < 0.15) | (np.arange(width) >= n)] = 0.0
    points.append(p), normals.append(w), sizes.append(n)
    cs.append(rng.normal() * rng.choice([0.05, 0.5, 3.0]))
  return points, normals, cs, sizes


def _solved(seed, norm):
  """Every instance projected in one call (rows must not interact, padding must not move);
  a list of (p, w, c, d) without the padding."""
  points, normals, cs, sizes = _instances(seed)
  d = project(jnp.asarray(np.stack(points), jnp.float32),
              jnp.asarray(np.stack(normals), jnp.float32), jnp.asarray(cs, jnp.float32),
              norm=norm)
  d = np.asarray(d, np.float64)
  np.testing.assert_array_equal(d[np.stack(normals) == 0], 0.0)  # padding and w_i = 0 stay
  rows = zip(points, normals, cs, d, sizes, strict=True)
  return [(p[:n], w[:n], c, row[:n]) for p, w, c, row, n in rows]


def _corner(p, w, c):
  """The box corner that gets w.d closest to an unreachable c."""
  w = w * (1.0 if c >= 0 else -1.0)
  return np.sign(w) * np.where(w > 0, 1 - p, p)


def _linf_reference(p, w, c):
  """min r subject to |d_i| <= r, w.d = c, -p <= d <= 1 - p, as a linear program; None if
  infeasible."""
  n = len(p)
  bound = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
  res = optimize.linprog(np.r_[np.zeros(n), 1.0], A_ub=bound, b_ub=np.zeros(2 * n),
                         A_eq=np.r_[w, 0.0][None], b_eq=[c],
                         bounds=[(-x, 1 - x) for x in p] + [(0, None)], method="highs")
  return res.x[-1] if res.status == 0 else None


def _l2_reference(p, w, c):
  """The L2 projection by bisection on lambda of d = clip(lambda w, -p, 1 - p) (float64,
  60 halvings); None if infeasible."""
  w = w * (1.0 if c >= 0 else -1.0)
  c = abs(c)
  value = lambda lam: w @ np.clip(lam * w, -p, 1 - p)  # noqa: E731
  if value(1e12) < c - 1e-12:
    return None
  low, high = 0.0, 1.0
  while value(high) < c:
    high *= 2
  for _ in range(60):
    mid = (low + high) / 2
    low, high = (mid, high) if value(mid) < c else (low, mid)
  return np.clip(high * w, -p, 1 - p)


def _kind(p, w, c, d, feasible):
  if not feasible:
    return INFEASIBLE
  return BOX_ACTIVE if np.any(np.isclose(p + d, 0) | np.isclose(p + d, 1)) else INTERIOR


def test_linf_projection_matches_a_linear_program():
  kinds = set()
  for p, w, c, d in _solved(0, "linf"):
    radius = _linf_reference(p, w, c)
    kinds.add(_kind(p, w, c, d, radius is not None))
    if radius is None:
      np.testing.assert_allclose(d, _corner(p, w, c), atol=1e-6)
      continue
    assert abs(w @ d - c) <= 1e-5 * (1 + abs(c))  # on the hyperplane
    assert np.all(p + d >= -1e-6) and np.all(p + d <= 1 + 1e-6)  # in the box
    np.testing.assert_allclose(np.abs(d).max(initial=0.0), radius, atol=2e-6)  # minimal
  assert kinds == {INTERIOR, BOX_ACTIVE, INFEASIBLE}


def test_l2_projection_matches_bisection_and_a_qp_solver():
  kinds = set()
  for i, (p, w, c, d) in enumerate(_solved(1, "l2")):
    expected = _l2_reference(p, w, c)
    kinds.add(_kind(p, w, c, d, expected is not None))
    if expected is None:
      np.testing.assert_allclose(d, _corner(p, w, c), atol=1e-6)
      continue
    np.testing.assert_allclose(d, expected, atol=2e-5)
    if i % 10 == 0:  # an independent solver on a few: no feasible point is shorter
      qp = optimize.minimize(lambda x: x @ x, np.zeros_like(p), jac=lambda x: 2 * x,
                             bounds=[(-x, 1 - x) for x in p], method="SLSQP",
                             constraints=[{"type": "eq", "fun": lambda x, w=w, c=c: w @ x - c}])
      assert np.linalg.norm(d) <= np.linalg.norm(qp.x) + 1e-5
  assert kinds == {INTERIOR, BOX_ACTIVE, INFEASIBLE}


def test_projection_of_a_zero_normal_and_of_a_point_on_the_plane_is_no_step():
  p = jnp.full((2, 5), 0.5)
  w = jnp.stack([jnp.zeros(5), jnp.arange(5.0) - 2])
  for norm in ("linf", "l2"):
    np.testing.assert_array_equal(project(p, w, jnp.zeros(2), norm=norm), 0.0)
    np.testing.assert_array_equal(project(p, w, jnp.ones(2), norm=norm)[0], 0.0)


def _near_boundary(num_images, seed=0):
  """A 2-class linear model and interior images at logit margins in [0.5, 2] from its
  boundary: each image's exact distance to the boundary is margin / ||w_1 - w_0||."""
  apply_fn, params = linear_model(num_classes=2, seed=seed)
  rng = np.random.default_rng(seed)
  normal = np.asarray(params["w"][:, 1] - params["w"][:, 0], np.float64)
  x = rng.uniform(0.4, 0.6, (num_images, normal.size))
  bias = float(params["b"][1] - params["b"][0])
  margin = rng.uniform(0.5, 2.0, num_images) * rng.choice([-1.0, 1.0], num_images)
  x = x + ((margin - (x @ normal + bias)) / (normal @ normal))[:, None] * normal
  assert 0.05 < x.min() and x.max() < 0.95  # interior
  images = jnp.asarray(x.reshape(num_images, 6, 6, 1), jnp.float32)
  labels = jnp.argmax(apply_fn(params, images), -1).astype(jnp.int32)
  return apply_fn, params, images, labels, np.abs(margin), normal


@pytest.mark.parametrize("norm,dual", [("linf", 1), ("l2", 2)])
def test_on_a_linear_model_one_iteration_reaches_the_boundary(norm, dual):
  apply_fn, params, images, labels, margin, normal = _near_boundary(6)
  distance = margin / np.linalg.norm(normal, dual)  # |w.x + b| / ||w||_dual
  measured = "linf" if norm == "linf" else "l2"
  key = jax.random.key(0)

  def run(eps, steps):
    config = FABConfig(eps=eps, num_steps=steps, num_target_classes=1, norm=norm)
    return jax.tree.map(np.asarray, fab(apply_fn, params, images, labels, key, config))

  # One iteration: x0 + eta d, d the exact projection, so eta times the distance.
  one = run(1.0, 1)
  assert one.success.all()
  np.testing.assert_allclose(getattr(one, measured), 1.05 * distance, rtol=1e-4)
  # More iterations pull back toward the image and close in on the boundary from outside.
  many = run(1.0, 30)
  found = getattr(many, measured)
  assert many.success.all()
  assert np.all(found >= distance * (1 - 1e-5)) and np.all(found <= 1.05 * distance * 1.0001)
  assert np.all(found <= 1.01 * distance)
  # Budgets just above what was found succeed; below the exact distance nothing can.
  assert run(found.max() * (1 + 1e-4), 30).success.all()
  below = run(distance.min() * (1 - 1e-3), 30)
  assert not below.success.any()
  np.testing.assert_array_equal(below.adv_images, images)


def _cnn_setup(n=6, seed=1):
  apply_fn, params = small_cnn(seed=seed)
  images = random_images(n, 8, 8, 3, seed=seed)
  labels = jnp.argmax(apply_fn(params, images), -1).astype(jnp.int32)
  return apply_fn, params, images, labels


CNN = FABConfig(eps=0.03, num_steps=4, num_target_classes=3)


@pytest.mark.parametrize("norm,eps", [("linf", 0.01), ("l2", 0.1)])
def test_budget_range_and_query_invariants_on_a_convnet(norm, eps):
  apply_fn, params, images, labels = _cnn_setup(8)
  labels = labels.at[0].set((labels[0] + 1) % 5)  # one image misclassified from the start
  config = CNN.replace(eps=eps, norm=norm)
  result = jax.tree.map(np.asarray, fab(apply_fn, params, images, labels,
                                        jax.random.key(0), config))
  assert 0 < result.success.sum() < len(labels)  # a budget where the answer varies
  assert result.adv_images.min() >= 0 and result.adv_images.max() <= 1
  assert np.all(fab_module.SPEC.within_budget(config, result, images[0].size))
  np.testing.assert_array_equal(result.adv_images[~result.success],
                                np.asarray(images)[~result.success])
  np.testing.assert_array_equal(result.target, common.NO_TARGET)
  np.testing.assert_array_equal(result.success, result.adv_pred != np.asarray(labels))
  # The misclassified image costs the clean pass; the others 4 steps per target they needed.
  assert result.queries[0] == 1 and result.success[0]
  assert set(result.queries[1:].tolist()) <= {1 + 4 * k for k in (1, 2, 3)}
  assert np.all(result.queries[1:][~result.success[1:]] == 1 + 4 * 3)


def test_the_first_successful_target_is_kept():
  apply_fn, params, images, labels = _cnn_setup(8)
  key = jax.random.key(0)
  first = fab(apply_fn, params, images, labels, key, CNN.replace(num_target_classes=1))
  three = fab(apply_fn, params, images, labels, key, CNN)
  s1, s3 = np.asarray(first.success), np.asarray(three.success)
  assert s1.any() and np.all(s3 >= s1)
  np.testing.assert_array_equal(np.asarray(three.adv_images)[s1],
                                np.asarray(first.adv_images)[s1])
  np.testing.assert_array_equal(np.asarray(three.queries)[s1], 1 + 4)


def test_random_restarts_batch_independence_and_determinism():
  """Restarts after the first start from a random point drawn from the image's own key: they
  fool an image the first missed, and each image in the batch gets what it gets alone."""
  apply_fn, params, images, labels = _cnn_setup(16)
  keys = jax.random.split(jax.random.key(4), 16)
  one = FABConfig(eps=0.2, num_steps=1, num_target_classes=1, norm="l2")
  four = one.replace(restarts=4)
  first = fab(apply_fn, params, images, labels, keys, one)
  batched = fab(apply_fn, params, images, labels, keys, four)
  s1, s4 = np.asarray(first.success), np.asarray(batched.success)
  assert np.all(s4 >= s1) and s4.sum() > s1.sum()
  np.testing.assert_array_equal(np.asarray(batched.queries)[s1], 2)
  assert np.all(np.asarray(batched.queries)[s4 & ~s1] > 2)
  for i in range(16):
    alone = fab(apply_fn, params, images[i:i + 1], labels[i:i + 1], keys[i:i + 1], four)
    chex.assert_trees_all_close(alone, jax.tree.map(lambda x, i=i: x[i:i + 1], batched),
                                atol=1e-6)
  chex.assert_trees_all_equal(batched, fab(apply_fn, params, images, labels, keys, four))


def test_the_core_composes_with_jit_and_vmap():
  apply_fn, params, images, labels = _cnn_setup(4)
  keys = jax.random.split(jax.random.key(2), 4)
  eager = fab(apply_fn, params, images, labels, keys, CNN)
  public = jax.jit(lambda x: fab(apply_fn, params, x, labels, keys, CNN))(images)
  # The host loop skips images an earlier target fooled: less work (`evaluated`), same rows.
  assert np.all(np.asarray(eager.evaluated) <= np.asarray(public.evaluated))
  eager = eager.replace(evaluated=public.evaluated)
  chex.assert_trees_all_close(public, eager, atol=1e-5)

  def one(image, label, key):
    result = fab_core(apply_fn, params, image[None], label[None], key[None], CNN)
    return jax.tree.map(lambda a: a[0], result)

  vmapped = jax.jit(jax.vmap(one))(images, labels, keys)
  chex.assert_trees_all_close(vmapped, eager, atol=1e-5)


def test_an_eps_sweep_of_the_jitted_core_traces_once():
  apply_fn, params = linear_model(num_classes=3)
  images, labels = random_images(3), jnp.arange(3)
  traces = []

  def counting_apply(p, x):
    traces.append(1)
    return apply_fn(p, x)

  config = FABConfig(num_steps=2, num_target_classes=2)
  jitted = jax.jit(lambda c: fab_core(counting_apply, params, images, labels,
                                      jax.random.key(0), c))
  jitted(config.replace(eps=0.1))
  assert traces
  traces.clear()
  for eps in (0.2, 0.3):
    jax.block_until_ready(jitted(config.replace(eps=eps)))
  assert traces == []


def test_spec_costs():
  config = FABConfig()
  assert fab_module.SPEC.forward_equivalents(config, 3072, 10) == 2 + 9 * (4 * 100 + 1)
  assert fab_module.SPEC.config(**fab_module.SPEC.quick).num_target_classes == 2


@pytest.mark.parametrize("config,match", [
    (FABConfig(eps=-0.1), "eps must be >= 0"),
    (FABConfig(num_steps=0), "num_steps must be an integer >= 1"),
    (FABConfig(num_target_classes=0), "num_target_classes must be an integer >= 1"),
    (FABConfig(restarts=0), "restarts must be an integer >= 1"),
    (FABConfig(norm="l1"), "unknown norm 'l1'; valid choices: linf, l2"),
    (FABConfig(num_target_classes=4), "num_target_classes = 4 needs a model with more "
                                      "classes; this one has 4"),
])
def test_bad_config_is_refused_naming_the_field(config, match):
  apply_fn, params = linear_model(num_classes=4)
  with pytest.raises(ValueError, match=match):
    fab(apply_fn, params, random_images(2), jnp.zeros(2, jnp.int32), jax.random.key(0),
        config)


def test_targets_are_refused():
  apply_fn, params = linear_model()
  with pytest.raises(ValueError, match="picks its own target classes"):
    fab(apply_fn, params, random_images(2), jnp.zeros(2, jnp.int32), jax.random.key(0),
        FABConfig(num_target_classes=2), targets=jnp.ones(2, jnp.int32))
