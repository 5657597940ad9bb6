"""Trained defenses: the Gauss network, the denoising block, adversarial training's step,
resuming an interrupted run, the overfitting guard, and the config's dataset key."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advsweep.bench.driver import config
from advsweep.models import architectures, checkpoints, zoo
from advsweep.models import training as train
from advsweep.models.training import guard as guard_module
from tests.conftest import requires_data


def test_gauss_logits_are_negative_squared_distances():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(5, 7)).astype(np.float32)
  centroids = rng.normal(size=(3, 7)).astype(np.float32)
  expected = -((features[:, None, :] - centroids[None]) ** 2).sum(-1)
  np.testing.assert_allclose(architectures.gauss_logits(features, centroids), expected,
                             rtol=1e-5, atol=1e-5)
  logits = jnp.asarray(expected)
  labels = jnp.asarray([0, 1, 2, 0, 1])
  p = np.exp(expected)
  onehot = np.eye(3)[np.asarray(labels)]
  bce = -(onehot * np.log(p) + (1 - onehot) * np.log1p(-p)).sum(-1)
  np.testing.assert_allclose(architectures.gauss_loss(logits, labels), bce, rtol=1e-4)


def _random_model(module, dataset):
  variables = zoo.init_variables(module, dataset, jax.random.key(0))
  return zoo.Model("test", module, variables, {})


def test_gauss_lenet_pixel_evaluator_equals_the_full_forward_pass():
  model = _random_model(architectures.PapernotLeNet(head=architectures.GAUSS), "mnist")
  splicer = model.pixel_evaluator
  images = jax.random.uniform(jax.random.key(1), (6, 28, 28, 1))
  rows = jnp.asarray([[0], [27], [0], [27], [13], [5]])
  cols = jnp.asarray([[0], [27], [27], [0], [14], [20]])
  colours = jax.random.uniform(jax.random.key(2), (6, 1, 1))
  perturbed = images.at[jnp.arange(6)[:, None], rows, cols].set(colours)
  expected = model.apply_fn(model.params, perturbed)
  for split in splicer.splits(model.params, (28, 28, 1)):
    plan = splicer.plan_for(model.params, (28, 28, 1), 1, split)
    state = splicer.clean_state(model.params, images, plan)
    got = splicer.logits(model.params, state, jnp.arange(6), rows, cols, colours, plan)
    np.testing.assert_allclose(got, expected, rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(expected).max()))


def test_denoising_blocks_start_as_the_identity():
  """Zero-initialised 1x1 convolutions: a denoised ResNet-20 given its twin's weights
  computes the twin's logits; once the convolution is non-zero the block changes them."""
  plain = _random_model(architectures.ResNet20(), "cifar10")
  denoised_module = architectures.ResNet20(denoise_after=(2, 3))
  fresh = zoo.init_variables(denoised_module, "cifar10", jax.random.key(5))
  variables = {"params": {**plain.params["params"],
                          **{k: v for k, v in fresh["params"].items() if "denoise" in k}},
               "batch_stats": plain.params["batch_stats"]}
  images = jax.random.uniform(jax.random.key(3), (4, 32, 32, 3))
  expected = plain.apply_fn(plain.params, images)
  got = denoised_module.apply(variables, images, train=False)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  kernel = variables["params"]["stage3_denoise"]["conv"]["kernel"]
  variables["params"]["stage3_denoise"]["conv"]["kernel"] = jnp.full_like(kernel, 0.05)
  assert not np.allclose(denoised_module.apply(variables, images, train=False), expected,
                         atol=1e-3)


def test_warm_start_copies_the_shared_weights_and_keeps_the_rest():
  """A denoised ResNet-20 started from the shipped cifar10_resnet20 computes its logits
  (the blocks start as the identity); only the blocks keep their initialisation."""
  source = zoo.load("cifar10_resnet20")
  module = architectures.ResNet20(denoise_after=(2, 3))
  fresh = zoo.init_variables(module, "cifar10", jax.random.key(1))
  merged, record = train.warm_start(fresh, "cifar10_resnet20")
  assert record["from"] == "cifar10_resnet20" and record["sha256"] == source.meta["sha256"]
  assert record["fresh"] == ["params/stage2_denoise/conv/kernel",
                             "params/stage3_denoise/conv/kernel"]
  images = jax.random.uniform(jax.random.key(3), (4, 32, 32, 3))
  np.testing.assert_allclose(module.apply(merged, images, train=False),
                             source.apply_fn(source.params, images), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(merged["params"]["stage2_denoise"]["conv"]["kernel"],
                                fresh["params"]["stage2_denoise"]["conv"]["kernel"])
  np.testing.assert_array_equal(merged["params"]["stem"]["conv"]["kernel"],
                                source.params["params"]["stem"]["conv"]["kernel"])
  with pytest.raises(ValueError, match="shares no weights"):
    train.warm_start(fresh, "mnist_softmax")
  if "cifar10_resnet20_da" not in zoo.available():
    with pytest.raises(checkpoints.CheckpointError, match="advsweep train cifar10_resnet20_da"):
      train.warm_start(fresh, "cifar10_resnet20_da")
  assert zoo.entry("cifar10_resnet20_denoise").recipe == zoo.entry(
      "cifar10_resnet20_adv").recipe  # the blocks are the only difference


def test_n_fgsm_adds_noise_and_one_unprojected_step():
  """de Jorge et al.: x + U(-k eps, k eps) + eps sign(grad), clipped to [0, 1] only: on a
  linear model the step's sign is the closed form's, and the perturbation reaches past eps
  (up to (k + 1) eps) where the noise pushes it."""
  from tests.attack_models import linear_model, random_images

  apply_fn, params = linear_model(num_classes=3)
  images = random_images(64) * 0.5 + 0.25
  labels = jnp.zeros(64, jnp.int32)
  eps = 0.02
  adv = train.n_fgsm(apply_fn, params, images, labels, jax.random.key(0), eps, eps, 2.0)
  delta = np.asarray(adv - images)
  assert np.abs(delta).max() <= 3 * eps + 1e-6
  assert np.abs(delta).max() > eps  # no projection onto the eps ball
  noise = np.asarray(jax.random.uniform(jax.random.key(0), images.shape, minval=-2 * eps,
                                        maxval=2 * eps))
  step = delta - noise
  np.testing.assert_allclose(np.abs(step), eps, atol=1e-5)  # one step of eps a feature


def test_n_fgsm_keeps_the_noisy_start_in_the_image_range():
  """As de Jorge et al.'s code: the noise is clipped to [0, 1] before the gradient step, so
  on black images the noise below 0 is lost, not carried into the step."""
  from tests.attack_models import linear_model

  apply_fn, params = linear_model(num_classes=3)
  images = jnp.zeros((16, 6, 6, 1))
  labels = jnp.zeros(16, jnp.int32)
  eps = 0.1
  adv = np.asarray(train.n_fgsm(apply_fn, params, images, labels, jax.random.key(1), eps, eps,
                                2.0))
  noise = np.asarray(jax.random.uniform(jax.random.key(1), images.shape, minval=-2 * eps,
                                        maxval=2 * eps))
  grad = jax.grad(lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
      apply_fn(params, x), labels)))(jnp.clip(noise, 0, 1))
  expected = np.clip(np.clip(noise, 0, 1) + eps * np.sign(np.asarray(grad)), 0, 1)
  np.testing.assert_allclose(adv, expected, atol=1e-6)


def test_training_attacks_follow_the_papers():
  recipe = zoo.entry("mnist_lenet_pgd").recipe
  attack = train.training_attack(recipe)
  assert (attack.eps, attack.step_size, attack.num_steps, attack.random_start) == (
      0.3, 0.1, 7, True)  # Madry et al.'s PGD from a random start, 7 steps of 0.1
  cifar = train.training_attack(zoo.entry("cifar10_resnet20_adv").recipe)
  assert (cifar.eps, cifar.step_size, cifar.num_steps, cifar.random_start) == (
      pytest.approx(8 / 255), pytest.approx(4 / 255), 2, True)  # PGD-2, steps of eps / 2
  assert zoo.entry("mnist_lenet_alp").recipe == dataclasses.replace(
      recipe, clean_weight=0.5, logit_pairing=0.5)  # Mosbach et al.'s 50% AT + ALP
  rs = train.training_attack(dataclasses.replace(recipe, adversary="fgsm_rs", adv_step=None))
  assert (rs.step_size, rs.num_steps) == (pytest.approx(0.375), 1)  # Wong et al.'s 1.25 eps
  fgsm = train.training_attack(zoo.entry("mnist_lenet_fgsm").recipe)
  assert (fgsm.eps, fgsm.step_size, fgsm.num_steps, fgsm.random_start) == (0.25, 0.25, 1,
                                                                           False)
  assert zoo.entry("mnist_lenet_fgsm").recipe.clean_weight == 0.5  # Goodfellow's alpha
  pgd = train.training_attack(dataclasses.replace(recipe, adversary="pgd", adv_steps=40,
                                                  adv_step=None))
  assert pgd.num_steps == 40 and pgd.step_size == pytest.approx(2.5 * 0.3 / 40)
  assert train.training_attack(zoo.entry("mnist_lenet").recipe) is None
  for name, entry in zoo.ZOO.items():
    assert bool(entry.defense) == bool(entry.twin), name
    assert not entry.twin or entry.twin in zoo.ZOO, name


@pytest.mark.parametrize("name", [n for n, e in zoo.ZOO.items() if e.defense == "gauss"])
def test_gauss_networks_train_on_their_twins_schedule(name):
  """Hess et al.'s claim is about the output layer: the Gauss network and its twin differ in
  nothing else (epochs, optimiser, augmentation), so the twin comparison isolates it."""
  entry = zoo.entry(name)
  assert entry.recipe == dataclasses.replace(zoo.entry(entry.twin).recipe, loss="gauss")


def test_the_eps_ramp_grows_linearly_then_holds():
  recipe = dataclasses.replace(zoo.entry("mnist_lenet_pgd").recipe, epsilon_ramp=0.5)
  scales = [train.eps_scale(recipe, step, 10) for step in range(10)]
  np.testing.assert_allclose(scales, [0.2, 0.4, 0.6, 0.8, 1, 1, 1, 1, 1, 1])
  plain = dataclasses.replace(recipe, epsilon_ramp=0.0)
  assert {train.eps_scale(plain, step, 10) for step in range(10)} == {1.0}


def _tiny(name, data_dir, tmp_path, **kwargs):
  """Two epochs of two steps of 8 images (the guard attacks 8 training images)."""
  return train.train_and_evaluate(name, seed=3, data_dir=data_dir, out_dir=tmp_path,
                                  epochs=2, train_limit=16, test_limit=16, progress=False,
                                  batch_size=8, guard_images=8, **kwargs)


@requires_data
def test_an_interrupted_run_resumes_to_the_same_weights(data_dir, tmp_path, capsys):
  """ALP (adversarial examples, logit pairing, the guard): killed after epoch 1, or within
  epoch 1 after a mid-epoch save, resumed, it ends with the weights and the history of a run
  that was never interrupted."""
  whole = _tiny("mnist_lenet_alp", data_dir, tmp_path / "whole")
  assert "s per step" in capsys.readouterr().out  # the time estimate comes first

  class Killed(Exception):
    pass

  def kill(epoch):
    if epoch == 1:
      raise Killed

  with pytest.raises(Killed):
    _tiny("mnist_lenet_alp", data_dir, tmp_path / "resumed", on_epoch_end=kill)
  state = train.resume_path(tmp_path / "resumed", "mnist_lenet_alp")
  assert state.is_file() and not (tmp_path / "resumed" / "mnist_lenet_alp.json").exists()
  # Another seed is another run: its state is refused, not silently continued.
  with pytest.raises(checkpoints.CheckpointError, match="--restart"):
    train.train_and_evaluate("mnist_lenet_alp", seed=4, data_dir=data_dir,
                             out_dir=tmp_path / "resumed", epochs=2, train_limit=16,
                             test_limit=16, progress=False, batch_size=8, guard_images=8)
  resumed = _tiny("mnist_lenet_alp", data_dir, tmp_path / "resumed")
  assert "resuming after epoch 1 of 2" in capsys.readouterr().out
  assert not state.exists()
  assert resumed.losses == whole.losses
  assert resumed.meta["overfit_guard"] == whole.meta["overfit_guard"]
  for a, b in zip(jax.tree.leaves(whole.variables), jax.tree.leaves(resumed.variables),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed.meta["sha256"] == whole.meta["sha256"]
  assert whole.meta["defense"] == "alp" and whole.meta["twin"] == "mnist_lenet"

  # Killed within an epoch, after its mid-epoch save (step 1 of 2): the same again.
  def kill_mid_epoch(epoch, steps):
    if (epoch, steps) == (0, 1):
      raise Killed

  with pytest.raises(Killed):
    _tiny("mnist_lenet_alp", data_dir, tmp_path / "mid", checkpoint_seconds=0.0,
          on_checkpoint=kill_mid_epoch)
  capsys.readouterr()
  mid = _tiny("mnist_lenet_alp", data_dir, tmp_path / "mid")
  assert "resuming in epoch 1 of 2 after step 1 of 2" in capsys.readouterr().out
  assert mid.losses == whole.losses
  assert mid.meta["overfit_guard"] == whole.meta["overfit_guard"]
  assert mid.meta["sha256"] == whole.meta["sha256"]


@requires_data
def test_a_corrupt_training_state_is_refused(data_dir, tmp_path):
  state = train.resume_path(tmp_path, "mnist_lenet_gauss")
  state.write_bytes(b"not msgpack at all")
  with pytest.raises(checkpoints.CheckpointError, match="not a training state"):
    _tiny("mnist_lenet_gauss", data_dir, tmp_path)
  result = _tiny("mnist_lenet_gauss", data_dir, tmp_path, restart=True)  # --restart
  assert len(result.losses) == 2 and not state.exists()


def test_a_training_state_of_an_earlier_layout_is_refused(tmp_path):
  import flax.serialization
  path = tmp_path / "old.resume.msgpack"
  path.write_bytes(flax.serialization.to_bytes({"epoch": np.int64(1), "fingerprint": "f"}))
  target = train.LoopState.start({"w": np.zeros(2)}, {"m": np.zeros(2)}, 2, 4, "f")
  with pytest.raises(checkpoints.CheckpointError, match="another layout.*--restart"):
    train.load_state(path, target)


@requires_data
def test_the_guard_stops_a_collapse_and_keeps_the_best_weights(data_dir, tmp_path,
                                                               monkeypatch):
  """Catastrophic overfitting (Wong et al.): PGD accuracy on training images collapses; the
  run stops there and keeps the weights of the best check."""
  seen, accuracies = [], iter([0.6, 0.7, 0.1, 0.9])

  def fake_guard(module, recipe):
    def accuracy(variables, images, labels, key):
      seen.append(jax.tree.map(np.asarray, variables))
      return next(accuracies)
    return accuracy

  monkeypatch.setattr(guard_module, "make_guard", fake_guard)
  result = train.train_and_evaluate("mnist_lenet_pgd", seed=0, data_dir=data_dir,
                                    out_dir=tmp_path, epochs=2, train_limit=32,
                                    test_limit=16, progress=False, batch_size=8)
  guard = result.meta["overfit_guard"]
  assert guard["pgd10_train_accuracy_per_check"] == [0.6, 0.7, 0.1]
  assert guard["stopped_at"] == {"epoch": 1, "fraction_of_epoch": 0.75}
  assert guard["kept"] == "check 2 of 3"
  for a, b in zip(jax.tree.leaves(seen[1]), jax.tree.leaves(result.variables), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_attack_tables_apply_per_dataset():
  cfg = config.load("robustness", quick=True)
  eps = {(c.model, c.attack): c.params.get("eps") for c in cfg.cells()
         if c.attack in ("fgsm", "pgd")}
  assert eps[("mnist_lenet_pgd", "pgd")] == 0.3
  assert eps[("fashion_mnist_lenet", "fgsm")] == 0.1
  assert eps[("cifar10_resnet20_adv", "pgd")] == pytest.approx(8 / 255)
  assert sum(1 for (m, a) in eps if m == "cifar10_vgg") == 2  # one FGSM, one PGD cell
  with pytest.raises(config.ConfigError, match="unknown dataset 'mnsit'"):
    config.load("robustness", ["attacks.fgsm.dataset=['mnsit', 'fashion_mnist', 'cifar10']"])
