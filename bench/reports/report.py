"""`advsweep report DIR`: summary tables (text, Markdown, CSV), Possas's tables and plots.

Every rate is over the images the model classified correctly before the attack (the papers
exclude the others); intervals are 95% Wilson score intervals.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from advsweep import attacks
from advsweep.bench.checks import detection, validity
from advsweep.bench.driver import config as config_lib
from advsweep.bench.driver import results
from advsweep.bench.reports import tables
from advsweep.models import files

ALL_BINS = "all"


def columns(table: pa.Table) -> dict[str, np.ndarray]:
  return {name: np.asarray(table.column(name).to_numpy(zero_copy_only=False))
          for name in table.column_names}


@dataclasses.dataclass(frozen=True)
class CellSummary:
  """Figures for one model x attack configuration x confidence bin."""

  model: str
  attack: str
  params: str  # JSON of the swept parameters
  config_hash: str
  conf_bin: str
  images: int  # rows, misclassified clean images included
  n: int  # clean-correct images: the denominator of every rate below
  successes: int
  top1_errors: int
  top5_errors: int
  mean_adv_conf: float  # over successful attacks
  mean_l0: float
  mean_l0_fraction: float  # over successful attacks (Papernot's "features modified")
  mean_linf: float
  mean_queries: float
  mean_evaluated: float  # rows the model computed: the gap to mean_queries searched nothing
  s_per_image: float
  invalid: int

  @property
  def success_rate(self) -> float:
    return self.successes / self.n if self.n else math.nan

  @property
  def interval(self) -> tuple[float, float]:
    return tables.wilson_interval(self.successes, self.n)

  @property
  def top1_error(self) -> float:
    return self.top1_errors / self.n if self.n else math.nan

  @property
  def top5_error(self) -> float:
    return self.top5_errors / self.n if self.n else math.nan

  @property
  def param_dict(self) -> dict[str, Any]:
    return json.loads(self.params)


def _mean(x: np.ndarray) -> float:
  return float(np.mean(x)) if len(x) else math.nan


def _mean_recorded(x: np.ndarray) -> float:
  """The mean over rows that record a value (parts written before a column existed hold
  null, read as NaN); NaN where none does."""
  x = np.asarray(x, np.float64)
  return float(np.nanmean(x)) if np.isfinite(x).any() else math.nan


def summarise(cols: dict[str, np.ndarray], mask: np.ndarray, key: tuple) -> CellSummary:
  model, attack, params, config_hash, conf_bin = key
  ok = mask & cols["clean_correct"]
  won = ok & cols["success"]
  return CellSummary(
      model=model, attack=attack, params=params, config_hash=config_hash, conf_bin=conf_bin,
      images=int(mask.sum()), n=int(ok.sum()), successes=int(won.sum()),
      top1_errors=int((ok & (cols["adv_pred"] != cols["label"])).sum()),
      top5_errors=int((ok & ~cols["adv_top5_correct"]).sum()),
      mean_adv_conf=_mean(cols["adv_conf"][won]),
      mean_l0=_mean(cols["l0"][ok]),
      mean_l0_fraction=_mean(cols["l0_fraction"][won]),
      mean_linf=_mean(cols["linf"][ok]),
      mean_queries=_mean(cols["queries"][ok]),
      mean_evaluated=_mean_recorded(cols["evaluated"][ok]),
      s_per_image=_mean(cols["wall_s"][mask]),
      invalid=int((mask & ~cols["valid"]).sum()))


def summaries(table: pa.Table, bin_order: list[str] | None = None) -> list[CellSummary]:
  """One summary per model x attack config x bin, plus an "all" row per config."""
  cols = columns(table)
  groups: dict[tuple, list[int]] = defaultdict(list)
  for i, key in enumerate(zip(cols["model"], cols["attack"], cols["params"],
                              cols["config_hash"], strict=True)):
    groups[key].append(i)
  present = list(dict.fromkeys(cols["conf_bin"].tolist()))
  order = [b for b in (bin_order or []) if b in present] + [
      b for b in present if b not in (bin_order or [])]
  out = []
  for key, idx in sorted(groups.items(), key=lambda kv: _sort_key(kv[0])):
    mask = np.zeros(table.num_rows, bool)
    mask[idx] = True
    for b in order:
      in_bin = mask & (cols["conf_bin"] == b)
      if in_bin.any():
        out.append(summarise(cols, in_bin, (*key, b)))
    if len(order) > 1:
      out.append(summarise(cols, mask, (*key, ALL_BINS)))
  return out


def _sort_key(key: tuple) -> tuple:
  model, attack, params, _ = key
  values = [(k, (0, v, "") if isinstance(v, int | float) else (1, 0, str(v)))
            for k, v in json.loads(params).items()]
  return model, attack, values


def params_text(params: str) -> str:
  d = json.loads(params)
  return " ".join(f"{k}={_short(v)}" for k, v in d.items()) or "(paper defaults)"


def _short(v: Any) -> str:
  """Floats in 4 digits, or as k/255 where that is what they are (eps = 8/255)."""
  if not isinstance(v, float):
    return str(v)
  short = f"{v:.4g}"
  steps = v * 255
  if float(short) != v and abs(steps - round(steps)) < 1e-6:
    return f"{round(steps)}/255"
  return short


SUMMARY_HEADER = ("model", "attack", "params", "bin", "n", "success", "95% CI", "top-1 err",
                  "top-5 err", "adv conf", "l0", "l0 frac", "linf", "queries", "evaluated",
                  "s/img",
                  "invalid")


def summary_rows(cells: list[CellSummary]) -> list[list[str]]:
  rows = []
  for c in cells:
    lo, hi = c.interval
    rows.append([c.model, c.attack, params_text(c.params), c.conf_bin, str(c.n),
                 tables.pct(c.success_rate), f"{tables.pct(lo)}-{tables.pct(hi)}",
                 tables.pct(c.top1_error), tables.pct(c.top5_error),
                 tables.pct(c.mean_adv_conf), tables.num(c.mean_l0, 1),
                 tables.pct(c.mean_l0_fraction, 2), tables.num(c.mean_linf, 3),
                 tables.num(c.mean_queries, 0), tables.num(c.mean_evaluated, 0),
                 tables.num(c.s_per_image, 4), str(c.invalid)])
  return rows


def pivot(cells: list[CellSummary]) -> tuple[list[str], list[list[str]]]:
  """The terminal's compact table: one row per model, attack and setting, one column per
  confidence bin (success rate on clean-correct images with its 95% interval, and n), and
  the attack time per image; the full table goes to summary.md and summary.csv."""
  bins = list(dict.fromkeys(c.conf_bin for c in cells if c.conf_bin != ALL_BINS))
  columns = [*bins, ALL_BINS] if len(bins) > 1 else [ALL_BINS]
  rows: dict[tuple[str, str, str], dict[str, CellSummary]] = {}
  for c in cells:
    rows.setdefault((c.model, c.attack, params_text(c.params)), {})[c.conf_bin] = c
  header = ["model", "attack", "params", *columns, "s/img"]
  body = []
  for (model, attack, params), by_bin in rows.items():
    texts = []
    for name in columns:
      c = by_bin.get(name)
      if c is None or not c.n:
        texts.append("-")
        continue
      lo, hi = c.interval
      texts.append(f"{tables.pct(c.success_rate)} ({tables.pct(lo)}-{tables.pct(hi)}) "
                   f"n={c.n}")
    every = by_bin.get(ALL_BINS) or next(iter(by_bin.values()))
    body.append([model, attack, params, *texts, tables.num(every.s_per_image, 4)])
  return header, body


def summary_csv(cells: list[CellSummary]) -> str:
  header = ["model", "attack", "params", "config_hash", "conf_bin", "images", "n",
            "successes", "success_rate", "ci_low", "ci_high", "top1_error", "top5_error",
            "mean_adv_conf", "mean_l0", "mean_l0_fraction", "mean_linf", "mean_queries",
            "mean_evaluated", "s_per_image", "invalid"]
  rows = [[c.model, c.attack, c.params, c.config_hash, c.conf_bin, c.images, c.n,
           c.successes, c.success_rate, *c.interval, c.top1_error, c.top5_error,
           c.mean_adv_conf, c.mean_l0, c.mean_l0_fraction, c.mean_linf, c.mean_queries,
           c.mean_evaluated, c.s_per_image, c.invalid] for c in cells]
  return tables.csv_text(header, rows)


# Possas's slides: least-likely and inverse perturbations, fast (one step) and iterative.
POSSAS_METHODS = {"least-likely": lambda p: p.get("target") == "least_likely",
                  "inverse": lambda p: p.get("target", "untargeted") == "untargeted"
                  and p.get("away_from") == "prediction"}
POSSAS_KINDS = {"fgsm": "fast", "bim": "iterative"}  # the slides' one-step and iterative
POSSAS_COLUMNS = (("iterative", "top5"), ("iterative", "top1"), ("fast", "top5"),
                  ("fast", "top1"))
POSSAS_HEADER = ("bin", "iterative top-5 error", "iterative top-1 error", "fast top-5 error",
                 "fast top-1 error")


def possas_tables(cells: list[CellSummary]) -> dict[tuple[str, str, str], dict]:
  """Possas's two tables, per model and eps: {(model, method, eps): {bin: {column: cell}}}.

  Fast is FGSM and iterative is BIM at the same eps; top-k error is the share of clean-correct
  images whose label left the top k.
  """
  out: dict[tuple[str, str, str], dict] = defaultdict(lambda: defaultdict(dict))
  for c in cells:
    kind = POSSAS_KINDS.get(c.attack)
    if kind is None or c.conf_bin == ALL_BINS:
      continue
    p = c.param_dict
    for method, matches in POSSAS_METHODS.items():
      if matches(p):
        eps = _short(p.get("eps", "default"))
        out[(c.model, method, eps)][c.conf_bin][kind] = c
  return {k: v for k, v in out.items()
          if all(len(row) == 2 for row in v.values())}


def possas_rows(table: dict[str, dict[str, CellSummary]],
                published: dict[str, list[float]] | None = None) -> list[list[str]]:
  """Rows high/medium/low; each cell "ours" or "ours (paper)" with n in the bin column."""
  rows = []
  for conf_bin, kinds in table.items():
    n = kinds["fast"].n
    row = [f"{conf_bin} (n={n})"]
    for i, (kind, err) in enumerate(POSSAS_COLUMNS):
      c = kinds[kind]
      text = tables.pct(c.top5_error if err == "top5" else c.top1_error, 0)
      if published and conf_bin in published:
        text += f" ({published[conf_bin][i]:.0f}%)"
      row.append(text)
    rows.append(row)
  return rows


DEFENSE_HEADER = ("model", "defense", "attack", "params", "n", "accuracy", "95% CI",
                  "adaptive", "adaptive accuracy", "95% CI", "transfer accuracy")


def _plain_params(params: dict[str, Any]) -> str:
  return json.dumps({k: v for k, v in params.items() if k not in config_lib.ADAPTIVE_KEYS},
                    sort_keys=True)


def _accuracy(cols: dict[str, np.ndarray], mask: np.ndarray) -> tuple[str, str]:
  ok = mask & cols["clean_correct"]
  n = int(ok.sum())
  if not n:
    return "-", "-"
  k = int((ok & (cols["adv_pred"] == cols["label"])).sum())
  lo, hi = tables.wilson_interval(k, n)
  return tables.pct(k / n), f"{tables.pct(lo)}-{tables.pct(hi)}"


def _cell_masks(cols: dict[str, np.ndarray], keep: np.ndarray
                ) -> dict[tuple[str, str, str], np.ndarray]:
  """The rows of each (model, attack, params) cell, among the rows in `keep`."""
  masks: dict[tuple[str, str, str], np.ndarray] = {}
  keys = zip(cols["model"], cols["attack"], cols["params"], strict=True)
  for i, (key, kept) in enumerate(zip(keys, keep, strict=True)):
    if kept:
      masks.setdefault(key, np.zeros(len(keep), bool))[i] = True
  return masks


def defense_lines(table: pa.Table) -> tuple[list[str], list[str]]:
  """The defenses table and the masking flags, as text and as Markdown lines (none where
  the run has no defended model): for `report` and `reproduce`."""
  rows, flag_lines = defense_section(table)
  if not rows:
    return [], []
  title = ("Defenses: accuracy (clean-correct images still classified correctly) under the "
           "plain and the adaptive attack")
  flag_lines = flag_lines or ["no gradient-masking flag raised"]
  text = ["", title, tables.format_text(DEFENSE_HEADER, rows), "",
          "Gradient-masking checks", *flag_lines]
  markdown = ["", f"## {title}", "", tables.format_markdown(DEFENSE_HEADER, rows), "",
              "## Gradient-masking checks", "", *[f"- {f}" for f in flag_lines]]
  return text, markdown


def defense_section(table: pa.Table) -> tuple[list[list[str]], list[str]]:
  """Accuracy under the plain and the adaptive attack side by side, per model, defense and
  attack configuration, with the transfer attack's; and the masking flags of every cell
  (`bench.checks.validity.cell_flags`). Empty where the run has no defended model."""
  cols = columns(table)
  if "defense" not in cols or all(d in (None, "none") for d in cols["defense"]):
    return [], []
  for name in ("grad_zero_share", "transfer_success"):
    cols[name] = np.asarray(table.column(name).to_pylist(), object)
  cols["forward_repeatable"] = np.asarray(
      [v is not False for v in table.column("forward_repeatable").to_pylist()])
  cells = _cell_masks(cols, np.ones(table.num_rows, bool))
  groups: dict[tuple[str, str, str], dict[bool, tuple[dict, np.ndarray]]] = defaultdict(dict)
  for (model, attack, params), mask in cells.items():
    p = json.loads(params)
    groups[(model, attack, _plain_params(p))][config_lib.is_adaptive(p)] = (p, mask)
  rows, flag_lines = [], []
  for (model, attack, plain), pair in sorted(groups.items()):
    defense = str(cols["defense"][next(iter(pair.values()))[1]][0] or "none")
    plain_cell = pair.get(False)
    adaptive_cell = pair.get(True)
    acc, ci = _accuracy(cols, plain_cell[1]) if plain_cell else ("-", "-")
    adaptive_name, a_acc, a_ci = "-", "-", "-"
    if adaptive_cell:
      p = adaptive_cell[0]
      adaptive_name = " ".join(f"{k}={p[k]}" for k in config_lib.ADAPTIVE_KEYS if k in p)
      a_acc, a_ci = _accuracy(cols, adaptive_cell[1])
    transfer = "-"
    if plain_cell:
      ok = plain_cell[1] & cols["clean_correct"]
      t = [v for v in cols["transfer_success"][ok] if v is not None]
      if t:
        transfer = tables.pct(1 - np.mean(np.asarray(t, bool)))
    n = int(((plain_cell or adaptive_cell)[1] & cols["clean_correct"]).sum())
    rows.append([model, defense, attack, params_text(plain), str(n), acc, ci, adaptive_name,
                 a_acc, a_ci, transfer])
    peers = [({"attack": a, "params": json.loads(pp)}, m)
             for (mm, a, pp), m in cells.items() if mm == model]
    for adaptive, (p, mask) in sorted(pair.items()):
      cell = {"attack": attack, "params": p}
      twin = adaptive_cell[1] if (not adaptive and adaptive_cell) else None
      for message in validity.cell_flags(cols, mask, cell, peers, twin):
        flag_lines.append(f"FLAG {model} {attack} {params_text(json.dumps(p))}: {message}")
  return rows, flag_lines


def detection_lines(found: list[detection.Detection]) -> tuple[list[str], list[str]]:
  """The detector's table as text and as Markdown lines (none where nothing was scored)."""
  if not found:
    return [], []
  title = ("Detection: neighbour-difference score (Papernot et al.), threshold at 5% false "
           "positives on the clean images")
  rows = detection.rows(found, params_text)
  return (["", title, tables.format_text(detection.HEADER, rows)],
          ["", f"## {title}", "", tables.format_markdown(detection.HEADER, rows)])


def detection_section(table: pa.Table) -> tuple[list[detection.Detection],
                                                dict[tuple[str, str, str], np.ndarray],
                                                dict[str, np.ndarray]]:
  """Papernot et al.'s detector against every attack configuration whose rows hold the
  neighbour-difference scores."""
  cols = columns(table)
  if "nd_score_clean" not in cols:
    return [], {}, cols
  cols["nd_score_clean"] = np.asarray(table.column("nd_score_clean").to_numpy(
      zero_copy_only=False), np.float64)
  cols["nd_score_adv"] = np.asarray(table.column("nd_score_adv").to_numpy(
      zero_copy_only=False), np.float64)
  groups = _cell_masks(cols, ~np.isnan(cols["nd_score_clean"]))
  found = [d for key, mask in sorted(groups.items())
           if (d := detection.evaluate(cols, mask, key)) is not None]
  return found, groups, cols


def plot(cells: list[CellSummary], out_dir: Path) -> list[Path]:
  """PNG plots: success against each attack's budget (`AttackSpec.budget_field`: eps, k,
  gamma) per bin, where the run swept it."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  series: dict[tuple, dict[str, list[tuple[float, float]]]] = defaultdict(
      lambda: defaultdict(list))
  for c in cells:
    p = dict(c.param_dict)
    spec = attacks.REGISTRY.get(c.attack)
    x_name = spec.budget_field if spec is not None else None
    if x_name not in p or not isinstance(p[x_name], int | float):
      continue
    x = float(p.pop(x_name))
    rest = " ".join(f"{k}={_short(v)}" for k, v in sorted(p.items()))
    series[(c.model, c.attack, x_name, rest)][c.conf_bin].append((x, c.success_rate))
  for (model, attack, x_name, rest), lines in series.items():
    if all(len(points) < 2 for points in lines.values()):
      continue
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for conf_bin, points in lines.items():
      points.sort()
      ax.plot([x for x, _ in points], [100 * y for _, y in points], marker="o",
              label=conf_bin, linestyle="--" if conf_bin == ALL_BINS else "-")
    ax.set_xlabel(x_name)
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{model} {attack} {rest}".strip(), fontsize=9)
    ax.legend(title="confidence bin", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    slug = "-".join(s for s in (model, attack, x_name, rest.replace(" ", "_")) if s)
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", slug.replace("=", ""))  # a user's `pkg.mod:fn`
    path = out_dir / f"success-vs-{slug}.png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    files.atomic_write_bytes(path, buffer.getvalue())
    written.append(path)
  return written


def cell_record(cell: CellSummary) -> dict[str, Any]:
  """One cell as plain JSON values: its keys, the swept parameters as a table, the rates with
  their 95% Wilson interval, and the means (null where undefined)."""
  low, high = cell.interval

  def value(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)

  return {"model": cell.model, "attack": cell.attack, "params": json.loads(cell.params),
          "config_hash": cell.config_hash, "bin": cell.conf_bin, "images": cell.images,
          "n": cell.n, "successes": cell.successes, "success_rate": value(cell.success_rate),
          "interval": [value(low), value(high)], "top1_error": value(cell.top1_error),
          "top5_error": value(cell.top5_error), "mean_adv_conf": value(cell.mean_adv_conf),
          "mean_l0_fraction": value(cell.mean_l0_fraction),
          "mean_linf": value(cell.mean_linf), "mean_queries": value(cell.mean_queries),
          "s_per_image": value(cell.s_per_image), "invalid": cell.invalid}


def summary_json(folder: str | Path) -> str:
  """A run's summary as JSON for a CI job to read: the run and every cell (`cell_record`)."""
  folder = Path(folder)
  table = results.read_run(folder)
  meta = results.read_run_meta(folder) or {}
  cells = summaries(table, meta.get("config", {}).get("bins", {}).get("names"))
  return json.dumps({"run": str(folder), "rows": table.num_rows,
                     "run_ids": sorted(table.column("run_id").unique().to_pylist()),
                     "cells": [cell_record(c) for c in cells]}, indent=1)


def compile_note(table: pa.Table) -> str:
  """`(compilation X s apart, over U of N units)`: the units' recorded compile time (one value
  per unit, on each of its rows; units written before it was recorded have none)."""
  if "compile_s" not in table.column_names:
    return ""
  keys = zip(*(table.column(c).to_pylist() for c in ("model", "config_hash", "created_at")),
             strict=True)
  per_unit = dict(zip(keys, table.column("compile_s").to_pylist(), strict=True))
  recorded = [s for s in per_unit.values() if s is not None]
  if not recorded:
    return ""
  return (f" (compilation {sum(recorded):.1f} s apart, over {len(recorded)} of "
          f"{len(per_unit)} units)")


def report(folder: str | Path, out_dir: str | Path | None = None, plots: bool = True,
           log=print) -> list[CellSummary]:
  """Prints the summary (and Possas's tables where the run has them); writes MD, CSV, PNG."""
  folder = Path(folder)
  table = results.read_run(folder)
  meta = results.read_run_meta(folder) or {}
  bin_order = meta.get("config", {}).get("bins", {}).get("names")
  cells = summaries(table, bin_order)
  out_dir = Path(out_dir) if out_dir else folder / "report"
  rows = summary_rows(cells)
  run_ids = ", ".join(sorted(table.column("run_id").unique().to_pylist()))
  header, compact = pivot(cells)
  text = [f"{folder}: {table.num_rows} rows, run {run_ids}",
          "success rate over clean-correct images (n) with its 95% Wilson interval, by "
          "confidence bin; s/img is attack time" + compile_note(table) + "; every column in "
          f"{out_dir / 'summary.md'} and summary.csv", tables.format_text(header, compact)]
  markdown = ["# advsweep report", "", f"Run folder `{folder}`, {table.num_rows} rows.", "",
              tables.format_markdown(SUMMARY_HEADER, rows)]
  for (model, method, eps), layout in possas_tables(cells).items():
    title = f"Possas layout: {method} method, {model}, eps {eps}"
    prow = possas_rows(layout)
    text += ["", title, tables.format_text(POSSAS_HEADER, prow)]
    markdown += ["", f"## {title}", "", tables.format_markdown(POSSAS_HEADER, prow)]
  defense_text, defense_markdown = defense_lines(table)
  text += defense_text
  markdown += defense_markdown
  found, groups, det_cols = detection_section(table)
  detection_text, detection_markdown = detection_lines(found)
  text += detection_text
  markdown += detection_markdown
  log("\n".join(text))
  tables.write_text(out_dir / "summary.md", "\n".join(markdown) + "\n")
  tables.write_text(out_dir / "summary.csv", summary_csv(cells))
  written = [out_dir / "summary.md", out_dir / "summary.csv"]
  if plots:
    written += plot(cells, out_dir)
    if found:
      written += detection.plot_roc(det_cols, groups, out_dir, params_text)
  log("wrote " + ", ".join(str(p) for p in written))
  return cells
