"""`advsweep robustness --standard`: zoo models under the standard evaluation, kept as files.

Each model's evaluation (`bench.evaluation.standard.evaluate`) on the first N test images of its
dataset, at its dataset's budget, is written to `<out>/<model>.parquet` (one row per image
and attack) and `<out>/<model>.json` (the settings, timings, flags and headline), each
atomically; a later run with the same settings skips a model whose files are there, so an
interrupted run resumes model by model. The table: per model, clean accuracy, the accuracy
left after each attack of the cascade, and the headline "robust under every attack" with its
95% interval; then each defended model against its twin, image by image (exact McNemar test,
Newcombe interval: `bench.stats.paired`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from advsweep.bench import stats
from advsweep.bench.driver import results
from advsweep.bench.evaluation import standard
from advsweep.bench.reports import tables
from advsweep.models import custom, datasets, files, zoo

HEADER_START = ("model", "defense", "twin", "n", "clean")


def settings(name: str, model: Any, num_images: int, norm: str, version: str, quick: bool,
             seed: int) -> dict[str, Any]:
  """What an evaluation's files must share with a run that reuses them."""
  dataset = model.meta["dataset"]
  if model.randomized:
    version = standard.RAND  # AutoAttack's version for a randomized model
  eps = standard.BUDGETS.get((dataset, norm))
  if eps is None:
    raise ValueError(f"no standard {norm} budget for {dataset}; known: "
                     f"{', '.join(f'{d} {n}' for d, n in standard.BUDGETS)}")
  return {"model": name, "model_sha256": model.meta.get("sha256", ""),
          "defense": model.meta.get("defense", ""), "twin": model.meta.get("twin", ""),
          "dataset": dataset,
          "split": "test", "num_images": num_images, "norm": norm, "eps": eps,
          "version": version, "quick": quick, "seed": seed}


def _rows(evaluation: standard.Evaluation, name: str, sha: str) -> dict[str, list]:
  """One row per image and attack."""
  n = evaluation.n
  out: dict[str, list] = {k: [] for k in (
      "model", "model_sha256", "example_idx", "label", "clean_pred", "clean_correct",
      "robust", "attack", "ran", "success", "adv_pred", "queries", "linf", "l2")}
  for attack, o in evaluation.outcomes.items():
    out["model"] += [name] * n
    out["model_sha256"] += [sha] * n
    out["example_idx"] += list(range(n))
    out["label"] += evaluation.labels.tolist()
    out["clean_pred"] += evaluation.clean_pred.tolist()
    out["clean_correct"] += evaluation.clean_correct.tolist()
    out["robust"] += evaluation.robust.tolist()
    out["attack"] += [attack] * n
    out["ran"] += o.ran.tolist()
    out["success"] += o.success.tolist()
    out["adv_pred"] += o.adv_pred.tolist()
    out["queries"] += o.queries.tolist()
    out["linf"] += o.linf.tolist()
    out["l2"] += o.l2.tolist()
  return out


def _write(folder: Path, name: str, evaluation: standard.Evaluation,
           meta: dict[str, Any]) -> None:
  slug = _slug(name)
  sink = pa.BufferOutputStream()
  pq.write_table(pa.Table.from_pydict(_rows(evaluation, name, meta["model_sha256"])), sink)
  files.atomic_write_bytes(folder / f"{slug}.parquet", sink.getvalue().to_pybytes())
  acc, low, high = evaluation.robust_accuracy()
  summary = {**meta, "clean_accuracy": evaluation.clean_accuracy(), "robust_accuracy": acc,
             "robust_interval": [low, high], "robust_after": evaluation.robust_after(),
             "seconds": round(evaluation.seconds, 1),
             "attack_seconds": {k: round(o.seconds, 1)
                                for k, o in evaluation.outcomes.items()},
             "flags": [str(f) for f in evaluation.flags], "headline": evaluation.headline(),
             "git": results.git_sha(), "versions": json.loads(results.versions())}
  files.atomic_write_bytes(folder / f"{slug}.json",
                           (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())


def _slug(name: str) -> str:
  """A model's reference as a file name (MODEL+DEFENSE:LEVEL has characters to replace)."""
  return name.replace("+", "_").replace(":", "_")


def load(folder: Path, name: str) -> tuple[dict[str, Any], pa.Table] | None:
  """A model's kept evaluation (summary and rows), or None where it is missing or torn."""
  slug = _slug(name)
  summary, rows = folder / f"{slug}.json", folder / f"{slug}.parquet"
  if not summary.is_file() or not rows.is_file():
    return None
  try:
    return json.loads(summary.read_text()), pq.read_table(rows)
  except (OSError, ValueError, pa.ArrowException):
    return None


def _robust_per_image(table: pa.Table) -> np.ndarray:
  cols = table.to_pydict()
  first = [i for i, a in enumerate(cols["attack"]) if a == cols["attack"][0]]
  return np.asarray([cols["robust"][i] for i in first], bool)


def run_zoo(models: list[str], *, num_images: int = 1000, norm: str = standard.LINF,
            version: str = standard.STANDARD, quick: bool = False,
            out_root: str | Path = "results", data_dir: str | None = None,
            checkpoint_dir: str | None = None, seed: int = 0, batch_size: int | None = None,
            beside: Sequence[tuple[str, str]] = (), progress: bool = True, log=print) -> str:
  """Evaluates each model (resuming from kept files), prints and writes the table, each
  model beside its twin and the `beside` pairs (model, other) image by image; returns its
  Markdown."""
  if num_images < 1:
    raise ValueError(f"--num-images must be >= 1; got {num_images}")
  for pair in beside:
    if len(pair) != 2 or not all(m in models for m in pair):
      raise ValueError(f"--beside {' '.join(pair)}: both models must be among --models "
                       f"({' '.join(models)})")
  folder = Path(out_root) / f"standard-{norm}{'-quick' if quick else ''}"
  folder.mkdir(parents=True, exist_ok=True)
  kept: dict[str, tuple[dict[str, Any], pa.Table]] = {}
  for name in models:
    model = custom.resolve(name, checkpoint_dir)
    meta = settings(name, model, num_images, norm, version, quick, seed)
    previous = load(folder, name)
    if previous is not None and all(previous[0].get(k) == v for k, v in meta.items()):
      log(f"{name}: kept ({previous[0]['headline']})")
      kept[name] = previous
      continue
    images, labels = datasets.load(meta["dataset"], "test", data_dir)
    images, labels = images[:num_images], labels[:num_images]
    attack_fn = model.attack_apply_fn(bpda=True, eot_samples=standard.EOT_DRAWS)
    attack_fn = None if attack_fn is model.apply_fn else attack_fn
    partial = folder / f"{_slug(name)}.partial.npz"
    if partial.is_file():
      log(f"{name}: going on from {partial}")
    evaluation = standard.evaluate(
        model.apply_fn, model.params, images, labels, norm=norm, eps=meta["eps"],
        version=meta["version"], seed=seed, batch_size=batch_size,
        quick=quick, progress=progress, attack_apply_fn=attack_fn, resume=partial)
    log(f"{name}: {evaluation.headline()} in {evaluation.seconds:.0f} s")
    for flag in evaluation.flags:
      log(f"  {flag}")
    _write(folder, name, evaluation, meta)
    kept[name] = load(folder, name)
  title = (f"Standard evaluation ({norm}, first {num_images} test images"
           f"{', quick: not the standard figure' if quick else ''})")
  text, markdown = lines(kept, title, beside)
  log("\n".join(text))
  body = "\n".join(markdown) + "\n"
  tables.write_text(folder.with_suffix(".md"), body)
  return body


def pairs(kept: dict[str, tuple[dict[str, Any], pa.Table]],
          beside: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
  """The (model, other) pairs compared image by image: each model with its twin (the
  checkpoint's record) and with the zoo's `beside` model, then the pairs asked for; each pair
  once, in either order, and only where both were evaluated."""
  out: list[tuple[str, str]] = []
  for name, (summary, _) in kept.items():
    entry = zoo.ZOO.get(name)
    out += [(name, other) for other in (summary.get("twin"), entry and entry.beside) if other]
  seen: set[frozenset[str]] = set()
  unique = []
  for model, other in [*out, *beside]:
    if model != other and model in kept and other in kept and frozenset((model, other)) not in seen:
      seen.add(frozenset((model, other)))
      unique.append((model, other))
  return unique


def lines(kept: dict[str, tuple[dict[str, Any], pa.Table]], title: str,
          beside: Sequence[tuple[str, str]] = ()) -> tuple[list[str], list[str]]:
  """The table, the paired comparisons (`pairs`) and the flags, as text and as Markdown
  lines."""
  attacks: list[str] = []
  for summary, _ in kept.values():
    attacks += [a for a in summary["robust_after"] if a not in attacks]
  header = (*HEADER_START, *[f"after {a}" for a in attacks], "robust (95% interval)",
            "seconds")
  rows, flags, twins = [], [], []
  for name, (summary, _) in kept.items():
    # The checkpoint's own metadata: what the evaluated weights were trained as.
    defense, twin = summary.get("defense") or "none", summary.get("twin") or "-"
    low, high = summary["robust_interval"]
    rows.append([name, defense, twin, str(summary["num_images"]),
                 tables.pct(summary["clean_accuracy"]),
                 *[tables.pct(summary["robust_after"].get(a, float("nan"))) for a in attacks],
                 f"{tables.pct(summary['robust_accuracy'])} ({tables.pct(low)}-"
                 f"{tables.pct(high)})", f"{summary['seconds']:.0f}"])
    flags += [f"{name}: {f}" for f in summary["flags"]]
  for name, other in pairs(kept, beside):
    ours, theirs = _robust_per_image(kept[name][1]), _robust_per_image(kept[other][1])
    if len(ours) == len(theirs):
      p = stats.paired(ours, theirs)
      twins.append(f"{name} vs {other}: robust {tables.pct(p.a)} vs {tables.pct(p.b)}, "
                   f"difference {100 * p.difference:+.1f} points ({100 * p.low:+.1f} to "
                   f"{100 * p.high:+.1f}), robust only here {p.only_a}, only there "
                   f"{p.only_b}, exact McNemar p = {p.p_value:.2g}: "
                   f"{p.verdict()}")
  note = ("An image is robust only if it is classified correctly and every attack fails on "
          "it (AutoAttack's protocol, each attack on the images the earlier ones left). "
          "'after X': accuracy once X and every attack before it have run. 95% Wilson "
          "interval; each model beside its twin (and the zoo's `beside` model, or the pairs "
          "asked for) on the same images (Newcombe interval, exact McNemar).")
  flags = flags or ["no flag: no randomness, softmax output, saturation, zero gradients, "
                    "Square success or CE/DLR gap found"]
  text = [title, tables.format_text(header, rows), note, ""]
  markdown = [f"## {title}", "", tables.format_markdown(header, rows), "", note, ""]
  if twins:
    text += ["Beside the twin and other models:", *twins, ""]
    markdown += ["### Beside the twin and other models", "", *[f"- {t}" for t in twins], ""]
  text += flags
  markdown += ["### Flags", "", *[f"- {f}" for f in flags]]
  return text, markdown


__all__ = ["lines", "load", "pairs", "run_zoo", "settings"]
