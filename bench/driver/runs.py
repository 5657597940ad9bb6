"""Reading a run: its rows, the sparse attacks' stored changes, the models that made them and
the images they were made on. The public API the analyses and reports use to get at a run
(the sweep writes it, `bench.driver.results` keeps its files).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from advsweep import attacks
from advsweep.bench.driver import results, sweep
from advsweep.bench.reports import report
from advsweep.models import custom, datasets, zoo


def read_rows(run_dir: str | Path, attack: str | None = None) -> tuple[pa.Table, dict]:
  """The run's rows (of `attack` only, if given) and their columns as numpy arrays.

  Raises:
    ResultsError: no run there, or no rows of `attack`, naming the command that makes them.
  """
  table = results.read_run(run_dir)
  if attack is not None:
    names = table.column("attack").to_numpy(zero_copy_only=False)
    keep = np.asarray(names == attack)
    table = table.filter(pa.array(keep))
    if table.num_rows == 0:
      has = ", ".join(sorted(set(names.tolist()))) or "none"
      if attack not in attacks.REGISTRY:
        raise results.ResultsError(f"unknown attack {attack!r}; the attacks of {run_dir}: "
                                   f"{has} (pass one with --attack)")
      raise results.ResultsError(
          f"{run_dir} has no {attack} rows (its attacks: {has}); pass one of them with "
          f"--attack, or run a config with an [attacks.{attack}] table first (e.g. "
          "`advsweep reproduce su2019 --quick`)")
  return table, report.columns(table)


@dataclasses.dataclass
class Changes:
  """The sparse attacks' stored changes of a run's rows (`bench.driver.perturbations`), per row:
  flat feature indices and new values (None where a row has none), and which rows have them."""

  index: list
  new: list

  @property
  def stored(self) -> np.ndarray:
    return np.asarray([i is not None for i in self.index], bool)


def read_changes(table: pa.Table) -> Changes:
  return Changes(table.column("changed_index").to_pylist(),
                 table.column("changed_to").to_pylist())


def load_model(run_dir: str | Path, cols: dict, name: str,
               checkpoint_dir: str | None = None) -> Any:
  """The model that made a run's rows of `name`: a zoo model (from `checkpoint_dir`, else the
  folder the run recorded, else the shipped weights), `MODEL+DEFENSE`, or a user's model.

  Raises:
    ResultsError: the rows were made with other weights (their `model_sha256` differs from
      the model's): recomputing with these would report another model's numbers.
  """
  if checkpoint_dir is None:
    checkpoint_dir = (results.read_run_meta(run_dir) or {}).get("checkpoint_dir")
  model = sweep.resolve_model(name, checkpoint_dir)
  made_with = set(np.asarray(cols["model_sha256"])[np.asarray(cols["model"]) == name].tolist())
  have = model.meta.get("sha256")
  if made_with and made_with != {have}:
    where = f"the checkpoints in {checkpoint_dir}" if checkpoint_dir else (
        "the shipped zoo weights" if custom.split_defense(name)[0] in zoo.ZOO else "its code")
    raise results.ResultsError(
        f"{run_dir}: the {name} rows were made with weights sha256 "
        f"{', '.join(sorted(h[:12] for h in made_with))}..., but {name} loads from {where} "
        f"with sha256 {str(have)[:12]}...; pass --checkpoint-dir with the folder the run "
        "used")
  return model


def load_models(run_dir: str | Path, attack: str | None = None,
                checkpoint_dir: str | None = None) -> dict[str, Any]:
  """Every model of a run's rows (of `attack`, where given), each checked by `load_model`."""
  _, cols = read_rows(run_dir, attack)
  return {name: load_model(run_dir, cols, name, checkpoint_dir)
          for name in dict.fromkeys(cols["model"].tolist())}


def has_layers(model: Any) -> bool:
  """Whether the model's layers can be read (`Model.intermediates`): a zoo model's Flax
  module; not a user's `apply_fn` nor an input defense in front of a model."""
  return model.module is not None


def load_split(dataset: str, split: str, data_dir: str | None
               ) -> tuple[np.ndarray, np.ndarray]:
  """([N, H, W, C] uint8 images, [N] labels) of a run's dataset split, read-only."""
  return sweep.dataset_split(dataset, split, data_dir)


def load_images(dataset: str, split: str, data_dir: str | None) -> np.ndarray:
  """[N, H, W, C] uint8 images of a run's dataset split."""
  return load_split(dataset, split, data_dir)[0]


def image_shape(dataset: str, split: str, data_dir: str | None) -> tuple[int, int, int]:
  """(H, W, C) of a run's dataset: from the zoo's table, else from its first image."""
  if dataset in datasets.DATASETS:
    return datasets.DATASETS[dataset].shape
  return tuple(int(d) for d in load_images(dataset, split, data_dir).shape[1:])


def clean_images(cols: dict, rows: np.ndarray, data_dir: str | None) -> np.ndarray:
  """The float32 clean images of rows `rows` (all from one dataset split)."""
  datasets_ = set(cols["dataset"][rows].tolist())
  splits = set(cols["split"][rows].tolist())
  if len(datasets_) != 1 or len(splits) != 1:
    raise ValueError(f"rows of several datasets or splits ({datasets_}, {splits}): analyse "
                     "one model at a time")
  images = load_images(datasets_.pop(), splits.pop(), data_dir)
  return images[cols["example_idx"][rows]].astype(np.float32) / 255.0
