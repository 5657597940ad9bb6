"""One-pixel confidence maps (Alatalo, Korpihalkola, Sipola, Kokkonen): for an image, at every
pixel position, the lowest true-class probability that changing that pixel alone reaches, over
a grid of colours, drawn as a heat map beside the image.

Exhaustive: H x W x (levels^C) candidates per image (32 x 32 x 27 on CIFAR-10 by default),
which pixel-local evaluation (any convolutional model) makes cheap. The images are
taken from a one-pixel run (some it fooled, some it did not), and the map is set beside what
differential evolution found: a position where the grid flips the class shows how much of the
image is vulnerable, and whether DE's failures are the search's or the model's.
"""

from __future__ import annotations

import time

import numpy as np

from advsweep.bench.analyses import common, probe
from advsweep.bench.driver import perturbations, runs

KIND = "confidence_maps"
IMAGES, QUICK_IMAGES = 4, 2


def _levels(channels: int, quick: bool) -> int:
  if channels == 1:
    return 5 if quick else 17
  return 2 if quick else 3


def pick_images(cols: dict, model: str, count: int) -> list[tuple[int, bool, int]]:
  """Up to `count` clean-correct images of `model`: (row, fooled, example_idx), the fooled
  ones first, then the others, half and half where both exist."""
  rows = np.flatnonzero(cols["clean_correct"] & (cols["model"] == model))
  seen: dict[int, tuple[int, bool]] = {}
  for i in rows:
    e = int(cols["example_idx"][i])
    fooled = bool(cols["success"][i])
    if e not in seen or (fooled and not seen[e][1]):
      seen[e] = (int(i), fooled)
  fooled = [(r, True, e) for e, (r, f) in seen.items() if f]
  other = [(r, False, e) for e, (r, f) in seen.items() if not f]
  take = min(len(fooled), max(count // 2, count - len(other)))
  return fooled[:take] + other[:count - take]


def analyze(run_dir, *, data_dir: str | None = None, attack: str = "one_pixel",
            checkpoint_dir: str | None = None, quick: bool = False,
            **_: object) -> common.Output:
  table, cols = runs.read_rows(run_dir, attack)
  changed = runs.read_changes(table).index
  out = {k: [] for k in ("model", "example_idx", "y", "x", "min_true_prob", "flips",
                         "best_colour")}
  headline, figures, maps = [], [], []
  for model_name in dict.fromkeys(cols["model"].tolist()):
    picked = pick_images(cols, model_name, QUICK_IMAGES if quick else IMAGES)
    if not picked:
      continue
    model = runs.load_model(run_dir, cols, model_name, checkpoint_dir)
    rows_ = np.asarray([r for r, _, _ in picked])
    images = runs.clean_images(cols, rows_, data_dir)
    h, w, c = images.shape[1:]
    grid = probe.colour_grid(c, _levels(c, quick))
    pixels = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    tester = probe.PixelProbe(model, images)
    for n, (row, fooled, example) in enumerate(picked):
      label = int(cols["label"][row])
      ids = np.full(len(pixels) * len(grid), n)
      rr = np.repeat(pixels[:, 0], len(grid))
      cc = np.repeat(pixels[:, 1], len(grid))
      colours = np.tile(grid, (len(pixels), 1))
      start = time.perf_counter()
      probs = tester.probs(ids, rr, cc, colours).reshape(len(pixels), len(grid), -1)
      seconds = time.perf_counter() - start
      true = probs[..., label]
      best = true.argmin(-1)
      low = true.min(-1)
      flips = (probs.argmax(-1) != label).any(-1)
      for key, values in (("model", [model_name] * len(pixels)),
                          ("example_idx", [example] * len(pixels)), ("y", pixels[:, 0]),
                          ("x", pixels[:, 1]), ("min_true_prob", low), ("flips", flips),
                          ("best_colour", grid[best].tolist())):
        out[key].extend(list(values))
      de_pixels = (perturbations.changed_pixels(changed[row], (h, w, c))
                   if changed[row] is not None else np.zeros((0, 2), int))
      maps.append((model_name, example, label, fooled, images[n], low.reshape(h, w), de_pixels))
      headline.append([model_name, str(example), str(label),
                       f"{float(cols['clean_conf'][row]):.3f}",
                       f"{float(low.min()):.3f}", f"{flips.sum()}/{len(flips)}",
                       "fooled" if fooled else "not fooled",
                       f"{len(ids):,} in {seconds:.1f} s ({tester.evaluation})"])
  if not maps:
    raise ValueError(f"{run_dir}: no clean-correct {attack} rows to draw maps for")
  path = common.analysis_dir(run_dir) / f"{KIND}.png"
  _figure(maps, path)
  figures.append(path)
  header = ["model", "image", "label", "clean p(true)", "lowest p(true) on the grid",
            "positions that flip", "one-pixel DE", "candidates"]
  notes = [f"Grid: {_levels(1, quick)} grey levels, or {_levels(3, quick)} levels per RGB "
           "channel. Alatalo et al. drew such maps for breast-cancer tissue images; ours are "
           "the run's own images. The DE column is the run's outcome on the same image."]
  return common.Output(KIND, common.table_from_columns(out), header, headline, figures, notes)


def _figure(maps, path) -> None:
  plt = common.pyplot()
  fig, axes = plt.subplots(len(maps), 2, figsize=(5.4, 2.6 * len(maps)), squeeze=False,
                           layout="constrained")
  for (model, example, label, fooled, image, low, de_pixels), (left, right) in zip(
      maps, axes, strict=True):
    left.imshow(image[..., 0] if image.shape[-1] == 1 else image,
                cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=1)
    left.set_title(f"{model} #{example} (label {label})", fontsize=8)
    heat = right.imshow(low, cmap="inferno", vmin=0, vmax=1)
    if len(de_pixels):
      right.scatter(de_pixels[:, 1], de_pixels[:, 0], s=40, facecolors="none",
                    edgecolors="cyan", label="DE " + ("success" if fooled else "best"))
      right.legend(fontsize=6, loc="lower right")
    right.set_title("lowest p(true class) per pixel", fontsize=8)
    fig.colorbar(heat, ax=right, fraction=0.046)
    for ax in (left, right):
      ax.set_xticks([])
      ax.set_yticks([])
  common.save_figure(fig, path)
