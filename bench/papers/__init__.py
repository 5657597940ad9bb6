"""The papers advsweep reproduces, one folder each: `bench/papers/<paper>/paper.toml` (title,
note, the run configs and the published figures with their sources) beside the run configs
it names (`<config>.toml`, found by `advsweep run` and `bench.driver.config.load` as any config).
`advsweep reproduce PAPER` runs the configs and prints the published figures beside ours
(`bench.reports.reproduce`); a paper's own tables are hooks named in its `sections`
(`bench.reports.reproduce.SECTIONS`). Adding a paper is adding a folder.

paper.toml's fields: `title`, `note`, `configs` (run configs, in this folder or
`bench/configs/`), optionally `sections`, `defenses` (print the defense table), `tables`
(Possas-style layouts) and `[[figures]]`, one per published figure: what it measures, the
setting it was measured in, where it is printed. `metric` is one of success_rate,
top1_error, top5_error, accuracy (rates over clean-correct images), clean_accuracy,
robust_accuracy, adv_error (over every image drawn: a clean misclassification counts as an
error), mean_adv_conf, mean_l0_fraction (over successful attacks); `model` (omit: every
model of the run) and `params` (a subset of the swept parameters) choose our rows; `value`
is the paper's figure as a fraction, and an entry without one is a setting we report with no
published counterpart in our sources; `config` (omit: every config) prints it under one of
the paper's configs only. `attack = "standard"` takes the standard evaluation's robust
accuracy of the model (`advsweep robustness --standard`, kept in `results/standard-<norm>/`,
`norm` default linf) where it measured the run's weights.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

# Where papers are found: this package's folders (a test adds one of its own).
FOLDERS: list[Path] = [Path(__file__).parent]
PAPER_FILE = "paper.toml"


def paper_dirs() -> dict[str, Path]:
  """Every paper's folder by name, in name order."""
  out = {}
  for root in FOLDERS:
    for folder in sorted(p for p in root.iterdir() if (p / PAPER_FILE).is_file()):
      out.setdefault(folder.name, folder)
  return out


def published() -> dict[str, dict[str, Any]]:
  """Every paper's paper.toml, by name."""
  return {name: tomllib.loads((folder / PAPER_FILE).read_text())
          for name, folder in paper_dirs().items()}


def config_files() -> dict[str, Path]:
  """The run configs kept in the papers' folders, by name."""
  return {p.stem: p for folder in paper_dirs().values() for p in sorted(folder.glob("*.toml"))
          if p.name != PAPER_FILE}


__all__ = ["FOLDERS", "config_files", "paper_dirs", "published"]
