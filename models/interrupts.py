"""Ctrl-C that is not lost.

Python raises KeyboardInterrupt at the next bytecode boundary of the main thread; when that
boundary is inside a Python callback that C++ calls (JAX hashing a jit's static arguments,
flattening a pytree, a destructor), the exception can be reported as "ignored" and dropped,
and the run goes on. The handler installed here also records the request, and the long loops
(the sweep's units, training's steps) call `check()`, which raises it again.
"""

from __future__ import annotations

import signal
import threading

_requested = threading.Event()


def _handler(signum: int, frame: object) -> None:
  del signum, frame
  _requested.set()
  raise KeyboardInterrupt


def install() -> None:
  """Makes SIGINT raise KeyboardInterrupt and remember that it came (main thread only)."""
  _requested.clear()
  signal.signal(signal.SIGINT, _handler)


def requested() -> bool:
  """Ctrl-C came since `install()` (it may have been swallowed where it was raised)."""
  return _requested.is_set()


def check() -> None:
  """Raises KeyboardInterrupt if Ctrl-C came: the loops' safe point to stop."""
  if _requested.is_set():
    raise KeyboardInterrupt
