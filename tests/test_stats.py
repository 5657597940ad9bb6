"""The statistics of bench/stats.py against hand computations and their defining
properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from advsweep.bench import stats


def test_wilson_interval_matches_the_formula():
  """Wilson (1927): (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
  z = scipy_stats.norm.ppf(0.975)
  for k, n in [(0, 10), (3, 10), (81, 263), (10, 10)]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert stats.wilson_interval(k, n) == pytest.approx((centre - half, centre + half),
                                                        abs=1e-12)
  assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))


def test_t_interval_is_wider_than_normal_at_small_n():
  values = np.array([0.1, 0.4, 0.35, 0.2, 0.5, 0.3])
  mean, low, high = stats.t_interval(values)
  half = scipy_stats.t.ppf(0.975, 5) * values.std(ddof=1) / math.sqrt(6)
  assert (mean, low, high) == pytest.approx((values.mean(), mean - half, mean + half))
  assert half > 1.96 * values.std(ddof=1) / math.sqrt(6)
  assert stats.t_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
  assert math.isnan(stats.t_interval([1.0])[1])


def test_mcnemar_is_the_binomial_test_on_discordant_pairs():
  a = np.array([1] * 30 + [1] * 9 + [0] * 2 + [0] * 59, bool)
  b = np.array([1] * 30 + [0] * 9 + [1] * 2 + [0] * 59, bool)
  result = stats.paired(a, b)
  assert (result.n, result.only_a, result.only_b) == (100, 9, 2)
  # Two-sided exact: 2 P(X <= 2), X ~ Binomial(11, 1/2) = 0.065: not significant.
  expected = 2 * sum(math.comb(11, i) for i in range(3)) / 2 ** 11
  assert result.p_value == pytest.approx(expected)
  assert result.difference == pytest.approx(0.07)
  assert result.verdict() == "no difference at 95%"
  lower = stats.paired(np.array([0] * 12 + [1] * 1 + [1] * 87, bool),
                       np.array([1] * 12 + [0] * 1 + [1] * 87, bool))
  assert lower.p_value == pytest.approx(2 * 14 / 2 ** 13)  # 2 P(X <= 1), X ~ B(13, 1/2)
  assert lower.verdict() == "lower" and lower.high < 0
  assert stats.paired(a, a).p_value == 1.0 and stats.paired(a, a).verdict().startswith("no")


def test_newcombe_interval_properties():
  """Newcombe's method 10: inside [-1, 1], around the estimate, near the Wald interval at
  large n, and exactly 0 for identical outcomes with no discordant pair."""
  rng = np.random.default_rng(0)
  for n in (20, 200, 20000):
    a = rng.random(n) < 0.6
    b = np.where(rng.random(n) < 0.8, a, rng.random(n) < 0.5)
    r = stats.paired(a, b)
    assert -1 <= r.low <= r.difference <= r.high <= 1
    if n == 20000:
      only_a, only_b = r.only_a / n, r.only_b / n
      wald = 1.96 * math.sqrt((only_a + only_b - (only_a - only_b) ** 2) / n)
      assert r.high - r.difference == pytest.approx(wald, rel=0.05)
      assert r.difference - r.low == pytest.approx(wald, rel=0.05)
  same = stats.paired(np.ones(10, bool), np.ones(10, bool))
  assert same.difference == 0 and same.low <= 0 <= same.high
  with pytest.raises(ValueError, match="same images"):
    stats.paired(np.ones(3), np.ones(4))
