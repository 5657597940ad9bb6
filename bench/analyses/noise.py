"""Observational noise and latent distance (Ciprijanovic et al., "DeepAdversaries: Examining the
Robustness of Deep Learning Models for Galaxy Morphology Classification").

- Accuracy against Poisson noise: the image read as photon counts at an exposure of E counts
  for a white pixel, `x' = Poisson(E x) / E` clipped to [0, 1]; smaller E is noisier. On a
  seeded draw of `NOISE_IMAGES` images of the run's split (not only the attacked ones: it
  needs no attack, and intervals of a few dozen images say little), with the same noise draws
  for every model, so a domain-adapted model and its twin are compared image by image.
- Latent distance: in the penultimate layer (the last sown layer before the logits, averaged
  over positions where it is a feature map: what a global-pooling head sees), the Euclidean
  distance between a clean image and its perturbed copy, for one-pixel successes, one-pixel
  failures (the final candidate) and Poisson-noised copies; divided by the mean norm of the
  clean latents, so models compare.
- A 2-D PCA projection of the latent space: the clean images by class, the one-pixel
  adversarial images and the noisy ones.
Their galaxy images are not available; ours are the run's MNIST, Fashion-MNIST or CIFAR-10
images, and noise draws come from a `jax.random` key of `seed`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from advsweep.bench import stats
from advsweep.bench.analyses import common
from advsweep.bench.driver import perturbations, runs
from advsweep.models import architectures, transforms

KIND = "noise"
EXPOSURES = (1000.0, 300.0, 100.0, 30.0, 10.0)
QUICK_EXPOSURES = (100.0, 10.0)
NOISE_IMAGES = 2000
QUICK_NOISE_IMAGES = 200
BATCH = 256


def poisson_noise(key: jax.Array, images: np.ndarray, exposure: float) -> np.ndarray:
  """`transforms.poisson_noise` on host arrays."""
  return np.asarray(transforms.poisson_noise(key, images, exposure))


def latent(model, images: np.ndarray) -> np.ndarray:
  """[N, D] penultimate features (see the module docstring), in batches."""
  out = []
  for start in range(0, len(images), BATCH):
    _, layers = model.intermediates(model.params, jnp.asarray(images[start:start + BATCH]))
    out.append(np.asarray(architectures.penultimate(layers)))
  return np.concatenate(out)


def noise_sample(dataset: str, split: str, data_dir: str | None, count: int, seed: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """`count` float32 images of a dataset split and their labels, drawn by `seed`."""
  images, labels = runs.load_split(dataset, split, data_dir)
  at = np.sort(np.random.default_rng(seed).permutation(len(images))[:count])
  return images[at].astype(np.float32) / 255.0, np.asarray(labels)[at]


def accuracy_under_noise(model, images: np.ndarray, labels: np.ndarray,
                         exposures: tuple[float, ...], key: jax.Array
                         ) -> tuple[np.ndarray, dict[float, np.ndarray]]:
  """Per image, whether `model` is right on the clean images and at each exposure. The draws
  depend on `key` and the exposure's position alone: every model sees the same noisy images."""
  clean = _predict(model, images) == labels
  noisy = {e: _predict(model, poisson_noise(jax.random.fold_in(key, i), images, e)) == labels
           for i, e in enumerate(exposures)}
  return clean, noisy


def _predict(model, images: np.ndarray) -> np.ndarray:
  return np.concatenate([np.asarray(model.apply_fn(model.params, jnp.asarray(
      images[s:s + BATCH]))).argmax(-1) for s in range(0, len(images), BATCH)])


def analyze(run_dir, *, data_dir: str | None = None, attack: str = "one_pixel",
            checkpoint_dir: str | None = None, quick: bool = False, seed: int = 0,
            **_: object) -> common.Output:
  table, cols = runs.read_rows(run_dir, attack)
  changes = runs.read_changes(table)
  index, new = changes.index, changes.new
  exposures = QUICK_EXPOSURES if quick else EXPOSURES
  key = jax.random.key(seed)
  out = {k: [] for k in ("model", "what", "exposure", "value", "low", "high", "n")}
  header = ["model", "what", "value (95% CI)", "n"]
  headline, figures = [], []

  def add(model_name, what, exposure, value, lo, hi, n, text):
    for k, v in (("model", model_name), ("what", what), ("exposure", exposure),
                 ("value", value), ("low", lo), ("high", hi), ("n", n)):
      out[k].append(v)
    headline.append([model_name, what if math.isnan(exposure) else f"{what}, exposure "
                     f"{exposure:g}", text, str(n)])

  measured: dict[str, dict] = {}
  curves: dict[str, list[float]] = {}
  samples: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
  no_layers: list[str] = []
  count = QUICK_NOISE_IMAGES if quick else NOISE_IMAGES
  sample_key, run_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
  for model_name in dict.fromkeys(cols["model"].tolist()):
    at = np.flatnonzero(cols["model"] == model_name)
    at = at[np.unique(cols["example_idx"][at], return_index=True)[1]]  # one row per image
    model = runs.load_model(run_dir, cols, model_name, checkpoint_dir)
    clean = runs.clean_images(cols, at, data_dir)
    labels = cols["label"][at]
    split_of = (str(cols["dataset"][at[0]]), str(cols["split"][at[0]]))
    if split_of not in samples:
      samples[split_of] = noise_sample(*split_of, data_dir, count, seed)
    sample, sample_labels = samples[split_of]
    correct, right_at = accuracy_under_noise(model, sample, sample_labels, exposures,
                                             sample_key)
    measured[model_name] = {"model": model, **right_at}
    add(model_name, "accuracy, clean", math.nan, correct.mean(), math.nan, math.nan,
        len(sample), common.fmt_rate(int(correct.sum()), len(sample)))
    curves[model_name] = [float(correct.mean()), *(float(right_at[e].mean()) for e in exposures)]
    for exposure in exposures:
      right = right_at[exposure]
      add(model_name, "accuracy", exposure, right.mean(), math.nan, math.nan, len(sample),
          common.fmt_rate(int(right.sum()), len(sample)))
    if not runs.has_layers(model):
      no_layers.append(model_name)
      figures.append(common.analysis_dir(run_dir) / f"{KIND}-{model_name}.png")
      _figure(model_name, exposures, curves[model_name], None, labels, None, None, None,
              figures[-1])
      continue
    z_clean = latent(model, clean)
    scale = float(np.linalg.norm(z_clean, axis=-1).mean())
    mid = exposures[len(exposures) // 2]
    z_noisy = latent(model, poisson_noise(run_key, clean, mid))
    groups = {f"latent distance, Poisson (exposure {mid:g})":
              np.linalg.norm(z_noisy - z_clean, axis=-1) / scale}
    attacked = np.flatnonzero((cols["model"] == model_name) & cols["clean_correct"]
                              & changes.stored)
    adv_latent = {}
    if len(attacked):
      where = {int(e): n for n, e in enumerate(cols["example_idx"][at])}
      positions = [where[int(e)] for e in cols["example_idx"][attacked]]
      adv = np.stack([perturbations.apply_changes(clean[p], index[r], new[r])
                      for p, r in zip(positions, attacked, strict=True)])
      z_adv = latent(model, adv)
      d = np.linalg.norm(z_adv - z_clean[positions], axis=-1) / scale
      won = cols["success"][attacked]
      groups["latent distance, one-pixel successes"] = d[won]
      groups["latent distance, one-pixel failures"] = d[~won]
      measured[model_name]["adversarial"] = d[won]
      adv_latent = {"won": z_adv[won]}
    for what, values in groups.items():
      mean, lo, hi = stats.t_interval(values)
      add(model_name, what, math.nan, mean, lo, hi, len(values),
          common.fmt_interval(mean, lo, hi))
    figures.append(common.analysis_dir(run_dir) / f"{KIND}-{model_name}.png")
    _figure(model_name, exposures, curves[model_name], z_clean, labels, z_noisy, mid,
            adv_latent.get("won"), figures[-1])
  figures.insert(0, common.analysis_dir(run_dir) / f"{KIND}.png")
  _curves_figure(curves, exposures, {m: str(got["model"].meta.get("twin") or "")
                                     for m, got in measured.items()}, figures[0])
  for model_name, got in measured.items():
    twin = got["model"].meta.get("twin") or ""
    if not str(got["model"].meta.get("defense", "")).startswith("domain") or twin not in measured:
      continue
    for exposure in exposures:  # the same images and noise draws: a paired difference
      diff = got[exposure].astype(float) - measured[twin][exposure].astype(float)
      mean, lo, hi = stats.t_interval(diff)
      add(model_name, f"accuracy minus {twin}'s", exposure, mean, lo, hi, len(diff),
          f"{100 * mean:+.1f} points ({100 * lo:+.1f} to {100 * hi:+.1f})")
    ours, theirs = got.get("adversarial"), measured[twin].get("adversarial")
    if ours is not None and theirs is not None and len(ours) and len(theirs):
      ratio = float(ours.mean() / theirs.mean())
      add(model_name, f"latent distance to one-pixel successes / {twin}'s", math.nan, ratio,
          math.nan, math.nan, len(ours), f"{ratio:.2f}x ({len(ours)} vs {len(theirs)} images)")
  notes = ["Latent distances are divided by the mean norm of the clean latents. Ciprijanovic "
           "et al. (galaxy images): noise makes a model trained on low-noise data unable to "
           "classify; one-pixel errors flip the class easily; with domain adaptation +23% "
           "accuracy on noisy data and ~2.3x the latent distance to one-pixel adversarial "
           "images."]
  notes += [f"{m}: accuracy under noise only; the latent distances read a model's layers, "
            "and a user's apply_fn or an input defense has none to read." for m in no_layers]
  return common.Output(KIND, common.table_from_columns(out), header, headline, figures, notes)


def pca_2d(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, [D, 2] principal axes) of `z` [N, D]."""
  mean = z.mean(0)
  _, _, vt = np.linalg.svd(z - mean, full_matrices=False)
  return mean, vt[:2].T


def _accuracy_axes(ax, exposures, points, **style) -> None:
  """One accuracy curve: clean at the left (drawn at exposure 1e4), then falling exposure."""
  ax.plot([1e4, *exposures], [100 * a for a in points], marker="o", **style)
  ax.set_xscale("log")
  if not ax.xaxis_inverted():
    ax.invert_xaxis()
  ax.set_xlabel("exposure (photon counts per white pixel; leftmost: clean)")
  ax.set_ylabel("accuracy (%)")


def _curves_figure(curves: dict[str, list[float]], exposures, twins: dict[str, str],
                   path) -> None:
  """Every model's accuracy against exposure on one axis (the same images and noise draws);
  a model with a twin is drawn dashed in its twin's colour."""
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
  colours = {}
  for name in sorted(curves, key=lambda m: twins.get(m, "") in curves):
    twin = twins.get(name, "")
    style = ({"color": colours[twin], "linestyle": "--"} if twin in colours else {})
    _accuracy_axes(ax, exposures, curves[name], label=name, **style)
    colours[name] = ax.lines[-1].get_color()
  ax.legend(fontsize=7)
  ax.set_title("Poisson noise: accuracy on the same images and draws", fontsize=9)
  common.save_figure(fig, path)


def _figure(model_name, exposures, curve, z_clean, labels, z_noisy, mid, z_adv, path) -> None:
  plt = common.pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
  _accuracy_axes(left, exposures, curve)
  left.set_title(f"{model_name}: Poisson noise", fontsize=9)
  if z_clean is None:  # no layers to read
    right.axis("off")
    right.text(0.5, 0.5, "no layers to read\n(a user's apply_fn or an input defense)",
               ha="center", va="center", fontsize=9)
    common.save_figure(fig, path)
    return
  mean, axes = pca_2d(z_clean)
  p = (z_clean - mean) @ axes
  scatter = right.scatter(p[:, 0], p[:, 1], c=labels, cmap="tab10", s=8, label="clean")
  q = (z_noisy - mean) @ axes
  right.scatter(q[:, 0], q[:, 1], c="grey", s=6, marker="+", label=f"Poisson {mid:g}")
  if z_adv is not None and len(z_adv):
    r = (z_adv - mean) @ axes
    right.scatter(r[:, 0], r[:, 1], c="red", s=30, marker="x", label="one-pixel adversarial")
  right.legend(fontsize=7)
  right.set_title("latent space, PCA of the clean images", fontsize=9)
  fig.colorbar(scatter, ax=right, label="class")
  common.save_figure(fig, path)
