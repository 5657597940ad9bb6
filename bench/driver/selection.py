"""Confidence bins (Possas) and the seeded, stratified draw of test images per bin."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from advsweep.models import evaluation


def assign_bins(clean_conf: np.ndarray, thresholds: list[float]) -> np.ndarray:
  """Bin index per image from its top-1 softmax probability: 0 is the highest bin.

  With thresholds [t0 > t1 > ...], bin 0 holds conf >= t0, bin 1 holds t1 <= conf < t0, and
  the last bin conf < t_last (Possas: high >= 0.30, medium 0.15-0.30, low < 0.15).
  """
  edges = np.asarray(thresholds, np.float64)
  return np.sum(np.asarray(clean_conf, np.float64)[:, None] < edges[None, :], axis=1)


def stratified_draw(bins: np.ndarray, num_bins: int, per_bin: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Up to `per_bin` image indices from each bin, drawn without replacement.

  Returns the chosen indices (sorted) and the number of images each bin had available. The
  draw depends only on `bins` and `seed`.
  """
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(bins))
  chosen = []
  available = np.zeros(num_bins, np.int64)
  for b in range(num_bins):
    members = order[bins[order] == b]
    available[b] = len(members)
    chosen.append(members[:per_bin])
  return np.sort(np.concatenate(chosen)), available


@dataclasses.dataclass(frozen=True)
class Selection:
  """The images of one model's sweep with their clean-image facts (all [N] arrays)."""

  example_idx: np.ndarray
  labels: np.ndarray
  clean_pred: np.ndarray
  clean_conf: np.ndarray
  clean_top5_correct: np.ndarray
  bins: np.ndarray
  available: np.ndarray  # [num_bins] images each bin had in the pool

  @property
  def clean_correct(self) -> np.ndarray:
    return self.clean_pred == self.labels


class NonFiniteLogitsError(ValueError):
  """A model gives NaN or infinite logits on clean images."""


def select(apply_fn: Any, params: Any, images_u8: np.ndarray, labels: np.ndarray,
           thresholds: list[float], per_bin: int, pool: int, seed: int) -> Selection:
  """Classifies the pool, bins it by clean confidence and draws up to `per_bin` per bin.

  Misclassified images stay in (their bin is still their top-1 confidence); they are flagged
  by `clean_correct` and excluded from success rates downstream, as the papers do.

  Raises:
    NonFiniteLogitsError: the model's logits are not finite on some pool image.
  """
  n = len(images_u8) if pool == 0 else min(pool, len(images_u8))
  logits = evaluation.predict_logits(apply_fn, params, images_u8[:n]).astype(np.float64)
  broken = np.flatnonzero(~np.isfinite(logits).all(-1))
  if len(broken):  # argmax of NaN is class 0: such a model would score as right on label 0
    raise NonFiniteLogitsError(
        f"non-finite logits (NaN or inf) on {len(broken)} of {n} images (first: image "
        f"{broken[0]}); fix the model or its weights before attacking it")
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  clean_pred = probs.argmax(-1)
  clean_conf = probs.max(-1)
  top5 = np.argsort(-logits, axis=-1, kind="stable")[:, :5]
  top5_correct = np.any(top5 == labels[:n, None], axis=-1)
  bins = assign_bins(clean_conf, thresholds)
  idx, available = stratified_draw(bins, len(thresholds) + 1, per_bin, seed)
  return Selection(example_idx=idx, labels=labels[idx].astype(np.int64),
                   clean_pred=clean_pred[idx], clean_conf=clean_conf[idx],
                   clean_top5_correct=top5_correct[idx], bins=bins[idx], available=available)
