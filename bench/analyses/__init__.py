"""The papers' analyses of a run (`advsweep analyze KIND RUN_DIR`): each reads the run's rows
(or runs what it needs), writes its parquet, figures and headline table under
`RUN/analysis/`, and returns them (`common.Output`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from advsweep.bench.analyses import (
  chromatic,
  class_pairs,
  common,
  confidence_maps,
  locality,
  noise,
  propagation,
)
from advsweep.bench.driver import runs

DEFAULT_CONFIG = "onepixel_analysis"  # the run `advsweep analyze KIND` makes without a folder

ANALYSES: dict[str, Callable[..., common.Output]] = {
    class_pairs.KIND: class_pairs.analyze,
    chromatic.KIND: chromatic.analyze,
    confidence_maps.KIND: confidence_maps.analyze,
    locality.KIND: locality.analyze,
    propagation.KIND: propagation.analyze,
    noise.KIND: noise.analyze,
}


# The analyses that run the run's models again: each model must be the one that made its rows.
RECOMPUTE = frozenset({confidence_maps.KIND, locality.KIND, propagation.KIND, noise.KIND})


def run(kind: str, run_dir: str | Path, **options: object) -> common.Output:
  """Runs analysis `kind` on `run_dir` and writes its outputs there.

  Raises:
    ResultsError: an analysis that runs the models again, on a run whose rows were made with
      other weights than its models load now (`runs.load_models`), before any work.
  """
  if kind not in ANALYSES:
    raise ValueError(f"unknown analysis {kind!r}; valid choices: {', '.join(ANALYSES)}")
  if kind in RECOMPUTE:
    runs.load_models(run_dir, options.get("attack"), options.get("checkpoint_dir"))
  output = ANALYSES[kind](run_dir, **options)
  common.write(output, run_dir)
  return output
