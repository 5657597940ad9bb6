"""First run online: the original MNIST, Fashion-MNIST and CIFAR-10 files, downloaded into a
cache folder and verified by their published checksums. No TensorFlow.

The cache (`$ADVSWEEP_CACHE_DIR`, else `$XDG_CACHE_HOME/advsweep/data`, else
`~/.cache/advsweep/data`) has the layout of a local data folder (`mnist-raw/`,
`fashion-mnist/`, `cifar-10-batches-bin/`), so `datasets.load` reads it as one. A file
appears there only whole and verified: it is downloaded to a temporary name beside its place,
checked, then renamed. A download that drops is tried again; one that fails its checksum is
refused. `$ADVSWEEP_DATA_MIRRORS` (base URLs separated by spaces or commas) replaces the
original hosts: a mirror serves `<base>/<dataset>/<file>` (`<base>/mnist/t10k-images-idx3-
ubyte.gz`). `ADVSWEEP_DOWNLOAD=0` turns downloading off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import io
import os
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from advsweep.models import files

CACHE_ENV = "ADVSWEEP_CACHE_DIR"
MIRRORS_ENV = "ADVSWEEP_DATA_MIRRORS"
DOWNLOAD_ENV = "ADVSWEEP_DOWNLOAD"
ATTEMPTS = 2  # per URL: a dropped connection is tried once more


class DownloadError(OSError):
  """Every URL of a file failed; the message names the file, the URLs and the fix."""


@dataclasses.dataclass(frozen=True)
class Remote:
  """Where a dataset's original files live and how each is verified."""

  folder: str  # the cache subfolder, as a local data folder has it
  hosts: tuple[str, ...]  # original base URLs
  files: dict[str, tuple[str, ...]]  # split -> the names to download
  sha256: dict[str, str] = dataclasses.field(default_factory=dict)  # kept as downloaded
  members: dict[str, str] = dataclasses.field(default_factory=dict)  # an archive's: md5s


def cache_dir() -> Path:
  if os.environ.get(CACHE_ENV):
    return Path(os.environ[CACHE_ENV]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "advsweep" / "data"


def enabled() -> bool:
  return os.environ.get(DOWNLOAD_ENV, "1") not in ("0", "false", "no")


def urls(dataset: str, remote: Remote, name: str) -> list[str]:
  mirrors = os.environ.get(MIRRORS_ENV, "").replace(",", " ").split()
  if mirrors:
    return [f"{m.rstrip('/')}/{dataset}/{name}" for m in mirrors]
  return [f"{host.rstrip('/')}/{name}" for host in remote.hosts]


def fetch(dataset: str, remote: Remote, split: str) -> Path:
  """Downloads what the split needs of `dataset` into the cache (what is not there yet) and
  returns the cache folder. A plain file is kept when its sha256 is the published one; an
  archive's members are kept when each has its published md5."""
  folder = cache_dir() / remote.folder
  for name in remote.files[split]:
    outputs = [folder / m for m in remote.members] if remote.members else [folder / name]
    if all(p.is_file() for p in outputs):
      continue
    if remote.members:
      for member, body in _download_members(dataset, remote, name, folder).items():
        files.atomic_write_bytes(folder / member, body)
    else:
      expected = remote.sha256[name]
      data = _download_verified(dataset, remote, name, folder / name,
                                lambda d, e=expected: hashlib.sha256(d).hexdigest() == e)
      files.atomic_write_bytes(folder / name, data)
  return cache_dir()


def _download_members(dataset: str, remote: Remote, name: str, folder: Path
                      ) -> dict[str, bytes]:
  """An archive's verified members; the check's extraction is kept, so it is read once."""
  verified: dict[str, bytes] = {}

  def check(data: bytes) -> bool:
    members = _members(data, remote.members)
    verified.update(members or {})
    return members is not None

  _download_verified(dataset, remote, name, folder / name, check)
  return verified


def _members(data: bytes, md5s: dict[str, str]) -> dict[str, bytes] | None:
  """The members of a .tar.gz named in `md5s` (by base name), or None unless every one is
  there with its md5."""
  try:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
      members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
      out = {}
      for name, md5 in md5s.items():
        extracted = tar.extractfile(members[name]) if name in members else None
        body = extracted.read() if extracted is not None else b""
        if hashlib.md5(body).hexdigest() != md5:
          return None
        out[name] = body
  except (tarfile.TarError, EOFError, OSError, zlib.error):  # zlib: corrupt mid-stream
    return None
  return out


def _download_verified(dataset: str, remote: Remote, name: str, target: Path,
                       check: Callable[[bytes], bool]) -> bytes:
  failures = []
  for url in urls(dataset, remote, name):
    for _ in range(ATTEMPTS):
      try:
        data = _get(url, name)
      except (OSError, http.client.HTTPException) as err:
        failures.append(f"{url} ({_reason(err)})")
        if isinstance(err, urllib.error.HTTPError) and err.code < 500 and err.code != 429:
          break  # the server refused: asking again gives the same answer
        continue
      if check(data):
        return data
      failures.append(f"{url} (checksum mismatch: not the original file; refused)")
      break
  place = (f"unpack its {remote.folder}/ files into {target.parent}" if remote.members
           else f"put it at {target}")
  raise DownloadError(
      f"could not download {dataset} file {name}: tried " + "; ".join(failures)
      + f". Fix: download it by hand and {place}, point --data-dir at a folder holding "
      f"them, or set ${MIRRORS_ENV} to a mirror's base URL")


def _reason(err: BaseException) -> str:
  if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
    return str(err.reason)
  return str(err) or type(err).__name__


def _get(url: str, name: str) -> bytes:
  """The body at `url`, whole: a body shorter than its Content-Length raises."""
  with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310  (http(s) only)
    total = int(response.headers.get("Content-Length") or 0) or None
    buffer = io.BytesIO()
    with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=None,
              leave=False) as bar:
      while chunk := response.read(1 << 20):
        buffer.write(chunk)
        bar.update(len(chunk))
  data = buffer.getvalue()
  if total is not None and len(data) != total:
    raise http.client.IncompleteRead(data[:0], total - len(data))
  return data
