"""The jax.distributed path for real: two processes on this machine (coordinator on
127.0.0.1) each take their share of the units, and together they write the rows of one
single-process run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from advsweep.bench.driver import results
from tests.conftest import DATA_DIR, requires_data

SETTINGS = ["--set", 'models=["mnist_softmax"]', "--set", "batch_size=10", "--set",
            "images.per_bin=5", "--attacks", "fgsm", "--no-progress", "--no-report"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _advsweep(args, env):
  return subprocess.Popen([sys.executable, "-m", "advsweep.bench.cli", *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@requires_data
def test_two_processes_write_the_rows_of_one(tmp_path):
  base = dict(os.environ, JAX_PLATFORMS="cpu", ADVSWEEP_DATA_DIR=str(DATA_DIR))
  port = _free_port()
  procs = [_advsweep(["run", "ci", "--out", str(tmp_path / "two"), *SETTINGS],
                     dict(base, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                          JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  single = _advsweep(["run", "ci", "--out", str(tmp_path / "one"), *SETTINGS], base)
  outputs = [p.communicate(timeout=600) for p in [*procs, single]]
  for p, (_, err) in zip([*procs, single], outputs, strict=True):
    assert p.returncode == 0, err
  for i, (out, _) in enumerate(outputs[:2]):
    assert f"2 here (shard {i}/2)" in out and "ran 2 units here" in out, out
  two, one = results.read_run(tmp_path / "two"), results.read_run(tmp_path / "one")
  assert two.num_rows == one.num_rows == 30  # 15 images x 2 eps
  assert results.content(two).equals(results.content(one))
