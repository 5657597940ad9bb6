"""The results format: one parquet row per (image, attack configuration), written atomically.

A run folder `results/<run-name>/` holds `run.json` (the resolved config and its hash) and
`parts/*.parquet`, one file per work unit (a batch of images under one attack
configuration). A unit's file appears whole or not at all (write, fsync, rename), so a run
killed at any moment resumes by skipping the units whose files exist. Reading refuses a
file that is corrupt or has another schema, naming it, instead of half-reading the run.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from advsweep.models import files

SCHEMA = pa.schema([
    ("run_id", pa.string()),  # <config name>-<config hash>: the same for every part of a run
    ("created_at", pa.timestamp("us", tz="UTC")),  # when the row's unit finished
    ("git_sha", pa.string()),
    ("versions", pa.string()),  # JSON: advsweep, jax, jaxlib, flax, evosax, numpy versions
    ("device_kind", pa.string()),
    ("device_count", pa.int32()),  # devices the batch was sharded over
    ("dataset", pa.string()),
    ("split", pa.string()),
    ("example_idx", pa.int64()),  # index in the split
    ("label", pa.int32()),
    ("model", pa.string()),
    ("model_sha256", pa.string()),
    ("attack", pa.string()),
    ("config_json", pa.string()),  # the attack's full config, target_class included
    ("config_hash", pa.string()),  # sha256 of config_json, 16 hex digits
    ("params", pa.string()),  # JSON of the parameters the config file set (the sweep axes)
    ("seed", pa.int64()),
    ("clean_pred", pa.int32()),
    ("clean_conf", pa.float32()),
    ("conf_bin", pa.string()),
    ("clean_correct", pa.bool_()),
    ("clean_top5_correct", pa.bool_()),
    ("target", pa.int32()),  # -1 untargeted
    ("adv_pred", pa.int32()),
    ("adv_conf", pa.float32()),
    ("adv_top5_correct", pa.bool_()),
    ("success", pa.bool_()),
    ("l0", pa.int32()),  # pixels changed
    ("l0_fraction", pa.float32()),  # fraction of input features changed
    ("l2", pa.float32()),
    ("linf", pa.float32()),
    ("queries", pa.int64()),
    ("wall_s", pa.float64()),  # the unit's attack time / its images, compilation excluded
    ("valid", pa.bool_()),  # budget, [0, 1] range and finite output checks passed
    ("evaluation", pa.string()),  # "full" forward pass or "pixel_local" (AttackResult)
    ("defense", pa.string()),  # the input transformation before the model, or "none"
    # Gradient-masking checks (`bench.checks.masking`); null where they do not apply.
    ("grad_zero_share", pa.float32()),  # input-gradient entries zero or non-finite, at the
    # clean image, of what the attack differentiates (gradient attacks)
    ("forward_repeatable", pa.bool_()),  # two draws of the model give the same logits
    ("transfer_success", pa.bool_()),  # the twin's adversarial image fools this model
    # Papernot et al.'s detection statistic (`attacks.common.neighbour_difference_score`).
    ("nd_score_clean", pa.float32()),
    ("nd_score_adv", pa.float32()),
    # Sparse attacks' changes (`bench.driver.perturbations`): indices into the image flattened in
    # (height, width, channel) order, the clean and the adversarial values; null for attacks
    # that change every feature (FGSM, PGD).
    ("changed_index", pa.list_(pa.int32())),
    ("changed_from", pa.list_(pa.float32())),
    ("changed_to", pa.list_(pa.float32())),
    # Rows the model really computed per image, padding of chunked calls and every restart
    # included (`AttackResult.evaluated`); `evaluated - queries` searched nothing.
    ("evaluated", pa.float64()),
    # The unit's compile seconds (tracing, lowering, XLA or the persistent cache), the same
    # on each of its rows; `wall_s` excludes them (`bench.driver.compilation`).
    ("compile_s", pa.float64()),
    # The sha256 of the weights the attack itself was trained to (AdvGAN's generator against
    # this model, `AttackSpec.trained_field`); null for attacks without.
    ("attack_weights_sha256", pa.string()),
])
# Columns added after the first release, in order: parts written before a column existed
# are read with it null (their evaluation, their defense, ... is not recorded).
_ADDED = ("evaluation", "defense", "grad_zero_share", "forward_repeatable",
          "transfer_success", "nd_score_clean", "nd_score_adv", "changed_index",
          "changed_from", "changed_to", "evaluated", "compile_s", "attack_weights_sha256")
# Columns that record when and where a row was made, not what it says.
PROVENANCE = ("created_at", "wall_s", "compile_s", "git_sha", "versions", "device_kind",
              "device_count")
ROW_KEY = ("model", "config_hash", "example_idx")
ANALYSIS_DIR = "analysis"  # `advsweep analyze` writes under RUN/analysis/: not rows of the run


class ResultsError(ValueError):
  """A results folder or file is corrupt, foreign or mismatched."""


class ForeignPartError(ResultsError):
  """A readable parquet file without advsweep's results schema (another tool or version)."""


@functools.cache
def git_sha() -> str:
  """The checkout's commit, with `+dirty` if it has changes; "unknown" outside git."""
  root = Path(__file__).resolve().parents[2]
  try:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                         text=True, check=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=root, capture_output=True, text=True, check=True,
                           timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return sha + ("+dirty" if dirty else "")


@functools.cache
def versions() -> str:
  out = {}
  for package in ("advsweep", "jax", "jaxlib", "flax", "evosax", "numpy"):
    try:
      out[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      out[package] = "not installed"
  return json.dumps(out, sort_keys=True)


def axis_name(field: str) -> str:
  """The column of a swept field: its own name, or `<name>_param` where a results column has
  it (the target mode `target` beside the `target` class column)."""
  return f"{field}_param" if field in SCHEMA.names else field


def _axis_type(values: list[Any]) -> pa.DataType:
  present = [v for v in values if v is not None]
  if present and all(isinstance(v, bool) for v in present):
    return pa.bool_()
  if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
    return pa.int64()
  if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
    return pa.float64()
  return pa.string()


def axis_schema(params: list[dict[str, Any]]) -> pa.Schema:
  """The typed columns of a run's sweep axes: one nullable column per field its cells set
  (`axis_name`), typed by the values (bool, int64, float64, else string; lists as JSON), in
  name order, so `pl.read_parquet(part).filter(pl.col("eps") == 0.1)` works."""
  fields: dict[str, list[Any]] = {}
  for cell in params:
    for key, value in cell.items():
      fields.setdefault(key, []).append(value)
  return pa.schema([(axis_name(k), _axis_type(v)) for k, v in sorted(fields.items())])


def axis_columns(axes: pa.Schema, params: list[dict[str, Any]]) -> dict[str, pa.Array]:
  """The axis columns of rows whose cell parameters are `params` (one dict a row)."""
  out = {}
  for field in axes:
    key = field.name.removesuffix("_param") if field.name.endswith("_param") and (
        field.name.removesuffix("_param") in SCHEMA.names) else field.name
    values = [p.get(key) for p in params]
    if pa.types.is_string(field.type):
      values = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
    elif pa.types.is_floating(field.type):
      values = [None if v is None else float(v) for v in values]
    out[field.name] = pa.array(values, field.type)
  return out


def write_part(path: str | os.PathLike, rows: dict[str, Any],
               axes: pa.Schema | None = None) -> None:
  """Writes one unit's rows (a dict of equal-length columns) atomically, with the run's
  typed axis columns (`axis_schema`) after the results columns."""
  table = pa.Table.from_pydict(rows, schema=SCHEMA)
  if axes is not None and len(axes):
    params = [json.loads(p) for p in rows["params"]]
    for name, column in axis_columns(axes, params).items():
      table = table.append_column(axes.field(name), column)
  sink = pa.BufferOutputStream()
  pq.write_table(table, sink)
  files.atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_part(path: str | os.PathLike) -> pa.Table:
  """Reads one part file; a corrupt or foreign file raises ResultsError naming it."""
  try:
    table = pq.read_table(path)
  except (OSError, pa.ArrowException) as err:
    raise ResultsError(f"{path} is corrupt ({err}); run the same `advsweep run` command "
                       "again: it recomputes that unit") from None
  known = [name for name in table.column_names if name in SCHEMA.names]
  axes = table.drop_columns(known)  # the run's typed axis columns, after the results'
  table = table.select(known)
  for i in range(len(_ADDED)):
    older = pa.schema([f for f in SCHEMA if f.name not in _ADDED[i:]])
    if table.schema.equals(older, check_metadata=False):
      for missing in _ADDED[i:]:
        field = SCHEMA.field(missing)
        table = table.append_column(field, pa.nulls(table.num_rows, field.type))
      break
  if not table.schema.equals(SCHEMA, check_metadata=False):
    raise ForeignPartError(f"{path} does not have the advsweep results schema; it is from "
                           "another version or tool: move it out of the run folder")
  for field, column in zip(axes.schema, axes.columns, strict=True):
    table = table.append_column(field, column)
  return table


def read_run(folder: str | os.PathLike) -> pa.Table:
  """All rows of a run folder (or of a folder of run folders), checked for duplicates."""
  folder = Path(folder)
  if not folder.is_dir():
    raise ResultsError(f"no results folder {folder}")
  paths = sorted(folder.rglob("*.parquet"))
  # In-flight temporary files, and the analyses' own tables (`RUN/analysis/`).
  paths = [p for p in paths if not p.name.startswith(".")
           and ANALYSIS_DIR not in p.relative_to(folder).parts]
  if not paths:
    raise ResultsError(f"{folder} holds no results (*.parquet); run `advsweep run` first")
  table = pa.concat_tables([read_part(p) for p in paths], promote_options="permissive")
  keys = set()
  for key in zip(*(table.column(c).to_pylist() for c in ("run_id", *ROW_KEY)), strict=True):
    if key in keys:
      raise ResultsError(f"{folder} holds the row {key} twice; it mixes copies of one run")
    keys.add(key)
  return table


def read_run_meta(folder: str | os.PathLike) -> dict[str, Any] | None:
  path = Path(folder) / "run.json"
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as err:
    raise ResultsError(f"{path} is corrupt ({err})") from None


def sort_rows(table: pa.Table) -> pa.Table:
  """Rows in a canonical order, to compare runs made in different unit orders."""
  return table.sort_by([(c, "ascending") for c in ("model", "attack", "config_hash",
                                                   "example_idx")])


def content(table: pa.Table) -> pa.Table:
  """The rows without their provenance columns, canonically ordered: what a run says."""
  return sort_rows(table).drop_columns(list(PROVENANCE))
