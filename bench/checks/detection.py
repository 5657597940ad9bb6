"""Papernot et al.'s adversarial-sample detector, evaluated from a run's rows.

The slides on Papernot et al.'s "The Limitations of Deep Learning in Adversarial Settings"
(2016) propose detecting adversarial samples by the sum of squared
differences between neighbouring pixels, which "is always higher for adversarial samples".
The detector flags an image whose score (`attacks.common.neighbour_difference_score`, in
the rows as `nd_score_clean` and `nd_score_adv`) exceeds a threshold set at a chosen
false-positive rate on clean images. Per attack configuration this module gives the ROC
curve and its AUC (clean images negative, successful adversarial images positive), the
detection rate at 5% false positives, and the slides' claim as a number: the share of
images whose adversarial score is above their own clean score.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from advsweep.attacks import common
from advsweep.bench.reports import tables
from advsweep.models import files

FALSE_POSITIVE_RATE = 0.05  # the operating point the report and the adaptive attack use


_score = jax.jit(common.neighbour_difference_score)


def score(images: jax.Array) -> np.ndarray:
  """[B] neighbour-difference scores of float images in [0, 1]."""
  return np.asarray(_score(images), np.float32)


def scores(images_u8: np.ndarray, batch: int = 1000) -> np.ndarray:
  """[N] neighbour-difference scores of uint8 images, in [0, 1] pixel units."""
  out = [score(jnp.asarray(images_u8[i:i + batch], jnp.float32) / 255.0)
         for i in range(0, len(images_u8), batch)]
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def threshold_at(clean: np.ndarray, fpr: float = FALSE_POSITIVE_RATE) -> float:
  """The smallest threshold that flags at most `fpr` of the clean scores (flag: score >
  threshold)."""
  if len(clean) == 0:
    raise ValueError("no clean scores to set the detector's threshold on")
  ordered = np.sort(np.asarray(clean, np.float64))
  allowed = math.floor(fpr * len(ordered))  # clean images that may lie above it
  return float(ordered[len(ordered) - 1 - allowed])


def roc(clean: np.ndarray, adversarial: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(false-positive rates, true-positive rates) over every threshold, from (0, 0) to
  (1, 1)."""
  thresholds = np.unique(np.concatenate([clean, adversarial]))[::-1]
  fpr = [(clean > t).mean() for t in thresholds] + [1.0]
  tpr = [(adversarial > t).mean() for t in thresholds] + [1.0]
  return np.asarray([0.0, *fpr]), np.asarray([0.0, *tpr])


def auc(clean: np.ndarray, adversarial: np.ndarray) -> float:
  """Area under the ROC curve: P(adversarial score > clean score), ties counting half (the
  Mann-Whitney statistic)."""
  if len(clean) == 0 or len(adversarial) == 0:
    return math.nan
  both = np.concatenate([clean, adversarial])
  order = np.argsort(both, kind="stable")
  ranks = np.empty(len(both), np.float64)
  sorted_values = both[order]
  # Average ranks over ties.
  boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
  starts = np.concatenate([[0], boundaries])
  ends = np.concatenate([boundaries, [len(both)]])
  for start, end in zip(starts, ends, strict=True):
    ranks[order[start:end]] = (start + end + 1) / 2
  adv_ranks = ranks[len(clean):].sum()
  n_adv, n_clean = len(adversarial), len(clean)
  return float((adv_ranks - n_adv * (n_adv + 1) / 2) / (n_adv * n_clean))


@dataclasses.dataclass(frozen=True)
class Detection:
  """The detector against one attack configuration on one model."""

  model: str
  attack: str
  params: str
  n: int  # successful adversarial images (the positives)
  clean: int  # clean images (the negatives)
  auc: float
  threshold: float
  detected: int  # positives above the threshold
  higher: int  # positives whose adversarial score is above their own clean score

  @property
  def detection_rate(self) -> float:
    return self.detected / self.n if self.n else math.nan

  @property
  def higher_share(self) -> float:
    return self.higher / self.n if self.n else math.nan


def evaluate(cols: dict[str, np.ndarray], mask: np.ndarray, key: tuple[str, str, str],
             fpr: float = FALSE_POSITIVE_RATE) -> Detection | None:
  """The detector on the rows in `mask`: negatives are their clean images, positives their
  successful adversarial images; None where the rows hold no scores."""
  clean = cols["nd_score_clean"][mask].astype(np.float64)
  if len(clean) == 0 or np.isnan(clean).any():
    return None
  won = mask & cols["success"] & cols["clean_correct"]
  adv = cols["nd_score_adv"][won].astype(np.float64)
  paired_clean = cols["nd_score_clean"][won].astype(np.float64)
  threshold = threshold_at(clean, fpr)
  return Detection(*key, n=len(adv), clean=len(clean), auc=auc(clean, adv),
                   threshold=threshold, detected=int((adv > threshold).sum()),
                   higher=int((adv > paired_clean).sum()))


HEADER = ("model", "attack", "params", "n adv", "AUC", "detected at 5% FPR", "95% CI",
          "adv score > clean")


def rows(found: list[Detection], params_text) -> list[list[str]]:
  out = []
  for d in found:
    lo, hi = tables.wilson_interval(d.detected, d.n)
    out.append([d.model, d.attack, params_text(d.params), str(d.n), tables.num(d.auc, 3),
                tables.pct(d.detection_rate), f"{tables.pct(lo)}-{tables.pct(hi)}",
                tables.pct(d.higher_share)])
  return out


def plot_roc(cols: dict[str, np.ndarray], groups: dict[tuple[str, str, str], np.ndarray],
             out_dir: Path, params_text) -> list[Path]:
  """One PNG per model: the ROC curve of every attack configuration with scores."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  by_model: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
  for (model, attack, params), mask in groups.items():
    won = mask & cols["success"] & cols["clean_correct"]
    if not won.any():
      continue
    clean = cols["nd_score_clean"][mask].astype(np.float64)
    adv = cols["nd_score_adv"][won].astype(np.float64)
    fpr, tpr = roc(clean, adv)
    label = f"AUC {auc(clean, adv):.2f}, n={len(adv)}: {attack} {params_text(params)}"
    by_model.setdefault(model, []).append((label, fpr, tpr))
  written = []
  for model, curves in by_model.items():
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for label, fpr, tpr in curves:
      ax.plot(100 * fpr, 100 * tpr, label=label[:90])
    ax.plot([0, 100], [0, 100], color="grey", linestyle=":", linewidth=1)
    ax.axvline(100 * FALSE_POSITIVE_RATE, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("clean images flagged (%)")
    ax.set_ylabel("adversarial images detected (%)")
    ax.set_title(f"neighbour-difference detector, {model}", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", model)
    path = out_dir / f"detection-roc-{slug}.png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    files.atomic_write_bytes(path, buffer.getvalue())
    written.append(path)
  return written
