"""Pixel-local evaluation (models.locality) equals the full forward pass, at every split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advsweep import attacks
from advsweep.models import zoo

SPLICED = ["mnist_lenet", "cifar10_allconv", "cifar10_nin", "cifar10_vgg"]


def _candidates(shape, num_pixels, count, seed):
  height, width, channels = shape
  keys = jax.random.split(jax.random.key(seed), 3)
  rows = jax.random.randint(keys[0], (count, num_pixels), 0, height)
  cols = jax.random.randint(keys[1], (count, num_pixels), 0, width)
  # Corners and edges first: where SAME padding and window clamping matter.
  edge_r = jnp.asarray([0, height - 1, 0, height - 1, 1, height - 2, 0, height // 2])
  edge_c = jnp.asarray([0, width - 1, width - 1, 0, width - 2, 1, width // 2, 0])
  rows, cols = rows.at[:8, 0].set(edge_r), cols.at[:8, 0].set(edge_c)
  colours = jax.random.uniform(keys[2], (count, num_pixels, channels))
  return rows, cols, colours


@pytest.mark.parametrize("name, num_pixels", [(n, 1) for n in SPLICED] + [
    ("mnist_lenet", 3), ("cifar10_nin", 3)])
def test_spliced_logits_equal_the_full_forward_pass(name, num_pixels):
  """Every split of the LeNet; for the deeper CIFAR-10 nets every third affordable one."""
  model = zoo.load(name)
  splicer = model.pixel_evaluator
  shape = (28, 28, 1) if name.startswith("mnist") else (32, 32, 3)
  count = 12
  images = jax.random.uniform(jax.random.key(1), (count, *shape))
  rows, cols, colours = _candidates(shape, num_pixels, count, seed=2)
  perturbed = images.at[jnp.arange(count)[:, None], rows, cols].set(colours)
  expected = model.apply_fn(model.params, perturbed)
  scale = float(jnp.max(jnp.abs(expected)))
  num_layers = len(splicer.layers)
  # The CIFAR-10 nets: every third split (and the deepest) among those whose windows cost at
  # most 3 full passes (deeper VGG splits cost up to 49, with Toeplitz matrices to match).
  affordable = [s for s in range(1, num_layers + 1)
                if (plan := splicer.plan_for(model.params, shape, 1, s)).macs
                <= 3 * plan.full_macs]
  splits = range(num_layers + 1) if name.startswith("mnist") else sorted(
      {*affordable[::3], affordable[-1]})
  for split in splits:
    plan = splicer.plan_for(model.params, shape, num_pixels, split)
    assert plan.split == (split if num_pixels == 1 else 0)  # k > 1: the full forward pass
    state = splicer.clean_state(model.params, images, plan)
    logits = jax.jit(lambda *a, plan=plan: splicer.logits(*a, plan))
    got = logits(model.params, state, jnp.arange(count), rows, cols, colours)
    np.testing.assert_allclose(got, expected, atol=2e-5 * max(scale, 1.0), rtol=0,
                               err_msg=f"{name} split {split}")


def test_plan_picks_a_split_cheaper_than_the_full_pass():
  model = zoo.load("cifar10_allconv")
  plan = model.pixel_evaluator.plan_for(model.params, (32, 32, 3), 1)
  assert 0 < plan.split < len(model.pixel_evaluator.layers)
  assert plan.macs < plan.full_macs
  assert model.pixel_evaluator.plan_for(model.params, (32, 32, 3), 3).split == 0


def test_architectures_without_an_evaluator_fall_back():
  assert zoo.load("cifar10_resnet20").pixel_evaluator is None
  assert zoo.load("mnist_softmax").pixel_evaluator is None


def test_one_pixel_attack_is_the_same_with_and_without_splicing():
  model = zoo.load("cifar10_allconv")
  images = jax.random.uniform(jax.random.key(3), (4, 32, 32, 3))
  labels = jnp.argmax(model.apply_fn(model.params, images), -1)
  results = [attacks.one_pixel(model.apply_fn, model.params, images, labels,
                               jax.random.key(4),
                               attacks.OnePixelConfig(population_size=40, num_generations=3,
                                                      num_slots=2, splice=splice),
                               evaluator=model.pixel_evaluator)
             for splice in (True, False)]
  assert [r.evaluation for r in results] == [attacks.PIXEL_LOCAL_EVALUATION,
                                             attacks.FULL_EVALUATION]
  np.testing.assert_array_equal(results[0].success, results[1].success)
  np.testing.assert_array_equal(results[0].queries, results[1].queries)
  np.testing.assert_allclose(results[0].adv_images, results[1].adv_images, atol=1e-6)
