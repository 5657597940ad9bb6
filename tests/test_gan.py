"""AdvGAN and the DCGAN: the generator's output within the budget, the attack's targets,
the training steps against eager references, resumption to the same weights, the Frechet
distance against its closed form, the driver's binding and the bad inputs."""

from __future__ import annotations

import json

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advsweep import attacks
from advsweep.attacks.advgan import core as advgan_core
from advsweep.attacks.advgan import training
from advsweep.attacks.advgan.networks import Discriminator, PerturbationGenerator
from advsweep.bench import cli
from advsweep.bench.driver import config as config_lib
from advsweep.bench.driver import results, sweep
from advsweep.models import checkpoints, zoo
from advsweep.models.gan import dcgan, generators, loop, quality
from tests import attack_models
from tests.conftest import requires_data


def _images(n, shape=(8, 8, 1), seed=0):
  """Images with pixels at 0 and 1 too, where clipping decides."""
  images = np.array(attack_models.random_images(n, *shape, seed=seed))
  images[:, 0, :, :] = 0.0
  images[:, -1, :, :] = 1.0
  return jnp.asarray(images)


@pytest.mark.parametrize("target", ["untargeted", "random", "explicit", "least_likely"])
@pytest.mark.parametrize("eps", [0.0, 0.03, 0.3, 1.0])
def test_adversarial_images_stay_within_eps_and_the_image_range(eps, target):
  apply_fn, params = attack_models.small_cnn(8, 8, 1, num_classes=5)
  images = _images(6)
  labels = jnp.argmax(apply_fn(params, images), -1)
  config = attack_models.advgan_config((8, 8, 1), 5, eps=eps, target=target)
  targets = (labels + 1) % 5 if target == "explicit" else None
  result = attacks.advgan(apply_fn, params, images, labels, jax.random.key(0), config,
                          targets=targets)
  delta = np.asarray(result.adv_images) - np.asarray(images)
  assert np.abs(delta).max() <= eps + 1e-6
  adv = np.asarray(result.adv_images)
  assert adv.min() >= 0.0 and adv.max() <= 1.0
  if eps > 0:
    assert np.abs(delta).max() > 0.5 * eps  # a tanh output near +-1 somewhere: it perturbs
  if target == "explicit":
    np.testing.assert_array_equal(result.target, targets)
  elif target == "least_likely":
    np.testing.assert_array_equal(result.target, jnp.argmin(apply_fn(params, images), -1))
    assert set(np.asarray(result.queries).tolist()) == {1}
  else:
    assert set(np.asarray(result.queries).tolist()) == {0}  # the model is not queried


def test_the_targeted_generator_reads_the_target():
  """One generator for every target: the target class changes the perturbation."""
  config = attack_models.advgan_config((8, 8, 1), 5, eps=0.2, target="explicit")
  images = _images(3)
  one = advgan_core.perturb(config.generator, images, jnp.asarray([1, 1, 1]), 0.2,
                            num_classes=5, targeted=True, width=8)
  two = advgan_core.perturb(config.generator, images, jnp.asarray([2, 2, 2]), 0.2,
                            num_classes=5, targeted=True, width=8)
  assert float(jnp.max(jnp.abs(one - two))) > 1e-3


def test_a_batch_perturbs_each_image_as_it_would_alone():
  """Instance norm: no image's perturbation depends on the others in the batch."""
  config = attack_models.advgan_config((8, 8, 1), 5, eps=0.2)
  images = _images(4)
  batch = advgan_core.perturb(config.generator, images, None, 0.2, num_classes=5,
                              targeted=False, width=8)
  for i in range(4):
    alone = advgan_core.perturb(config.generator, images[i:i + 1], None, 0.2, num_classes=5,
                                targeted=False, width=8)
    np.testing.assert_allclose(batch[i:i + 1], alone, atol=1e-6)


def test_the_margin_loss_by_hand():
  logits = jnp.asarray([[3.0, 1.0, 2.5], [0.0, 4.0, 1.0]])
  labels = jnp.asarray([0, 0])
  # untargeted: Z_y - max_{i != y} Z_i, floored at -kappa
  np.testing.assert_allclose(training.margin_loss(logits, labels, None, 0.0), [0.5, 0.0])
  np.testing.assert_allclose(training.margin_loss(logits, labels, None, 10.0), [0.5, -4.0])
  # targeted at class 2: max_{i != t} Z_i - Z_t
  np.testing.assert_allclose(training.margin_loss(logits, labels, jnp.asarray([2, 2]), 10.0),
                             [0.5, 3.0])


def _eager_advgan_step(apply_fn, target_params, recipe, num_classes, gen, disc, images,
                       labels):
  """The paper's losses written out without jit, numpy for the margin: the reference."""
  tx = optax.sgd(1.0)
  gen_net = PerturbationGenerator(num_classes, False, recipe.width)
  disc_net = Discriminator(recipe.width)

  def adv_of(g):
    delta = recipe.eps * gen_net.apply(g, images, None)
    return jnp.clip(images + delta, 0, 1)

  adv = adv_of(gen)
  with jax.disable_jit():
    d_grads = jax.grad(lambda d: -jnp.mean(jnp.log(jax.nn.sigmoid(disc_net.apply(d, images))))
                       - jnp.mean(jnp.log(1 - jax.nn.sigmoid(disc_net.apply(d, adv)))))(disc)
    updates, _ = tx.update(d_grads, tx.init(disc), disc)
    disc = optax.apply_updates(disc, updates)

    def g_loss(g):
      x = adv_of(g)
      z = apply_fn(target_params, x)
      own = z[jnp.arange(len(labels)), labels]
      others = jnp.where(jax.nn.one_hot(labels, num_classes) > 0, -1e9, z).max(-1)
      margin = jnp.maximum(own - others, -recipe.kappa).mean()
      gan = -jnp.mean(jnp.log(jax.nn.sigmoid(disc_net.apply(disc, x))))
      norms = jnp.sqrt(jnp.sum((x - images) ** 2, axis=(1, 2, 3)))
      bound = recipe.hinge_bound * recipe.eps * np.sqrt(np.prod(images.shape[1:]))
      hinge = jnp.maximum(norms - bound, 0).mean()
      return recipe.adv_weight * margin + recipe.gan_weight * gan + recipe.hinge_weight * hinge

    g_grads = jax.grad(g_loss)(gen)
    updates, _ = tx.update(g_grads, tx.init(gen), gen)
  return optax.apply_updates(gen, updates), disc


def _same_step(new, ref, old):
  """The two updates agree to 0.5% of the update's largest entry (float32 noise through
  instance norm, jitted against eager, reaches about 0.15% of it; a loss term left out or
  weighted wrong moves entries by their own size)."""
  flat = lambda t: jax.flatten_util.ravel_pytree(t)[0]  # noqa: E731
  ours, theirs = flat(new) - flat(old), flat(ref) - flat(old)
  assert float(jnp.max(jnp.abs(theirs))) > 0
  assert float(jnp.max(jnp.abs(ours - theirs))) <= 5e-3 * float(jnp.max(jnp.abs(theirs)))


def test_the_advgan_training_step_equals_an_eager_reference():
  # 16 x 16: the discriminator's last instance norm sees 2 x 2 (on 1 x 1 it outputs zero).
  apply_fn, params = attack_models.small_cnn(16, 16, 1, num_classes=5)
  recipe = training.AdvGANRecipe(eps=0.2, hinge_bound=0.1)  # the hinge active
  gen, disc = training.init(jax.random.key(0), recipe, (16, 16, 1), 5)
  images = _images(6, (16, 16, 1))
  labels = jnp.argmax(apply_fn(params, images), -1)
  # Plain gradient steps: Adam's first step is lr * sign(g), which amplifies the float noise
  # of near-zero gradients; the step's gradients themselves are what is compared.
  tx = optax.sgd(1.0)
  step = training.make_step(apply_fn, recipe, 5, tx)
  new_gen, new_disc, _, _, metrics = step(params, gen, disc, tx.init(gen), tx.init(disc),
                                          images, labels, jax.random.key(1))
  ref_gen, ref_disc = _eager_advgan_step(apply_fn, params, recipe, 5, gen, disc, images,
                                         labels)
  _same_step(new_disc, ref_disc, disc)
  _same_step(new_gen, ref_gen, gen)
  assert np.isfinite(np.asarray(metrics)).all()


def test_the_dcgan_step_equals_an_eager_reference():
  recipe = dcgan.DCGANRecipe(latent=4, width=4)
  shape, classes = (8, 8, 1), 3
  gen, disc = dcgan.init(jax.random.key(0), recipe, shape, classes)
  tx = optax.sgd(1.0)  # as above: gradients compared, not Adam's sign-like first step
  images, labels = _images(4), jnp.asarray([0, 1, 2, 0])
  key = jax.random.key(3)
  step = dcgan.make_step(recipe, shape, classes, tx)
  new_gen, new_disc, _, _, _ = step(gen, disc, tx.init(gen["params"]),
                                    tx.init(disc["params"]), images, labels, key)
  gen_net, disc_net = dcgan.networks(recipe, shape, classes)
  d_key, g_key = jax.random.split(key)
  with jax.disable_jit():
    z = jax.random.normal(d_key, (4, recipe.latent))
    fake, _ = gen_net.apply(gen, z, labels, train=True, mutable=["batch_stats"])

    def d_loss(p):
      real, upd = disc_net.apply({**disc, "params": p}, images, labels, mutable=["batch_stats"])
      made, upd = disc_net.apply({**disc, "params": p, **upd}, fake, labels,
                                 mutable=["batch_stats"])
      loss = (-jnp.mean(jnp.log(jax.nn.sigmoid(real)))
              - jnp.mean(jnp.log(1 - jax.nn.sigmoid(made))))
      return loss, upd

    grads, upd = jax.grad(d_loss, has_aux=True)(disc["params"])
    updates, _ = tx.update(grads, tx.init(disc["params"]), disc["params"])
    ref_disc = {**disc, **upd, "params": optax.apply_updates(disc["params"], updates)}

    def g_loss(p):
      z = jax.random.normal(g_key, (4, recipe.latent))
      made, _ = gen_net.apply({**gen, "params": p}, z, labels, train=True,
                              mutable=["batch_stats"])
      logits, _ = disc_net.apply(ref_disc, made, labels, mutable=["batch_stats"])
      return -jnp.mean(jnp.log(jax.nn.sigmoid(logits)))

    grads = jax.grad(g_loss)(gen["params"])
    updates, _ = tx.update(grads, tx.init(gen["params"]), gen["params"])
  _same_step(new_disc["params"], ref_disc["params"], disc["params"])
  _same_step(new_gen["params"], optax.apply_updates(gen["params"], updates), gen["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new_disc["batch_stats"], ref_disc["batch_stats"])
  samples = dcgan.sample(new_gen, recipe, shape, classes, labels, key)
  assert samples.shape == images.shape
  assert float(samples.min()) >= 0 and float(samples.max()) <= 1


def _dcgan_run(tmp_path, interrupt_after=None):
  recipe = dcgan.DCGANRecipe(latent=4, width=4, batch_size=4, epochs=2)
  shape, classes = (8, 8, 1), 3
  gen, disc = dcgan.init(jax.random.key(0), recipe, shape, classes)
  tx = dcgan.optimizer(recipe)
  state = loop.GanState.start(gen, disc, tx.init(gen["params"]), tx.init(disc["params"]),
                              recipe.epochs, 4, "fingerprint")
  images = (np.asarray(_images(12)) * 255).astype(np.uint8)
  labels = np.arange(12) % 3
  saves = []

  def on_checkpoint(epoch, step):
    saves.append((epoch, step))
    if interrupt_after is not None and len(saves) >= interrupt_after:
      raise KeyboardInterrupt

  return loop.train("toy", state, dcgan.make_step(recipe, shape, classes), images, labels,
                    epochs=recipe.epochs, batch_size=4, seed=5, metric_names=list("abcd"),
                    state_file=tmp_path / "toy.resume.msgpack", progress=False,
                    checkpoint_seconds=0.0, on_checkpoint=on_checkpoint)


def test_a_killed_gan_training_resumes_to_the_same_weights(tmp_path):
  whole = _dcgan_run(tmp_path / "whole")
  for interrupt_after in (1, 3):  # mid first epoch; mid second epoch
    folder = tmp_path / f"cut{interrupt_after}"
    with pytest.raises(KeyboardInterrupt):
      _dcgan_run(folder, interrupt_after)
    assert (folder / "toy.resume.msgpack").is_file()
    resumed = _dcgan_run(folder)
    assert not (folder / "toy.resume.msgpack").exists()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 (resumed.generator, resumed.discriminator, resumed.history),
                 (whole.generator, whole.discriminator, whole.history))


def test_the_frechet_distance_against_its_closed_form():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4000, 3))
  shift = np.asarray([1.0, -2.0, 0.5])
  # Same covariance, shifted mean: the distance is ||shift||^2 (up to sampling).
  assert quality.frechet_distance(a, a + shift) == pytest.approx(np.sum(shift ** 2), rel=1e-6)
  # Scaled by s: Tr(S + s^2 S - 2 s S) = (1 - s)^2 Tr(S) for S of a, with no shift.
  cov = np.cov(a, rowvar=False)
  assert quality.frechet_distance(a, 3.0 * a) == pytest.approx(
      np.sum((3.0 * a.mean(0) - a.mean(0)) ** 2) + 4.0 * np.trace(cov), rel=1e-6)
  with pytest.raises(ValueError, match="one D"):
    quality.frechet_distance(a, a[:, :2])


def test_a_generator_of_another_image_size_is_refused_by_name():
  apply_fn, params = attack_models.small_cnn(8, 8, 1, num_classes=5)
  config = attack_models.advgan_config((28, 28, 1), 5)
  with pytest.raises(ValueError, match="trained on 28x28x1 images, the images given are 8x8x1"):
    attacks.advgan(apply_fn, params, _images(2), jnp.asarray([0, 1]), jax.random.key(0),
                   config)
  unbound = attacks.AdvGANConfig()
  with pytest.raises(ValueError, match="needs a generator trained against the model"):
    attacks.advgan(apply_fn, params, _images(2), jnp.asarray([0, 1]), jax.random.key(0),
                   unbound)


def test_configs_refuse_a_generator_field_and_a_stranger_in_models():
  with pytest.raises(config_lib.ConfigError, match="trained against each model by the driver"):
    config_lib.check_attack_field("advgan", "generator")
  raw = {"name": "x", "models": ["mnist_lenet"], "attacks": {"advgan": {
      "models": ["mnist_softmax"]}}}
  with pytest.raises(config_lib.ConfigError, match="not among the config's models"):
    config_lib._check_attacks(raw["attacks"], raw["models"], "x")


@pytest.mark.parametrize("argv,phrase", [
    (["gan", "advgan", "mnist_lenet", "--eps", "-0.1"], "--eps must lie in [0, 1]"),
    (["gan", "advgan", "mnist_lenet", "--eps", "1.5"], "--eps must lie in [0, 1]"),
    (["attack", "mnist_lenet", "advgan", "--set", "eps=-0.1"], "eps must be >= 0"),
    (["attack", "mnist_lenet", "advgan", "--set", "target=sideways"], "unknown target mode"),
    (["attack", "mnist_lenet", "advgan", "--set", "generator=1"],
     "trained against each model by the driver"),
])
def test_bad_gan_input_is_one_line_and_writes_nothing(argv, phrase, tmp_path, capsys,
                                                      monkeypatch):
  monkeypatch.setenv(generators.GENERATOR_DIR_ENV, str(tmp_path / "cache"))
  assert cli.main([*argv, *(["--out", str(tmp_path / "out")] if argv[0] == "gan" else [])]) == 2
  err = capsys.readouterr().err.strip()
  assert phrase in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@requires_data
def test_a_sweep_binds_the_cached_generator_and_records_its_sha256(data_dir, tmp_path,
                                                                   monkeypatch):
  """The driver finds the generator trained against the model in the cache (here a tiny
  one, against a model without a shipped generator), runs AdvGAN with it and writes its
  sha256 in every row; the other attacks' rows have none."""
  monkeypatch.setenv(generators.GENERATOR_DIR_ENV, str(tmp_path / "cache"))
  model = zoo.load("mnist_softmax")
  assert generators.find_advgan(model, training.AdvGANRecipe()) is None
  recipe = training.AdvGANRecipe(eps=0.3, epochs=1, batch_size=16)
  path = generators.generator_dir() / (generators.advgan_name(model, recipe) + ".msgpack")
  meta = generators.train_advgan(model, recipe, path, data_dir=data_dir, train_limit=32,
                                 progress=False)
  assert meta["train_examples"] == 32 and meta["eval_images"] == generators.EVAL_IMAGES
  toml = tmp_path / "gan.toml"
  toml.write_text('name = "gan"\nmodels = ["mnist_softmax"]\nbatch_size = 4\n'
                  '[images]\nper_bin = 4\n[attacks.advgan]\neps = 0.3\n'
                  '[attacks.fgsm]\neps = 0.1\n')
  config = config_lib.load(str(toml))
  sweep.run(config, tmp_path / "run", data_dir=str(data_dir), progress=False,
            log=lambda _: None)
  table = results.read_run(tmp_path / "run")
  cols = table.to_pydict()
  by_attack = {a: {s for s, b in zip(cols["attack_weights_sha256"], cols["attack"],
                                     strict=True) if b == a} for a in ("advgan", "fgsm")}
  assert by_attack == {"advgan": {meta["sha256"]}, "fgsm": {None}}
  linf = [v for v, a in zip(cols["linf"], cols["attack"], strict=True) if a == "advgan"]
  assert max(linf) <= 0.3 + 1e-5 and all(cols["valid"])
  config_json = next(c for c, a in zip(cols["config_json"], cols["attack"], strict=True)
                     if a == "advgan")
  assert json.loads(config_json) == {"attack": "advgan", "eps": 0.3, "target": "untargeted",
                                     "width": 8, "target_class": None}
  # A generator file that does not match its sha256 is refused, not half-loaded.
  path.write_bytes(path.read_bytes()[:-3] + b"xyz")
  with pytest.raises(checkpoints.CheckpointError, match="sha256"):
    generators.advgan_generator(model, recipe, train=False)


@requires_data
def test_the_shipped_generator_fools_mnist_lenet_from_the_command_line(data_dir, capsys,
                                                                     monkeypatch):
  """`advsweep attack mnist_lenet advgan` binds the shipped generator (never trains one
  here: the cache is empty) and names it; it fools the LeNet on most images at eps 0.3."""
  monkeypatch.setenv(generators.GENERATOR_DIR_ENV, "/nonexistent/advgan-cache")
  model = zoo.load("mnist_lenet")
  path = generators.find_for(attacks.AdvGANConfig(eps=0.3), model)
  assert path is not None and path.parent == generators.SHIPPED_DIR
  assert cli.main(["attack", "mnist_lenet", "advgan", "-n", "64", "--data-dir",
                   str(data_dir)]) == 0
  out = capsys.readouterr().out
  assert f"weights sha256 {checkpoints.load_meta(path)['sha256']}" in out
  assert "generator=None" in out  # the summary shows the config, not the weights
  rate = float(out.split("success_rate")[1].split()[0])
  assert rate >= 0.9
