"""Batched evaluation of a classifier over a whole array of images."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def _jitted_predict(apply_fn: Callable) -> Callable:
  """One jitted prediction function per `apply_fn`, reused across calls (no recompiles)."""

  @jax.jit
  def predict(params, images_u8):
    logits = apply_fn(params, images_u8.astype(jnp.float32) / 255.0)
    return jnp.argmax(logits, -1), logits

  return predict


def predict_logits(apply_fn: Callable, params: Any, images_u8: np.ndarray,
                   batch_size: int = 1000) -> np.ndarray:
  """Logits [N,K] for uint8 images [N,H,W,C], computed in fixed-size batches.

  The last batch is padded to `batch_size` so one compiled function serves every batch.
  """
  predict = _jitted_predict(apply_fn)
  n = len(images_u8)
  out = []
  for start in range(0, n, batch_size):
    batch = images_u8[start:start + batch_size]
    pad = batch_size - len(batch)
    if pad:
      batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
    _, logits = predict(params, batch)
    out.append(np.asarray(logits)[:batch_size - pad])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def accuracy(apply_fn: Callable, params: Any, images_u8: np.ndarray, labels: np.ndarray,
             batch_size: int = 1000) -> float:
  """Top-1 accuracy of `apply_fn` on uint8 images [N,H,W,C] with int labels [N]."""
  logits = predict_logits(apply_fn, params, images_u8, batch_size)
  return float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))


SUBSET_SIZE = 2000  # the fixed subset: the first 2000 images of the test split


def accuracy_summary(apply_fn: Callable, params: Any, test_images_u8: np.ndarray,
                     test_labels: np.ndarray) -> dict:
  """Accuracy on the whole test split and on its first `SUBSET_SIZE` images.

  The subset figure is stored in each checkpoint's metadata so tests can re-measure it
  cheaply and exactly; the full figure is the one the zoo reports.
  """
  correct = np.argmax(predict_logits(apply_fn, params, test_images_u8), -1) == test_labels
  return {
      "test_accuracy": float(np.mean(correct)),
      "test_examples": int(len(correct)),
      "test_subset_accuracy": float(np.mean(correct[:SUBSET_SIZE])),
      "test_subset_examples": int(min(SUBSET_SIZE, len(correct))),
  }
