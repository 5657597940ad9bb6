"""The documentation's results pages, generated from committed results folders, so that no
figure in the docs stands without the rows behind it (`docs/results/`):

- `standard-evaluation.md`: the zoo under the standard evaluation, from `results/standard-linf/`
  (`advsweep robustness --standard`);
- `standard-vs-reference.md`: ours beside the reference AutoAttack, image by image, from
  `results/standard-reference/` (`python -m advsweep.bench.perf.standard_vs_reference`);
- `one-pixel-vs-art.md`: the one-pixel attack beside ART, per model and library the newest
  row of the committed `results/perf/peers-*.parquet` (`advsweep perf peers`);
- `zoo.md`: the zoo from its shipped checkpoints (`models/trained/`, `advsweep models`);
- `advgan.md`: AdvGAN beside PGD and the DCGAN's samples measured, from the newest committed
  `results/perf/advgan-*.json` (`python -m advsweep.bench.perf.advgan`).

    python -m advsweep.bench.perf.pages [--root .]      # rewrites docs/results/

A test regenerates the pages and compares them with the committed ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

from advsweep.bench.evaluation import standard_runs
from advsweep.bench.reports import tables
from advsweep.models import files

PAGES = ("standard-evaluation.md", "standard-vs-reference.md", "one-pixel-vs-art.md",
         "zoo.md", "advgan.md")


def _header(title: str, command: str, source: str) -> list[str]:
  return [f"# {title}", "", f"Generated from `{source}` by `python -m "
          "advsweep.bench.perf.pages`; the rows were made by", "", "```bash", command,
          "```", ""]


def standard_evaluation(root: Path) -> str:
  folder = root / "results" / "standard-linf"
  kept = {}
  for summary_path in sorted(folder.glob("*.json")):
    loaded = standard_runs.load(folder, json.loads(summary_path.read_text())["model"])
    if loaded is not None:
      kept[loaded[0]["model"]] = loaded
  _, markdown = standard_runs.lines(kept, "Standard evaluation (L-inf, first 1,000 test "
                                    "images)")
  return "\n".join([*_header("The zoo under the standard evaluation",
                             "advsweep robustness --standard", "results/standard-linf/"),
                    *markdown, ""])


def standard_vs_reference(root: Path) -> str:
  from advsweep.bench.perf import standard_vs_reference as versus

  folder = root / "results" / "standard-reference"
  rows = [versus.row(json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))]
  return "\n".join([*_header(
      "The standard evaluation beside the reference AutoAttack",
      "python -m advsweep.bench.perf.standard_vs_reference --models MODEL --n N "
      "--out results/standard-reference", "results/standard-reference/"),
      tables.format_markdown(list(versus.HEADER), rows), "",
      "The reference is torchattacks 3.5.1 with Croce and Hein's settings (100 iterations, "
      "Square's original schedule); 'kept' means our side was read from the standard "
      "evaluation's files instead of being run beside it.", ""])


def one_pixel_vs_art(root: Path) -> str:
  """Per model and library, the newest committed one-pixel row (`results/perf/peers-*`)."""
  newest: dict[tuple[str, str], tuple[dict, str]] = {}
  for path in sorted((root / "results" / "perf").glob("peers-*.parquet")):  # oldest first
    for r in pq.read_table(path).to_pylist():
      if r["attack"] == "one_pixel":
        newest[(r["model"], r["library"])] = (r, path.name)
  body = [[r["model"], r["library"], str(r["images"]), f"{r['s_per_image']:.3f}",
           f"{r['evals_per_image']:.0f}", tables.pct(r["success_rate"]),
           "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x", source]
          for (model, _), (r, source) in sorted(newest.items(), key=lambda kv: kv[0][0])]
  return "\n".join([*_header(
      "The one-pixel attack beside ART", "advsweep perf peers --attacks one_pixel "
      "--models MODEL ... --pixel-images N", "results/perf/peers-*.parquet"),
      "Population 400, 100 generations; per model and library the newest committed run "
      "(the file in the last column). 'peer / ours time': ART's seconds per image over "
      "ours (for a variant of ours, ART's over the variant's).", "",
      tables.format_markdown(["model", "library", "images", "s/image", "evaluations/image",
                              "success", "peer / ours time", "rows"], body), ""])


def zoo_page(root: Path) -> str:
  """The zoo from the shipped checkpoints (each verified)."""
  from advsweep.bench.reports import zoo as zoo_table

  rows, failures = zoo_table.rows(root / "models" / "trained", entry_points=False)
  if failures:
    raise ValueError(f"a shipped checkpoint fails verification: {failures[0]}")
  return "\n".join([*_header("The zoo", "advsweep models --markdown", "models/trained/"),
                    "Accuracy on the full test split.", "",
                    tables.format_markdown(list(zoo_table.HEADER), rows), ""])


def advgan_page(root: Path) -> str:
  """AdvGAN beside PGD-40 and the DCGAN's sample quality, from the newest committed run."""
  from advsweep.bench.perf import advgan as advgan_bench

  runs = sorted((root / "results" / "perf").glob("advgan-*.json"))
  head = _header("AdvGAN beside PGD, and the DCGAN's samples",
                 "python -m advsweep.bench.perf.advgan", "results/perf/advgan-*.json")
  if not runs:
    return "\n".join([*head, "No run is committed yet.", ""])
  run = json.loads(runs[-1].read_text())
  header, body = advgan_bench.table(run["rows"])
  lines = [*head, f"`{run['command']}` on {run['device']} ({runs[-1].name}); eps "
           f"{run['rows'][0]['eps'] if run['rows'] else '-'}, success over the correctly "
           "classified of the first test images, seconds per image of the attack alone "
           "(compiled, best of 3), the generator's one-time training beside it.", "",
           tables.format_markdown(header, body), ""]
  quality = run.get("dcgan")
  if quality:
    lines += [f"The DCGAN's samples: {quality['judge']} classifies "
              f"{tables.pct(quality['class_accuracy'], 1)} of {quality['samples']} as the "
              f"class asked for; Frechet distance {quality['frechet_distance']:.2f} on its "
              f"penultimate features against {quality['real_images']} test images (as many "
              f"training images against the same: "
              f"{quality['frechet_distance_real_train_vs_test']:.2f}).", ""]
  return "\n".join(lines)


def render(root: Path) -> dict[str, str]:
  """Every page's text, by file name."""
  return {"standard-evaluation.md": standard_evaluation(root),
          "standard-vs-reference.md": standard_vs_reference(root),
          "one-pixel-vs-art.md": one_pixel_vs_art(root),
          "zoo.md": zoo_page(root), "advgan.md": advgan_page(root)}


def write(root: Path) -> list[Path]:
  out = root / "docs" / "results"
  written = []
  for name, text in render(root).items():
    files.atomic_write_text(out / name, text)
    written.append(out / name)
  return written


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m advsweep.bench.perf.pages",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", default=".", help="the repository (default: here)")
  args = parser.parse_args(argv)
  for path in write(Path(args.root)):
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
