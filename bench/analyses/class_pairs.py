"""Class pairs of the one-pixel attack (Su, Vargas, Sakurai 2019, the heat maps of
original x target class): for each source class, the share of its attacked images that the
attack carried to each other class.

Read from a run's rows. In targeted runs (a fixed or random target per row) a cell is the
success rate of the attempts from source s toward t. In untargeted and "at least one target"
runs a row holds only the class the attack reached (`adv_pred` of a success), so a cell is the
share of source-s images carried to t; a row sums to the source's success rate. Su et al.'s
per-target matrix is a targeted sweep: `target = "explicit"`, `target_class = [0, ..., 9]`.
"""

from __future__ import annotations

import json

import numpy as np

from advsweep.bench.analyses import common
from advsweep.bench.driver import runs
from advsweep.bench.reports import report
from advsweep.models import datasets

KIND = "class_pairs"
# Target modes whose rows hold the class the attack reached rather than one it aimed at.
REACHED_MODES = ("untargeted", "at_least_one_target")


def _mode(config_json: str) -> str:
  target = json.loads(config_json).get("target", "untargeted")
  return "reached" if target in REACHED_MODES else "targeted"


def _without_target_class(text: str) -> str:
  """A config's or params' JSON without `target_class`: a sweep over target classes is one
  matrix (each class its own cell, its own `config_hash`)."""
  fields = json.loads(text) if text else {}
  return json.dumps({k: v for k, v in fields.items() if k != "target_class"}, sort_keys=True)


def matrices(cols: dict) -> list[dict]:
  """Per (model, attack configuration up to the target class): the counts and the attempts
  of every class pair."""
  out = []
  keep = cols["clean_correct"]
  group = np.array([_without_target_class(c) for c in cols["config_json"]], dtype=object)
  for model in dict.fromkeys(cols["model"][keep].tolist()):
    for config in dict.fromkeys(group[keep & (cols["model"] == model)].tolist()):
      rows = keep & (cols["model"] == model) & (group == config)
      first = np.flatnonzero(rows)[0]
      mode = _mode(cols["config_json"][first])
      config_hash = "+".join(sorted(set(cols["config_hash"][rows].tolist())))
      info = datasets.DATASETS.get(cols["dataset"][first])
      k = info.num_classes if info else int(max(cols["label"].max(), cols["adv_pred"].max())) + 1
      hits, attempts = np.zeros((k, k), np.int64), np.zeros((k, k), np.int64)
      label, success = cols["label"][rows], cols["success"][rows]
      if mode == "targeted":
        np.add.at(attempts, (label, cols["target"][rows]), 1)
        np.add.at(hits, (label[success], cols["target"][rows][success]), 1)
      else:
        per_source = np.bincount(label, minlength=k)
        attempts[:] = per_source[:, None]
        np.add.at(hits, (label[success], cols["adv_pred"][rows][success]), 1)
      np.fill_diagonal(attempts, 0)
      out.append({"model": model, "config_hash": config_hash, "mode": mode,
                  "params": _without_target_class(cols["params"][first]), "hits": hits,
                  "attempts": attempts,
                  "class_names": info.class_names if info else tuple(map(str, range(k)))})
  return out


def _figure(m: dict, path) -> None:
  plt = common.pyplot()
  with np.errstate(invalid="ignore", divide="ignore"):
    share = np.where(m["attempts"] > 0, m["hits"] / np.maximum(m["attempts"], 1), np.nan)
  fig, ax = plt.subplots(figsize=(5.2, 4.4))
  image = ax.imshow(100 * share, cmap="viridis", vmin=0)
  names = m["class_names"]
  ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
  ax.set_yticks(range(len(names)), names, fontsize=7)
  ax.set_xlabel("target class" if m["mode"] == "targeted" else "class reached")
  ax.set_ylabel("source class")
  ax.set_title(f"{m['model']}: one-pixel {report.params_text(m['params'])}", fontsize=8)
  fig.colorbar(image, ax=ax, label="% of attacked images")
  common.save_figure(fig, path)


def _source(names, hits, n, s: int) -> str:
  return f"{names[s]} {common.fmt_rate(int(hits[s]), int(n[s]))}"


def analyze(run_dir, *, data_dir: str | None = None, attack: str = "one_pixel",
            **_: object) -> common.Output:
  """The class-pair matrices of a run's `attack` rows, one figure per model and config."""
  _, cols = runs.read_rows(run_dir, attack)
  found = matrices(cols)
  out_dir = common.analysis_dir(run_dir)
  rows = {k: [] for k in ("model", "config_hash", "params", "mode", "source", "target",
                          "hits", "attempts")}
  headline, figures = [], []
  for i, m in enumerate(found):
    k = len(m["hits"])
    for s in range(k):
      for t in range(k):
        if s != t:
          for key, value in (("model", m["model"]), ("config_hash", m["config_hash"]),
                             ("params", m["params"]), ("mode", m["mode"]), ("source", s),
                             ("target", t), ("hits", int(m["hits"][s, t])),
                             ("attempts", int(m["attempts"][s, t]))):
            rows[key].append(value)
    figures.append(out_dir / f"{KIND}-{i}.png")
    _figure(m, figures[-1])
    names = m["class_names"]
    by_source_hits = m["hits"].sum(1)
    by_source_n = m["attempts"].max(1) if m["mode"] == "reached" else m["attempts"].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
      source_rate = np.where(by_source_n > 0, by_source_hits / np.maximum(by_source_n, 1), -1)
      pair = np.where(m["attempts"] > 0, m["hits"] / np.maximum(m["attempts"], 1), -1)
    s_best, s_worst = int(np.argmax(source_rate)), int(np.argmin(
        np.where(by_source_n > 0, source_rate, 2)))
    top = np.dstack(np.unravel_index(np.argsort(-pair, axis=None)[:3], pair.shape))[0]
    headline.append([
        m["model"], report.params_text(m["params"]), m["mode"],
        str(int(by_source_n.sum()) if m["mode"] == "reached" else int(m["attempts"].sum())),
        _source(names, by_source_hits, by_source_n, s_best),
        _source(names, by_source_hits, by_source_n, s_worst),
        ", ".join(f"{names[s]}->{names[t]} {m['hits'][s, t]}/{m['attempts'][s, t]}"
                  for s, t in top if pair[s, t] > 0) or "-"])
  header = ["model", "attack", "cells", "images", "most vulnerable source",
            "least vulnerable source", "top pairs (hits/attempts)"]
  notes = ["Cells: 'reached' = share of the source's images carried to the class (untargeted, "
           "at least one target); 'targeted' = success rate toward the target. Su et al. "
           "show such source x target matrices for CIFAR-10."]
  return common.Output(KIND, common.table_from_columns(rows), header, headline, figures, notes)
