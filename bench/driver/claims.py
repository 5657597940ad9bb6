"""Claims on work units, so that processes sharing a run folder share its work.

Before a process runs a unit it creates `claims/<unit>.claim` with `O_CREAT | O_EXCL`, which
succeeds for exactly one process, on a local disk and on NFS alike. The claim names its
owner (host, pid, a random token); while the unit runs, a thread touches it every
`heartbeat_s`. A claim is stale, and taken over, when its owner is a dead process on this
host or when it has not been touched for `stale_after_s` (an owner on another host that
stopped). Taking over is itself guarded by an exclusive file named after the stale claim's
token, so two processes never both take over one claim.

A claim file that cannot be read as an owner (empty, not JSON, no host, pid and token), for
instance one left by a process whose disk filled while it wrote, is not being written when it
is older than `WRITE_GRACE_S` (the owner is written right after the file is created): no live
process can own it, so it is named through `log` and taken over. A claim whose write fails is
removed before the error propagates, so it leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

DEFAULT_STALE_AFTER_S = 300.0
# How long a claim file may stay unreadable while its creator writes the owner into it.
WRITE_GRACE_S = 5.0
_OWNER_KEYS = ("host", "pid", "token")


def _create_exclusive(path: Path, body: dict) -> bool:
  """Creates `path` holding `body`; False if it exists. A failed write removes the file."""
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  try:
    with os.fdopen(fd, "w") as f:
      f.write(json.dumps(body))
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    path.unlink(missing_ok=True)
    raise
  return True


def _read(path: Path) -> dict | None:
  """A claim's owner; {} for a file that names no owner (being written, empty or garbage);
  None if the file is gone."""
  try:
    text = path.read_bytes().decode("utf-8", errors="replace")
  except FileNotFoundError:
    return None
  try:
    body = json.loads(text)
  except json.JSONDecodeError:
    return {}
  if not isinstance(body, dict) or any(key not in body for key in _OWNER_KEYS):
    return {}
  return body


def _age(path: Path) -> float | None:
  try:
    return time.time() - path.stat().st_mtime
  except FileNotFoundError:
    return None


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
               heartbeat_s: float | None = None,
               log: Callable[[str], None] | None = None):
    self.folder = Path(folder)
    self.log = log or (lambda message: None)
    self.stale_after_s = stale_after_s
    self.heartbeat_s = heartbeat_s if heartbeat_s is not None else stale_after_s / 10
    self.owner = {"host": socket.gethostname(), "pid": os.getpid(),
                  "token": uuid.uuid4().hex}

  def path(self, name: str) -> Path:
    return self.folder / f"{name}.claim"

  def stale(self, path: Path, body: dict) -> bool:
    """Whether a claim's owner is gone: a dead process here, or no heartbeat for too long."""
    age = _age(path)
    if age is None:
      return False
    if not body:  # names no owner: stale once it cannot be a claim being written
      return age > WRITE_GRACE_S
    if body.get("host") == self.owner["host"] and isinstance(body.get("pid"), int):
      if body.get("token") != self.owner["token"] and not _alive(body["pid"]):
        return True
    return age > self.stale_after_s

  def take(self, name: str) -> bool:
    """Claims unit `name`; False when a live process holds it."""
    self.folder.mkdir(parents=True, exist_ok=True)
    path = self.path(name)
    for attempt in range(3):
      if _create_exclusive(path, self.owner):
        return True
      body = _read(path)
      if body is None:  # released between our two steps: try again
        continue
      if not body and not self.stale(path, body) and attempt < 2:
        time.sleep(0.05)  # most likely being written this instant: read it again
        continue
      if not self.stale(path, body):
        return False
      taken = self._take_over(path, body)
      if taken and not body:
        self.log(f"claim {path} named no owner (empty or not a claim; no live process can "
                 "hold it): taken over")
      return taken
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
