"""Files written whole or not at all: checkpoints, results parts, reports, run metadata."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to a temporary file beside `path`, fsyncs it, then renames it into place.

  A reader sees the old file or the new one, never a part: a run killed at any moment leaves
  no half-written file behind (the temporary file's name starts with a dot).
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
  umask = os.umask(0)
  os.umask(umask)
  try:
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private; use the usual mode
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """`atomic_write_bytes` of UTF-8 text."""
  atomic_write_bytes(path, text.encode())
