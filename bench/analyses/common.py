"""What every analysis shares: reading a run's rows, loading its models and images, the
statistics the papers' claims are tested with, and writing the outputs atomically.

An analysis writes under `RUN/analysis/`: `KIND.parquet` (its own rows), `KIND-*.png`
(figures) and `KIND.md` (the headline table), and prints the headline table.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import stats as scipy_stats

from advsweep.bench import report, results, stats, tables
from advsweep.models import files


@dataclasses.dataclass
class Output:
  """An analysis' results: its rows, figures, headline table and notes."""

  kind: str
  rows: pa.Table
  header: list[str]
  headline: list[list[str]]
  figures: list[Path] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def text(self) -> str:
    lines = [f"{self.kind}:", tables.format_text(self.header, self.headline)]
    return "\n".join(lines + self.notes)

  def markdown(self) -> str:
    return "\n".join([f"# {self.kind}", "", tables.format_markdown(self.header, self.headline),
                      "", *self.notes, "", *(f"![{p.stem}]({p.name})" for p in self.figures),
                      ""])


def analysis_dir(run_dir: str | Path) -> Path:
  return Path(run_dir) / results.ANALYSIS_DIR


def write(output: Output, run_dir: str | Path) -> Path:
  """Writes the rows and the Markdown headline beside the figures; returns the folder."""
  out = analysis_dir(run_dir)
  sink = pa.BufferOutputStream()
  pq.write_table(output.rows, sink)
  files.atomic_write_bytes(out / f"{output.kind}.parquet", sink.getvalue().to_pybytes())
  files.atomic_write_text(out / f"{output.kind}.md", output.markdown())
  return out


def save_figure(fig: Any, path: Path) -> Path:
  """A matplotlib figure to PNG, atomically; closes it."""
  import matplotlib.pyplot as plt

  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  files.atomic_write_bytes(path, buffer.getvalue())
  return path


def pyplot() -> Any:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def read_rows(run_dir: str | Path, attack: str | None = None) -> tuple[pa.Table, dict]:
  """The run's rows (of `attack` only, if given) and their columns as numpy arrays.

  Raises:
    ResultsError: no run there, or no rows of `attack`, naming the command that makes them.
  """
  from advsweep import attacks

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
  """The sparse attacks' stored changes of a run's rows (`bench.perturbations`), per row:
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
  from advsweep.bench import sweep

  if checkpoint_dir is None:
    checkpoint_dir = (results.read_run_meta(run_dir) or {}).get("checkpoint_dir")
  model = sweep.resolve_model(name, checkpoint_dir)
  made_with = set(np.asarray(cols["model_sha256"])[np.asarray(cols["model"]) == name].tolist())
  have = model.meta.get("sha256")
  if made_with and made_with != {have}:
    where = f"the checkpoints in {checkpoint_dir}" if checkpoint_dir else (
        "the shipped zoo weights" if name.partition("+")[0] in _zoo_names() else "its code")
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


def _zoo_names() -> set[str]:
  from advsweep.models import zoo

  return set(zoo.ZOO)


def has_layers(model: Any) -> bool:
  """Whether the model's layers can be read (`Model.intermediates`): a zoo model's Flax
  module; not a user's `apply_fn` nor an input defense in front of a model."""
  return model.module is not None


def load_split(dataset: str, split: str, data_dir: str | None
               ) -> tuple[np.ndarray, np.ndarray]:
  """([N, H, W, C] uint8 images, [N] labels) of a run's dataset split, read-only."""
  from advsweep.bench import sweep

  return sweep.dataset_split(dataset, split, data_dir)


def load_images(dataset: str, split: str, data_dir: str | None) -> np.ndarray:
  """[N, H, W, C] uint8 images of a run's dataset split."""
  return load_split(dataset, split, data_dir)[0]


def image_shape(dataset: str, split: str, data_dir: str | None) -> tuple[int, int, int]:
  """(H, W, C) of a run's dataset: from the zoo's table, else from its first image."""
  from advsweep.models import datasets

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


def mean_interval(x: np.ndarray) -> tuple[float, float, float]:
  """Mean and its 95% Student's t interval (nan where fewer than two values):
  `bench.stats.t_interval`."""
  return stats.t_interval(x)


def rank_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """Mann-Whitney U test of `a` against `b`: (P(a > b) + P(a = b) / 2, two-sided p).

  scipy's asymptotic test with the tie correction and no continuity correction (nan where
  a side is empty). The first value is the common-language effect size: 0.5 is no
  difference, 1 means every `a` exceeds every `b`.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if len(a) == 0 or len(b) == 0:
    return math.nan, math.nan
  if np.ptp(np.concatenate([a, b])) == 0:  # every value tied: nothing to rank
    return 0.5, 1.0
  test = scipy_stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic",
                                  use_continuity=False)
  return float(test.statistic) / (len(a) * len(b)), float(test.pvalue)


def fmt_interval(mean: float, lo: float, hi: float, digits: int = 3) -> str:
  if math.isnan(mean):
    return "-"
  if math.isnan(lo):
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def fmt_rate(successes: int, n: int) -> str:
  if n == 0:
    return "-"
  lo, hi = tables.wilson_interval(successes, n)
  return f"{tables.pct(successes / n)} ({tables.pct(lo)}-{tables.pct(hi)})"


def fmt_p(p: float) -> str:
  return "-" if math.isnan(p) else (f"{p:.2g}" if p >= 1e-4 else "<1e-4")


def table_from_columns(columns: dict[str, Sequence[Any]]) -> pa.Table:
  """An analysis' rows (equal-length columns: lists or numpy arrays) as an arrow table."""
  return pa.Table.from_pydict({k: list(v) if not isinstance(v, np.ndarray) else v
                               for k, v in columns.items()})
