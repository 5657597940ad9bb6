"""Cold and warm starts of one command, with the persistent compile cache
(`bench.driver.compilation`): the same `advsweep run CONFIG --quick` twice in fresh
processes, into fresh run folders, the first with an empty cache folder and the second with
what the first left there. Prints each one's wall time and what it was made of: compilation
and attack time as the rows record them (`compile_s`, `wall_s`), and the rest (starting
Python and JAX, data, the image selection, the report), and writes them to
`<out>/cold-start-<platform>-<stamp>.json` (the docs' efficiency page reads the newest).

    python -m advsweep.bench.perf.cold_start [--config main] [--data-dir DATA] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from advsweep.bench.driver import results
from advsweep.bench.reports import tables
from advsweep.models import files


def timed_run(config: str, out: Path, cache: Path, data_dir: str | None) -> dict[str, float]:
  """One `advsweep run CONFIG --quick` in a new process: its wall time and the rows' sums."""
  env = dict(os.environ, ADVSWEEP_COMPILE_CACHE=str(cache))
  if data_dir:
    env["ADVSWEEP_DATA_DIR"] = data_dir
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "advsweep.bench.cli", "run", config, "--quick",
                  "--out", str(out), "--no-progress", "--no-report"], env=env, check=True,
                 stdout=subprocess.DEVNULL)
  wall = time.perf_counter() - start
  cols = results.read_run(out).select(["model", "config_hash", "created_at", "compile_s",
                                       "wall_s"]).to_pydict()
  units: dict[tuple, tuple[float, float]] = {}
  for m, h, c, compiled, per_image in zip(*cols.values(), strict=True):
    _, attack = units.get((m, h, c), (compiled, 0.0))
    units[(m, h, c)] = (compiled, attack + per_image)  # wall_s: the unit's time / its images
  compile_s = float(np.sum([s for s, _ in units.values()]))
  attack_s = float(np.sum([a for _, a in units.values()]))
  return {"wall": wall, "compile": compile_s, "attack": attack_s,
          "rest": wall - compile_s - attack_s}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m advsweep.bench.perf.cold_start",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="main")
  parser.add_argument("--data-dir", default=os.environ.get("ADVSWEEP_DATA_DIR"))
  parser.add_argument("--out", default="results/perf", help="folder for the JSON file")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    cache = Path(tmp) / "cache"
    first = timed_run(args.config, Path(tmp) / "first", cache, args.data_dir)
    second = timed_run(args.config, Path(tmp) / "second", cache, args.data_dir)
  rows = [[name, *(f"{run[k]:.1f}" for k in ("wall", "compile", "attack", "rest"))]
          for name, run in (("cold (empty cache)", first), ("warm (the first's cache)", second))]
  print(f"advsweep run {args.config} --quick, seconds:")
  print(tables.format_text(["start", "wall", "compilation", "attacks", "the rest"], rows))
  print(f"warm / cold: {first['wall'] / second['wall']:.2f}x faster")
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
  device = jax.devices()[0]
  path = Path(args.out) / f"cold-start-{device.platform}-{stamp}.json"
  files.atomic_write_text(path, json.dumps({
      "command": f"advsweep run {args.config} --quick", "cold": first, "warm": second,
      "speedup": first["wall"] / second["wall"], "device_kind": device.device_kind,
      "jax": jax.__version__, "created_at": stamp}, indent=1, sort_keys=True) + "\n")
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
