"""The accelerator check: one script to run where a GPU or TPU can be had, recording its figures
in `results/perf/accelerator-<device>-<time>.md` beside the device's name.

    python -m advsweep.bench.perf.accelerator --data-dir DATA [--out results/perf] [--quick]

Steps, each a separate `advsweep` process timed from its start (compilation included, the
persistent compile cache switched off so a rerun measures the same thing):
1. `advsweep perf --quick`: the attacks' throughput;
2. `advsweep perf peers --attacks one_pixel` on a zoo CIFAR-10 model: ours beside ART
   (goal on a GPU: >= 30x ART);
3. `advsweep robustness --standard` on a defended CIFAR-10 model (1,000 images);
4. `advsweep reproduce su2019` in full (goal on a GPU: under 15 minutes);
then, in this process, the one-pixel attack's `chunk_size` (candidates per model call) that
packs populations best on the device. `--quick` shrinks every step to a CPU smoke run (the
script's test).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from advsweep.bench.reports import tables
from advsweep.models import files

CIFAR_MODEL = "cifar10_allconv"
DEFENDED_MODEL = "cifar10_resnet20_adv"
CHUNK_SIZES = (0, 1600, 6400, 25600)  # 0: one population (400) per call
GOAL_ONE_PIXEL_VS_ART = 30.0
GOAL_SU2019_MINUTES = 15.0


def steps(quick: bool, out: Path) -> list[tuple[str, list[str]]]:
  """(name, advsweep arguments) of the timed steps."""
  runs = str(out / "accelerator-runs")
  return [
      ("perf --quick", ["perf", "--quick", "--out", str(out)]),
      ("one-pixel vs ART", ["perf", "peers", "--attacks", "one_pixel", "--models",
                            CIFAR_MODEL, "--out", str(out),
                            *(["--quick"] if quick else ["--pixel-images", "100"])]),
      ("standard evaluation", ["robustness", "--standard", "--models", DEFENDED_MODEL,
                               "--out", runs, "--num-images", "20" if quick else "1000"]),
      ("reproduce su2019", ["reproduce", "su2019", "--out", runs,
                            *(["--quick"] if quick else [])]),
  ]


def _timed(argv: list[str], data_dir: str | None, log: Path) -> tuple[float, int]:
  env = dict(os.environ, ADVSWEEP_COMPILE_CACHE="0")
  if data_dir:
    env["ADVSWEEP_DATA_DIR"] = data_dir
  start = time.perf_counter()
  with log.open("a") as sink:
    sink.write(f"\n$ advsweep {' '.join(argv)}\n")
    sink.flush()
    quiet = ["--no-progress"] if argv[0] in ("robustness", "reproduce") else []
    done = subprocess.run([sys.executable, "-m", "advsweep.bench.cli", *argv, *quiet,
                           "--no-compile-cache"], env=env, stdout=sink,
                          stderr=subprocess.STDOUT, check=False)
  return time.perf_counter() - start, done.returncode


def chunk_sizes(data_dir: str | None, images: int, generations: int
                ) -> list[tuple[int, float]]:
  """(chunk_size, seconds per image) of the one-pixel attack on `CIFAR_MODEL`, fixed work
  (no early stop), after a warm-up of the same shapes."""
  from advsweep import attacks
  from advsweep.models import datasets, zoo

  model = zoo.load(CIFAR_MODEL)
  x, y = datasets.load("cifar10", "test", data_dir)
  x = jnp.asarray(x[:images], jnp.float32) / 255.0
  y = jnp.asarray(y[:images], jnp.int32)
  out = []
  for chunk in CHUNK_SIZES:
    config = attacks.OnePixelConfig(num_generations=generations, chunk_size=chunk,
                                    stop_on_flip=False, stop_true_prob=0.0,
                                    num_slots=max(1, chunk // 400))
    run = attacks.REGISTRY["one_pixel"].prepared(model.apply_fn, model.params, x, y,
                                                 jax.random.key(0), config)
    jax.block_until_ready(run())  # compile
    start = time.perf_counter()
    jax.block_until_ready(run())
    out.append((chunk, (time.perf_counter() - start) / images))
  return out


def _one_pixel_speedup(out: Path, since: float) -> float | None:
  """ART's s/image over ours on the one-pixel rows of the newest peers file written since."""
  import pyarrow.parquet as pq

  newest = sorted((p for p in out.glob("peers-*.parquet") if p.stat().st_mtime >= since),
                  key=lambda p: p.stat().st_mtime)
  if not newest:
    return None
  rows = pq.read_table(newest[-1]).to_pylist()
  ours = [r["s_per_image"] for r in rows if r["library"] == "advsweep"
          and r["attack"] == "one_pixel"]
  art = [r["s_per_image"] for r in rows if r["library"] == "ART" and r["attack"] == "one_pixel"]
  return art[0] / ours[0] if ours and art else None


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m advsweep.bench.perf.accelerator",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="results/perf", help="folder for the figures")
  parser.add_argument("--data-dir", default=os.environ.get("ADVSWEEP_DATA_DIR"))
  parser.add_argument("--quick", action="store_true", help="a CPU smoke run of every step")
  args = parser.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  device = jax.devices()[0]
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
  name = f"accelerator-{device.platform}-{stamp}"
  log = out / f"{name}.log"
  started = time.time()
  rows = []
  for title, command in steps(args.quick, out):
    print(f"[accelerator] {title}: advsweep {' '.join(command)}", flush=True)
    seconds, status = _timed(command, args.data_dir, log)
    rows.append([title, f"{seconds:.1f}", "ok" if status == 0 else f"exit {status}"])
  chunks = chunk_sizes(args.data_dir, 4 if args.quick else 64, 3 if args.quick else 20)
  best = min(chunks, key=lambda c: c[1])
  speedup = _one_pixel_speedup(out, started)
  su2019 = float(rows[3][1]) / 60
  lines = [f"# Accelerator check, {stamp}", "",
           f"Device: {device.device_kind} ({device.platform}, {jax.device_count()} device(s)); "
           f"jax {jax.__version__}; {'quick (smoke) settings' if args.quick else 'full'}.", "",
           tables.format_markdown(["step", "seconds (compilation included)", "status"], rows),
           "", "One-pixel `chunk_size` on " + CIFAR_MODEL + " (fixed work):", "",
           tables.format_markdown(["chunk_size", "s/image"],
                                  [[str(c), f"{s:.4f}"] for c, s in chunks]), "",
           f"Best chunk_size: {best[0]}.",
           f"One-pixel vs ART: {'-' if speedup is None else f'{speedup:.1f}x'} (goal on a GPU "
           f">= {GOAL_ONE_PIXEL_VS_ART:.0f}x).",
           f"su2019 {'(quick)' if args.quick else 'full'}: {su2019:.1f} min (goal on a GPU "
           f"under {GOAL_SU2019_MINUTES:.0f} min).", "", f"Commands' output: `{log.name}`.", ""]
  files.atomic_write_text(out / f"{name}.md", "\n".join(lines))
  files.atomic_write_text(out / f"{name}.json", json.dumps({
      "device": device.device_kind, "platform": device.platform, "quick": args.quick,
      "steps": rows, "chunk_sizes": chunks, "best_chunk_size": best[0],
      "one_pixel_vs_art": speedup}, indent=1) + "\n")
  print("\n".join(lines))
  return 0 if all(r[2] == "ok" for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
