"""Pixel-local evaluation (attacks.pixel_local), derived from the model's jaxpr, equals the full
forward pass at every split: the zoo's sequential CNNs, ResNet-20 (skip connections, strided
projections), the denoised ResNet (a non-local block ends the windows) and a user's own
network (plain JAX, a non-square image, max and average pools, a strided residual)."""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advsweep import attacks
from advsweep.attacks import pixel_local
from advsweep.models import zoo


def _candidates(shape, count, seed):
  height, width, channels = shape
  keys = jax.random.split(jax.random.key(seed), 3)
  rows = jax.random.randint(keys[0], (count, 1), 0, height)
  cols = jax.random.randint(keys[1], (count, 1), 0, width)
  # Corners and edges first: where SAME padding and windows off the map matter.
  edge_r = jnp.asarray([0, height - 1, 0, height - 1, 1, height - 2, 0, height // 2])
  edge_c = jnp.asarray([0, width - 1, width - 1, 0, width - 2, 1, width // 2, 0])
  rows, cols = rows.at[:8, 0].set(edge_r), cols.at[:8, 0].set(edge_c)
  colours = jax.random.uniform(keys[2], (count, 1, channels))
  return rows, cols, colours


def _check_splits(apply_fn, params, shape, splits=None, count=12):
  """Logits at each split against the full forward pass; returns the splits checked."""
  splicer = pixel_local.PixelSplicer(apply_fn)
  splits = splicer.splits(params, shape) if splits is None else splits
  images = jax.random.uniform(jax.random.key(1), (count, *shape))
  rows, cols, colours = _candidates(shape, count, seed=2)
  expected = apply_fn(params, images.at[jnp.arange(count)[:, None], rows, cols].set(colours))
  scale = max(float(jnp.max(jnp.abs(expected))), 1.0)
  for split in splits:
    plan = splicer.plan_for(params, shape, 1, split)
    assert plan.split == split
    state = splicer.clean_state(params, images, plan)
    logits = jax.jit(lambda *a, plan=plan: splicer.logits(*a, plan))
    got = logits(params, state, jnp.arange(count), rows, cols, colours)
    np.testing.assert_allclose(got, expected, atol=2e-5 * scale, rtol=0,
                               err_msg=f"split {split}")
  return splits


class UserNet(nn.Module):
  """A user's CNN the zoo does not know: max and average pools, a strided residual block
  with a 1x1 projection, a GELU, a global mean."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3))(x * 2.0 - 1.0))
    x = nn.max_pool(x, (2, 2), (2, 2))
    y = nn.gelu(nn.Conv(8, (3, 3), strides=(2, 2))(x))
    y = nn.Conv(8, (5, 5), use_bias=False)(y)
    x = nn.relu(y + nn.Conv(8, (1, 1), strides=(2, 2))(x))
    x = nn.avg_pool(x, (3, 3), (1, 1), padding="SAME")
    return nn.Dense(5)(jnp.mean(x, axis=(1, 2)))


def _user_model(shape=(14, 18, 3)):
  net = UserNet()
  return net.apply, net.init(jax.random.key(0), jnp.zeros((1, *shape))), shape


def test_a_users_cnn_at_every_split():
  apply_fn, params, shape = _user_model()
  splits = _check_splits(apply_fn, params, shape)
  assert len(splits) > 10  # up to the global mean


def test_lenet_at_every_split():
  model = zoo.load("mnist_lenet")
  assert len(_check_splits(model.apply_fn, model.params, (28, 28, 1))) > 10


@pytest.mark.parametrize("name", ["cifar10_resnet20", "cifar10_allconv"])
def test_cifar10_nets_at_a_spread_of_splits(name):
  """Every eighth split (compiling each takes seconds), the deepest and the chosen one."""
  model = zoo.load(name)
  splicer = model.pixel_evaluator
  splits = splicer.splits(model.params, (32, 32, 3))
  chosen = splicer.plan_for(model.params, (32, 32, 3), 1).split
  _check_splits(model.apply_fn, model.params, (32, 32, 3),
                sorted({*splits[::8], splits[-1], chosen}), count=10)


def test_a_nonlocal_block_ends_the_windows():
  """The denoised ResNet's first non-local block (after stage 2) reads every position: the
  windows end there, where the plain ResNet's run on to its global mean."""
  def first_global(model):
    analysis = model.pixel_evaluator.analysis(model.params, (32, 32, 3))
    index = next(i for i, step in enumerate(analysis.steps)
                 if step is not None and step.kind == "global")
    return index, analysis.program.eqns[index].prim.name

  denoised, plain = zoo.load("cifar10_resnet20_denoise"), zoo.load("cifar10_resnet20")
  (cut, name), (end, last) = first_global(denoised), first_global(plain)
  assert cut < end and name == "reshape" and last == "reduce_sum"


def test_plans():
  model = zoo.load("cifar10_allconv")
  splicer = model.pixel_evaluator
  plan = splicer.plan_for(model.params, (32, 32, 3), 1)
  assert plan.split > 0 and plan.macs < plan.full_macs
  assert splicer.plan_for(model.params, (32, 32, 3), 3).split == 0  # k > 1: full pass
  resnet = zoo.load("cifar10_resnet20")
  plan = resnet.pixel_evaluator.plan_for(resnet.params, (32, 32, 3), 1)
  assert plan.split > 0 and plan.macs < plan.full_macs
  softmax = zoo.load("mnist_softmax")  # a dense first layer: nothing is local
  assert softmax.pixel_evaluator.splits(softmax.params, (28, 28, 1)) == [0]
  with pytest.raises(ValueError, match="pick one of"):
    softmax.pixel_evaluator.plan_for(softmax.params, (28, 28, 1), 1, split=3)


def test_the_windows_follow_the_receptive_field():
  """ResNet-20's stem (3x3) turns the one-pixel window into 3x3; its first block's two 3x3
  convolutions into 7x7, the skip connection's union included."""
  model = zoo.load("cifar10_resnet20")
  analysis = model.pixel_evaluator.analysis(model.params, (32, 32, 3))
  windows = [analysis.axes[eqn.outs[0]][0].window
             for eqn, step in zip(analysis.program.eqns, analysis.steps, strict=True)
             if step is not None and step.kind == "conv"]
  assert windows[:3] == [3, 5, 7]


def test_one_pixel_attack_is_the_same_with_and_without_splicing():
  for name in ("cifar10_allconv", "cifar10_resnet20"):
    model = zoo.load(name)
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


# --- The one-pixel attack evaluates pixel-locally by default (issue 33). -----------------

def _pixel_config():
  return attacks.OnePixelConfig(population_size=8, num_generations=3, stop_on_flip=False)


def test_a_plain_one_pixel_call_is_pixel_local_and_equals_the_explicit_evaluator():
  apply_fn, params, shape = _user_model()
  images = jax.random.uniform(jax.random.key(1), (3, *shape))
  labels = jnp.argmax(apply_fn(params, images), -1)
  key = jax.random.key(2)
  plain = attacks.one_pixel(apply_fn, params, images, labels, key, _pixel_config())
  explicit = attacks.one_pixel(apply_fn, params, images, labels, key, _pixel_config(),
                               evaluator=pixel_local.PixelSplicer(apply_fn))
  full = attacks.one_pixel(apply_fn, params, images, labels, key, _pixel_config(),
                           evaluator="full")
  assert plain.evaluation == explicit.evaluation == attacks.PIXEL_LOCAL_EVALUATION
  assert full.evaluation == attacks.FULL_EVALUATION
  for field in ("adv_images", "success", "queries"):
    np.testing.assert_array_equal(getattr(plain, field), getattr(explicit, field))
  np.testing.assert_allclose(plain.adv_images, full.adv_images, atol=1e-6)
  assert pixel_local.splicer_for(apply_fn) is pixel_local.splicer_for(apply_fn)  # derived once


def test_a_model_without_a_local_first_layer_warns_once_and_runs_the_full_pass():
  def dense_first(params, images):  # a dense layer reads every pixel at once
    return images.reshape(images.shape[0], -1) @ params

  params = jax.random.normal(jax.random.key(0), (4 * 4 * 1, 3))
  images = jax.random.uniform(jax.random.key(1), (2, 4, 4, 1))
  labels = jnp.argmax(dense_first(params, images), -1)
  with pytest.warns(RuntimeWarning, match=r"dense_first runs the full forward pass .*"
                    r"reshape, comes before any convolution.* evaluator='full'"):
    result = attacks.one_pixel(dense_first, params, images, labels, 0, _pixel_config())
  assert result.evaluation == attacks.FULL_EVALUATION
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the second call is silent, and "full" never warns
    attacks.one_pixel(dense_first, params, images, labels, 0, _pixel_config())
    attacks.one_pixel(dense_first, params, images, labels, 0, _pixel_config(),
                      evaluator="full")


def test_the_pixel_local_default_runs_under_jit():
  apply_fn, params, shape = _user_model()
  images = jax.random.uniform(jax.random.key(1), (2, *shape))
  labels = jnp.argmax(apply_fn(params, images), -1)
  jitted = jax.jit(lambda x: attacks.one_pixel(apply_fn, params, x, labels, jax.random.key(0),
                                               _pixel_config()))
  assert jitted(images).evaluation == attacks.PIXEL_LOCAL_EVALUATION
