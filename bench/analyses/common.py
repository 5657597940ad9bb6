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

from advsweep.bench.driver import results
from advsweep.bench.reports import tables
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
