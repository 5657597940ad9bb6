"""Small helpers: binomial intervals and plain-text, Markdown and CSV tables."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence

from advsweep.bench import stats
from advsweep.models import files

# The 95% Wilson score interval of a binomial proportion: scipy's, through `bench.stats`.
wilson_interval = stats.wilson_interval


def pct(x: float, digits: int = 1) -> str:
  return "-" if x is None or math.isnan(x) else f"{100 * x:.{digits}f}%"


def num(x: float, digits: int = 3) -> str:
  return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def format_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """An aligned plain-text table."""
  cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)).rstrip(),
           "  ".join("-" * w for w in widths)]
  lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in cells[1:]]
  return "\n".join(lines)


def format_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
  return "\n".join(lines)


def csv_text(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  sink = io.StringIO()
  writer = csv.writer(sink, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  return sink.getvalue()


def write_text(path: str | os.PathLike, text: str) -> None:
  files.atomic_write_text(path, text)
