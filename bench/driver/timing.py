"""Timing loops shared by the benchmarks and the sweep's time estimate."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def calls(fn: Callable[[], Any], seconds: float, max_runs: int | None = None
          ) -> tuple[Any, list[float]]:
  """The last output and the seconds of each call of `fn`, called until `seconds` have
  passed (at least once, at most `max_runs` times)."""
  times, start, out = [], time.perf_counter(), None
  while not times or (time.perf_counter() - start < seconds
                      and (max_runs is None or len(times) < max_runs)):
    begin = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - begin)
  return out, times


def timed(fn: Callable[[], Any], min_seconds: float = 2.0, max_runs: int = 7
          ) -> tuple[Any, float, int]:
  """The output, the median seconds of repeated calls and how many calls were made.

  Calls repeat until `min_seconds` have passed (at most `max_runs`): one call for the long
  attacks, several for the ones that take milliseconds, whose single timings are noisy.
  """
  out, median, runs, _ = timed_with_total(fn, min_seconds, max_runs)
  return out, median, runs


def timed_with_total(fn: Callable[[], Any], min_seconds: float = 2.0, max_runs: int = 7
                     ) -> tuple[Any, float, int, float]:
  """`timed`, and the total seconds of the calls (a share of time spent inside some part
  of `fn` divides by it: the median of the calls is not their mean)."""
  out, times = calls(fn, min_seconds, max_runs)
  return out, float(np.median(times)), len(times), float(np.sum(times))


def throughput(call: Callable[[], Any], batch: int, min_seconds: float = 1.0) -> float:
  """Items per second of a warm `call` that handles `batch` items (at least three calls)."""
  reps, start = 0, time.perf_counter()
  while reps < 3 or time.perf_counter() - start < min_seconds:
    jax.block_until_ready(call())
    reps += 1
  return reps * batch / (time.perf_counter() - start)


def forward_rate(apply_fn: Callable, params: Any, shape: tuple[int, ...],
                 min_seconds: float = 1.0) -> float:
  """Images per second of the jitted forward pass on a batch of `shape`, after a warm-up."""
  forward = jax.jit(lambda x: apply_fn(params, x))
  x = jax.random.uniform(jax.random.key(0), shape)
  jax.block_until_ready(forward(x))
  return throughput(lambda: forward(x), shape[0], min_seconds)
