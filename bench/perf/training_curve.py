"""Robustness against training epochs: clean accuracy and accuracy under PGD-20 of every
epoch's weights that `advsweep train NAME --keep-epochs` kept, on the first N test images.

Where a CPU budget stops short of a paper's figure (issue 36: the CIFAR-10 defenses), the
curve shows where: still rising at the last epoch (more epochs would help) or flat (the
network's capacity or the recipe is the limit). PGD-20 from a random start, step eps / 4
(2/255 at CIFAR-10's 8/255, as Wong et al. evaluate), at the dataset's budget
(`bench.evaluation.standard.BUDGETS`). The shipped checkpoint, where given, is measured too.

  python -m advsweep.bench.perf.training_curve cifar10_resnet20_adv \\
      --epochs-dir models/trained/cifar10_resnet20_adv.epochs --n 500 --out results/training-curve
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from advsweep import attacks
from advsweep.bench import stats
from advsweep.bench.evaluation import standard
from advsweep.bench.reports import tables
from advsweep.models import checkpoints, datasets, evaluation, files, zoo

BATCH = 100
PGD_STEPS = 20


def pgd_config(dataset: str) -> attacks.PGDConfig:
  """PGD-20 at the dataset's L-inf budget, step eps / 4, from a random start."""
  eps = standard.BUDGETS[(dataset, standard.LINF)]
  return attacks.PGDConfig(eps=eps, step_size=eps / 4, num_steps=PGD_STEPS, random_start=True)


def measure(model: zoo.Model, images_u8: np.ndarray, labels: np.ndarray, seed: int = 0
            ) -> dict[str, Any]:
  """Clean and PGD-20 accuracy over every image (a misclassified clean image counts as an
  error under attack too), each with its 95% Wilson interval. Image i's random start comes
  from the seed's key folded with i, whatever the batch."""
  config = pgd_config(zoo.entry(model.name).dataset)
  key = jax.random.key(seed)
  clean = evaluation.predict_logits(model.apply_fn, model.params, images_u8).argmax(-1) == labels
  images = images_u8.astype(np.float32) / 255.0
  robust = []
  for start in range(0, len(labels), BATCH):
    x, y = images[start:start + BATCH], labels[start:start + BATCH]
    keys = standard.image_keys(key, np.arange(start, start + len(y)))
    result = attacks.pgd(model.apply_fn, model.params, x, y, keys, config)
    robust.append(np.asarray(result.adv_pred) == y)
  robust = clean & np.concatenate(robust)
  row = {"images": len(labels)}
  for name, hits in (("clean", clean), ("pgd20", robust)):
    low, high = stats.wilson_interval(int(hits.sum()), len(hits))
    row |= {f"{name}_accuracy": float(hits.mean()), f"{name}_low": low, f"{name}_high": high}
  return row


def curve(name: str, epochs_dir: str | os.PathLike, n: int, *, seed: int = 0,
          data_dir: str | None = None, shipped_dir: str | os.PathLike | None = None,
          log=print) -> list[dict[str, Any]]:
  """One row per kept epoch (and the shipped weights, if `shipped_dir` holds them)."""
  folders = sorted(p for p in Path(epochs_dir).glob("epoch*") if (p / f"{name}.msgpack")
                   .is_file())
  if not folders:
    raise FileNotFoundError(f"no epoch checkpoints of {name} under {epochs_dir}; train with "
                            f"`advsweep train {name} --keep-epochs`")
  images, labels = datasets.load(zoo.entry(name).dataset, "test", data_dir)
  images, labels = images[:n], labels[:n]
  sources = [(f"epoch {int(f.name.removeprefix('epoch'))}", f) for f in folders]
  if shipped_dir is not None and (Path(shipped_dir) / f"{name}.msgpack").is_file():
    sources.append(("shipped", Path(shipped_dir)))
  rows = []
  for label, folder in sources:
    model = zoo.load(name, folder)
    row = {"model": name, "weights": label, "epoch": model.meta.get("epoch"),
           "sha256": model.meta["sha256"], **measure(model, images, labels, seed)}
    log(f"{name} {label}: clean {100 * row['clean_accuracy']:.1f}%, PGD-20 "
        f"{100 * row['pgd20_accuracy']:.1f}% ({100 * row['pgd20_low']:.1f}-"
        f"{100 * row['pgd20_high']:.1f}) on {n} images")
    rows.append(row)
  return rows


def markdown(rows: list[dict[str, Any]], command: str) -> str:
  def cell(row, kind):
    return (f"{tables.pct(row[kind + '_accuracy'])} ({tables.pct(row[kind + '_low'])}-"
            f"{tables.pct(row[kind + '_high'])})")

  body = [[r["weights"], r["images"], cell(r, "clean"), cell(r, "pgd20")] for r in rows]
  return "\n".join([f"# {rows[0]['model']}: robustness against epochs", "", f"`{command}`", "",
                    tables.format_markdown(["weights", "images", "clean", "PGD-20"], body), "",
                    "Accuracy over every image (95% Wilson interval). PGD-20: random start, "
                    "step eps / 4, at the dataset's budget.", ""])


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m advsweep.bench.perf.training_curve",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("model", choices=list(zoo.ZOO), metavar="MODEL")
  p.add_argument("--epochs-dir", required=True,
                 help="the folder `advsweep train MODEL --keep-epochs` wrote")
  p.add_argument("--shipped-dir", default=None, help="also measure MODEL's checkpoint here")
  p.add_argument("--n", type=int, default=500, help="first N test images (default 500)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="results/training-curve")
  p.add_argument("--data-dir", default=os.environ.get("ADVSWEEP_DATA_DIR"))
  args = p.parse_args(argv)
  if args.n < 1:
    p.error(f"--n must be >= 1; got {args.n}")
  try:
    rows = curve(args.model, args.epochs_dir, args.n, seed=args.seed, data_dir=args.data_dir,
                 shipped_dir=args.shipped_dir)
  except (FileNotFoundError, ValueError, checkpoints.CheckpointError) as err:
    print(f"training_curve: error: {err}", file=sys.stderr)
    return 2
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  command = (f"python -m advsweep.bench.perf.training_curve {args.model} --epochs-dir "
             f"{Path(args.epochs_dir).name} --n {args.n}")
  files.atomic_write_bytes(out / f"{args.model}.json",
                           (json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
                           .encode())
  files.atomic_write_bytes(out / f"{args.model}.md", markdown(rows, command).encode())
  print(f"wrote {out / args.model}.json and .md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
