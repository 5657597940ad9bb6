"""Trained generators: AdvGAN's, one per target model, budget and mode, found or trained and
cached (`bind`, `advgan_generator`); the DCGAN's (`train_dcgan`, `load_dcgan`). Each is a
checkpoint as the zoo's: flax msgpack weights and a JSON file with their sha256, the target
model's sha256 and the recipe.

An AdvGAN generator is looked up first among the shipped ones (`models/trained/gan/`), then
in the generator cache (`$ADVSWEEP_GENERATOR_DIR`, else `~/.cache/advsweep/advgan`); where
neither has it, `bind` trains it on the target's training split (minutes on a CPU for the
zoo's MNIST models) and caches it, so a sweep trains each generator once.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from advsweep.attacks import common
from advsweep.attacks.advgan import core as advgan_core
from advsweep.attacks.advgan import training as advgan_training
from advsweep.models import checkpoints, datasets, zoo
from advsweep.models.gan import dcgan, loop
from advsweep.models.training import state as state_lib

SHIPPED_DIR = zoo.CHECKPOINT_DIR / "gan"
GENERATOR_DIR_ENV = "ADVSWEEP_GENERATOR_DIR"
ADVGAN_METRICS = ("g_loss", "d_loss", "margin", "success")
DCGAN_METRICS = ("g_loss", "d_loss", "d_real", "d_fake")
EVAL_IMAGES = 1000  # test images a trained generator's success is measured on


def generator_dir() -> Path:
  """Where trained AdvGAN generators are cached."""
  if os.environ.get(GENERATOR_DIR_ENV):
    return Path(os.environ[GENERATOR_DIR_ENV]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "advsweep" / "advgan"


def advgan_name(model: zoo.Model, recipe: advgan_training.AdvGANRecipe) -> str:
  """The checkpoint name of the generator of `recipe` against `model` (its weights' sha256
  in the name: another training of the model gets another generator)."""
  slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.name)
  mode = "targeted" if recipe.targeted else "untargeted"
  return (f"advgan-{slug}-{model.meta['sha256'][:12]}-linf{recipe.eps:g}-{mode}-"
          f"{recipe_tag(recipe)}")


def recipe_tag(recipe: advgan_training.AdvGANRecipe) -> str:
  """8 hex digits of the sha256 of the recipe's loss and networks: generators of another
  loss get other files. The run's length (epochs, batch size) is left out: a longer or
  shorter training of the same generator replaces it (its metadata says which it is)."""
  fields = {k: v for k, v in dataclasses.asdict(recipe).items()
            if k not in ("epochs", "batch_size")}
  text = json.dumps(fields, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:8]


def _dataset_of(model: zoo.Model) -> str:
  dataset = model.meta.get("dataset")
  if not dataset:
    raise ValueError(f"model {model.name} names no dataset, so AdvGAN has nothing to train "
                     "its generator on; give it one (custom.model(..., dataset=...))")
  return dataset


def _num_classes(model: zoo.Model, image_shape: tuple[int, ...]) -> int:
  return int(jax.eval_shape(model.apply_fn, model.params,
                            jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)).shape[-1])


def train_advgan(model: zoo.Model, recipe: advgan_training.AdvGANRecipe, out_path: Path, *,
                 data_dir: str | os.PathLike | None = None, seed: int = 0,
                 train_limit: int | None = None, progress: bool = True,
                 checkpoint_seconds: float = state_lib.CHECKPOINT_SECONDS) -> dict:
  """Trains AdvGAN's generator against `model` on its training split and writes it to
  `out_path` (`.msgpack` and `.json`); resumable from `out_path`'s resume file. Returns
  the metadata, with the generator's success on the first `EVAL_IMAGES` test images."""
  dataset = _dataset_of(model)
  images, labels = datasets.load(dataset, "train", data_dir)
  images, labels = images[:train_limit], labels[:train_limit]
  shape = tuple(images.shape[1:])
  num_classes = _num_classes(model, shape)
  gen, disc = advgan_training.init(jax.random.key(seed), recipe, shape, num_classes)
  tx = advgan_training.optimizer(recipe)
  fingerprint = json.dumps({"advgan": dataclasses.asdict(recipe), "model": model.name,
                            "model_sha256": model.meta["sha256"], "seed": seed,
                            "train_limit": train_limit}, sort_keys=True)
  state = loop.GanState.start(gen, disc, tx.init(gen), tx.init(disc), recipe.epochs,
                              len(ADVGAN_METRICS), fingerprint)
  target_fn = model.attack_apply_fn()
  step = advgan_training.make_step(target_fn, recipe, num_classes)
  target_params = model.params
  bound = lambda *args: step(target_params, *args)  # noqa: E731
  state = loop.train(out_path.stem, state, bound, images, labels, epochs=recipe.epochs,
                     batch_size=recipe.batch_size, seed=seed, metric_names=ADVGAN_METRICS,
                     state_file=out_path.with_suffix(state_lib.RESUME_SUFFIX),
                     progress=progress, checkpoint_seconds=checkpoint_seconds)
  config = advgan_core.AdvGANConfig(
      eps=recipe.eps, width=recipe.width, generator=state.generator, image_shape=shape,
      target=common.RANDOM if recipe.targeted else common.UNTARGETED)
  test_x, test_y = datasets.load(dataset, "test", data_dir)
  scores = success_on(model, config, test_x[:EVAL_IMAGES], test_y[:EVAL_IMAGES], seed)
  meta = {
      "kind": "advgan_generator", "target_model": model.name,
      "target_sha256": model.meta["sha256"], "dataset": dataset,
      "image_shape": list(shape), "num_classes": num_classes,
      "recipe": dataclasses.asdict(recipe), "seed": seed, "train_limit": train_limit,
      "train_examples": len(labels),
      "history": {m: [round(float(v), 4) for v in state.history[:, i]]
                  for i, m in enumerate(ADVGAN_METRICS)},
      **scores, "train_seconds": round(float(state.train_seconds), 1),
      "device": jax.devices()[0].device_kind, **_provenance()}
  return checkpoints.save(out_path, state.generator, meta)


def success_on(model: zoo.Model, config: advgan_core.AdvGANConfig, images_u8: np.ndarray,
               labels: np.ndarray, seed: int) -> dict[str, Any]:
  """The attack's success rate over the clean-correct images among `images_u8`."""
  images = jnp.asarray(images_u8, jnp.float32) / 255.0
  labels = jnp.asarray(labels, jnp.int32)
  result = advgan_core.advgan(model.apply_fn, model.params, images, labels,
                              jax.random.key(seed), config)
  clean = np.asarray(jnp.argmax(jax.jit(model.apply_fn)(model.params, images), -1))
  keep = clean == np.asarray(labels)
  success = np.asarray(result.success)[keep]
  return {"eval_images": len(keep), "eval_clean_correct": int(keep.sum()),
          "eval_success_rate": round(float(success.mean()), 4) if keep.any() else None,
          "eval_mode": config.target}


def _provenance() -> dict[str, Any]:
  return {"created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
          "versions": {p: importlib.metadata.version(p) for p in ("jax", "flax", "optax")}}


def find_advgan(model: zoo.Model, recipe: advgan_training.AdvGANRecipe,
                folders: list[Path] | None = None) -> Path | None:
  """The checkpoint of `recipe`'s generator against `model`, shipped or cached, or None."""
  name = advgan_name(model, recipe) + ".msgpack"
  for folder in folders if folders is not None else [SHIPPED_DIR, generator_dir()]:
    if (Path(folder) / name).is_file():
      return Path(folder) / name
  return None


def find_for(config: advgan_core.AdvGANConfig, model: zoo.Model) -> Path | None:
  """The checkpoint of the generator an attack config needs against `model`, or None."""
  return find_advgan(model, recipe_for(config))


def load_generator(path: Path, model: zoo.Model, recipe: advgan_training.AdvGANRecipe
                   ) -> tuple[Any, dict]:
  """A generator's variables and metadata, checked against its sha256 and `model`."""
  meta = checkpoints.load_meta(path)
  if meta.get("target_sha256") != model.meta["sha256"]:
    raise checkpoints.CheckpointError(
        f"{path}: a generator trained against other weights of {meta.get('target_model')} "
        "than the model given; delete it to train a new one")
  shape, num_classes = tuple(meta["image_shape"]), int(meta["num_classes"])
  target, _ = jax.eval_shape(lambda: advgan_training.init(jax.random.key(0), recipe, shape,
                                                          num_classes))
  target = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), target)
  return checkpoints.load(path, target, meta), meta


def advgan_generator(model: zoo.Model, recipe: advgan_training.AdvGANRecipe, *,
                     data_dir: str | os.PathLike | None = None, train: bool = True,
                     progress: bool = True, seed: int = 0) -> tuple[Any, dict]:
  """The generator of `recipe` against `model`: shipped, cached, or (with `train`) trained
  now and cached. Returns its variables and metadata (`sha256` among them)."""
  path = find_advgan(model, recipe)
  if path is None:
    if not train:
      raise FileNotFoundError(
          f"no AdvGAN generator against {model.name} (eps {recipe.eps:g}, "
          f"{'targeted' if recipe.targeted else 'untargeted'}) in {SHIPPED_DIR} or "
          f"{generator_dir()}; train it with `advsweep gan advgan {model.name} --eps "
          f"{recipe.eps:g}`")
    path = generator_dir() / (advgan_name(model, recipe) + ".msgpack")
    print(f"training AdvGAN's generator against {model.name} ({recipe.epochs} epochs); "
          f"cached in {path}", flush=True)
    train_advgan(model, recipe, path, data_dir=data_dir, seed=seed, progress=progress)
  return load_generator(path, model, recipe)


def recipe_for(config: advgan_core.AdvGANConfig) -> advgan_training.AdvGANRecipe:
  """The training recipe of the generator an attack config needs (the default recipe at its
  eps, mode and width)."""
  return advgan_training.AdvGANRecipe(eps=float(config.eps), targeted=config.targeted,
                                      width=config.width)


def bind(config: Any, model: zoo.Model, field: str = advgan_core.GENERATOR_FIELD, *,
         data_dir: str | os.PathLike | None = None, progress: bool = True
         ) -> tuple[Any, str]:
  """`config` with its `field` set to the generator trained against `model` (found, or
  trained and cached), and that generator's sha256."""
  generator, meta = advgan_generator(model, recipe_for(config), data_dir=data_dir,
                                     progress=progress)
  bound = dataclasses.replace(config, **{field: generator})
  if hasattr(bound, "image_shape"):
    bound = dataclasses.replace(bound, image_shape=tuple(meta["image_shape"]))
  return bound, meta["sha256"]


def train_dcgan(dataset: str, recipe: dcgan.DCGANRecipe, out_path: Path, *,
                data_dir: str | os.PathLike | None = None, seed: int = 0,
                train_limit: int | None = None, progress: bool = True,
                checkpoint_seconds: float = state_lib.CHECKPOINT_SECONDS) -> dict:
  """Trains the class-conditional DCGAN on `dataset`'s training split and writes its
  generator (inference variables) to `out_path`; resumable. Returns the metadata."""
  info = datasets.info(dataset)
  images, labels = datasets.load(dataset, "train", data_dir)
  images, labels = images[:train_limit], labels[:train_limit]
  gen, disc = dcgan.init(jax.random.key(seed), recipe, info.shape, info.num_classes)
  tx = dcgan.optimizer(recipe)
  fingerprint = json.dumps({"dcgan": dataclasses.asdict(recipe), "dataset": dataset,
                            "seed": seed, "train_limit": train_limit}, sort_keys=True)
  state = loop.GanState.start(gen, disc, tx.init(gen["params"]), tx.init(disc["params"]),
                              recipe.epochs, len(DCGAN_METRICS), fingerprint)
  step = dcgan.make_step(recipe, info.shape, info.num_classes)
  state = loop.train(out_path.stem, state, step, images, labels, epochs=recipe.epochs,
                     batch_size=recipe.batch_size, seed=seed, metric_names=DCGAN_METRICS,
                     state_file=out_path.with_suffix(state_lib.RESUME_SUFFIX),
                     progress=progress, checkpoint_seconds=checkpoint_seconds)
  meta = {
      "kind": "dcgan_generator", "dataset": dataset, "recipe": dataclasses.asdict(recipe),
      "seed": seed, "train_limit": train_limit, "train_examples": len(labels),
      "history": {m: [round(float(v), 4) for v in state.history[:, i]]
                  for i, m in enumerate(DCGAN_METRICS)},
      "train_seconds": round(float(state.train_seconds), 1),
      "device": jax.devices()[0].device_kind, **_provenance()}
  return checkpoints.save(out_path, state.generator, meta)


def load_dcgan(path: str | os.PathLike) -> tuple[Any, dict, dcgan.DCGANRecipe]:
  """The DCGAN generator's variables, metadata and recipe from its checkpoint."""
  path = Path(path)
  meta = checkpoints.load_meta(path)
  if meta.get("kind") != "dcgan_generator":
    raise checkpoints.CheckpointError(f"{path}: not a DCGAN generator checkpoint")
  recipe = dcgan.DCGANRecipe(**meta["recipe"])
  info = datasets.info(meta["dataset"])
  target, _ = jax.eval_shape(lambda: dcgan.init(jax.random.key(0), recipe, info.shape,
                                                info.num_classes))
  target = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), target)
  return checkpoints.load(path, target, meta), meta, recipe
