"""Every attack's core composes: jit, vmap, a training step; schedulers equal the cores."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advsweep import attacks
from tests.attack_models import advgan_config, random_images, small_cnn

# Small budgets, one per registered attack: the test below fails for an attack left out.
SMALL = {
    "one_pixel": attacks.OnePixelConfig(population_size=12, num_generations=3, num_slots=2),
    "fgsm": attacks.FGSMConfig(eps=0.05),
    "bim": attacks.BIMConfig(eps=0.05, step_size=0.01, num_steps=3),
    "pgd": attacks.PGDConfig(eps=0.05, step_size=0.01, num_steps=3),
    "jsma": attacks.JSMAConfig(gamma=0.1, num_slots=2),
    "apgd": attacks.APGDConfig(eps=0.05, num_steps=3),
    "apgd_t": attacks.APGDTConfig(eps=0.05, num_steps=3, num_target_classes=2),
    "fab_t": attacks.FABConfig(eps=0.05, num_steps=3, num_target_classes=2),
    "square": attacks.SquareConfig(eps=0.05, num_queries=20),
    "advgan": advgan_config((8, 8, 3), 5, eps=0.05),
}
NAMES = list(SMALL)


def _setup(n=5):
  apply_fn, params = small_cnn(seed=1)
  images = random_images(n, 8, 8, 3, seed=1)
  labels = jnp.argmax(apply_fn(params, images), -1).astype(jnp.int32)
  return apply_fn, params, images, labels, jax.random.split(jax.random.key(2), n)


def _same_rows(a, b):
  """Equal results; `evaluated` (work the model really did) may differ where a host
  schedule skips the images an earlier run fooled, but never falls below `queries`."""
  for r in (a, b):
    assert np.all(np.asarray(r.evaluated) >= np.asarray(r.queries))
  chex.assert_trees_all_close(a.replace(evaluated=b.evaluated), b, atol=1e-5)


def test_every_registered_attack_is_covered():
  assert set(attacks.REGISTRY) == set(SMALL)


@pytest.mark.parametrize("name", NAMES)
def test_core_under_jit_equals_the_public_attack(name):
  apply_fn, params, images, labels, keys = _setup()
  spec = attacks.REGISTRY[name]
  eager = spec.run(apply_fn, params, images, labels, keys, SMALL[name])
  core = jax.jit(lambda x: spec.core(apply_fn, params, x, labels, keys, SMALL[name]))(images)
  # The public attack traces too, as a user would write it, and then runs the core.
  public = jax.jit(lambda x: spec.run(apply_fn, params, x, labels, keys, SMALL[name]))(images)
  _same_rows(core, eager)
  _same_rows(public, eager)


@pytest.mark.parametrize("name", NAMES)
def test_core_under_vmap_over_images_and_keys(name):
  """vmap over single images: the same rows as the batch (the scheduler, with fewer slots
  than images for the one-pixel attack and JSMA)."""
  apply_fn, params, images, labels, keys = _setup()
  spec = attacks.REGISTRY[name]

  def one(image, label, key):
    result = spec.core(apply_fn, params, image[None], label[None], key[None], SMALL[name])
    return jax.tree.map(lambda a: a[0], result)

  vmapped = jax.vmap(one)(images, labels, keys)
  batched = spec.run(apply_fn, params, images, labels, keys, SMALL[name])
  _same_rows(vmapped, batched)


@pytest.mark.parametrize("name", NAMES)
def test_core_inside_a_jitted_training_step(name):
  """Adversarial training's shape: the attack on the current params, then a gradient step on
  the loss of the adversarial images, all one jitted function."""
  apply_fn, params, images, labels, keys = _setup()
  spec = attacks.REGISTRY[name]
  optimizer = optax.sgd(0.1)

  @jax.jit
  def train_step(params, opt_state, images, labels, keys):
    adv = jax.lax.stop_gradient(
        spec.run(apply_fn, params, images, labels, keys, SMALL[name]).adv_images)

    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, adv), labels).mean()

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value, adv

  new_params, _, value, adv = train_step(params, optimizer.init(params), images, labels, keys)
  expected = spec.run(apply_fn, params, images, labels, keys, SMALL[name]).adv_images
  np.testing.assert_allclose(adv, expected, atol=1e-5)  # the same attack as outside
  assert np.isfinite(float(value))
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), new_params,
                                       params))
  assert max(float(m) for m in moved) > 0  # the step changed the params


@pytest.mark.parametrize("name,field,values", [
    ("pgd", "eps", (0.02, 0.05, 0.1)),
    ("bim", "eps", (0.02, 0.05, 0.1)),
    ("fgsm", "eps", (0.02, 0.05, 0.1)),
    ("one_pixel", "differential_weight", (0.3, 0.5, 0.9)),
    ("jsma", "gamma", (0.05, 0.1, 0.2)),
    ("advgan", "eps", (0.02, 0.05, 0.1)),
])
def test_a_budget_sweep_of_the_jitted_core_traces_once(name, field, values):
  """Budgets are traced leaves of the config: the config as an argument of the jitted core
  compiles once for the whole sweep."""
  apply_fn, params, images, labels, keys = _setup(3)
  spec = attacks.REGISTRY[name]
  traces = []

  def counting_apply(p, x):
    traces.append(1)
    return apply_fn(p, x)

  jitted = jax.jit(lambda config: spec.core(counting_apply, params, images, labels, keys,
                                            config))
  jitted(SMALL[name].replace(**{field: values[0]}))
  assert traces
  traces.clear()
  for value in values[1:]:
    jax.block_until_ready(jitted(SMALL[name].replace(**{field: value})))
  assert traces == []


@pytest.mark.parametrize("name,slots", [("one_pixel", 2), ("one_pixel", 3), ("jsma", 2),
                                        ("jsma", 3)])
def test_schedulers_equal_the_core_run_on_each_image_alone(name, slots):
  """Slot refilling (one-pixel) and continuous batching with a chunked tail (JSMA) give
  every image what the core gives it alone."""
  apply_fn, params, images, labels, keys = _setup(7)
  spec = attacks.REGISTRY[name]
  config = SMALL[name].replace(num_slots=slots)
  scheduled = spec.run(apply_fn, params, images, labels, keys, config)
  assert len(set(np.asarray(scheduled.queries).tolist())) > 1  # images stop at different times
  core = jax.jit(lambda x, y, k: spec.core(apply_fn, params, x, y, k, config))
  for i in range(len(images)):
    alone = core(images[i:i + 1], labels[i:i + 1], keys[i:i + 1])
    chex.assert_trees_all_close(alone, jax.tree.map(lambda a, i=i: a[i:i + 1], scheduled),
                                atol=1e-6)


def test_a_wrapper_is_evaluated_pixel_locally_too_and_full_is_asked_by_name():
  """The evaluator is derived from whatever function is given (a lambda around the model
  included); evaluator="full" runs the full pass; the result says which evaluation ran."""
  from advsweep.models import zoo

  model = zoo.load("mnist_lenet")
  images = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1))
  labels = jnp.argmax(model.apply_fn(model.params, images), -1)
  config = attacks.OnePixelConfig(population_size=8, num_generations=1)
  key = jax.random.key(1)
  local = attacks.one_pixel(model.apply_fn, model.params, images, labels, key, config,
                            evaluator=model.pixel_evaluator)
  wrapped = attacks.one_pixel(lambda p, x: model.apply_fn(p, x), model.params, images, labels,
                              key, config)
  full = attacks.one_pixel(model.apply_fn, model.params, images, labels, key, config,
                           evaluator="full")
  assert local.evaluation == wrapped.evaluation == attacks.PIXEL_LOCAL_EVALUATION
  assert full.evaluation == attacks.FULL_EVALUATION
  np.testing.assert_array_equal(local.queries, full.queries)
  np.testing.assert_allclose(local.adv_images, full.adv_images, atol=1e-6)
  np.testing.assert_allclose(local.adv_images, wrapped.adv_images, atol=1e-6)
  assert attacks.pgd(model.apply_fn, model.params, images, labels, key,
                     evaluator=model.pixel_evaluator).evaluation == attacks.FULL_EVALUATION


def test_checks_that_need_values_run_only_on_concrete_inputs():
  apply_fn, params, images, labels, keys = _setup(2)
  bad = images.at[0, 0, 0, 0].set(2.0)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    attacks.fgsm(apply_fn, params, bad, labels, keys)
  # Under jit the values are unknown: the static checks run, the range check cannot.
  jax.jit(lambda x: attacks.fgsm(apply_fn, params, x, labels, keys).adv_images)(bad)
  with pytest.raises(ValueError, match="rank 4"):  # a static check, under jit too
    jax.jit(lambda x: attacks.fgsm(apply_fn, params, x[0], labels, keys).adv_images)(images)


_TRACES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: _TRACES.append(name)
    if name == "/jax/core/compile/jaxpr_trace_duration" else None)


def test_two_loads_of_a_zoo_model_share_the_compiled_attack():
  """A zoo model's apply_fn is equal for equal modules: the bound cores are found again for
  a second `models.load` of the same model (with the same params)."""
  from advsweep.models import zoo

  first, second = zoo.load("mnist_softmax"), zoo.load("mnist_softmax")
  images = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
  labels = jnp.zeros(4, jnp.int32)
  config = attacks.BIMConfig(eps=0.1, num_steps=2)
  attacks.bim(first.apply_fn, first.params, images, labels, jax.random.key(0), config)
  _TRACES.clear()
  attacks.bim(second.apply_fn, first.params, images, labels, jax.random.key(0), config)
  assert _TRACES == []  # not even the input checks' abstract evaluation of the model
