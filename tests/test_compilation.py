"""The persistent compile cache every command uses, and compile time kept apart from attack
time (`bench.driver.compilation`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from advsweep.bench.driver import compilation, results
from tests.conftest import DATA_DIR, requires_data


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.delenv(compilation.CACHE_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compilation.cache_folder() == tmp_path / "xdg" / "advsweep" / "jax"
  monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path / "mine"))
  assert compilation.cache_folder() == tmp_path / "mine"
  for off in ("0", "off", "OFF", "false", "no"):
    monkeypatch.setenv(compilation.CACHE_ENV, off)
    assert compilation.cache_folder() is None


def test_compile_seconds_count_a_new_program_and_not_a_cached_call():
  @jax.jit
  def program(x):
    return jnp.sin(x) * 3 + x.sum()

  before = compilation.seconds()
  program(jnp.ones(7)).block_until_ready()
  first = compilation.seconds() - before
  before = compilation.seconds()
  program(jnp.ones(7)).block_until_ready()
  assert first > 0 and compilation.seconds() - before == 0


_SECOND_RUN = """
import json, sys
from advsweep.bench import cli
from advsweep.bench.driver import compilation
compilation.seconds()  # start the clock before anything compiles
status = cli.main(sys.argv[1:])
print(json.dumps({"status": status, "hits": compilation.cache_hits(),
                  "compile_s": compilation.seconds()}))
"""


def _run(tmp_path: Path, cache: str, out: str, *extra: str) -> dict:
  config = tmp_path / "c.toml"
  config.write_text('name = "c"\nmodels = ["mnist_softmax"]\nbatch_size = 4\n[images]\n'
                    'per_bin = 2\npool = 50\n[bins]\nnames = ["all"]\nthresholds = []\n'
                    '[attacks.fgsm]\neps = 0.1\n')
  env = dict(os.environ, ADVSWEEP_COMPILE_CACHE=cache, ADVSWEEP_DATA_DIR=str(DATA_DIR))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  done = subprocess.run([sys.executable, "-c", _SECOND_RUN, "run", str(config), "--out",
                         str(tmp_path / out), "--no-progress", *extra], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  return json.loads(done.stdout.strip().splitlines()[-1])


@requires_data
def test_a_second_command_loads_its_programs_from_the_cache(tmp_path):
  cache = tmp_path / "cache"
  first = _run(tmp_path, str(cache), "one")
  assert first["status"] == 0 and first["hits"] == 0 and any(cache.iterdir())
  second = _run(tmp_path, str(cache), "two")
  assert second["hits"] > 0
  off = _run(tmp_path, str(cache), "three", "--no-compile-cache")
  assert off["hits"] == 0
  rows = results.read_run(tmp_path / "two")
  compile_s = set(rows.column("compile_s").to_pylist())
  assert all(s is not None and s >= 0 for s in compile_s)
  assert all(w >= 0 for w in rows.column("wall_s").to_pylist())


@pytest.mark.parametrize("value", ["0", "off"])
def test_the_environment_switches_the_cache_off(tmp_path, value):
  env = dict(os.environ, ADVSWEEP_COMPILE_CACHE=value)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  code = ("import jax\nfrom advsweep.bench.driver import compilation\n"
          "print(compilation.enable_cache(compilation.cache_folder()), "
          "jax.config.jax_compilation_cache_dir)")
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120, check=True)
  assert done.stdout.split() == ["None", "None"]


def test_a_folder_that_cannot_be_made_leaves_the_cache_off_with_a_warning(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  code = ("import warnings, json\nfrom pathlib import Path\n"
          "from advsweep.bench.driver import compilation\n"
          "with warnings.catch_warnings(record=True) as w:\n"
          "  warnings.simplefilter('always')\n"
          f"  used = compilation.enable_cache(Path({str(blocker / 'sub')!r}))\n"
          "print(json.dumps([used, [str(x.message) for x in w]]))")
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120, check=True)
  used, said = json.loads(done.stdout.strip().splitlines()[-1])
  assert used is None and len(said) == 1 and "compile cache off: cannot create" in said[0]
