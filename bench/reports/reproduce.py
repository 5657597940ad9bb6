"""`advsweep reproduce PAPER [--quick]`: run a paper's sweep and print ours beside theirs.

The published figures and their sources live in each paper's folder, `bench/papers/<paper>/`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from advsweep.bench import papers as papers_lib
from advsweep.bench import stats
from advsweep.bench.driver import config as config_lib
from advsweep.bench.driver import results, sweep
from advsweep.bench.evaluation import standard_runs
from advsweep.bench.reports import report, tables

RATE_METRICS = ("success_rate", "top1_error", "top5_error", "accuracy")
# Over every image of the cell, the way robustness is usually published (RobustBench, the
# MNIST challenge): an image misclassified when clean counts as an error.
ALL_IMAGE_METRICS = ("clean_accuracy", "robust_accuracy", "adv_error")
MEAN_METRICS = ("mean_adv_conf", "mean_l0_fraction")  # over successful attacks


def published() -> dict[str, Any]:
  """Every paper's paper.toml by name (`bench.papers`)."""
  return papers_lib.published()


def papers() -> list[str]:
  return list(published())


def _matches(params: dict[str, Any], wanted: dict[str, Any]) -> bool:
  for key, value in wanted.items():
    if key not in params:
      return False
    ours = params[key]
    if isinstance(value, float) or isinstance(ours, float):
      if not isinstance(ours, int | float) or not math.isclose(ours, value, rel_tol=1e-9):
        return False
    elif ours != value:
      return False
  return True


def metric(cols: dict[str, np.ndarray], mask: np.ndarray, name: str
           ) -> tuple[float, int, tuple[float, float]]:
  """(value, n, 95% interval) of a metric over the rows in `mask`: the clean-correct ones,
  or all of them for `ALL_IMAGE_METRICS`."""
  if name in ALL_IMAGE_METRICS:
    robust = cols["clean_correct"] & (cols["adv_pred"] == cols["label"])
    hits = {"clean_accuracy": cols["clean_correct"], "robust_accuracy": robust,
            "adv_error": ~robust}[name][mask]
    k, n = int(hits.sum()), len(hits)
    return (k / n if n else math.nan), n, tables.wilson_interval(k, n)
  ok = mask & cols["clean_correct"]
  if name in RATE_METRICS:
    hits = {"success_rate": cols["success"],
            "top1_error": cols["adv_pred"] != cols["label"],
            "accuracy": cols["adv_pred"] == cols["label"],
            "top5_error": ~cols["adv_top5_correct"]}[name][ok]
    n = len(hits)
    k = int(hits.sum())
    return (k / n if n else math.nan), n, tables.wilson_interval(k, n)
  if name in MEAN_METRICS:
    column = {"mean_adv_conf": "adv_conf", "mean_l0_fraction": "l0_fraction"}[name]
    values = cols[column][ok & cols["success"]].astype(np.float64)
    n = len(values)
    if n == 0:
      return math.nan, 0, (math.nan, math.nan)
    mean, low, high = stats.t_interval(values)
    return mean, n, (low, high)
  valid = RATE_METRICS + ALL_IMAGE_METRICS + MEAN_METRICS
  raise ValueError(f"unknown metric {name!r}; valid: {', '.join(valid)}")


FIGURE_HEADER = ("figure", "model", "paper", "ours", "n", "95% interval", "paper source")


# A figure with this `attack` is the standard evaluation's robust accuracy, read from what
# `advsweep robustness --standard` kept (`<out_root>/standard-<norm>/<model>.json`, the
# figure's `norm`, default linf).
STANDARD = "standard"


def _standard_row(fig: dict[str, Any], model: str, weights: set[str], folder: Path
                  ) -> list[str]:
  """The standard evaluation's figure for `model`, if it measured the run's weights."""
  kept = standard_runs.load(folder, model)
  command = f"advsweep robustness --standard --models {model}"
  if kept is None or kept[0].get("model_sha256") not in weights:
    why = "not run" if kept is None else "other weights"
    return [fig["what"], model, _fmt(fig.get("value")), f"{why}: {command}", "0", "-",
            fig.get("source", "-")]
  summary = kept[0]
  lo, hi = summary["robust_interval"]
  return [fig["what"], model, _fmt(fig.get("value")), tables.pct(summary["robust_accuracy"], 2),
          str(summary["num_images"]), f"{tables.pct(lo, 1)}-{tables.pct(hi, 1)}",
          fig.get("source", "not in our sources")]


def figure_rows(table: pa.Table, figures: list[dict[str, Any]],
                out_root: Path | None = None) -> list[list[str]]:
  """One row per published figure and matching model of the run; a figure of the standard
  evaluation (`attack = "standard"`) reads its kept summary under `out_root`."""
  cols = report.columns(table)
  # A plain cell's params hold no adaptive key: it matches the key at its default.
  params = np.array([{**config_lib.ADAPTIVE_KEYS, **json.loads(p)} for p in cols["params"]],
                    dtype=object)
  rows = []
  for fig in figures:
    models = [fig["model"]] if "model" in fig else list(dict.fromkeys(cols["model"].tolist()))
    for model in models:
      if fig["attack"] == STANDARD:
        weights = set(cols["model_sha256"][cols["model"] == model].tolist())
        folder = Path(out_root or "results") / f"standard-{fig.get('norm', 'linf')}"
        rows.append(_standard_row(fig, model, weights, folder))
        continue
      mask = (cols["model"] == model) & (cols["attack"] == fig["attack"])
      wanted = fig.get("params", {})
      mask &= np.array([_matches(p, wanted) for p in params], bool)
      if not mask.any():
        rows.append([fig["what"], model, _fmt(fig.get("value")), "not run", "0", "-",
                     fig.get("source", "-")])
        continue
      value, n, (lo, hi) = metric(cols, mask, fig["metric"])
      interval = "-" if math.isnan(lo) else f"{tables.pct(lo, 1)}-{tables.pct(hi, 1)}"
      rows.append([fig["what"], model, _fmt(fig.get("value")), tables.pct(value, 2), str(n),
                   interval,
                   fig.get("source", "not in our sources")])
  return rows


def _fmt(value: float | None) -> str:
  return "-" if value is None else tables.pct(value, 2)


def class_pair_matrix(table: pa.Table, attack: str = "jsma") -> tuple[list[str], list[list[str]]]:
  """Papernot's class-pair study: success rate (%) and mean features changed per pair."""
  cols = report.columns(table)
  mask = (cols["attack"] == attack) & cols["clean_correct"] & (cols["target"] >= 0)
  classes = sorted(set(cols["label"][mask].tolist()) | set(cols["target"][mask].tolist()))
  header = ["source \\ target", *map(str, classes)]
  rows = []
  for s in classes:
    row = [str(s)]
    for t in classes:
      cell = mask & (cols["label"] == s) & (cols["target"] == t)
      if s == t or not cell.any():
        row.append("-")
        continue
      won = cell & cols["success"]
      rate = won.sum() / cell.sum()
      frac = cols["l0_fraction"][won].mean() if won.any() else math.nan
      row.append(f"{100 * rate:.0f}% / {tables.pct(frac, 1)}")
    rows.append(row)
  return header, rows



def _class_pairs_section(table: pa.Table) -> tuple[str, list[str], list[list[str]]]:
  header, rows = class_pair_matrix(table)
  return "Class pairs: success rate / mean features changed on successes", header, rows


def _twins_section(table: pa.Table) -> tuple[str, list[str], list[list[str]]]:
  from advsweep.bench.reports import robustness

  header, rows = robustness.twin_rows(table)
  return ("Each defended model beside its twin, image by image (exact McNemar test, "
          "Newcombe interval)", header, rows)


def _twins_both_correct_section(table: pa.Table) -> tuple[str, list[str], list[list[str]]]:
  from advsweep.bench.reports import robustness

  header, rows = robustness.twin_rows(table, both_correct=True)
  return ("Each defended model beside its twin on the images both classify correctly: the "
          "share still correct is one minus the attack's success rate (exact McNemar test, "
          "Newcombe interval)", header, rows)


# A paper's own tables, named by its `sections` in its paper.toml.
SECTIONS = {"class_pairs": _class_pairs_section, "twins": _twins_section,
            "twins_both_correct": _twins_both_correct_section}

def reproduce(paper: str, quick: bool = False, out_root: str | Path = "results",
              data_dir: str | None = None, overrides: list[str] | None = None,
              progress: bool = True, log=print) -> str:
  """Runs (or resumes) the paper's sweeps and prints the comparison; returns the Markdown,
  also written to `<out_root>/reproduce-<paper>[-quick].md`."""
  entry = _entry(paper)
  for name in entry["configs"]:
    config = config_lib.load(name, overrides, quick=quick)
    sweep.run(config, Path(out_root) / config.name, data_dir=data_dir, progress=progress,
              log=log)
  text, body = comparison(paper, quick, out_root, overrides)
  log(text)
  tables.write_text(Path(out_root) / f"reproduce-{paper}{'-quick' if quick else ''}.md", body)
  return body


def _entry(paper: str) -> dict[str, Any]:
  data = published()
  if paper not in data:
    raise config_lib.ConfigError(f"unknown paper {paper!r}; valid choices: {', '.join(data)}")
  return data[paper]


def kept_state(paper: str, quick: bool = False, out_root: str | Path = "results") -> str:
  """Whether `out_root` holds the paper's runs as its configs are now: "kept" (every run
  folder finished, made with the current config), "missing" (a folder is absent),
  "partial" (a run has units still to run) or "stale" (a folder was made with another
  version of its config)."""
  for name in _entry(paper)["configs"]:
    config = config_lib.load(name, quick=quick)
    out_dir = Path(out_root) / config.name
    meta = results.read_run_meta(out_dir)
    if meta is None:
      return "missing"
    if meta.get("config_hash") != config.config_hash:
      return "stale"
    if not sweep.finished(out_dir):
      return "partial"
  return "kept"


def comparison(paper: str, quick: bool = False, out_root: str | Path = "results",
               overrides: list[str] | None = None, shown_root: str | Path | None = None
               ) -> tuple[str, str]:
  """The paper's figures beside ours, from its run folders as they are (nothing is run):
  the terminal text and the Markdown. `shown_root`: how the Markdown names `out_root`."""
  entry = _entry(paper)
  markdown = [f"# {paper}: {entry['title']}", "", entry.get("note", ""), ""]
  text = []
  for name in entry["configs"]:
    config = config_lib.load(name, overrides, quick=quick)
    out_dir = Path(out_root) / config.name
    shown = Path(shown_root) / config.name if shown_root is not None else out_dir
    table = results.read_run(out_dir)
    text.append(f"{paper} ({config.name}, {table.num_rows} rows in {shown}): {entry['title']}")
    markdown.append(f"Run `{config.name}`: {table.num_rows} rows in `{shown}`.")
    figures = [f for f in entry.get("figures", []) if f.get("config", name) == name]
    if figures:
      rows = figure_rows(table, figures, Path(out_root))
      text.append(tables.format_text(FIGURE_HEADER, rows))
      markdown += ["", tables.format_markdown(FIGURE_HEADER, rows)]
    if "defenses" in entry:
      defense_text, defense_markdown = report.defense_lines(table)
      text += defense_text
      markdown += defense_markdown
    for section in entry.get("sections", []):  # the paper's own tables (`SECTIONS`)
      title, header, rows = SECTIONS[section](table)
      if not rows:  # nothing of the kind in this config's run
        continue
      text += ["", title, tables.format_text(header, rows)]
      markdown += ["", f"## {title}", "", tables.format_markdown(header, rows)]
    if "tables" in entry:
      cells = report.summaries(table, config.bin_names)
      for (model, method, eps), layout in report.possas_tables(cells).items():
        paper_table = entry["tables"].get(method, {})
        title = (f"{method} method, {model}, eps {eps}: ours (slides, Inception V3 on "
                 "ImageNet)")
        rows = report.possas_rows(layout, {k: v for k, v in paper_table.items()
                                           if k in config.bin_names})
        text += ["", title, tables.format_text(report.POSSAS_HEADER, rows)]
        markdown += ["", f"## {title}", "", tables.format_markdown(report.POSSAS_HEADER, rows)]
    text.append("")
  text.append(f"note: {entry.get('note', '')}")
  return "\n".join(text), "\n".join(markdown) + "\n"
