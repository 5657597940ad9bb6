"""advsweep's standard evaluation beside the reference AutoAttack, on the same model and images.

For each model, both run on the first N test images at the same budget, one after the other
in one process: the reference (`bench.reference_autoattack`, torchattacks with Croce &
Hein's settings: 100 iterations, Square's original schedule) and ours
(`bench.evaluation.standard.evaluate`). Per model: each one's robust accuracy with its 95%
interval, the
images robust under one and fooled by the other (a paired comparison: exact McNemar test,
Newcombe interval), and each one's wall time. Our figure must not exceed the reference's by
more than one point or its interval: an evaluation that finds fewer adversarial examples
than the reference is not AutoAttack-grade.

    python -m advsweep.bench.perf.standard_vs_reference --models mnist_lenet_pgd --n 1000 \\
        --out results/standard-reference

Needs the reference's optional packages (see `bench.reference_autoattack`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from advsweep.bench import stats
from advsweep.bench.driver import compilation
from advsweep.bench.evaluation import standard
from advsweep.bench.reports import tables
from advsweep.models import datasets, files, zoo

HEADER = ("model", "weights", "n", "norm", "eps", "clean", "advsweep robust", "reference robust",
          "only ours robust", "only reference robust", "McNemar p", "reference run",
          "advsweep s", "reference s", "speed-up")
NORM_LABELS = {"linf": "L-inf", "l2": "L2"}


class _Kept:
  """Our per-image outcomes read from `advsweep robustness --standard`'s files, in the shape
  of `standard.Evaluation` that `compare` reads."""

  def __init__(self, summary: dict[str, Any], table: Any, num_images: int):
    cols = table.to_pydict()
    attacks = list(dict.fromkeys(cols["attack"]))
    per_attack = {a: [i for i, x in enumerate(cols["attack"]) if x == a] for a in attacks}
    first = per_attack[attacks[0]]
    self.robust = np.asarray([cols["robust"][i] for i in first], bool)[:num_images]
    self.correct = np.asarray([cols["clean_correct"][i] for i in first], bool)[:num_images]
    self.summary = summary
    self.flags = summary.get("flags", [])
    self.outcomes = {}

  def robust_accuracy(self) -> tuple[float, float, float]:
    k, n = int(self.robust.sum()), len(self.robust)
    return (k / n, *stats.wilson_interval(k, n))

  def clean_accuracy(self) -> float:
    return float(self.correct.mean())

  def robust_after(self) -> dict[str, float]:
    return {}

  def headline(self) -> str:
    acc, low, high = self.robust_accuracy()
    return (f"robust accuracy {100 * acc:.1f}% ({100 * low:.1f}-{100 * high:.1f}) on the first "
            f"{len(self.robust)} images, kept from a run of {self.summary['num_images']}")


def kept_evaluation(folder: Path, name: str, num_images: int, eps: float, norm: str,
                    seed: int, sha256: str) -> _Kept:
  """Our outcomes on the first `num_images` images from `advsweep robustness --standard`'s
  kept files in `folder`, checked to be this model's weights and these settings.

  Raises:
    ValueError: no kept evaluation, or one of other weights, settings or fewer images.
  """
  from advsweep.bench.evaluation import standard_runs

  kept = standard_runs.load(folder, name)
  if kept is None:
    raise ValueError(f"{folder} holds no evaluation of {name}; run advsweep robustness "
                     f"--standard --models {name} first")
  summary, table = kept
  want = {"model_sha256": sha256, "eps": eps, "norm": norm, "seed": seed,
          "version": standard.STANDARD, "quick": False}
  wrong = {k: (summary.get(k), v) for k, v in want.items() if summary.get(k) != v}
  if wrong or summary.get("num_images", 0) < num_images:
    raise ValueError(f"{folder}/{name}: kept with other settings {wrong} or fewer than "
                     f"{num_images} images ({summary.get('num_images')})")
  return _Kept(summary, table, num_images)


def compare(name: str, num_images: int, *, eps: float | None = None, norm: str = "linf",
            data_dir: str | None = None, seed: int = 0, batch_size: int | None = None,
            reference_batch_size: int | None = None, threads: int | None = None,
            ours_from: Path | None = None, progress_dir: Path | None = None,
            log=print) -> dict[str, Any]:
  """Runs both on `name`'s first `num_images` test images (ours read from the kept files of
  `ours_from` where given: then no speed is compared); returns the comparison. With
  `progress_dir`, the reference keeps its finished batches there and an interrupted
  comparison resumes at the next one."""
  from advsweep.bench.perf import reference_autoattack as reference

  model = zoo.load(name)
  dataset = model.meta["dataset"]
  explicit_eps = eps is not None
  eps = standard.BUDGETS[(dataset, norm)] if eps is None else eps
  images, labels = datasets.load(dataset, "test", data_dir)
  images, labels = images[:num_images], labels[:num_images]
  compile_before, hits_before = compilation.seconds(), compilation.cache_hits()
  tic = time.perf_counter()
  if ours_from is not None:
    ours = kept_evaluation(ours_from, name, num_images, eps, norm, seed, model.meta["sha256"])
    ours_seconds = float("nan")
  else:
    ours = standard.evaluate(model.apply_fn, model.params, images, labels, norm=norm, eps=eps,
                             seed=seed, batch_size=batch_size, progress=False)
    ours_seconds = time.perf_counter() - tic
  ours_compile = compilation.seconds() - compile_before
  ours_hits = compilation.cache_hits() - hits_before
  log(f"{name}: advsweep {ours.headline()}"
      + ("" if math.isnan(ours_seconds) else f" in {ours_seconds:.0f} s"))
  ref = reference.run(name, num_images=num_images, eps=eps, norm=norm, data_dir=data_dir,
                      seed=seed, croce_hein=True, threads=threads,
                      batch_size=reference_batch_size or reference.DEFAULT_BATCH_SIZE,
                      progress_path=None if progress_dir is None else progress_dir / (
                          result_stem(name, num_images, eps if explicit_eps else None,
                                      model.meta.get("sha256", ""), threads, norm)
                          + ".reference.partial.npz"))
  ref_robust = np.asarray(ref["robust"], bool)
  log(f"{name}: reference robust {100 * ref_robust.mean():.1f}% in {ref['seconds']:.0f} s")
  paired = stats.paired(ours.robust, ref_robust)
  acc, low, high = ours.robust_accuracy()
  ref_low, ref_high = stats.wilson_interval(int(ref_robust.sum()), len(ref_robust))
  return {
      "model": name, "sha256": model.meta.get("sha256", ""), "num_images": num_images,
      "norm": norm, "eps": eps, "clean": ours.clean_accuracy(),
      "cpus": _usable_cpus(),
      "ours": {"robust": acc, "interval": [low, high], "seconds": ours_seconds,
               "compile_seconds": ours_compile, "compile_cache_hits": ours_hits,
               "attack_seconds": {k: o.seconds for k, o in ours.outcomes.items()},
               "robust_after": ours.robust_after(), "flags": [str(f) for f in ours.flags]},
      "reference": {"robust": float(ref_robust.mean()), "interval": [ref_low, ref_high],
                    "seconds": ref["seconds"],
                    **{k: ref[k] for k in ("kind", "torch_threads", "batch_size",
                                           "model_calls", "model_images", "gradient_calls",
                                           "compile_seconds", "violations",
                                           "attack_costs") if k in ref}},
      "only_ours_robust": paired.only_a, "only_reference_robust": paired.only_b,
      "difference": paired.difference, "difference_interval": [paired.low, paired.high],
      "mcnemar_p": paired.p_value,
      "within_one_point": acc <= float(ref_robust.mean()) + 0.01 or acc <= ref_high,
  }


def _usable_cpus() -> int | None:
  """The CPUs this process may run on (fewer than the machine's under `taskset`)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count()


def result_stem(name: str, num_images: int, eps: float | None, sha256: str,
                threads: int | None = None, norm: str = "linf") -> str:
  """The comparison's file name without its suffix. Named by the weights too, by the norm
  where it is not L-inf, and by torch's threads where they were set: a retrained model's
  comparison, one in another threat model, or a timing on fewer threads never replaces
  another (the docs' page lists them all)."""
  return (f"{name}-{num_images}" + ("" if norm == "linf" else f"-{norm}")
          + ("" if eps is None else f"-eps{eps:g}")
          + ("" if threads is None else f"-t{threads}") + f"-{sha256[:12]}")


def row(result: dict[str, Any]) -> list[str]:
  ours, ref = result["ours"], result["reference"]
  fmt = lambda r: (f"{tables.pct(r['robust'])} ({tables.pct(r['interval'][0])}-"  # noqa: E731
                   f"{tables.pct(r['interval'][1])})")
  return [result["model"], result["sha256"][:12], str(result["num_images"]),
          NORM_LABELS.get(result.get("norm", "linf"), result.get("norm")),
          f"{result['eps']:.4g}",
          tables.pct(result["clean"]), fmt(ours), fmt(ref), str(result["only_ours_robust"]),
          str(result["only_reference_robust"]), f"{result['mcnemar_p']:.2g}",
          _reference_run(result),
          "kept" if math.isnan(ours["seconds"]) else f"{ours['seconds']:.0f}",
          f"{ref['seconds']:.0f}",
          "-" if math.isnan(ours["seconds"]) else f"{ref['seconds'] / ours['seconds']:.2f}x"]


def _reference_run(result: dict[str, Any]) -> str:
  """How the reference ran: a torch copy of the weights ('native') or the JAX model through the
  autograd bridge, on how many torch threads, and on how many CPUs the process could use where
  the comparison recorded it."""
  ref = result["reference"]
  cpus = result.get("cpus")
  return (f"{ref.get('kind', '?')}, {ref.get('torch_threads', '?')} thread(s)"
          + ("" if cpus is None else f", {cpus} CPU(s)"))


COST_HEADER = ("model", "weights", "n", "reference run", "attack", "advsweep s",
               "reference s", "reference model images", "reference gradient calls")
# Our compile time sits in the attacks' seconds; the page's cost table adds it as a row.
COMPILE_ROW = "advsweep's compilation (inside the attacks' seconds)"


def cost_rows(result: dict[str, Any]) -> list[list[str]]:
  """Per attack of a comparison that ran both sides: each one's seconds and the reference's
  model work inside that attack (its ledger); none for a kept or earlier comparison."""
  ours, ref = result["ours"], result["reference"]
  costs = ref.get("attack_costs")
  if not costs or math.isnan(ours["seconds"]):
    return []
  mine = ours.get("attack_seconds", {})
  head = [result["model"], result["sha256"][:12], str(result["num_images"]),
          _reference_run(result)]
  rows = [[*head, attack, f"{mine[attack]:.0f}" if attack in mine else "-",
           f"{cost['seconds']:.0f}", str(cost["model_images"]), str(cost["gradient_calls"])]
          for attack, cost in costs.items()]
  if "compile_seconds" in ours:
    hits = ours.get("compile_cache_hits", 0)
    rows.append([*head, COMPILE_ROW + (f", {hits} programs from the cache" if hits else ""),
                 f"{ours['compile_seconds']:.0f}", "-", "-", "-"])
  return rows


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m advsweep.bench.perf.standard_vs_reference",
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
  parser.add_argument("--ours-from", type=Path, default=None,
                      help="read our outcomes from advsweep robustness --standard's kept files "
                      "in this folder (e.g. results/standard-linf) instead of running them")
  parser.add_argument("--no-compile-cache", action="store_true",
                      help="compile our programs anew (default: the persistent cache that "
                      "advsweep's commands use; a first run fills it)")
  args = parser.parse_args(argv)
  compilation.enable_cache(None if args.no_compile_cache else compilation.cache_folder())
  args.out.mkdir(parents=True, exist_ok=True)
  rows = []
  for name in args.models:
    result = compare(name, args.n, eps=args.eps, norm=args.norm, data_dir=args.data_dir,
                     threads=args.threads, reference_batch_size=args.reference_batch_size,
                     ours_from=args.ours_from, progress_dir=args.out)
    stem = result_stem(name, args.n, args.eps, result["sha256"], args.threads, args.norm)
    files.atomic_write_bytes(args.out / f"{stem}.json",
                             (json.dumps(result, indent=1) + "\n").encode())
    rows.append(row(result))
  print(tables.format_text(HEADER, rows))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
