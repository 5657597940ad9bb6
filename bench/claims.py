"""Claims on work units, so that processes sharing a run folder share its work.

Before a process runs a unit it creates `claims/<unit>.claim` with `O_CREAT | O_EXCL`, which
succeeds for exactly one process, on a local disk and on NFS alike. The claim names its
owner (host, pid, a random token); while the unit runs, a thread touches it every
`heartbeat_s`. A claim is stale, and taken over, when its owner is a dead process on this
host or when it has not been touched for `stale_after_s` (an owner on another host that
stopped). Taking over is itself guarded by an exclusive file named after the stale claim's
token, so two processes never both take over one claim.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

DEFAULT_STALE_AFTER_S = 300.0


def _create_exclusive(path: Path, body: dict) -> bool:
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    json.dump(body, f)
  return True


def _read(path: Path) -> dict | None:
  """A claim's owner, {} for a claim being written (empty or partial), None if gone."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  try:
    body = json.loads(text)
  except json.JSONDecodeError:
    return {}
  return body if isinstance(body, dict) else {}


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


class Claims:
  """The claims of one process in one folder."""

  def __init__(self, folder: str | os.PathLike, *,
               stale_after_s: float = DEFAULT_STALE_AFTER_S,
               heartbeat_s: float | None = None):
    self.folder = Path(folder)
    self.stale_after_s = stale_after_s
    self.heartbeat_s = heartbeat_s if heartbeat_s is not None else stale_after_s / 10
    self.owner = {"host": socket.gethostname(), "pid": os.getpid(),
                  "token": uuid.uuid4().hex}

  def path(self, name: str) -> Path:
    return self.folder / f"{name}.claim"

  def stale(self, path: Path, body: dict) -> bool:
    """Whether a claim's owner is gone: a dead process here, or no heartbeat for too long."""
    if body.get("host") == self.owner["host"] and isinstance(body.get("pid"), int):
      if body.get("token") != self.owner["token"] and not _alive(body["pid"]):
        return True
    try:
      age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
      return False
    return age > self.stale_after_s

  def take(self, name: str) -> bool:
    """Claims unit `name`; False when a live process holds it."""
    self.folder.mkdir(parents=True, exist_ok=True)
    path = self.path(name)
    for _ in range(3):
      if _create_exclusive(path, self.owner):
        return True
      body = _read(path)
      if body is None:  # released between our two steps: try again
        continue
      return self.stale(path, body) and self._take_over(path, body)
    return False

  def _take_over(self, path: Path, body: dict) -> bool:
    guard = path.with_name(f"{path.name}.takeover-{body.get('token', 'partial')}")
    if not _create_exclusive(guard, self.owner):
      guard_body = _read(guard)
      if guard_body is None or not self.stale(guard, guard_body):
        return False
      guard.unlink(missing_ok=True)  # a taker that died half-way
      if not _create_exclusive(guard, self.owner):
        return False
    try:
      if _read(path) != body:  # someone else took it over first
        return False
      path.unlink(missing_ok=True)
      return _create_exclusive(path, self.owner)
    finally:
      guard.unlink(missing_ok=True)

  def release(self, name: str) -> None:
    path = self.path(name)
    if _read(path) == self.owner:
      path.unlink(missing_ok=True)

  @contextlib.contextmanager
  def holding(self, name: str) -> Iterator[None]:
    """Keeps a taken claim fresh while the body runs, and releases it after."""
    stop = threading.Event()

    def beat() -> None:
      while not stop.wait(self.heartbeat_s):
        with contextlib.suppress(FileNotFoundError):
          os.utime(self.path(name))

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
      yield
    finally:
      stop.set()
      thread.join()
      self.release(name)
