"""AdvGAN beside PGD on the zoo's models, and the DCGAN's samples measured.

    python -m advsweep.bench.perf.advgan [--models mnist_lenet ...] [--n 1000]

For each model with a trained generator (shipped or cached): success rate over the clean-
correct images among the first N test images, and seconds per image of the attack alone
(jitted, compiled before the clock starts, the best of 3 runs), for AdvGAN (the generator's
forward pass) and for PGD-40 at the same eps (step 0.01, random start) on the same images
and batch. AdvGAN's figure excludes its generator's training, a one-time cost per model
that its metadata records (`train_seconds`) and that the table prints beside it. Then the
shipped DCGAN's class accuracy and Frechet distance (`bench.gan.dcgan_quality`). Writes
`results/perf/advgan-<time>.md` and `.json`, and a figure, `advgan-<time>.png`: the DCGAN's
samples (two of each class), and for the first model eight test images, AdvGAN's
adversarial images and perturbations beside PGD-40's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from advsweep import attacks
from advsweep.bench import gan
from advsweep.bench.reports import tables
from advsweep.models import checkpoints, datasets, files, zoo
from advsweep.models.gan import generators

OUT = Path(__file__).resolve().parents[2] / "results" / "perf"
REPEATS = 3


def _best_seconds(fn) -> tuple[float, object]:
  """The best of `REPEATS` timed calls (after one that compiles), and the last result."""
  jax.block_until_ready(fn())  # compiles
  best = float("inf")
  for _ in range(REPEATS):
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best, result


def measure(name: str, n: int, eps: float, data_dir: str | None) -> dict | None:
  """AdvGAN and PGD-40 on model `name`'s first n test images; None without a generator."""
  model = zoo.load(name)
  config = attacks.AdvGANConfig(eps=eps)
  path = generators.find_for(config, model)
  if path is None:
    return None
  config, sha = generators.bind(config, model, data_dir=data_dir)
  meta = checkpoints.load_meta(path)
  images_u8, labels = datasets.load(model.meta["dataset"], "test", data_dir)
  images = jnp.asarray(images_u8[:n], jnp.float32) / 255.0
  labels = jnp.asarray(labels[:n], jnp.int32)
  key = jax.random.key(0)
  keep = np.asarray(jnp.argmax(jax.jit(model.apply_fn)(model.params, images), -1)) == \
      np.asarray(labels)
  pgd = attacks.PGDConfig(eps=eps, step_size=0.01, num_steps=40)
  row = {"model": name, "n": n, "clean_correct": int(keep.sum()), "eps": eps,
         "generator_sha256": sha, "generator_train_seconds": meta["train_seconds"]}
  for attack, cfg in (("advgan", config), ("pgd", pgd)):
    spec = attacks.REGISTRY[attack]
    run = lambda spec=spec, cfg=cfg: spec.run(model.apply_fn, model.params, images, labels,  # noqa: E731
                                              key, cfg)
    seconds, result = _best_seconds(run)
    success = np.asarray(result.success)[keep]
    k = int(success.sum())
    lo, hi = tables.wilson_interval(k, len(success))
    row[attack] = {"success_rate": k / len(success), "low": lo, "high": hi,
                   "seconds_per_image": seconds / n}
  return row


FIGURE_IMAGES = 8


def figure(path: Path, model_name: str, eps: float, data_dir: str | None,
           samples: np.ndarray | None) -> None:
  """The DCGAN's samples (if any), then per test image: clean, AdvGAN's image and
  perturbation, PGD-40's image and perturbation (perturbations on a grey scale of +-eps)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from advsweep.bench.analyses import common

  model = zoo.load(model_name)
  config, _ = generators.bind(attacks.AdvGANConfig(eps=eps), model, data_dir=data_dir)
  images_u8, labels = datasets.load(model.meta["dataset"], "test", data_dir)
  images = jnp.asarray(images_u8[:FIGURE_IMAGES], jnp.float32) / 255.0
  labels = jnp.asarray(labels[:FIGURE_IMAGES], jnp.int32)
  key = jax.random.key(0)
  runs = {"AdvGAN": attacks.advgan(model.apply_fn, model.params, images, labels, key, config),
          "PGD-40": attacks.pgd(model.apply_fn, model.params, images, labels, key,
                                attacks.PGDConfig(eps=eps, step_size=0.01, num_steps=40))}
  rows = 5 + (2 if samples is not None else 0)
  fig, axes = plt.subplots(rows, FIGURE_IMAGES if samples is None else 10,
                           figsize=(12, 1.3 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  top = 0
  if samples is not None:
    for i, sample in enumerate(samples[:20]):
      ax = axes[i % 2, i // 2]
      ax.imshow(sample[..., 0], cmap="gray", vmin=0, vmax=1)
      if i % 2 == 0:
        ax.set_title(f"DCGAN {i // 2}", fontsize=8)
    top = 2
  clean = np.asarray(images)
  for j in range(FIGURE_IMAGES):
    axes[top, j].imshow(clean[j, ..., 0], cmap="gray", vmin=0, vmax=1)
    axes[top, j].set_title(f"clean {int(labels[j])}", fontsize=8)
    for r, (name, result) in enumerate(runs.items()):
      adv = np.asarray(result.adv_images)[j, ..., 0]
      pred = int(result.adv_pred[j])
      axes[top + 1 + 2 * r, j].imshow(adv, cmap="gray", vmin=0, vmax=1)
      axes[top + 1 + 2 * r, j].set_title(f"{name}: {pred}", fontsize=8)
      axes[top + 2 + 2 * r, j].imshow(adv - clean[j, ..., 0], cmap="coolwarm", vmin=-eps,
                                      vmax=eps)
      axes[top + 2 + 2 * r, j].set_title(f"{name} delta", fontsize=8)
  fig.suptitle(f"{model_name}, eps {eps:g}: the DCGAN's samples, AdvGAN's and PGD-40's "
               "adversarial images (predicted class) and perturbations", fontsize=9)
  common.save_figure(fig, path)


def _success(side: dict) -> str:
  return (f"{tables.pct(side['success_rate'], 1)} ({tables.pct(side['low'], 1)}"
          f"-{tables.pct(side['high'], 1)})")


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
  """The benchmark's table from its rows (`measure`): printed here and on the docs' page."""
  header = ["model", "n", "AdvGAN success", "PGD-40 success", "AdvGAN s/img", "PGD-40 s/img",
            "PGD / AdvGAN time", "generator training"]
  body = [[r["model"], str(r["clean_correct"]), _success(r["advgan"]), _success(r["pgd"]),
           f"{r['advgan']['seconds_per_image']:.2e}", f"{r['pgd']['seconds_per_image']:.2e}",
           f"{r['pgd']['seconds_per_image'] / r['advgan']['seconds_per_image']:.0f}x",
           f"{r['generator_train_seconds']:.0f} s"] for r in rows]
  return header, body


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["mnist_lenet", "mnist_lenet_fgsm",
                                                      "mnist_lenet_advgan"])
  parser.add_argument("--n", type=int, default=1000)
  parser.add_argument("--eps", type=float, default=0.3)
  parser.add_argument("--data-dir", default=None)
  args = parser.parse_args(argv)
  rows, skipped = [], []
  for name in args.models:
    row = measure(name, args.n, args.eps, args.data_dir)
    (rows.append(row) if row else skipped.append(name))
  header, body = table(rows)
  lines = [f"AdvGAN beside PGD-40 at eps {args.eps:g}, first {args.n} test images "
           f"({jax.devices()[0].device_kind}); success over the clean-correct images (n)",
           tables.format_text(header, body)]
  if skipped:
    lines.append(f"no generator trained for: {', '.join(skipped)} (advsweep gan advgan MODEL)")
  dcgan_path = generators.SHIPPED_DIR / "dcgan_mnist.msgpack"
  quality = None
  if dcgan_path.is_file():
    generator, meta, recipe = generators.load_dcgan(dcgan_path)
    quality = gan.dcgan_quality(generator, meta, recipe, args.data_dir)
    lines.append(
        f"DCGAN (mnist, {meta['train_seconds']:.0f} s of training): {quality['judge']} "
        f"classifies {tables.pct(quality['class_accuracy'], 1)} of {quality['samples']} samples "
        f"as their class (per class: " + ", ".join(
            f"{c}: {tables.pct(v, 0)}" for c, v in quality["class_per_class"].items())
        + f"); Frechet distance {quality['frechet_distance']:.2f} against "
        f"{quality['real_images']} test images (train vs test images: "
        f"{quality['frechet_distance_real_train_vs_test']:.2f})")
  text = "\n".join(lines)
  print(text)
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
  if rows:
    samples = None
    if quality is not None:
      from advsweep.models.gan import dcgan

      info = datasets.info(meta["dataset"])
      samples = np.asarray(dcgan.sample(generator, recipe, info.shape, info.num_classes,
                                        np.repeat(np.arange(10), 2), jax.random.key(1)))
    figure(OUT / f"advgan-{stamp}.png", rows[0]["model"], args.eps, args.data_dir, samples)
  command = "python -m advsweep.bench.perf.advgan " + " ".join(argv or [])
  files.atomic_write_text(OUT / f"advgan-{stamp}.md", f"`{command.strip()}`\n\n```\n{text}\n```\n")
  files.atomic_write_text(OUT / f"advgan-{stamp}.json", json.dumps(
      {"command": command.strip(), "device": jax.devices()[0].device_kind, "rows": rows,
       "dcgan": quality}, indent=2, default=str) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
