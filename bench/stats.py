"""The statistics advsweep reports, in one place, on `scipy.stats` where it has them.

- `wilson_interval`: a binomial proportion's 95% Wilson score interval (no continuity
  correction), `scipy.stats.binomtest(...).proportion_ci(method="wilson")`.
- `t_interval`: a mean's interval from Student's t, right for the small n of per-model
  means (a normal z = 1.96 is too narrow at n around 25).
- `paired`: two models (or attacks) on the same images: the exact McNemar test on the
  discordant pairs and Newcombe's score interval for the difference of the paired
  proportions (Newcombe 1998, method 10). A defended model and its twin are compared this
  way, image by image, not by whether two separate intervals overlap.

References:
  Newcombe, Improved confidence intervals for the difference between binomial proportions
  based on paired data, Statistics in Medicine 17 (1998), 2635-2650.
  McNemar, Note on the sampling error of the difference between correlated proportions or
  percentages, Psychometrika 12 (1947).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE
                    ) -> tuple[float, float]:
  """Wilson score interval of `successes` out of `n`; (nan, nan) when n = 0."""
  if n == 0:
    return math.nan, math.nan
  ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
  return float(ci.low), float(ci.high)


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE
               ) -> tuple[float, float, float]:
  """(mean, low, high): the mean of `values` with its Student's t interval; the interval is
  (nan, nan) below two values."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return math.nan, math.nan, math.nan
  mean = float(values.mean())
  if values.size < 2:
    return mean, math.nan, math.nan
  low, high = stats.t.interval(confidence, values.size - 1, loc=mean,
                               scale=stats.sem(values))
  if not math.isfinite(low):  # every value equal: no spread
    return mean, mean, mean
  return mean, float(low), float(high)


def disjoint_above(a: tuple[int, int], b: tuple[int, int]) -> bool:
  """Rate a = (successes, n) lies above rate b with their 95% Wilson intervals apart (for two
  rates on different images; on the same images use `paired`)."""
  (ka, na), (kb, nb) = a, b
  if not na or not nb:
    return False
  return wilson_interval(ka, na)[0] > wilson_interval(kb, nb)[1]


@dataclasses.dataclass(frozen=True)
class Paired:
  """Two 0/1 outcomes on the same n images (say, "robust" for model A and model B).

  Attributes:
    n: images.
    a, b: share of images with outcome 1 under A and under B.
    only_a, only_b: the discordant pairs (1 under A only; 1 under B only).
    difference: a - b.
    low, high: Newcombe's 95% interval of the difference (method 10).
    p_value: the exact two-sided McNemar test of a = b (a binomial test of `only_a` out of
      the discordant pairs at 1/2); 1 when there are none.
  """

  n: int
  a: float
  b: float
  only_a: int
  only_b: int
  difference: float
  low: float
  high: float
  p_value: float

  def verdict(self, alpha: float = 1 - CONFIDENCE) -> str:
    if self.n == 0:
      return "no images"
    if self.p_value >= alpha:
      return "no difference at 95%"
    return "higher" if self.difference > 0 else "lower"


def paired(a: np.ndarray, b: np.ndarray, confidence: float = CONFIDENCE) -> Paired:
  """Compares two 0/1 outcomes image by image (see `Paired`)."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  if a.shape != b.shape:
    raise ValueError(f"paired outcomes need the same images; got {a.shape} and {b.shape}")
  n = int(a.size)
  if n == 0:
    return Paired(0, math.nan, math.nan, 0, 0, math.nan, math.nan, math.nan, math.nan)
  both = int(np.sum(a & b))
  only_a = int(np.sum(a & ~b))
  only_b = int(np.sum(~a & b))
  neither = n - both - only_a - only_b
  discordant = only_a + only_b
  p_value = 1.0 if discordant == 0 else float(stats.binomtest(only_a, discordant).pvalue)
  p1, p2 = (both + only_a) / n, (both + only_b) / n
  l1, u1 = wilson_interval(both + only_a, n, confidence)
  l2, u2 = wilson_interval(both + only_b, n, confidence)
  margins = float(both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
  phi = 0.0 if margins == 0 else (both * neither - only_a * only_b) / math.sqrt(margins)
  below = math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0))
  above = math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0))
  difference = p1 - p2
  return Paired(n, p1, p2, only_a, only_b, difference, max(-1.0, difference - below),
                min(1.0, difference + above), p_value)


__all__ = ["CONFIDENCE", "Paired", "disjoint_above", "paired", "t_interval", "wilson_interval"]


def rank_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """Mann-Whitney U test of `a` against `b`: (P(a > b) + P(a = b) / 2, two-sided p).

  scipy's asymptotic test with the tie correction and no continuity correction (nan where
  a side is empty). The first value is the common-language effect size: 0.5 is no
  difference, 1 means every `a` exceeds every `b`.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if len(a) == 0 or len(b) == 0:
    return math.nan, math.nan
  if np.ptp(np.concatenate([a, b])) == 0:  # every value tied: nothing to rank
    return 0.5, 1.0
  test = stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic",
                                  use_continuity=False)
  return float(test.statistic) / (len(a) * len(b)), float(test.pvalue)
