"""`advsweep compare BASELINE NEW`: the regression check between two runs.

Cells are matched by model, attack configuration (its hash) and confidence bin. A cell fails
when its new success rate lies outside the baseline's 95% Wilson interval, when its time per
image grew by more than `time_factor` (and by more than `time_floor` seconds over the cell's
images, so that sub-second jitter in tiny cells is not called a regression), when its number
of clean-correct images changed, or when it is missing from the new run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from advsweep.bench.driver import results
from advsweep.bench.reports import report, tables

DEFAULT_TIME_FACTOR = 3.0
DEFAULT_TIME_FLOOR = 1.0  # seconds over the cell's images


@dataclasses.dataclass(frozen=True)
class Difference:
  baseline: report.CellSummary
  new: report.CellSummary | None
  status: str  # "ok", "success rate", "slower", "missing"

  @property
  def failed(self) -> bool:
    return self.status != "ok"


def compare_cells(baseline: list[report.CellSummary], new: list[report.CellSummary],
                  time_factor: float = DEFAULT_TIME_FACTOR,
                  time_floor: float = DEFAULT_TIME_FLOOR) -> list[Difference]:
  """Matches cells and judges each: see the module docstring."""
  by_key = {(c.model, c.config_hash, c.conf_bin): c for c in new}
  out = []
  for base in baseline:
    other = by_key.get((base.model, base.config_hash, base.conf_bin))
    if other is None:
      out.append(Difference(base, None, "missing"))
      continue
    problems = []
    lo, hi = base.interval
    if base.n and other.n and not lo - 1e-12 <= other.success_rate <= hi + 1e-12:
      problems.append("success rate")
    if base.n != other.n:
      problems.append("n")
    extra_seconds = (other.s_per_image - base.s_per_image) * other.images
    if other.s_per_image > time_factor * base.s_per_image and extra_seconds > time_floor:
      problems.append("slower")
    out.append(Difference(base, other, ", ".join(problems) or "ok"))
  return out


HEADER = ("model", "attack", "params", "bin", "n", "base success", "base 95% CI",
          "new success", "change", "base s/img", "new s/img", "ratio", "status")


def difference_rows(diffs: list[Difference]) -> list[list[str]]:
  rows = []
  for d in diffs:
    b, n = d.baseline, d.new
    lo, hi = b.interval
    row = [b.model, b.attack, report.params_text(b.params), b.conf_bin, str(b.n),
           tables.pct(b.success_rate), f"{tables.pct(lo)}-{tables.pct(hi)}"]
    if n is None:
      row += ["-", "-", tables.num(b.s_per_image, 4), "-", "-"]
    else:
      change = 100 * (n.success_rate - b.success_rate)
      row += [tables.pct(n.success_rate), f"{change:+.1f} pt", tables.num(b.s_per_image, 4),
              tables.num(n.s_per_image, 4),
              f"{n.s_per_image / b.s_per_image:.2f}x" if b.s_per_image > 0 else "-"]
    rows.append([*row, d.status.upper() if d.failed else "ok"])
  return rows


def as_json(diffs: list[Difference], extra: int) -> str:
  """The comparison for a CI job: each baseline cell, its new figures and its status."""
  return json.dumps({
      "cells": len(diffs), "failed": sum(d.failed for d in diffs), "not_judged": extra,
      "differences": [{"status": d.status, "baseline": report.cell_record(d.baseline),
                       "new": None if d.new is None else report.cell_record(d.new)}
                      for d in diffs]}, indent=1)


def compare(baseline_dir: str | Path, new_dir: str | Path,
            time_factor: float = DEFAULT_TIME_FACTOR, time_floor: float = DEFAULT_TIME_FLOOR,
            log=print, output_format: str = "text") -> int:
  """Prints the table of differences (or, with `output_format="json"`, `as_json`); returns
  the exit status (1 if any cell failed)."""
  meta = results.read_run_meta(baseline_dir) or {}
  bins = meta.get("config", {}).get("bins", {}).get("names")
  base = report.summaries(results.read_run(baseline_dir), bins)
  new = report.summaries(results.read_run(new_dir), bins)
  diffs = compare_cells(base, new, time_factor, time_floor)
  failed = [d for d in diffs if d.failed]
  extra = {(c.model, c.config_hash, c.conf_bin) for c in new} - {
      (c.model, c.config_hash, c.conf_bin) for c in base}
  if output_format == "json":
    log(as_json(diffs, len(extra)))
    return 1 if failed else 0
  log(tables.format_text(HEADER, difference_rows(diffs)))
  if extra:
    log(f"{len(extra)} cells of {new_dir} are not in the baseline (not judged)")
  log(f"{len(diffs)} cells compared: {len(failed)} failed (success rate outside the "
      f"baseline's 95% interval, n changed, more than {time_factor:g}x and "
      f"{time_floor:g} s slower, or missing)")
  return 1 if failed else 0
