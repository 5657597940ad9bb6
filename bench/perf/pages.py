"""The documentation's results pages, generated from committed results folders, so that no
figure in the docs stands without the rows behind it (`docs/results/`):

- `standard-evaluation.md`: the zoo under the standard evaluation, from `results/standard-linf/`
  (`advsweep robustness --standard`);
- `standard-vs-reference.md`: ours beside the reference AutoAttack, image by image, from
  `results/standard-reference/` (`python -m advsweep.bench.perf.standard_vs_reference`);
- `peers.md`: every attack beside ART's and Foolbox's, per model, attack and library the
  newest row of the committed `results/perf/peers-*.parquet` (`advsweep perf peers`);
- `scaling.md`: how cost grows with the batch, the image, k and the population, and the
  traces of a swept field, from `results/perf/scaling-*.parquet` (`advsweep perf scaling`);
- `efficiency.md`: each attack's time against the model's own passes, from the newest
  committed `results/perf/perf-*.parquet` (`advsweep perf`);
- `main-job.md`: the main job (`advsweep run`) by confidence bin, from `results/main/`;
- `papers.md`: every paper's figures beside ours whose runs are kept in `results/`
  (`advsweep reproduce`);
- `analyses.md`: the one-pixel analyses kept beside their runs (`advsweep analyze`);
- `defenses.md`: input defenses under plain and adaptive attacks, the masking checks and
  the detector, from `results/defenses/` (`advsweep run defenses`);
- `robustness.md`: the zoo under each attack, defended models beside their twins, from every
  committed `results/robustness*/` (`advsweep robustness`);
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
from typing import Any

import pyarrow.parquet as pq

from advsweep.bench.evaluation import standard_runs
from advsweep.bench.reports import tables
from advsweep.models import files

PAGES = ("standard-evaluation.md", "standard-vs-reference.md", "peers.md", "scaling.md",
         "efficiency.md", "main-job.md", "papers.md", "analyses.md", "defenses.md",
         "robustness.md", "zoo.md", "advgan.md")


def _header(title: str, command: str, source: str) -> list[str]:
  return [f"# {title}", "", f"Generated from `{source}` by `python -m "
          "advsweep.bench.perf.pages`; the rows were made by", "", "```bash", command,
          "```", ""]


def _kept_standard(folder: Path) -> dict[str, Any]:
  kept = {}
  for summary_path in sorted(folder.glob("*.json")):
    loaded = standard_runs.load(folder, json.loads(summary_path.read_text())["model"])
    if loaded is not None:
      kept[loaded[0]["model"]] = loaded
  return kept


def standard_evaluation(root: Path) -> str:
  """The L-inf table (`results/standard-linf/`), and the L2 one where `results/standard-l2/`
  holds a run (CIFAR-10 at 0.5, RobustBench's L2 budget)."""
  _, markdown = standard_runs.lines(_kept_standard(root / "results" / "standard-linf"),
                                    "Standard evaluation (L-inf, first 1,000 test images)")
  l2 = _kept_standard(root / "results" / "standard-l2")
  l2_lines = []
  if l2:
    _, l2_markdown = standard_runs.lines(l2, "Standard evaluation (L2, first 1,000 test "
                                         "images)")
    l2_lines = ["", "The L2 table was made by `advsweep robustness --standard --norm l2 "
                "--models ...` (`results/standard-l2/`).", "", *l2_markdown]
  return "\n".join([*_header("The zoo under the standard evaluation",
                             "advsweep robustness --standard", "results/standard-linf/"),
                    *markdown, *l2_lines, ""])


def standard_vs_reference(root: Path) -> str:
  from advsweep.bench.perf import standard_vs_reference as versus

  folder = root / "results" / "standard-reference"
  results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
  rows = [versus.row(r) for r in results]
  costs = [line for r in results for line in versus.cost_rows(r)]
  where = ["", "### Where the time goes", "",
           "Per attack, on the comparisons that ran both sides in one process and recorded the "
           "reference's ledger: each side's seconds, and the model images and gradient calls the "
           "reference made inside the attack. The standard evaluation runs each attack with the "
           "same iterations, restarts, targets and query budget, on the images the earlier "
           "attacks left.", "",
           tables.format_markdown(list(versus.COST_HEADER), costs)] if costs else []
  return "\n".join([*_header(
      "The standard evaluation beside the reference AutoAttack",
      "python -m advsweep.bench.perf.standard_vs_reference --models MODEL --n N "
      "--out results/standard-reference", "results/standard-reference/"),
      tables.format_markdown(list(versus.HEADER), rows), "",
      "The reference is torchattacks 3.5.1 with Croce and Hein's settings (100 iterations, "
      "Square's original schedule); 'kept' means our side was read from the standard "
      "evaluation's files instead of being run beside it. 'weights': the first digits of "
      "the checkpoint's sha256 (a retrained model's earlier rows stay, under the weights "
      "they measured; `advsweep models` lists the shipped ones). 'reference run': a torch "
      "copy of the weights ('native') or the JAX model through the autograd bridge, torch's "
      "threads, and the CPUs the process could use where the run recorded them.", *where,
      ""])


def _newest_rows(folder: Path, pattern: str, key) -> dict[tuple, tuple[dict, str]]:
  """Per key, the row of the newest file (files are named by their UTC stamp)."""
  newest: dict[tuple, tuple[dict, str]] = {}
  for path in sorted(folder.glob(pattern)):  # oldest first
    for r in pq.read_table(path).to_pylist():
      newest[key(r)] = (r, path.name)
  return newest


_LIBRARY_ORDER = {"advsweep": 0, "Foolbox": 2, "ART": 3}


def peers_page(root: Path) -> str:
  """Per model, attack and library, the newest committed row (`results/perf/peers-*`)."""
  newest = _newest_rows(root / "results" / "perf", "peers-*.parquet",
                        lambda r: (r["model"], r["attack"], r["library"]))
  order = sorted(newest, key=lambda k: (k[0], k[1], _LIBRARY_ORDER.get(k[2], 1), k[2]))
  body = []
  for key in order:
    r, source = newest[key]
    features = "-" if r.get("features_changed") is None else tables.pct(
        r["features_changed"], 2)
    body.append([r["model"], r["attack"], r["library"], str(r["images"]),
                 f"{r['s_per_image']:.4f}", f"{r['evals_per_image']:,.0f}",
                 tables.pct(r["success_rate"]), features,
                 "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x",
                 "-" if r.get("model_share") is None else tables.pct(r["model_share"]),
                 r.get("note") or "", source])
  return "\n".join([*_header(
      "advsweep beside ART and Foolbox", "advsweep perf peers --models MODEL ... "
      "[--attacks ...] [-n N] [--pixel-images N]", "results/perf/peers-*.parquet"),
      "Each library's attack on the same weights, images and jitted forward pass, in one "
      "process; per model, attack and library the newest committed run (the file in the "
      "last column, named by its UTC time). One-pixel: population 400, 100 generations; "
      "FGSM, BIM, PGD: eps 0.1 (MNIST) or 8/255 (CIFAR-10), 10 steps of eps/4; JSMA: theta "
      "1, gamma 14.5%. 'peer / ours time': the peer's seconds per image over ours (on a "
      "variant row of ours, ART's over the variant's). 'in model calls': the share of ART's "
      "time inside the model's forward and gradient calls.", "",
      tables.format_markdown(["model", "attack", "library", "images", "s/image",
                              "evaluations/image", "success", "features changed",
                              "peer / ours time", "in model calls", "note", "rows"], body),
      ""])


def scaling_page(root: Path) -> str:
  """How cost grows, per sweep point the newest committed row (`results/perf/scaling-*`)."""
  newest = _newest_rows(root / "results" / "perf", "scaling-*.parquet",
                        lambda r: (r["sweep"], r["model"], r["attack"], r["x"]))
  timed = sorted((k for k in newest if k[0] != "retrace"),
                 key=lambda k: (k[0], k[1], k[2], k[3]))
  body = []
  for key in timed:
    r, source = newest[key]
    body.append([r["sweep"], r["model"], r["attack"], f"{r['x']:,}", f"{r['s_per_image']:.4f}",
                 f"{r['evals_per_image']:,.1f}", f"{r['compile_s']:.1f}", source])
  retrace = []
  for key in sorted(k for k in newest if k[0] == "retrace"):
    r, source = newest[key]
    retrace.append([r["attack"], r["field"], r["values"],
                    f"{r['first_traces']} / {r['first_compiles']}",
                    f"{r['later_traces']} / {r['later_compiles']}", source])
  return "\n".join([*_header(
      "How cost grows", "advsweep perf scaling [--sweeps batch image_size pixels "
      "population retrace]", "results/perf/scaling-*.parquet"),
      "Seconds per image of the run with compilation apart (first call minus a warm second "
      "call; early stopping off, so every image does the same work); x is the batch size, "
      "the image's pixel count, the one-pixel attack's k, or its population. Per sweep "
      "point the newest committed run (last column).", "",
      tables.format_markdown(["sweep", "model", "attack", "x", "s/image",
                              "evaluations/image", "compile s", "rows"], body), "",
      "Traces and XLA compiles while a sweep moves one field over four values: the first "
      "value's, then the later three's together.", "",
      tables.format_markdown(["attack", "field", "values", "first: traces / compiles",
                              "later: traces / compiles", "rows"], retrace), ""])


def _cold_start_lines(root: Path) -> list[str]:
  """The persistent compile cache's effect, from the newest committed
  `results/perf/cold-start-*.json` (`python -m advsweep.bench.perf.cold_start`)."""
  runs = sorted((root / "results" / "perf").glob("cold-start-*.json"))
  if not runs:
    return []
  run = json.loads(runs[-1].read_text())
  body = [[name, *(f"{run[key][part]:.1f}" for part in ("wall", "compile", "attack", "rest"))]
          for name, key in (("cold (empty cache)", "cold"), ("warm (the first's cache)",
                                                             "warm"))]
  return ["## Cold and warm starts", "", f"`{run['command']}` twice in fresh processes, the "
          "second with the compile cache the first left (`python -m "
          f"advsweep.bench.perf.cold_start`, {runs[-1].name}): the warm start is "
          f"{run['speedup']:.1f}x faster. Seconds:", "",
          tables.format_markdown(["start", "wall", "compilation", "attacks", "the rest"],
                                 body), "", "## Each attack against the model", ""]


def efficiency_page(root: Path) -> str:
  """Each attack's time against the model's own passes, from the newest committed
  `results/perf/perf-*.parquet` (`advsweep perf`)."""
  runs = sorted((root / "results" / "perf").glob("perf-*.parquet"))
  head = _header("Attacks against the model's own throughput",
                 "advsweep perf --models MODEL ... [--quick] [-n N]",
                 "results/perf/perf-*.parquet")
  if not runs:
    return "\n".join([*head, *_cold_start_lines(root), "No run is committed yet.", ""])
  rows = pq.read_table(runs[-1]).to_pylist()
  body = [[r["model"], r["attack"], str(r["images"]), r["unit"], str(r["unit_batch"]),
           f"{r['raw_units_per_s']:,.0f}", f"{r['attack_units_per_s']:,.0f}",
           f"{r['efficiency']:.2f}", f"{r['s_per_image']:.4f}", tables.pct(r["success_rate"]),
           f"{r['compile_s']:.1f}",
           "-" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.0f} MB"]
          for r in rows]
  return "\n".join([
      *head, *_cold_start_lines(root),
      f"The newest committed run, {runs[-1].name} ({rows[0]['device_kind']}, "
      f"jax {rows[0]['jax']}). 'raw units/s': the model alone, for the unit of work the "
      "attack makes (a forward pass, a forward and backward pass, a forward pass and two "
      "VJPs) at the attack's batch size; 'efficiency': the time the model alone needs for "
      "the attack's passes (and one forward pass per image that re-checks the result) over "
      "the attack's time, so 1.0 means no time goes anywhere but the model (above 1 for the "
      "one-pixel attack, whose pixel-local evaluation does fewer multiply-adds than a full "
      "pass). Attack and raw passes are timed in turn, medians of at least three rounds.", "",
      tables.format_markdown(["model", "attack", "images", "unit", "batch", "raw units/s",
                              "attack units/s", "efficiency", "s/image", "success",
                              "compile s", "compiled memory"], body), ""])


def main_job_page(root: Path) -> str:
  """The main job's success rates by confidence bin, from the committed `results/main/`."""
  from advsweep.bench.driver import results
  from advsweep.bench.reports import report

  folder = root / "results" / "main"
  head = _header("The main job", "advsweep run", "results/main/")
  if not (folder / "run.json").is_file():
    return "\n".join([*head, "No run is committed yet.", ""])
  table = results.read_run(folder)
  meta = results.read_run_meta(folder) or {}
  config = meta.get("config", {})
  cells = report.summaries(table, config.get("bins", {}).get("names"))
  header, body = report.pivot(cells)
  return "\n".join([
      *head, f"{config.get('description', '')}: {table.num_rows:,} rows (one per image and "
      f"attack setting), bins {config.get('bins', {}).get('names')} at confidence thresholds "
      f"{config.get('bins', {}).get('thresholds')}, seed {config.get('seed')}. Success rate "
      "over the clean-correct images with its 95% Wilson interval and n, by the clean "
      "image's confidence bin ('all' pools the drawn images, so it over-weights the rare low "
      "bin); s/img: attack time per image, compilation included in the first cell of each "
      "attack.", "",
      tables.format_markdown(header, body), ""])


def defenses_page(root: Path) -> str:
  """Input defenses under plain and adaptive attacks, with the masking checks and the
  detector, from the committed `results/defenses/` (`advsweep run defenses`)."""
  from advsweep.bench.driver import results, sweep
  from advsweep.bench.reports import report

  folder = root / "results" / "defenses"
  head = _header("Input defenses, plain and adaptive attacks", "advsweep run defenses",
                 "results/defenses/")
  if not (folder / "run.json").is_file() or not sweep.finished(folder):
    return "\n".join([*head, "No finished run is committed yet.", ""])
  table = results.read_run(folder)
  config = (results.read_run_meta(folder) or {}).get("config", {})
  _, defense_markdown = report.defense_lines(table)
  found, _, _ = report.detection_section(table)
  _, detection_markdown = report.detection_lines(found)
  # The report's sections are level-1 headings; here they sit under the page's title.
  lines = [f"#{line}" if line.startswith("# ") else line
           for line in [*defense_markdown, *detection_markdown]]
  return "\n".join([*head, f"{config.get('description', '')}: {table.num_rows:,} rows. "
                     "Accuracy over the clean-correct images with its 95% Wilson interval.",
                     *lines, ""])


def robustness_page(root: Path) -> str:
  """Every committed robustness table (`results/robustness*/`, `advsweep robustness`): the
  zoo under FGSM, PGD with restarts, the one-pixel attack, JSMA and transfer from the twin,
  each defended model beside its twin."""
  from advsweep.bench.driver import results
  from advsweep.bench.reports import robustness

  head = _header("The zoo under each attack", "advsweep robustness [--quick] "
                 "[--set name=NAME --set 'models=[...]']", "results/robustness*/")
  body = []
  for folder in sorted((root / "results").glob("robustness*/")):
    if not (folder / "run.json").is_file():
      continue
    config = (results.read_run_meta(folder) or {}).get("config", {})
    table = results.read_run(folder)
    per_model = config.get("images", {}).get("per_bin", "?")
    per_model = f"{per_model:,}" if isinstance(per_model, int) else per_model
    _, markdown = robustness.lines(table, f"`results/{folder.name}/`: {table.num_rows:,} rows, "
                                   f"{per_model} images a model")
    body += [*markdown, "", f"Models: {', '.join(config.get('models', []))}.", ""]
  if not body:
    body = ["No run is committed yet.", ""]
  return "\n".join([*head, "The per-attack table beside the [standard evaluation]"
                     "(standard-evaluation.md), which is the headline figure: each column "
                     "here is one attack, a defense's figure is its worst case.", "",
                     *body])


def papers_page(root: Path) -> str:
  """Every paper's comparison whose runs are kept in `results/` as its configs are now."""
  from advsweep.bench.reports import reproduce

  body, stale = [], []
  for paper in reproduce.papers():
    for quick in (False, True):
      command = f"advsweep reproduce {paper}{' --quick' if quick else ''}"
      state = reproduce.kept_state(paper, quick, root / "results")
      if state == "stale":
        stale.append(f"`{command}`")
      if state != "kept":
        continue
      _, markdown = reproduce.comparison(paper, quick, root / "results", shown_root="results")
      title, *rest = markdown.strip("\n").split("\n")
      body += [f"#{title}{' (quick)' if quick else ''}", "", f"`{command}`",
               *(f"#{line}" if line.startswith("#") else line for line in rest), ""]
  head = _header("The papers, ours beside theirs", "advsweep reproduce PAPER [--quick]",
                 "results/<run>/")
  note = ["Each paper's published figures beside ours, from the run folders kept in "
          "`results/` (a paper whose runs are not kept is left out).", ""]
  if stale:
    note += [f"Made with an earlier version of their config, so left out until rerun: "
             f"{', '.join(stale)}.", ""]
  return "\n".join([*head, *note, *body])


# The analyses' kept runs: (run folder, the config that made it).
ANALYSIS_RUNS = (("onepixel-analysis", "onepixel_analysis"),
                 ("onepixel-equal-budget", "onepixel_analysis --set images.per_bin=150 --set "
                  "attacks.one_pixel.num_generations=25 --set "
                  "attacks.one_pixel.stop_on_flip=false --set "
                  "attacks.one_pixel.stop_true_prob=0.0"),
                 ("onepixel-class-pairs", "onepixel_class_pairs"))


def analyses_page(root: Path) -> str:
  """Every analysis kept beside its run (`results/<run>/analysis/KIND.md`, written by
  `advsweep analyze KIND <run>` from the run's rows), figures named by their paths."""
  from advsweep.bench.driver import results
  from advsweep.bench.reports import report

  body = []
  for run, config in ANALYSIS_RUNS:
    folder = root / "results" / run / "analysis"
    if (root / "results" / run / "run.json").is_file() and any(folder.glob("*.md")):
      header, rows = report.pivot(report.summaries(results.read_run(root / "results" / run)))
      body += [f"## The one-pixel runs, `results/{run}`", "", f"`advsweep run {config}`: "
               "success over the clean-correct images with its 95% Wilson interval and n.",
               "", tables.format_markdown(header, rows), ""]
    for page in sorted(folder.glob("*.md")):
      kind = page.stem
      body += [f"## {kind}, `results/{run}`", "",
               f"`advsweep run {config}`, then `advsweep analyze {kind} results/{run}`", ""]
      for line in page.read_text().strip("\n").split("\n")[1:]:  # its own title dropped
        if line.startswith("![") and line.endswith(")"):
          line = f"Figure: `results/{run}/analysis/{line[line.index('(') + 1:-1]}`."
        body.append(f"#{line}" if line.startswith("#") else line)
      body.append("")
  head = _header("The analyses", "advsweep analyze KIND RUN", "results/<run>/analysis/")
  return "\n".join([*head, "The papers' analyses of the one-pixel attack, on the kept runs; "
                     "what each measures and the papers' claims beside ours: [the analyses "
                     "guide](../guide/analyses.md).", "", *body])


def zoo_page(root: Path) -> str:
  """The zoo from the shipped checkpoints (each verified)."""
  from advsweep.bench.reports import zoo as zoo_table

  rows, failures = zoo_table.rows(root / "models" / "trained", entry_points=False)
  if failures:
    raise ValueError(f"a shipped checkpoint fails verification: {failures[0]}")
  return "\n".join([*_header("The zoo", "advsweep models --markdown", "models/trained/"),
                    "Accuracy on the full test split; training s: the wall time of the "
                    "training run on the machine that made it (beside other jobs on the "
                    "2-core development CPU, so an upper bound).", "",
                    tables.format_markdown(list(zoo_table.HEADER), rows), "",
                    "## How the defended models were trained", "",
                    "As each shipped checkpoint's metadata records it (a recipe in "
                    "`models/zoo.py` changed since, for a model being retrained, shows here "
                    "only once its new weights ship). Guard: PGD-10 accuracy on 512 training "
                    "images at the training eps, four checks an epoch; the weights of the kept "
                    "check ship.", "",
                    tables.format_markdown(list(zoo_table.TRAINING_HEADER),
                                           zoo_table.training_rows(root / "models" /
                                                                   "trained")), "",
                    *_training_curves(root)])


def _training_curves(root: Path) -> list[str]:
  """Robustness against epochs, from `results/training-curve/*.json` (where kept)."""
  from advsweep.bench.perf import training_curve

  kept = sorted((root / "results" / "training-curve").glob("*.json"))
  if not kept:
    return []
  lines = ["## Robustness against epochs", "",
           "Each kept epoch's weights (`advsweep train MODEL --keep-epochs`) measured by "
           "`bench/perf/training_curve.py`: where the CPU budget stops short of a paper's "
           "figure, whether more epochs would help.", ""]
  for path in kept:
    run = json.loads(path.read_text())
    text = training_curve.markdown(run["rows"], run["command"])
    lines += [f"##{line}" if line.startswith("# ") else line for line in text.splitlines()]
  return [*lines, ""]


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
          "peers.md": peers_page(root), "scaling.md": scaling_page(root),
          "efficiency.md": efficiency_page(root), "main-job.md": main_job_page(root),
          "papers.md": papers_page(root), "analyses.md": analyses_page(root),
          "defenses.md": defenses_page(root), "robustness.md": robustness_page(root),
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
