"""The side-by-side benchmark (bench/perf/peers.py) on a few images: counts and cross-checks."""

from __future__ import annotations

import pytest

from advsweep.bench.perf import peers
from advsweep.models import zoo
from tests.conftest import DATA_DIR, requires_data

pytest.importorskip("art")
pytest.importorskip("foolbox")


@requires_data
def test_peer_rows_agree_with_ours_where_the_attack_is_deterministic():
  model = zoo.load("mnist_lenet")
  images, labels = peers.correct_images(model, DATA_DIR, 24)
  assert len(images) == 24
  settings = peers.Settings(eps=0.15, num_steps=4, gradient_images=24, jsma_images=3,
                            pixel_images=2, pixel_generations=1)
  rows = peers.gradient_rows(model, "mnist_lenet", images, labels, settings)
  rows += peers.jsma_rows(model, "mnist_lenet", images, labels, settings)
  rows += peers.one_pixel_rows(model, "mnist_lenet", images, labels, settings)
  rows = peers.with_speedups(rows)
  by = {(r["attack"], r["library"]): r for r in rows}
  assert {a for a, _ in by} == {"one_pixel", "fgsm", "bim", "pgd", "jsma"}
  # FGSM is deterministic: the same sign gradient on the same images gives the same flips
  # (one image of slack for a gradient component that rounds to zero differently).
  ours = by["fgsm", "advsweep"]["success_rate"] * 24
  for library in ("Foolbox", "ART"):
    assert abs(by["fgsm", library]["success_rate"] * 24 - ours) <= 1
  assert abs(by["bim", "ART"]["success_rate"] - by["bim", "advsweep"]["success_rate"]) * 24 <= 1
  for r in rows:
    assert r["evals_per_image"] > 0 and 0 <= r["success_rate"] <= 1
    assert (r["speedup"] is None) == (r["library"] == "advsweep")
  jsma_f = by["jsma", peers.VARIANT_F]
  assert jsma_f["speedup"] == pytest.approx(by["jsma", "ART"]["s_per_image"]
                                            / jsma_f["s_per_image"])
  # One-pixel: 2 generations of ~400 (ART's early stop may end sooner).
  assert by["one_pixel", "advsweep"]["evals_per_image"] == 800 + 1  # and the re-check
  assert 0 < by["one_pixel", "ART"]["evals_per_image"] <= 800 + 2
  assert by["one_pixel", "ART"]["note"] in ("at most 0 pixel(s) changed",
                                            "at most 1 pixel(s) changed")
  for r in rows:  # the share of a peer's time inside the model and gradient calls
    if r["library"] == "ART":
      assert 0 < r["model_share"] <= 1.05, r
    else:
      assert r["model_share"] is None, r
  table = peers.format_table(rows)
  assert peers.JSMA_NOTE in table and "Foolbox" in table


@requires_data
def test_arts_jitted_gradients_are_the_models_and_are_counted():
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  model = zoo.load("mnist_lenet")
  forward = peers.CountingForward(model.apply_fn, model.params)
  classifier = peers._art_jax_classifier(forward, (28, 28, 1), 10)
  x = np.asarray(jax.random.uniform(jax.random.key(0), (3, 28, 28, 1)))
  jac = np.asarray(jax.vmap(jax.jacrev(lambda xi: model.apply_fn(model.params, xi[None])[0]))(x))
  np.testing.assert_allclose(classifier.class_gradient(x), jac, atol=1e-5)
  np.testing.assert_allclose(classifier.class_gradient(x, label=[1, 4, 7])[:, 0],
                             jac[np.arange(3), [1, 4, 7]], atol=1e-5)
  y = np.eye(10, dtype=np.float32)[[0, 1, 2]]
  loss = lambda v: jnp.mean(optax.softmax_cross_entropy(model.apply_fn(model.params, v), y))  # noqa: E731
  np.testing.assert_allclose(classifier.loss_gradient(x, y), jax.grad(loss)(x), atol=1e-6)
  assert forward.images == 9 and forward.seconds > 0
