"""The standard evaluation's progress file: what an interrupted evaluation has finished.

After every batch of every attack, `standard.evaluate` writes the outcomes so far to a file
(NumPy's `.npz`, arrays only: it loads without executing code), atomically. Started again
with the same file, model, images and settings, it skips what is done; since every random
choice comes from the image's index and the attack's position, the result is the one an
uninterrupted run gives. The file names what it belongs to by a fingerprint (a hash of the
parameters, images, labels, indices and settings); a file of another evaluation, or one
that cannot be read, is set aside with a warning and the evaluation starts afresh.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from advsweep.models import files

FINGERPRINT = "fingerprint"


def fingerprint(params: Any, images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                settings: dict[str, Any]) -> str:
  """A hash of everything an evaluation's outcomes depend on."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)  # a randomized model's key: its bits
    array = np.asarray(leaf)
    digest.update(str((array.dtype, array.shape)).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  for array in (images, labels, indices):
    digest.update(str((array.dtype, array.shape)).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
  return digest.hexdigest()


def load(path: str | os.PathLike, expected: str) -> dict[str, np.ndarray] | None:
  """The arrays kept in `path` for the evaluation `expected` names; None where there is no
  file, or it belongs to another evaluation or cannot be read (then with a warning)."""
  path = Path(path)
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as kept:
      arrays = {name: kept[name] for name in kept.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
    warnings.warn(f"{path} cannot be read ({err}); the evaluation starts afresh", stacklevel=3)
    return None
  if str(arrays.get(FINGERPRINT, "")) != expected:
    warnings.warn(f"{path} belongs to another evaluation (other weights, images or "
                  "settings); this one starts afresh and replaces it", stacklevel=3)
    return None
  return arrays


def save(path: str | os.PathLike, expected: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes the arrays and the fingerprint to `path` atomically."""
  buffer = io.BytesIO()
  np.savez(buffer, **{FINGERPRINT: np.asarray(expected)}, **arrays)
  files.atomic_write_bytes(Path(path), buffer.getvalue())


def remove(path: str | os.PathLike | None) -> None:
  if path is not None:
    Path(path).unlink(missing_ok=True)
