"""Users' own models in the driver: by zoo name, by `package.module:function`, or by name
through the `advsweep.models` entry-point group.

A model function takes no arguments and returns a `zoo.Model`; `model(...)` builds one
from any pure JAX function, Flax (linen or NNX) or not:

    def my_model() -> advsweep.models.zoo.Model:
      params = load_my_weights()
      return custom.model("my_cnn", my_apply, params, dataset="/data/my_set", num_classes=7)

`dataset` is a zoo dataset name, a local folder (`datasets.load` reads npz files and folders
of PNGs per class) or a prepared TFDS name; it may be left to the config's `dataset`.
A package lists its models for `advsweep models` and for configs by name in its
`pyproject.toml`:

    [project.entry-points."advsweep.models"]
    my_cnn = "my_package.models:my_model"
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from advsweep.models import defenses, zoo

ENTRY_POINT_GROUP = "advsweep.models"


class ModelReferenceError(ValueError):
  """A model name is no zoo model, no entry point and no importable `module:function`."""


def params_sha256(params: Any) -> str:
  """A digest of a pytree's structure, shapes, dtypes and values: a user's model's identity
  in the rows (`model_sha256`), as the checkpoint's sha256 is a zoo model's."""
  leaves, treedef = jax.tree.flatten(params)
  digest = hashlib.sha256(str(treedef).encode())
  for leaf in leaves:
    array = np.asarray(leaf)
    digest.update(f"{array.shape}{array.dtype}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def model(name: str, apply_fn: Callable[[Any, Any], Any], params: Any, *,
          dataset: str | Path | None = None, num_classes: int | None = None,
          **meta: Any) -> zoo.Model:
  """A user's model for the driver and the attacks.

  Args:
    name: how the rows name it.
    apply_fn: `apply_fn(params, images[B,H,W,C] float in [0, 1]) -> logits[B,K]`, pure.
    params: its first argument (any pytree).
    dataset: what it classifies (see the module docstring), or None to take the config's.
    num_classes: K, checked against the data where given; else read from `apply_fn`.
    **meta: anything else to keep (architecture, accuracy, ...).
  """
  return zoo.Model(name=name, module=None, params=params, function=apply_fn, meta={
      "architecture": "user", **meta,
      "dataset": None if dataset is None else str(dataset), "num_classes": num_classes,
      "sha256": params_sha256(params)})


def entry_points() -> dict[str, importlib.metadata.EntryPoint]:
  """The models packages register in the `advsweep.models` entry-point group."""
  return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _function(reference: str) -> Callable[[], Any]:
  """The callable a reference names, imported (the user's own code runs here)."""
  registered = entry_points()
  if reference in registered:
    entry = registered[reference]
    try:
      return entry.load()
    except Exception as err:  # noqa: BLE001  (an installed package can fail in any way)
      raise ModelReferenceError(
          f"model {reference!r}: its entry point {entry.value} (package "
          f"{entry.dist.name if entry.dist else '?'}) cannot be loaded "
          f"({type(err).__name__}: {_first_line(err)}); reinstall that package or remove "
          "it") from None
  module_name, sep, attribute = reference.partition(":")
  if not sep or not module_name or not attribute:
    raise ModelReferenceError(
        f"unknown model {reference!r}; valid choices: {', '.join(zoo.ZOO)}"
        + (f", {', '.join(registered)}" if registered else "")
        + ", or a function as package.module:function")
  _current_folder_first()
  try:
    module = importlib.import_module(module_name)
  except ImportError as err:
    raise ModelReferenceError(f"model {reference!r}: cannot import {module_name} ({err}); "
                              "install the package or add its folder to PYTHONPATH") from None
  except Exception as err:  # noqa: BLE001  (the user's module runs here and can raise anything)
    raise ModelReferenceError(
        f"model {reference!r}: importing {module_name} raised {type(err).__name__}: "
        f"{_first_line(err)} ({_where(err)}); fix the module") from None
  function = getattr(module, attribute, None)
  if not callable(function):
    raise ModelReferenceError(f"model {reference!r}: {module_name} has no function "
                              f"{attribute!r}")
  return function


def _current_folder_first() -> None:
  """Puts the current folder on the import path, as `python -m` does, so a user's
  `package.module:function` beside them imports without PYTHONPATH."""
  here = os.getcwd()
  if here not in sys.path and "" not in sys.path:
    sys.path.insert(0, here)


def _first_line(err: BaseException) -> str:
  return " ".join(str(err).split()) or "no message"


def _where(err: BaseException) -> str:
  """The innermost frame of an exception's traceback, as `file:line`."""
  tb = err.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"


def split_defense(reference: str) -> tuple[str, str | None]:
  """`"cifar10_allconv+jpeg:75"` -> ("cifar10_allconv", "jpeg:75"); no `+`: no defense."""
  base, sep, defense = reference.partition("+")
  return (base, defense) if sep else (reference, None)


def check_reference(reference: str) -> None:
  """Raises ModelReferenceError unless `reference` names a model, optionally behind a
  defense (`MODEL+jpeg:75`); nothing is loaded."""
  if not isinstance(reference, str):
    return
  reference, defense = split_defense(reference)
  if defense is not None:
    try:
      defenses.parse(defense)
    except ValueError as err:
      raise ModelReferenceError(str(err)) from None
  if reference not in zoo.ZOO:
    _function(reference)


def resolve(reference: str, checkpoint_dir: str | Path | None = None) -> zoo.Model:
  """The model a config names: a zoo model (from `checkpoint_dir` where given), an entry
  point's model, or what `package.module:function()` returns; `NAME+DEFENSE` puts it
  behind an input-transformation defense (`models.defenses`)."""
  base, defense = split_defense(reference)
  if defense is not None:
    defended = defenses.defend(resolve(base, checkpoint_dir), defense)
    return dataclasses.replace(defended, name=reference)
  if reference in zoo.ZOO:
    return zoo.load(reference, checkpoint_dir)
  function = _function(reference)
  try:
    built = function()
  except Exception as err:  # noqa: BLE001  (the user's function can raise anything)
    raise ModelReferenceError(
        f"model {reference!r}: {getattr(function, '__name__', 'the function')}() raised "
        f"{type(err).__name__}: {_first_line(err)} ({_where(err)}); fix the function") from None
  if not isinstance(built, zoo.Model):
    raise ModelReferenceError(f"model {reference!r} returned {type(built).__name__}, not an "
                              "advsweep Model; build one with advsweep.models.custom.model(...)")
  return built
