"""advsweep's standard evaluation beside the reference AutoAttack, on the same model and images.

For each model, both run on the first N test images at the same budget, one after the other
in one process: the reference (`bench.reference_autoattack`, torchattacks with Croce &
Hein's settings: 100 iterations, Square's original schedule) and ours
(`bench.standard.evaluate`). Per model: each one's robust accuracy with its 95% interval, the
images robust under one and fooled by the other (a paired comparison: exact McNemar test,
Newcombe interval), and each one's wall time. Our figure must not exceed the reference's by
more than one point or its interval: an evaluation that finds fewer adversarial examples
than the reference is not AutoAttack-grade.

    python -m advsweep.bench.standard_vs_reference --models mnist_lenet_pgd --n 1000 \\
        --out results/standard-reference

Needs the reference's optional packages (see `bench.reference_autoattack`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from advsweep.bench import standard, stats, tables
from advsweep.models import datasets, files, zoo

HEADER = ("model", "n", "eps", "clean", "advsweep robust", "reference robust",
          "only ours robust", "only reference robust", "McNemar p", "advsweep s",
          "reference s", "speed-up")


def compare(name: str, num_images: int, *, eps: float | None = None, norm: str = "linf",
            data_dir: str | None = None, seed: int = 0, batch_size: int = 500,
            reference_batch_size: int | None = None, threads: int | None = None,
            log=print) -> dict[str, Any]:
  """Runs both on `name`'s first `num_images` test images; returns the comparison."""
  from advsweep.bench import reference_autoattack as reference

  model = zoo.load(name)
  dataset = model.meta["dataset"]
  eps = standard.BUDGETS[(dataset, norm)] if eps is None else eps
  images, labels = datasets.load(dataset, "test", data_dir)
  images, labels = images[:num_images], labels[:num_images]
  tic = time.perf_counter()
  ours = standard.evaluate(model.apply_fn, model.params, images, labels, norm=norm, eps=eps,
                           seed=seed, batch_size=batch_size, progress=False)
  ours_seconds = time.perf_counter() - tic
  log(f"{name}: advsweep {ours.headline()} in {ours_seconds:.0f} s")
  ref = reference.run(name, num_images=num_images, eps=eps, norm=norm, data_dir=data_dir,
                      seed=seed, croce_hein=True, threads=threads,
                      batch_size=reference_batch_size or reference.DEFAULT_BATCH_SIZE)
  ref_robust = np.asarray(ref["robust"], bool)
  log(f"{name}: reference robust {100 * ref_robust.mean():.1f}% in {ref['seconds']:.0f} s")
  paired = stats.paired(ours.robust, ref_robust)
  acc, low, high = ours.robust_accuracy()
  ref_low, ref_high = stats.wilson_interval(int(ref_robust.sum()), len(ref_robust))
  return {
      "model": name, "sha256": model.meta.get("sha256", ""), "num_images": num_images,
      "norm": norm, "eps": eps, "clean": ours.clean_accuracy(),
      "ours": {"robust": acc, "interval": [low, high], "seconds": ours_seconds,
               "attack_seconds": {k: o.seconds for k, o in ours.outcomes.items()},
               "robust_after": ours.robust_after(), "flags": [str(f) for f in ours.flags]},
      "reference": {"robust": float(ref_robust.mean()), "interval": [ref_low, ref_high],
                    "seconds": ref["seconds"],
                    **{k: ref[k] for k in ("kind", "torch_threads", "batch_size",
                                           "model_calls", "model_images", "gradient_calls",
                                           "compile_seconds", "violations") if k in ref}},
      "only_ours_robust": paired.only_a, "only_reference_robust": paired.only_b,
      "difference": paired.difference, "difference_interval": [paired.low, paired.high],
      "mcnemar_p": paired.p_value,
      "within_one_point": acc <= float(ref_robust.mean()) + 0.01 or acc <= ref_high,
  }


def row(result: dict[str, Any]) -> list[str]:
  ours, ref = result["ours"], result["reference"]
  fmt = lambda r: (f"{tables.pct(r['robust'])} ({tables.pct(r['interval'][0])}-"  # noqa: E731
                   f"{tables.pct(r['interval'][1])})")
  return [result["model"], str(result["num_images"]), f"{result['eps']:.4g}",
          tables.pct(result["clean"]), fmt(ours), fmt(ref), str(result["only_ours_robust"]),
          str(result["only_reference_robust"]), f"{result['mcnemar_p']:.2g}",
          f"{ours['seconds']:.0f}", f"{ref['seconds']:.0f}",
          f"{ref['seconds'] / ours['seconds']:.2f}x"]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m advsweep.bench.standard_vs_reference",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", nargs="+", required=True, choices=list(zoo.ZOO),
                      metavar="MODEL")
  parser.add_argument("--n", type=int, default=1000, help="first N test images")
  parser.add_argument("--eps", type=float, default=None, help="default: the dataset's")
  parser.add_argument("--norm", choices=["linf", "l2"], default="linf")
  parser.add_argument("--threads", type=int, default=None, help="torch's threads")
  parser.add_argument("--reference-batch-size", type=int, default=None)
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--out", type=Path, required=True, help="folder for the results")
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  rows = []
  for name in args.models:
    result = compare(name, args.n, eps=args.eps, norm=args.norm, data_dir=args.data_dir,
                     threads=args.threads, reference_batch_size=args.reference_batch_size)
    suffix = "" if args.eps is None else f"-eps{args.eps:g}"
    files.atomic_write_bytes(args.out / f"{name}-{args.n}{suffix}.json",
                             (json.dumps(result, indent=1) + "\n").encode())
    rows.append(row(result))
  print(tables.format_text(HEADER, rows))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
