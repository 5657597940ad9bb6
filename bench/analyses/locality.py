"""Locality of one-pixel vulnerability (Vargas and Su, "Understanding the One-Pixel Attack:
Propagation Maps and Locality Analysis"): does the colour of a successful one-pixel attack
also succeed at the pixels around the attacked one?

For each successful k = 1 attack of a run, its colour is applied alone at every pixel at
Chebyshev distance d = 1, 2, ... from the attacked pixel (the ring of the (2d+1)^2 square) and
at random positions of the same image; the success rate (the row's own criterion: another
class, or the row's target) against the distance, beside the random rate. Rates are averaged
per image first, so an image with many ring pixels weighs as much as one near a border, and
the interval is over images. The paper's claim: nearby pixels share the vulnerability.
"""

from __future__ import annotations

import numpy as np

from advsweep.bench import stats
from advsweep.bench.analyses import common, probe
from advsweep.bench.driver import perturbations, runs
from advsweep.bench.reports import report

KIND = "locality"
DISTANCES, QUICK_DISTANCES = 5, 3
RANDOM_POSITIONS = 64


def ring(y: int, x: int, d: int, h: int, w: int) -> np.ndarray:
  """[P, 2] the pixels at Chebyshev distance exactly `d` from (y, x) inside an h x w image."""
  dy, dx = np.meshgrid(np.arange(-d, d + 1), np.arange(-d, d + 1), indexing="ij")
  on = np.maximum(abs(dy), abs(dx)) == d
  pts = np.stack([dy[on] + y, dx[on] + x], -1)
  inside = (pts[:, 0] >= 0) & (pts[:, 0] < h) & (pts[:, 1] >= 0) & (pts[:, 1] < w)
  return pts[inside]


def analyze(run_dir, *, data_dir: str | None = None, attack: str = "one_pixel",
            checkpoint_dir: str | None = None, quick: bool = False, seed: int = 0,
            **_: object) -> common.Output:
  table, cols = runs.read_rows(run_dir, attack)
  changes = runs.read_changes(table)
  index, new = changes.index, changes.new
  distances = QUICK_DISTANCES if quick else DISTANCES
  rng = np.random.default_rng(seed)
  keep = cols["clean_correct"] & cols["success"] & (cols["l0"] == 1)
  keep &= changes.stored
  out = {k: [] for k in ("model", "config_hash", "example_idx", "distance", "trials", "hits")}
  header = ["model", "attack", "images", *[f"d={d}" for d in range(1, distances + 1)],
            "random"]
  headline, curves = [], []
  for model_name, config_hash in dict.fromkeys(zip(cols["model"][keep],
                                                   cols["config_hash"][keep], strict=True)):
    rows_ = np.flatnonzero(keep & (cols["model"] == model_name)
                           & (cols["config_hash"] == config_hash))
    model = runs.load_model(run_dir, cols, model_name, checkpoint_dir)
    images = runs.clean_images(cols, rows_, data_dir)
    h, w, c = images.shape[1:]
    tester = probe.PixelProbe(model, images)
    ids, rr, cc, colours, tags = [], [], [], [], []
    for n, row in enumerate(rows_):
      (y, x), = perturbations.changed_pixels(index[row], (h, w, c))
      colour = images[n, y, x].copy()
      _, _, ch = perturbations.feature_coordinates(index[row], (h, w, c))
      colour[ch] = new[row]
      for d in range(1, distances + 1):
        pts = ring(y, x, d, h, w)
        ids += [n] * len(pts)
        rr += pts[:, 0].tolist()
        cc += pts[:, 1].tolist()
        colours += [colour] * len(pts)
        tags += [(n, d)] * len(pts)
      pts = rng.integers(0, [h, w], (RANDOM_POSITIONS, 2))
      ids += [n] * len(pts)
      rr += pts[:, 0].tolist()
      cc += pts[:, 1].tolist()
      colours += [colour] * len(pts)
      tags += [(n, 0)] * len(pts)
    pred = tester.probs(np.asarray(ids), np.asarray(rr), np.asarray(cc),
                        np.asarray(colours)).argmax(-1)
    tags = np.asarray(tags)
    targets = cols["target"][rows_][tags[:, 0]]
    labels = cols["label"][rows_][tags[:, 0]]
    hit = np.where(targets >= 0, pred == targets, pred != labels)
    per_image = np.full((len(rows_), distances + 1), np.nan)
    for n in range(len(rows_)):
      for d in range(distances + 1):
        at = (tags[:, 0] == n) & (tags[:, 1] == d)
        if at.any():
          per_image[n, d] = hit[at].mean()
          for key, value in (("model", model_name), ("config_hash", config_hash),
                             ("example_idx", int(cols["example_idx"][rows_[n]])),
                             ("distance", d), ("trials", int(at.sum())),
                             ("hits", int(hit[at].sum()))):
            out[key].append(value)
    intervals = [stats.t_interval(per_image[~np.isnan(per_image[:, d]), d])
                 for d in range(distances + 1)]
    curves.append((model_name, cols["params"][rows_[0]], intervals))
    headline.append([model_name, report.params_text(cols["params"][rows_[0]]), str(len(rows_)),
                     *[_pct(s) for s in intervals[1:]], _pct(intervals[0])])
  if not curves:
    raise ValueError(f"{run_dir}: no successful k = 1 {attack} rows with stored changes")
  path = common.analysis_dir(run_dir) / f"{KIND}.png"
  _figure(curves, path)
  notes = ["Distance 0 in the parquet is the random positions. Vargas and Su's claim: nearby "
           "pixels share the vulnerability (the rate falls with distance, above random near "
           "the attacked pixel). Mean over images with its 95% interval."]
  return common.Output(KIND, common.table_from_columns(out), header, headline, [path], notes)


def _pct(stat: tuple[float, float, float]) -> str:
  mean, lo, hi = stat
  if np.isnan(mean):
    return "-"
  if np.isnan(lo):
    return f"{100 * mean:.0f}%"
  return f"{100 * mean:.0f}% ({100 * max(lo, 0):.0f}-{100 * min(hi, 1):.0f})"


def _figure(curves, path) -> None:
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
  for model, params, intervals in curves:
    d = np.arange(1, len(intervals))
    mean = np.asarray([s[0] for s in intervals[1:]])
    lo = np.asarray([s[1] for s in intervals[1:]])
    hi = np.asarray([s[2] for s in intervals[1:]])
    line, = ax.plot(d, 100 * mean, marker="o", label=f"{model} {report.params_text(params)}")
    if not np.all(np.isnan(lo)):
      ax.fill_between(d, 100 * lo, 100 * hi, alpha=0.15, color=line.get_color())
    ax.axhline(100 * intervals[0][0], ls="--", color=line.get_color(), lw=1)
  ax.set_xlabel("Chebyshev distance from the attacked pixel")
  ax.set_ylabel("success of the same colour (%)")
  ax.set_title("one-pixel locality (dashed: random positions)", fontsize=9)
  ax.legend(fontsize=6)
  common.save_figure(fig, path)
