"""Propagation maps (Vargas and Su, "Understanding the One-Pixel Attack: Propagation Maps and
Locality Analysis"): how a one-pixel change spreads through the network.

For a successful one-pixel adversarial image and its clean image, every layer's absolute
difference of activations, the maximum over channels, divided by that layer's largest clean
activation (so 1 means "as large as the strongest clean feature"). Drawn as a grid, layers x
images; per layer, the share of positions that changed and the largest relative difference.
The paper's claim: the change reaches the last layer, spreads to a global one and reaches
values close to the maximum of the original maps. Layers are the ones a zoo architecture sows
(`models.architectures`): every convolution or block output, ResNet-20's included.
"""

from __future__ import annotations

import numpy as np

from advsweep.bench.analyses import common
from advsweep.bench.driver import perturbations, runs

KIND = "propagation"
IMAGES, QUICK_IMAGES = 30, 2  # successful images a model; the figure draws the first few
FIGURE_IMAGES = 4
CHANGED = 1e-4  # a position changed if its difference exceeds this share of the clean maximum


def layer_maps(model, clean: np.ndarray, adv: np.ndarray
               ) -> list[tuple[str, np.ndarray, float]]:
  """Per sown spatial layer, in forward order: (name, [N, h, w] max-over-channels |adv - clean|
  / max |clean| of that layer, per image, max |clean| averaged over images)."""
  both = np.concatenate([clean, adv]).astype(np.float32)
  _, layers = model.intermediates(model.params, both)
  n = len(clean)
  out = [("input", np.abs(adv - clean).max(-1) / np.maximum(np.abs(clean).max((1, 2, 3)),
                                                            1e-12)[:, None, None], 1.0)]
  for name, act in layers.items():
    act = np.asarray(act)
    if act.ndim != 4:
      continue
    c, a = act[:n], act[n:]
    scale = np.maximum(np.abs(c).max((1, 2, 3)), 1e-12)
    out.append((name, np.abs(a - c).max(-1) / scale[:, None, None], float(scale.mean())))
  return out


def analyze(run_dir, *, data_dir: str | None = None, attack: str = "one_pixel",
            checkpoint_dir: str | None = None, quick: bool = False,
            **_: object) -> common.Output:
  table, cols = runs.read_rows(run_dir, attack)
  changes = runs.read_changes(table)
  index, new = changes.index, changes.new
  keep = cols["clean_correct"] & cols["success"] & changes.stored
  out = {k: [] for k in ("model", "example_idx", "layer", "depth", "changed_share",
                         "max_relative_difference")}
  header = ["model", "layer", "depth", "images", "positions changed", "max |diff| / clean max"]
  headline, figures, skipped, short = [], [], [], []
  wanted = QUICK_IMAGES if quick else IMAGES
  models = runs.load_models(run_dir, attack, checkpoint_dir)
  if not any(runs.has_layers(m) for m in models.values()):
    raise ValueError(f"{run_dir}: propagation reads a model's layers, and "
                     f"{', '.join(models)} has none to read (a user's apply_fn or an input "
                     "defense in front of a model); analyse a run of a zoo model")
  for model_name in dict.fromkeys(cols["model"][keep].tolist()):
    rows_ = np.flatnonzero(keep & (cols["model"] == model_name))
    rows_ = rows_[np.unique(cols["example_idx"][rows_], return_index=True)[1]]
    if len(rows_) < wanted:
      short.append(f"{model_name} ({len(rows_)})")
    rows_ = rows_[:wanted]
    model = runs.load_model(run_dir, cols, model_name, checkpoint_dir)
    if not runs.has_layers(model):
      skipped.append(model_name)
      continue
    clean = runs.clean_images(cols, rows_, data_dir)
    adv = np.stack([perturbations.apply_changes(x, index[r], new[r])
                    for x, r in zip(clean, rows_, strict=True)])
    maps = layer_maps(model, clean, adv)
    for depth, (layer, diff, _) in enumerate(maps):
      changed = (diff > CHANGED).mean((1, 2))
      peak = diff.max((1, 2))
      for n, r in enumerate(rows_):
        for key, value in (("model", model_name), ("example_idx", int(cols["example_idx"][r])),
                           ("layer", layer), ("depth", depth),
                           ("changed_share", float(changed[n])),
                           ("max_relative_difference", float(peak[n]))):
          out[key].append(value)
      headline.append([model_name, layer, str(depth), str(len(rows_)),
                       f"{100 * changed.mean():.1f}% ({100 * changed.min():.1f}-"
                       f"{100 * changed.max():.1f})",
                       f"{peak.mean():.3f} ({peak.min():.3f}-{peak.max():.3f})"])
    figures.append(common.analysis_dir(run_dir) / f"{KIND}-{model_name}.png")
    shown = slice(0, FIGURE_IMAGES)
    _figure(model_name, [(layer, diff[shown], scale) for layer, diff, scale in maps],
            clean[shown], adv[shown], [int(cols["example_idx"][r]) for r in rows_[shown]],
            figures[-1])
  if not figures:
    raise ValueError(f"{run_dir}: no successful {attack} rows with stored changes")
  notes = [f"Skipped (no layers to read: a user's apply_fn or an input defense): {m}."
           for m in skipped]
  if short:
    notes.append(f"Fewer than {wanted} successful images (Vargas and Su's maps need a sample, "
                 f"not a few examples; attack more images): {', '.join(short)}.")
  notes += [f"Figures: the first {FIGURE_IMAGES} images of each model. Per layer: mean over "
           "the images (min-max). 'Positions changed': share of the layer's positions whose "
           f"difference exceeds {CHANGED:g} of the clean maximum. "
           "Vargas and Su: the change reaches the last layer, spreads to most positions and "
           "reaches values close to the clean maps' maximum."]
  return common.Output(KIND, common.table_from_columns(out), header, headline, figures, notes)


def _figure(model_name, maps, clean, adv, examples, path) -> None:
  plt = common.pyplot()
  n, cols_ = len(clean), len(maps) + 1
  fig, axes = plt.subplots(n, cols_, figsize=(1.25 * cols_, 1.35 * n), squeeze=False,
                           layout="constrained")
  for i in range(n):
    image = adv[i]
    axes[i, 0].imshow(image[..., 0] if image.shape[-1] == 1 else image,
                      cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=1)
    axes[i, 0].set_ylabel(f"#{examples[i]}", fontsize=7)
    for j, (layer, diff, _) in enumerate(maps):
      heat = axes[i, j + 1].imshow(diff[i], cmap="inferno", vmin=0, vmax=1)
      if i == 0:
        axes[i, j + 1].set_title(layer.removesuffix("_act"), fontsize=6)
  axes[0, 0].set_title("adversarial", fontsize=6)
  for ax in axes.reshape(-1):
    ax.set_xticks([])
    ax.set_yticks([])
  fig.colorbar(heat, ax=axes[:, -1].tolist(), fraction=0.05, label="|diff| / clean max")
  fig.suptitle(f"{model_name}: propagation maps of one-pixel adversarial images", fontsize=8)
  common.save_figure(fig, path)
