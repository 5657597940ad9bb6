"""A sweep as Ray tasks on a local cluster of two workers (`bench.driver.ray_sweep`): the rows of a
plain run, and a worker killed in the middle of a unit costs nothing but the rerun."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from advsweep.bench.driver import config, results, sweep
from tests.conftest import requires_data
from tests.test_sweep import assert_same_rows

ray = pytest.importorskip("ray")

RAW = {
    "name": "rayed", "models": ["mnist_lenet"], "seed": 3, "batch_size": 2,
    "images": {"per_bin": 2, "pool": 60}, "bins": {"names": ["all"], "thresholds": []},
    "attacks": {"fgsm": {"eps": [0.1, 0.3]},
                # A unit long enough to be killed in (no early stop, a full population).
                "one_pixel": {"population_size": 200, "num_generations": 12,
                              "stop_on_flip": False, "stop_true_prob": 0.0}},
}


@pytest.fixture(scope="module")
def cluster():
  ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
           runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                     if k.startswith(("ADVSWEEP_", "XLA_FLAGS"))}})
  yield
  ray.shutdown()


def _kill_the_first_claimer(claims: Path, killed: list, stop: threading.Event) -> None:
  """SIGKILLs the worker process that holds the first claim to appear (mid-unit)."""
  while not stop.is_set():
    for path in claims.glob("*one_pixel*.claim") if claims.is_dir() else []:
      try:
        owner = json.loads(path.read_text())
      except ValueError:
        continue  # being written
      time.sleep(0.5)  # into the unit's work
      os.kill(owner["pid"], signal.SIGKILL)
      killed.append((path.name.removesuffix(".claim"), owner["pid"]))
      return
    time.sleep(0.01)


@requires_data
def test_ray_tasks_write_the_rows_of_a_plain_run_even_when_a_worker_dies(tmp_path, data_dir,
                                                                         cluster):
  cfg = config.resolve(RAW)
  plain = tmp_path / "plain"
  sweep.run(cfg, plain, data_dir=str(data_dir), progress=False, estimate=False,
            log=lambda *_: None)
  from advsweep.bench.driver import ray_sweep

  out = tmp_path / "ray"
  killed, stop = [], threading.Event()
  watcher = threading.Thread(target=_kill_the_first_claimer,
                             args=(out / "claims", killed, stop), daemon=True)
  watcher.start()
  said = []
  try:
    outcome = ray_sweep.run(cfg, out, data_dir=str(data_dir), progress=False,
                            log=said.append)
  finally:
    stop.set()
    watcher.join()
  assert killed, "no worker was killed: the unit ended before the watcher saw its claim"
  assert outcome.units_done == outcome.units_total == outcome.units_run
  assert_same_rows(results.read_run(out), results.read_run(plain))
  parts = sorted(p.name for p in (out / "parts").iterdir() if not p.name.startswith("."))
  assert parts == sorted(p.name for p in (plain / "parts").iterdir())  # no duplicates
  assert not list((out / "claims").glob("*.claim"))
  assert any("ran 3 units as Ray tasks" in m for m in said), said


@requires_data
def test_a_second_ray_run_finds_everything_done(tmp_path, data_dir, cluster):
  from advsweep.bench.driver import ray_sweep

  cfg = config.resolve(dict(RAW, attacks={"fgsm": {"eps": [0.2]}}))
  out = tmp_path / "ray"
  first = ray_sweep.run(cfg, out, data_dir=str(data_dir), progress=False, log=lambda *_: None)
  again = ray_sweep.run(cfg, out, data_dir=str(data_dir), progress=False, log=lambda *_: None)
  assert (first.units_run, again.units_run, again.units_skipped) == (1, 0, 1)
  with pytest.raises(results.ResultsError, match="drop --no-resume"):
    ray_sweep.run(cfg, out, data_dir=str(data_dir), progress=False, resume=False,
                  log=lambda *_: None)
