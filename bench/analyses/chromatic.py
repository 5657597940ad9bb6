"""Chromatic and spatial statistics of one-pixel attacks (Alatalo, Korpihalkola, Sipola,
Kokkonen: "Chromatic and spatial analysis of one-pixel attacks against an image classifier").

For every final candidate of a one-pixel run (the best candidate of a failed attack too), the
changed pixels' colour change, per channel and as a Euclidean distance in colour space, and
their position: a heat map and the distance to the image centre. Successful candidates against
unsuccessful ones, with 95% intervals and a Mann-Whitney rank test, for the paper's two
claims: the more effective attacks change the pixel's colour more, and the successful ones sit
near the centre of the image. Their images were breast-cancer tissue; ours are MNIST,
Fashion-MNIST and CIFAR-10.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from advsweep.bench import stats
from advsweep.bench.analyses import common
from advsweep.bench.driver import perturbations, runs
from advsweep.bench.reports import report

KIND = "chromatic"


def pixel_changes(table: pa.Table, cols: dict, data_dir: str | None = None
                  ) -> dict[str, np.ndarray]:
  """One entry per changed pixel of each clean-correct row: the row, position, colour change.

  The pixels are read from the rows' `changed_index` and `changed_to`; channels a candidate
  left at their clean value count as a change of 0.
  """
  index = table.column("changed_index").to_pylist()
  old = table.column("changed_from").to_pylist()
  new = table.column("changed_to").to_pylist()
  out = {k: [] for k in ("row", "y", "x", "delta")}
  missing = 0
  for i in np.flatnonzero(cols["clean_correct"]):
    if index[i] is None:
      missing += 1
      continue
    h, w, c = runs.image_shape(cols["dataset"][i], cols["split"][i], data_dir)
    y, x, ch = perturbations.feature_coordinates(index[i], (h, w, c))
    delta = np.asarray(new[i], np.float32) - np.asarray(old[i], np.float32)
    pixel = y * w + x
    for p in np.unique(pixel):
      change = np.zeros(c, np.float32)
      at = pixel == p
      change[ch[at]] = delta[at]
      out["row"].append(i)
      out["y"].append(int(p // w))
      out["x"].append(int(p % w))
      out["delta"].append(change)
  if missing:
    raise ValueError(f"{missing} rows have no stored changes (made before advsweep stored "
                     "them): run the config again into a new folder")
  return {k: np.asarray(v) for k, v in out.items()}


def analyze(run_dir, *, data_dir: str | None = None, attack: str = "one_pixel",
            **_: object) -> common.Output:
  table, cols = runs.read_rows(run_dir, attack)
  px = pixel_changes(table, cols, data_dir)
  if len(px["row"]) == 0:
    raise ValueError(f"{run_dir}: no clean-correct {attack} rows with changed pixels")
  success = cols["success"][px["row"]]
  distance = np.linalg.norm(px["delta"], axis=-1)
  shapes = {m: runs.image_shape(d, split, data_dir) for m, d, split in
            dict.fromkeys(zip(cols["model"], cols["dataset"], cols["split"], strict=True))}
  model = cols["model"][px["row"]]
  hw = np.asarray([shapes[m][:2] for m in model], np.float64)
  centre = np.hypot(px["y"] - (hw[:, 0] - 1) / 2, px["x"] - (hw[:, 1] - 1) / 2)
  # Normalised by the centre-to-corner distance: 0 at the centre, 1 in a corner.
  centre_share = centre / np.hypot((hw[:, 0] - 1) / 2, (hw[:, 1] - 1) / 2)
  rows = {"model": model, "config_hash": cols["config_hash"][px["row"]],
          "example_idx": cols["example_idx"][px["row"]], "success": success,
          "y": px["y"], "x": px["x"], "colour_change": [d.tolist() for d in px["delta"]],
          "colour_distance": distance, "centre_distance": centre_share}
  queries = cols["queries"][px["row"]]
  header = ["model", "attack", "pixels won/lost", "queries won/lost", "colour distance won",
            "colour distance lost", "P(won > lost), p", "centre distance won",
            "centre distance lost", "P(won < lost), p"]
  headline, figures, unequal = [], [], []
  out_dir = common.analysis_dir(run_dir)
  for i, (m, h) in enumerate(dict.fromkeys(zip(model, rows["config_hash"], strict=True))):
    at = (model == m) & (rows["config_hash"] == h)
    won, lost = at & success, at & ~success
    effect_c, p_c = stats.rank_test(distance[won], distance[lost])
    effect_s, p_s = stats.rank_test(centre_share[lost], centre_share[won])
    params = cols["params"][px["row"][at][0]]
    budget_won, budget_lost = _median(queries[won]), _median(queries[lost])
    if won.any() and lost.any() and budget_won != budget_lost:
      unequal.append(m)
    headline.append([
        m, report.params_text(params), f"{won.sum()}/{lost.sum()}",
        f"{budget_won:,.0f}/{budget_lost:,.0f}",
        common.fmt_interval(*stats.t_interval(distance[won])),
        common.fmt_interval(*stats.t_interval(distance[lost])),
        f"{common.fmt_interval(effect_c, np.nan, np.nan, 2)}, p {common.fmt_p(p_c)}",
        common.fmt_interval(*stats.t_interval(centre_share[won])),
        common.fmt_interval(*stats.t_interval(centre_share[lost])),
        f"{common.fmt_interval(effect_s, np.nan, np.nan, 2)}, p {common.fmt_p(p_s)}"])
    figures.append(out_dir / f"{KIND}-{i}.png")
    _figure(m, params, shapes[m], px, at, success, distance, figures[-1])
  notes = [f"Unequal search budgets ({', '.join(unequal)}): the successful searches stopped "
           "early, the failed ones ran the whole budget, which alone pushes their pixels' "
           "colours to the extremes; the colour comparison is confounded. Run the attack "
           "with stop_on_flip = false and stop_true_prob = 0 to compare at an equal budget."
           ] if unequal else []
  notes += ["Queries: the median search budget an image spent. Colour distance: Euclidean "
           "norm of the pixel's change in [0, 1] per channel (sqrt(C) at most). Centre "
           "distance: 0 at the image centre, 1 in a corner. "
           "P(won > lost) is the rank test's effect size (0.5: no difference). "
           "Alatalo et al.'s claims (medical images): successful attacks change the colour "
           "more and sit near the centre."]
  return common.Output(KIND, common.table_from_columns(rows), header, headline, figures, notes)


def _median(values: np.ndarray) -> float:
  return float(np.median(values)) if len(values) else float("nan")


def _figure(model, params, shape, px, at, success, distance, path) -> None:
  plt = common.pyplot()
  h, w, _ = shape
  fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), layout="constrained")
  for ax, keep, title in ((axes[0], at & success, "successful pixels"),
                          (axes[1], at & ~success, "unsuccessful final pixels")):
    counts = np.zeros((h, w))
    np.add.at(counts, (px["y"][keep], px["x"][keep]), 1)
    image = ax.imshow(counts, cmap="magma")
    ax.set_title(f"{title} (n={keep.sum()})", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(image, ax=ax, fraction=0.046)
  bins = np.linspace(0, max(float(distance[at].max()), 1e-6), 20)
  axes[2].hist(distance[at & success], bins, alpha=0.6, density=True, label="successful")
  axes[2].hist(distance[at & ~success], bins, alpha=0.6, density=True, label="unsuccessful")
  axes[2].set_xlabel("colour change (Euclidean, [0, 1] channels)")
  axes[2].legend(fontsize=8)
  fig.suptitle(f"{model}: one-pixel {report.params_text(params)}", fontsize=9)
  common.save_figure(fig, path)
