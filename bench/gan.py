"""`advsweep gan`: train the class-conditional DCGAN and AdvGAN's generators, and measure
them (the DCGAN's class accuracy and Frechet distance; a generator's success rate)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from advsweep.attacks.advgan import training as advgan_training
from advsweep.models import checkpoints, custom, datasets, zoo
from advsweep.models.gan import dcgan, generators, quality

SAMPLES_PER_CLASS = 500  # generated images of each class the DCGAN is measured on
REAL_IMAGES = 5000  # test images its samples are compared with; the Frechet distance is
# biased at small n, so it is read only beside real images' distance at the same n
JUDGE = {"mnist": "mnist_lenet", "fashion_mnist": "fashion_mnist_lenet",
         "cifar10": "cifar10_resnet20"}  # the zoo classifier that judges a dataset's samples


def dcgan_quality(generator: Any, meta: dict, recipe: dcgan.DCGANRecipe,
                  data_dir: str | os.PathLike | None = None, seed: int = 0) -> dict[str, Any]:
  """The DCGAN's samples measured: the dataset's zoo classifier's accuracy on
  `SAMPLES_PER_CLASS` samples of each class, and the Frechet distance of its features
  between the samples and the first `REAL_IMAGES` test images, beside the distance between
  those test images and as many training images (what real images score)."""
  dataset = meta["dataset"]
  info = datasets.info(dataset)
  judge = zoo.load(JUDGE[dataset])
  classes = np.repeat(np.arange(info.num_classes), SAMPLES_PER_CLASS)
  samples = np.asarray(dcgan.sample(generator, recipe, info.shape, info.num_classes,
                                    classes, jax.random.key(seed)))
  test_x, _ = datasets.load(dataset, "test", data_dir)
  train_x, _ = datasets.load(dataset, "train", data_dir)
  real = jnp.asarray(test_x[:REAL_IMAGES], jnp.float32) / 255.0
  other = jnp.asarray(train_x[:REAL_IMAGES], jnp.float32) / 255.0
  real_features = quality.features(judge, real)
  return {
      "judge": judge.name, "samples": len(classes),
      **{f"class_{k}": v for k, v in quality.class_accuracy(judge, samples, classes).items()},
      "frechet_distance": round(quality.frechet_distance(
          quality.features(judge, samples), real_features), 3),
      "frechet_distance_real_train_vs_test": round(quality.frechet_distance(
          quality.features(judge, other), real_features), 3),
      "real_images": REAL_IMAGES}


def train_dcgan(dataset: str, out: Path, *, epochs: int | None, seed: int,
                data_dir: str | None, train_limit: int | None, progress: bool) -> dict:
  """Trains (or resumes) the DCGAN, measures it, and rewrites its metadata with the
  figures."""
  recipe = dcgan.DCGANRecipe()
  if epochs is not None:
    recipe = dataclasses.replace(recipe, epochs=epochs)
  generators.train_dcgan(dataset, recipe, out, data_dir=data_dir, seed=seed,
                         train_limit=train_limit, progress=progress)
  generator, meta, recipe = generators.load_dcgan(out)
  meta = dict(meta, quality=dcgan_quality(generator, meta, recipe, data_dir, seed))
  checkpoints.write_meta(out, meta)
  return meta


def train_advgan(reference: str, *, eps: float, targeted: bool, epochs: int | None,
                 kappa: float | None,
                 seed: int, data_dir: str | None, out_dir: Path | None,
                 checkpoint_dir: str | None, train_limit: int | None, progress: bool) -> dict:
  """Trains (or resumes) AdvGAN's generator against a model; writes it to `out_dir` (default:
  the generator cache, where sweeps find it)."""
  if eps < 0 or eps > 1:
    raise ValueError(f"--eps must lie in [0, 1] (pixels in [0, 1]); got {eps}")
  model = custom.resolve(reference, checkpoint_dir)
  recipe = advgan_training.AdvGANRecipe(eps=eps, targeted=targeted)
  if epochs is not None:
    recipe = dataclasses.replace(recipe, epochs=epochs)
  if kappa is not None:
    if kappa < 0:
      raise ValueError(f"--kappa must be >= 0 (the margin's confidence); got {kappa}")
    recipe = dataclasses.replace(recipe, kappa=kappa)
  folder = out_dir if out_dir is not None else generators.generator_dir()
  path = Path(folder) / (generators.advgan_name(model, recipe) + ".msgpack")
  return {**generators.train_advgan(model, recipe, path, data_dir=data_dir, seed=seed,
                                    train_limit=train_limit, progress=progress),
          "path": str(path)}
