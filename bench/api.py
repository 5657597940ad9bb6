"""The Python API beside the command line: run a sweep, read a run, evaluate a model.

    from advsweep.bench import run, read, evaluate

    rows = run("ci", out="results/ci")                       # a shipped config, by name
    rows = run({"name": "mine", "models": ["pkg.nets:net"],  # or a config as a dict
                "attacks": {"pgd": {"eps": [0.1, 0.2]}}}, out="results/mine")
    frame = read("results/mine", as_="pandas")               # every row, typed sweep axes
    result = evaluate(apply_fn, params, images, labels, norm="linf", eps=8 / 255)

They live in `advsweep.bench` because `advsweep` itself is a namespace shared by the three
packages (nothing else can claim it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from advsweep.bench.driver import config as config_lib
from advsweep.bench.driver import results, sweep

FRAMES = ("arrow", "pandas", "polars")


def run(config: str | os.PathLike | dict[str, Any] | config_lib.RunConfig,
        out: str | os.PathLike | None = None, *, overrides: list[str] | None = None,
        quick: bool = False, data_dir: str | None = None, checkpoint_dir: str | None = None,
        progress: bool = True, log: Callable[[str], Any] = print) -> pa.Table:
  """Runs (or resumes) a sweep and returns its rows, as `advsweep run` does.

  Args:
    config: a shipped config's name (`main`, `ci`, a paper's), a TOML path, a config as a
      dict (the TOML's tables), or a resolved `RunConfig`.
    out: the run folder (default `results/<name>`).
    overrides: `key=value` assignments, as `--set` takes them.
    quick: apply the config's [quick] table.
    data_dir: the local data folder (default `$ADVSWEEP_DATA_DIR`).
    checkpoint_dir: where the zoo models' checkpoints are (default: the shipped ones).
    progress: show a progress bar.
    log: where messages go.
  """
  if isinstance(config, config_lib.RunConfig):
    resolved = config if not overrides else config_lib.resolve(config.raw, overrides)
  elif isinstance(config, dict):
    resolved = config_lib.resolve(config, overrides, quick=quick, source="dict")
  else:
    resolved = config_lib.load(str(config), overrides, quick=quick)
  folder = Path(out) if out is not None else Path("results") / resolved.name
  sweep.run(resolved, folder, data_dir=data_dir, progress=progress,
            checkpoint_dir=checkpoint_dir, log=log)
  return results.read_run(folder)


def read(run_dir: str | os.PathLike, as_: str = "arrow") -> Any:
  """Every row of a run folder (or of a folder of runs): a pyarrow Table, or with `as_`
  "pandas" or "polars" a frame of that library (installed by the user)."""
  if as_ not in FRAMES:
    raise ValueError(f"as_ must be one of {', '.join(FRAMES)}; got {as_!r}")
  table = results.read_run(run_dir)
  if as_ == "pandas":
    return table.to_pandas()
  if as_ == "polars":
    import polars as pl

    return pl.from_arrow(table)
  return table


__all__ = ["read", "run"]
