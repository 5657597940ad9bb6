"""A sweep on a Ray cluster (`advsweep run CONFIG --ray [ADDRESS]`): each unit one Ray task.

The driver plans the sweep as `bench.driver.sweep.run` does (the run folder, the models' image
selection, the units still to run), then submits one task per unit. A task runs its unit
through `sweep.run(..., only={unit})`: the same claim (`bench.driver.claims`), the same atomic part
write, the same verification of what is there already. Ray retries a task whose worker died
(`max_retries`); the retry finds the dead worker's claim and takes it over (at once on the
same host, after `stale_after_s` without a heartbeat from another host), and a killed
worker never leaves a partial part, since parts are renamed into place whole. A task asks
for one GPU where the cluster has them, else one CPU. Every worker keeps the models it
loaded, so a worker pays the selection once per run, not once per unit.

The run folder must be one that every node can reach (a shared file system), and advsweep
must be installed on every node, as for any Ray job; `ADDRESS` is what `ray.init` takes
(`auto`, `ray://HOST:10001`); without one, a local cluster of this machine's cores is
started for the run and stopped after it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from advsweep.bench.driver import claims as claims_lib
from advsweep.bench.driver import compilation, results, sweep
from advsweep.bench.driver import config as config_lib

INSTALL_HINT = "Ray is an optional extra: pip install 'advsweep[ray]' (or pip install ray)"
LOCAL = "local"  # `--ray` without an address: a cluster of this machine, for this run
DEFAULT_RETRIES = 3


def _ray() -> Any:
  try:
    import ray
  except ImportError as err:
    raise ImportError(f"{err}; {INSTALL_HINT}") from None
  return ray


# ---------------------------------------------------------------------------------------
# The task (runs in a Ray worker process)

_MODELS: dict[tuple[str, str | None, str | None], dict[str, sweep.ModelData]] = {}


def run_unit(raw: str, config_hash: str, out_dir: str, filename: str, data_dir: str | None,
             checkpoint_dir: str | None, stale_after_s: float, compile_cache: str | None
             ) -> dict[str, Any]:
  """Runs one unit of a run in this process, as `sweep.run(..., only={filename})` does, and
  returns what happened: `ran` (this task wrote the part) or found it done, its process and
  host, and the sweep's messages. Waits while another live process holds the unit's claim,
  up to 1.5 x `stale_after_s`, after which a holder that stopped has lost it.

  Raises:
    RuntimeError: the unit stayed claimed by another process.
  """
  compilation.enable_cache(None if compile_cache is None else Path(compile_cache))
  config = config_lib.resolve(json.loads(raw), source="ray task")
  if config.config_hash != config_hash:
    raise RuntimeError(f"the task's config resolves to {config.config_hash}, not the "
                       f"driver's {config_hash}: the workers run another advsweep version")
  key = (config.config_hash, data_dir, checkpoint_dir)
  if key not in _MODELS:
    _MODELS.clear()  # one run's models at a time
    _MODELS[key] = sweep.load_models(config, data_dir, checkpoint_dir)
  messages: list[str] = []
  deadline = time.monotonic() + 1.5 * stale_after_s
  while True:
    outcome = sweep.run(config, out_dir, data_dir=data_dir, progress=False, estimate=False,
                        stale_after_s=stale_after_s, checkpoint_dir=checkpoint_dir,
                        only={filename}, models=_MODELS[key], log=messages.append)
    if outcome.units_run or outcome.units_skipped:
      return {"unit": filename, "ran": bool(outcome.units_run), "pid": os.getpid(),
              "host": socket.gethostname(), "messages": messages}
    if time.monotonic() > deadline:
      raise RuntimeError(f"unit {filename} stayed claimed by another process for "
                         f"{1.5 * stale_after_s:.0f} s")
    time.sleep(min(5.0, stale_after_s / 10))


# ---------------------------------------------------------------------------------------
# The driver


def run(config: config_lib.RunConfig, out_dir: str | os.PathLike, *,
        address: str | None = None, data_dir: str | None = None,
        checkpoint_dir: str | None = None, resume: bool = True, progress: bool = True,
        stale_after_s: float = claims_lib.DEFAULT_STALE_AFTER_S,
        max_retries: int = DEFAULT_RETRIES, num_cpus: int | None = None,
        compile_cache: str | None = None, log=print) -> sweep.SweepOutcome:
  """Runs the sweep's pending units as Ray tasks and waits for them (see the module doc).

  Args:
    config, out_dir, data_dir, checkpoint_dir, resume, progress, stale_after_s: as
      `sweep.run`.
    address: the cluster `ray.init` connects to; None or `"local"` starts one on this
      machine (`num_cpus` workers, default its cores) for this run.
    max_retries: times Ray reruns a task whose worker died.
    compile_cache: the persistent compile cache folder the workers use (None: off).

  Raises:
    RuntimeError: a unit failed (its error named), or some unit is still missing.
  """
  ray = _ray()
  out_dir = Path(out_dir).resolve()
  run_id = sweep.open_folder(out_dir, config)
  models = sweep.load_models(config, data_dir, checkpoint_dir)
  units = sweep.plan(config, {m: d.selection for m, d in models.items()})
  todo = sweep.pending(units, models, out_dir, run_id, config, log)
  if not resume and len(todo) < len(units):
    raise results.ResultsError(f"{out_dir} already has {len(units) - len(todo)} of this run's "
                               "units; drop --no-resume to continue it, or pass --out a new "
                               "folder")
  started = not ray.is_initialized()
  if started:
    local = address in (None, LOCAL)
    ray.init(address=None if local else address, include_dashboard=False,
             num_cpus=(num_cpus or os.cpu_count()) if local else None,
             logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": _worker_env()})
  try:
    gpus = ray.cluster_resources().get("GPU", 0)
    log(f"{config.name}: {len(units)} units in the sweep, {len(units) - len(todo)} already "
        f"done, {len(todo)} to run as Ray tasks on {int(ray.cluster_resources().get('CPU', 0))}"
        f" CPUs and {int(gpus)} GPUs")
    if todo:
      sweep.write_run_meta(out_dir, config, run_id, checkpoint_dir, len(units))
    task = ray.remote(run_unit).options(
        num_cpus=0 if gpus >= 1 else 1, num_gpus=1 if gpus >= 1 else 0,
        max_retries=max_retries, retry_exceptions=False)
    raw = json.dumps(config.raw)
    pending_refs = {task.remote(raw, config.config_hash, str(out_dir), unit.filename,
                                data_dir, checkpoint_dir, stale_after_s, compile_cache):
                    unit for unit in todo}
    ran, failures = _wait(ray, pending_refs, progress, config.name)
  finally:
    if started:
      ray.shutdown()
  for unit, error in failures:
    log(f"{config.name}: unit {unit.filename} failed: {error}")
  missing = sweep.pending(units, models, out_dir, run_id, config, log=lambda *_: None)
  if failures or missing:
    raise RuntimeError(f"{len(failures)} unit(s) failed and {len(missing)} are missing in "
                       f"{out_dir}; run the same command again to rerun them")
  log(f"{config.name}: ran {ran} unit{'' if ran == 1 else 's'} as Ray tasks")
  return sweep.SweepOutcome(out_dir, len(units), len(units), len(units) - len(todo), ran,
                            len(units), {})


def _worker_env() -> dict[str, str]:
  """The driver's settings a worker needs: data, cache and XLA variables."""
  keep = ("ADVSWEEP_", "XLA_FLAGS", "JAX_", "XDG_CACHE_HOME")
  return {k: v for k, v in os.environ.items() if k.startswith(keep)}


def _wait(ray: Any, refs: dict[Any, sweep.Unit], progress: bool, name: str
          ) -> tuple[int, list[tuple[sweep.Unit, str]]]:
  """Collects the tasks as they finish: (units this run wrote, failures with their error)."""
  bar = tqdm(total=sum(len(u.positions) for u in refs.values()), unit="img", desc=name,
             disable=not progress, file=sys.stderr, dynamic_ncols=True)
  ran, failures, waiting = 0, [], list(refs)
  try:
    while waiting:
      done, waiting = ray.wait(waiting, num_returns=1)
      unit = refs[done[0]]
      try:
        ran += bool(ray.get(done[0])["ran"])
      except Exception as err:  # noqa: BLE001  (a task's error, or a worker lost for good)
        failures.append((unit, " ".join(str(err).split())[-500:]))
      bar.update(len(unit.positions))
  finally:
    bar.close()
  return ran, failures


__all__ = ["LOCAL", "run", "run_unit"]
