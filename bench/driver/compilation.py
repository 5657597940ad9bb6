"""XLA compilation: a persistent cache for every command, and a clock of compile time.

A sweep runs many small programs (one per attack, model and batch shape), and on a small job
compiling them takes longer than running them. JAX's persistent compilation cache keeps the
compiled executables on disk, so a second command with the same programs loads them instead
(`enable_cache`; every command calls it before anything compiles). The folder is
`~/.cache/advsweep/jax` (under `$XDG_CACHE_HOME` where set); `$ADVSWEEP_COMPILE_CACHE` names
another folder, or switches the cache off with `0`, as does `--no-compile-cache`. The cache
is bounded (`MAX_BYTES`, least recently used entries evicted first), which makes JAX guard
every read and write with a file lock: processes that share the folder (a multi-process job,
two sweeps into one run) share it safely.

`seconds()` is the process's compile time so far (tracing, lowering and XLA's compilation,
from `jax.monitoring`'s duration events), so a unit's compile time is read apart from its
attack time (`bench.driver.sweep`'s `compile_s` and `wall_s` columns).
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import jax

CACHE_ENV = "ADVSWEEP_COMPILE_CACHE"
_OFF = ("0", "off", "false", "no")
MAX_BYTES = 4 << 30  # 4 GiB on disk, the least recently used entries evicted first
# The duration events JAX records through jax.monitoring for the steps of a compilation
# (tests/test_compilation.py checks that a new program is counted and a cached call is not).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def cache_folder() -> Path | None:
  """The persistent cache's folder, or None where `$ADVSWEEP_COMPILE_CACHE` switches it off."""
  value = os.environ.get(CACHE_ENV)
  if value is not None and value.strip().lower() in _OFF:
    return None
  if value and value.strip():
    return Path(value).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "advsweep" / "jax"


def enable_cache(folder: Path | None) -> Path | None:
  """Points JAX's persistent compilation cache at `folder` for every program, however quick
  to compile; returns the folder in use. A cache folder set already (by
  `$JAX_COMPILATION_CACHE_DIR` or the caller's `jax.config`) is kept; None, or a folder that
  cannot be created (with a warning naming it), leaves the cache off."""
  current = jax.config.jax_compilation_cache_dir
  if current:
    return Path(current)
  if folder is None:
    return None
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as err:
    warnings.warn(f"compile cache off: cannot create {folder} ({err.strerror}); set "
                  f"${CACHE_ENV} to a folder you can write", RuntimeWarning, stacklevel=2)
    return None
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return folder


class _Clock:
  """Compile seconds and persistent-cache hits so far, from `jax.monitoring`."""

  def __init__(self):
    self.seconds = 0.0
    self.cache_hits = 0
    self._lock = threading.Lock()
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    jax.monitoring.register_event_listener(self._on_event)

  def _on_duration(self, event: str, duration: float, **_: object) -> None:
    if event in COMPILE_EVENTS:
      with self._lock:
        self.seconds += duration

  def _on_event(self, event: str, **_: object) -> None:
    if event == CACHE_HIT_EVENT:
      with self._lock:
        self.cache_hits += 1


_clock: _Clock | None = None
_clock_lock = threading.Lock()


def _the_clock() -> _Clock:
  global _clock
  with _clock_lock:
    if _clock is None:
      _clock = _Clock()
  return _clock


def seconds() -> float:
  """This process's compile time so far: tracing, lowering and compiling (or loading from the
  persistent cache), counted from the first call of `seconds` or `cache_hits`."""
  return _the_clock().seconds


def cache_hits() -> int:
  """Executables loaded from the persistent cache so far (counted as `seconds` is)."""
  return _the_clock().cache_hits


__all__ = ["CACHE_ENV", "MAX_BYTES", "cache_folder", "cache_hits", "enable_cache", "seconds"]
