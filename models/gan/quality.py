"""How good a generator's samples are, measured rather than shown: the zoo classifier's
accuracy on generated images of each requested class, and the Frechet distance between the
classifier's penultimate features of the samples and of real test images (Heusel et al.'s
FID, with the zoo LeNet in place of Inception: the usual substitute on MNIST)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from advsweep.models import architectures, zoo

FEATURE_BATCH = 500


def features(model: zoo.Model, images: np.ndarray | jax.Array) -> np.ndarray:
  """[N, D] the model's penultimate features (`architectures.penultimate`) of images in
  [0, 1], in batches."""
  out = [np.asarray(_penultimate(model, model.params,
                                 jnp.asarray(images[start:start + FEATURE_BATCH])), np.float64)
         for start in range(0, len(images), FEATURE_BATCH)]
  return np.concatenate(out)


@functools.partial(jax.jit, static_argnums=0)  # compiled once per model (and batch shape)
def _penultimate(model: zoo.Model, params: Any, images: jax.Array) -> jax.Array:
  return architectures.penultimate(model.intermediates(params, images)[1])


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """The Frechet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]:
  ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017, Eq. 6)."""
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"feature sets must be [N, D] of one D; got {a.shape} and {b.shape}")
  if min(len(a), len(b)) < 2:
    raise ValueError("each feature set needs at least 2 rows for a covariance")
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = scipy.linalg.sqrtm(cov_a @ cov_b)
  root = np.real(root)  # numerical noise leaves a tiny imaginary part
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * root))


def class_accuracy(model: zoo.Model, images: np.ndarray | jax.Array, classes: np.ndarray
                   ) -> dict[str, Any]:
  """The classifier's accuracy on images generated for `classes`: overall and per class."""
  pred = np.asarray(jnp.argmax(jax.jit(model.apply_fn)(model.params, jnp.asarray(images)), -1))
  classes = np.asarray(classes)
  per_class = {int(c): round(float(np.mean(pred[classes == c] == c)), 4)
               for c in np.unique(classes)}
  return {"accuracy": round(float(np.mean(pred == classes)), 4), "per_class": per_class}
