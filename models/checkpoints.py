"""Checkpoints: flax msgpack weights plus a JSON metadata file. No pickle, no code execution.

A checkpoint is two files side by side: `<name>.msgpack` (the model's variables, written by
`flax.serialization.to_bytes`) and `<name>.json` (metadata, including the weights' sha256).
Loading checks the sha256 first, then restores into the structure the module expects, so a
corrupt, truncated or mismatched file is refused with a clear message, never half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import numpy as np

from advsweep.models.files import atomic_write_bytes


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt, or does not fit its model."""


def sha256_file(path: str | os.PathLike) -> str:
  return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save(weights_path: str | os.PathLike, variables: Any, meta: dict) -> dict:
  """Writes weights and metadata atomically; returns the metadata with `sha256` filled in."""
  host = jax.tree.map(np.asarray, variables)
  data = flax.serialization.to_bytes(host)
  meta = dict(meta, sha256=hashlib.sha256(data).hexdigest(), weights_bytes=len(data))
  weights_path = Path(weights_path)
  atomic_write_bytes(weights_path, data)
  write_meta(weights_path, meta)
  return meta


def write_meta(weights_path: str | os.PathLike, meta: dict) -> None:
  """Writes the metadata file beside `weights_path`, atomically (the weights, and so their
  sha256, untouched: figures measured after training are added this way)."""
  atomic_write_bytes(Path(weights_path).with_suffix(".json"),
                     (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def load_meta(weights_path: str | os.PathLike) -> dict:
  meta_path = Path(weights_path).with_suffix(".json")
  if not meta_path.is_file():
    raise CheckpointError(f"{meta_path}: metadata file missing; retrain the model with "
                          "`advsweep train NAME` or restore the file from the repository")
  try:
    return json.loads(meta_path.read_text())
  except json.JSONDecodeError as err:
    raise CheckpointError(f"{meta_path}: not valid JSON ({err})") from err


def load(weights_path: str | os.PathLike, target: Any, meta: dict) -> Any:
  """Restores variables shaped like `target` from `weights_path`, checking `meta['sha256']`.

  Raises:
    CheckpointError: missing file, sha256 mismatch, or a structure/shape that does not match
      `target`.
  """
  weights_path = Path(weights_path)
  if not weights_path.is_file():
    raise CheckpointError(f"{weights_path}: checkpoint missing; train it with "
                          "`advsweep train NAME` or restore it from the repository")
  data = weights_path.read_bytes()
  digest = hashlib.sha256(data).hexdigest()
  if digest != meta.get("sha256"):
    raise CheckpointError(
        f"{weights_path}: sha256 {digest[:12]}... does not match the metadata's "
        f"{str(meta.get('sha256'))[:12]}...; the file is corrupt or belongs to another "
        "training run. Restore it from the repository or retrain.")
  try:
    state = flax.serialization.msgpack_restore(data)
  except Exception as err:  # msgpack raises several unrelated types on bad input
    raise CheckpointError(f"{weights_path}: not a flax msgpack checkpoint ({err})") from err
  _check_structure(state, flax.serialization.to_state_dict(target), weights_path, "")
  return flax.serialization.from_state_dict(target, state)


def _check_structure(state: Any, expected: Any, path: Path, where: str) -> None:
  if isinstance(expected, dict):
    if not isinstance(state, dict) or set(state) != set(expected):
      got = sorted(state) if isinstance(state, dict) else type(state).__name__
      raise CheckpointError(f"{path}: at '{where or '/'}' the checkpoint has {got}, the "
                            f"model expects {sorted(expected)}: wrong model for this file")
    for k in expected:
      _check_structure(state[k], expected[k], path, f"{where}/{k}")
    return
  shape = tuple(np.shape(expected))
  if tuple(np.shape(state)) != shape:
    raise CheckpointError(f"{path}: '{where}' has shape {np.shape(state)}, the model "
                          f"expects {shape}: wrong model or width for this file")
