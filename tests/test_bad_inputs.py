"""Bad input, as a hostile but realistic user gives it: every case exits non-zero with one line
that names the problem and the fix, prints no traceback, and writes nothing.

The classes (issue 19): config values checked when the config loads; one-line failures from
every command; the attack API at its edges; resume that verifies what it skips; checkpoints
verified where they are listed; concurrent processes sharing a folder; quiet data loading.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advsweep import attacks
from advsweep.bench import analyses, cli
from advsweep.bench.driver import claims, config, results, sweep
from advsweep.models import datasets, zoo
from tests import attack_models
from tests.conftest import DATA_DIR, requires_data

REPO = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> set[str]:
  return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def fails(capsys, cwd: Path, argv: list[str], *phrases: str, code: int = 2) -> str:
  """Runs `advsweep ARGV` in `cwd`; asserts the exit status, one stderr line holding every
  phrase, no traceback and no file written. Returns the line."""
  before = _tree(cwd)
  try:
    rc = cli.main(argv)
  except SystemExit as exit_:  # argparse
    rc = exit_.code
  out, err = capsys.readouterr()
  lines = [line for line in err.splitlines() if line.strip()]
  assert rc == code, (rc, out, err)
  assert "Traceback" not in err + out
  assert len(lines) == 1, err
  for phrase in phrases:
    assert phrase.lower() in lines[0].lower(), (phrase, lines[0])
  assert _tree(cwd) == before, "a failed command wrote files"
  return lines[0]


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
  monkeypatch.chdir(tmp_path)
  return tmp_path


# --- 1. Config values are checked when the config loads, before data or files. ----------

CONFIG_CASES = [
    ('attacks.fgsm.eps=abc', ('attacks.fgsm.eps takes a number', "'abc'")),
    ('attacks.fgsm.eps=true', ('attacks.fgsm.eps takes a number', 'True')),
    ('attacks.bim.num_steps=0', ('num_steps', '>= 1')),
    ('attacks.pgd.num_steps=2.5', ('attacks.pgd.num_steps takes an integer', '2.5')),
    ('attacks.one_pixel.stop_on_flip=False', ('stop_on_flip takes true or false', "'False'")),
    ('attacks.pgd.random_start=1', ('random_start takes true or false', 'toml')),
    ('bins.thresholds=["a", "b"]', ('bins.thresholds must be a list of probabilities',)),
    ('bins.thresholds=[0.1, 0.5]', ('strictly decreasing',)),
    ('bins.names=["a", "a", "b"]', ('distinct names',)),
    ('images.per_bin=0', ('images.per_bin must be an integer >= 1',)),
    ('images.per_bin=true', ('images.per_bin must be an integer >= 1',)),
    ('images.pool=-1', ('images.pool must be an integer >= 0',)),
    ('seed=-1', ('seed must be an integer >= 0',)),
    ('seed=1.5', ('seed must be an integer >= 0',)),
    ('batch_size=0', ('batch_size must be an integer >= 1',)),
    ('models=[]', ('models must be a non-empty list',)),
    ('models=["mnist_lenet", 3]', ('models must be a non-empty list',)),
    ('models=["no_such_model"]', ("unknown model 'no_such_model'", 'valid choices')),
    ('split=validation', ('split must be one of', 'test')),
    ('name="../elsewhere"', ('name must be letters', 'run folder')),
    ('foo=1', ("unknown config key 'foo'", 'valid keys')),
    ('attacks.nope.eps=1', ("unknown attack 'nope'", 'valid choices')),
    ('attacks.fgsm.nope=1', ("unknown field 'nope' for attack fgsm", 'valid fields')),
    ('attacks.fgsm.eps', ('--set expects KEY=VALUE',)),
    ('attacks.fgsm=3', ('must be a table of parameters',)),
    ('attacks.fgsm.target_class=3', ('target_class needs target = "explicit"',)),
    ('attacks.fgsm.eps=-0.1', ('eps must be >= 0',)),
    ('attacks.jsma.derivative="nope"', ("unknown derivative 'nope'", 'valid choices')),
]


@pytest.mark.parametrize("assignment,phrases", CONFIG_CASES,
                         ids=[c[0] for c in CONFIG_CASES])
def test_run_refuses_a_bad_config_value_before_anything(capsys, cwd, assignment, phrases):
  fails(capsys, cwd, ["run", "ci", "--out", "run", "--set", assignment, "--no-progress"],
        *phrases)


def test_explicit_target_class_must_be_a_class_of_the_models(capsys, cwd):
  fails(capsys, cwd, ["run", "ci", "--out", "run", "--set", 'attacks.fgsm.target="explicit"',
                      "--set", "attacks.fgsm.target_class=10"],
        "target_class must be a class index in [0, 10)", "10")


def test_a_config_file_that_is_not_toml_or_not_there(capsys, cwd):
  (cwd / "bad.toml").write_text("name = [unclosed\n")
  fails(capsys, cwd, ["run", "bad.toml"], "bad.toml is not valid TOML")
  fails(capsys, cwd, ["run", "missing.toml"], "no config file missing.toml")
  fails(capsys, cwd, ["run", "no_such_config"], "unknown config 'no_such_config'",
        "valid choices")
  (cwd / "table.toml").write_text('name = "t"\nmodels = ["mnist_lenet"]\n'
                                  '[attacks]\nfgsm = 3\n')
  fails(capsys, cwd, ["run", "table.toml"], "attacks.fgsm must be a table of fields")


def test_attack_and_reproduce_check_values_too(capsys, cwd):
  fails(capsys, cwd, ["attack", "mnist_lenet", "fgsm", "--set", "eps=true"],
        "fgsm.eps takes a number")
  fails(capsys, cwd, ["attack", "mnist_lenet", "bim", "--set", "num_steps=0"], "num_steps")
  fails(capsys, cwd, ["reproduce", "goodfellow2015", "--out", "runs", "--set",
                      "attacks.fgsm.eps=abc"], "attacks.fgsm.eps takes a number")


# --- 2. Every expected failure is one line and a non-zero exit. --------------------------

@pytest.mark.parametrize("argv,phrases", [
    (["attack", "mnist_lenet", "fgsm", "-n", "0"], ["-n", "whole number >= 1"]),
    (["attack", "mnist_lenet", "fgsm", "-n", "-3"], ["-n", "whole number >= 1"]),
    (["attack", "mnist_lenet", "fgsm", "--seed", "x"], ["--seed", "whole number >= 0"]),
    (["attack", "no_model", "fgsm"], ["unknown model 'no_model'", "valid choices"]),
    (["perf", "-n", "0"], ["-n", "whole number >= 1"]),
    (["perf", "--peers", "--pixel-images", "-1"], ["--pixel-images", "whole number"]),
    (["perf", "throughput", "--sweeps", "batch"],
     ["--sweeps applies to `advsweep perf scaling` only, not to throughput"]),
    (["perf", "--pixel-images", "3"], ["--pixel-images applies to `advsweep perf peers` only"]),
    (["perf", "scaling", "--peers"], ["two programs", "old spelling of `advsweep perf peers`"]),
    (["perf", "nope"], ["invalid choice: 'nope'"]),
    (["train", "mnist_lenet", "--epochs", "0"], ["--epochs", "whole number >= 1"]),
    (["run", "ci", "--shard", "3/2"], ["--shard K/N needs 0 <= K < N"]),
    (["run", "ci", "--shard", "one/two"], ["--shard expects K/N"]),
    (["run", "ci", "--attacks", "nope"], ["unknown attack 'nope'"]),
    (["report", "no_such_run"], ["no results folder no_such_run"]),
    (["compare", "a", "b"], ["no results folder a"]),
    (["models", "--checkpoint-dir", "nowhere"], ["no checkpoint folder nowhere",
                                                 "--checkpoint-dir"]),
])
def test_every_command_fails_in_one_line(capsys, cwd, argv, phrases):
  fails(capsys, cwd, argv, *phrases)


def test_out_must_be_a_folder_that_can_be_written(capsys, cwd):
  (cwd / "afile").write_text("x")
  fails(capsys, cwd, ["run", "ci", "--out", "afile"], "afile is a file", "name a folder")
  fails(capsys, cwd, ["run", "ci", "--out", "afile/run"], "afile is a file", "cannot be created")
  fails(capsys, cwd, ["report", "somewhere", "--out", "afile"], "afile is a file")
  fails(capsys, cwd, ["reproduce", "su2019", "--out", "afile"], "afile is a file")
  fails(capsys, cwd, ["run", "ci", "--out", "/proc/advsweep-run"], "cannot write in /proc",
        "a folder you can write")


def test_missing_data_is_one_line_from_attack_and_run(capsys, cwd, monkeypatch):
  monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
  line = fails(capsys, cwd, ["attack", "mnist_lenet", "fgsm", "-n", "2", "--data-dir",
                             str(cwd / "nodata")], "dataset 'mnist' split 'test' not found",
               "--data-dir")
  assert "nodata" in line
  fails(capsys, cwd, ["run", "ci", "--out", "run", "--data-dir", str(cwd / "nodata"),
                      "--no-progress"], "not found", "Fix:")


@requires_data  # the sweep it interrupts reads MNIST
def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
  """SIGINT while a sweep runs: exit 130, one line, and only whole parts on disk."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", **{datasets.DATA_DIR_ENV: str(DATA_DIR)})
  proc = subprocess.Popen(
      [sys.executable, "-m", "advsweep.bench.cli", "run", "ci", "--out", str(tmp_path / "r"),
       "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
      cwd=tmp_path,
      # A shell's background job inherits SIGINT ignored, and Python keeps it so; this test
      # is of Ctrl-C at a terminal, whatever started pytest.
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  for line in proc.stdout:  # interrupt once the sweep has begun its units
    if "to run on" in line:
      break
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, (out, err)
  lines = [line for line in err.splitlines() if line.strip()]
  assert lines == [lines[-1]] and "interrupted" in lines[-1], err
  assert "Traceback" not in err
  for part in (tmp_path / "r").rglob("*.parquet"):
    results.read_part(part)


# --- 3. The attack API at its edges. ---------------------------------------------------

APPLY, PARAMS = attack_models.linear_model(height=4, width=4, channels=1, num_classes=4)
SMALL = {
    "fgsm": attacks.FGSM.config(eps=0.1),
    "bim": attacks.BIM.config(eps=0.1, num_steps=2),
    "pgd": attacks.PGD.config(eps=0.1, num_steps=2),
    "jsma": attacks.JSMA.config(gamma=0.2),
    "one_pixel": attacks.ONE_PIXEL.config(population_size=4, num_generations=1),
    "apgd": attacks.APGD.config(eps=0.1, num_steps=2),
    "apgd_t": attacks.APGD_T.config(eps=0.1, num_steps=2, num_target_classes=2),
    "fab_t": attacks.FAB_T.config(eps=0.1, num_steps=2, num_target_classes=2),
    "square": attacks.SQUARE.config(eps=0.1, num_queries=5),
    "advgan": attack_models.advgan_config((4, 4, 1), 4, eps=0.1),
}


@pytest.mark.parametrize("name", list(attacks.REGISTRY))
def test_an_empty_batch_is_refused_by_name(name):
  images = jnp.zeros((0, 4, 4, 1))
  with pytest.raises(ValueError, match="empty batch"):
    attacks.REGISTRY[name].run(APPLY, PARAMS, images, jnp.zeros((0,), jnp.int32),
                               jax.random.key(0), SMALL[name])


@pytest.mark.parametrize("name", list(attacks.REGISTRY))
def test_an_integer_seed_is_a_key(name):
  images = attack_models.random_images(2, 4, 4, 1)
  labels = jnp.asarray([0, 1], jnp.int32)
  spec = attacks.REGISTRY[name]
  by_seed = spec.run(APPLY, PARAMS, images, labels, 7, SMALL[name])
  by_key = spec.run(APPLY, PARAMS, images, labels, jax.random.key(7), SMALL[name])
  np.testing.assert_array_equal(by_seed.adv_images, by_key.adv_images)
  with pytest.raises(ValueError, match="integer seed"):
    spec.run(APPLY, PARAMS, images, labels, jnp.zeros((3,), jnp.float32), SMALL[name])


@pytest.mark.parametrize("name", list(attacks.REGISTRY))
def test_a_model_that_returns_nan_gives_finite_images_and_no_success(name):
  def nan_model(params, images):
    return APPLY(params, images) * jnp.nan

  images = attack_models.random_images(2, 4, 4, 1)
  result = attacks.REGISTRY[name].run(nan_model, PARAMS, images, jnp.asarray([0, 1]),
                                      jax.random.key(0), SMALL[name])
  adv = np.asarray(result.adv_images)
  assert np.isfinite(adv).all() and adv.min() >= 0 and adv.max() <= 1
  assert not np.asarray(result.finite).any() and not np.asarray(result.success).any()


EPS_BOUNDED = [name for name, config in SMALL.items() if hasattr(config, "eps")]


@pytest.mark.parametrize("name", EPS_BOUNDED)
def test_a_traced_negative_eps_is_enforced_as_zero(name):
  """Under jit the value checks cannot run: eps < 0 must not become a budget of |eps|."""
  spec = attacks.REGISTRY[name]
  images = attack_models.random_images(2, 4, 4, 1)
  labels = APPLY(PARAMS, images).argmax(-1)  # correct: a success would need a perturbation
  with pytest.raises(ValueError, match="eps must be >= 0"):
    spec.run(APPLY, PARAMS, images, labels, jax.random.key(0),
             SMALL[name].replace(eps=-0.1))

  @jax.jit
  def attack(eps):
    return spec.core(APPLY, PARAMS, images, labels, jax.random.key(0),
                     SMALL[name].replace(eps=eps))

  result = attack(jnp.float32(-0.1))
  np.testing.assert_array_equal(np.asarray(result.adv_images), np.asarray(images))
  assert not np.asarray(result.success).any()
  assert np.asarray(attack(jnp.float32(0.1)).linf).max() > 0  # the same program perturbs


@pytest.mark.parametrize("returns,phrase", [
    (lambda logits: logits.argmax(-1), "int32 (1,)"),
    (lambda logits: logits[:, :1], "float32 (1, 1)"),
    (lambda logits: logits.reshape(-1), "float32 (4,)"),
    (lambda logits: (logits > 0).astype(jnp.int32), "int32 (1, 4)"),
], ids=["class-ids", "one-column", "flat", "integer-scores"])
def test_an_apply_fn_that_returns_no_logits_is_named(returns, phrase):
  def model(params, images):
    return returns(APPLY(params, images))

  images = attack_models.random_images(2, 4, 4, 1)
  with pytest.raises(ValueError, match=r"logits \[B, K\] .* expected from apply_fn, got "
                     + re.escape(phrase)):
    attacks.fgsm(model, PARAMS, images, jnp.asarray([0, 1]), jax.random.key(0))


# --- 4. Resume verifies what it skips. -------------------------------------------------

TINY = config.resolve({
    "name": "tiny", "models": ["mnist_softmax"], "seed": 1, "batch_size": 4,
    "images": {"per_bin": 2, "pool": 200}, "bins": {"thresholds": [0.99, 0.9]},
    "attacks": {"fgsm": {"eps": [0.1, 0.2]}}})


def _sweep(cfg, out, **kwargs):
  messages = []
  outcome = sweep.run(cfg, out, data_dir=str(DATA_DIR), progress=False, estimate=False,
                      log=messages.append, **kwargs)
  return outcome, messages


@requires_data
def test_a_truncated_part_is_run_again(tmp_path):
  out = tmp_path / "run"
  first, _ = _sweep(TINY, out)
  part = sorted((out / "parts").glob("*.parquet"))[0]
  whole = part.read_bytes()
  part.write_bytes(whole[:300])
  again, messages = _sweep(TINY, out)
  assert (again.units_skipped, again.units_run) == (first.units_total - 1, 1)
  assert any(str(part) in m and "unreadable" in m for m in messages)
  assert results.read_part(part).num_rows == results.read_part(
      _write_to(tmp_path / "copy.parquet", whole)).num_rows


def _write_to(path: Path, data: bytes) -> Path:
  path.write_bytes(data)
  return path


@requires_data
def test_parts_of_another_seed_are_refused_by_name(tmp_path):
  out = tmp_path / "run"
  _sweep(TINY, out)
  (out / "run.json").unlink()
  other = config.resolve(dict(TINY.raw, seed=2))
  with pytest.raises(results.ResultsError, match=r"belongs to run tiny-\w+ \(seed 1\)"):
    _sweep(other, out)
  assert not (out / "run.json").exists()  # refused before anything was written


@requires_data
def test_a_part_that_is_no_unit_of_the_run_is_refused(tmp_path):
  out = tmp_path / "run"
  _sweep(TINY, out)
  shutil.copy(sorted((out / "parts").glob("*.parquet"))[0], out / "parts" / "stray.parquet")
  with pytest.raises(results.ResultsError, match="stray.parquet .* is no unit of this run"):
    _sweep(TINY, out)


@requires_data
def test_a_config_that_failed_before_its_first_unit_gives_the_folder_back(tmp_path):
  out = tmp_path / "run"
  out.mkdir()
  (out / "run.json").write_text(json.dumps({"run_id": "x", "config_hash": "other"}))
  outcome, _ = _sweep(TINY, out)
  assert outcome.units_run == outcome.units_total
  assert json.loads((out / "run.json").read_text())["config_hash"] == TINY.config_hash


def test_a_folder_of_run_folders_is_refused_as_a_run_folder(tmp_path):
  """`--out results` (the folder that holds run folders and benchmark files) is refused
  before any work, naming the folder the run would go to; an empty folder, or one holding
  only what a run writes, is a run folder."""
  (tmp_path / "main").mkdir()
  (tmp_path / "perf-cpu-1.parquet").write_bytes(b"")
  with pytest.raises(results.ResultsError, match=r"no run folder .* holds 'main' and 1 more; "
                     r"--out names the run folder itself: pass --out .*tiny"):
    sweep.open_folder(tmp_path, TINY)
  assert not (tmp_path / "run.json").exists()
  fresh = tmp_path / "fresh"
  (fresh / "parts").mkdir(parents=True)
  assert sweep.open_folder(fresh, TINY) == f"{TINY.name}-{TINY.config_hash}"


def test_every_flag_an_error_message_advises_exists():
  """Advice must work as written: each `--flag` in a message of bench/ or models/ is an
  option of some command."""
  parser = cli.build_parser()
  options = set()
  for action in parser._subparsers._group_actions:  # noqa: SLF001
    for sub in action.choices.values():
      for a in sub._actions:  # noqa: SLF001
        options.update(o for o in a.option_strings if o.startswith("--"))
  mentioned = set()
  for path in [*(REPO / "bench").glob("*.py"), *(REPO / "models").glob("*.py")]:
    for literal in re.findall(r'f?"([^"\n]* [^"\n]*)"', path.read_text()):  # messages
      mentioned.update(re.findall(r"(?<![\w-])--[a-z][a-z-]+", literal))
  mentioned -= {"--no-build-isolation", "--no-deps"}  # pip's, quoted in install hints
  assert mentioned and mentioned <= options, sorted(mentioned - options)


# --- 5. Checkpoints are verified where they are listed. -------------------------------

@pytest.mark.parametrize("damage,phrase", [
    ("flip", "sha256"), ("truncate", "sha256"), ("zero_checksum", "sha256"),
    ("no_meta", "metadata file missing"), ("bad_meta", "not valid JSON"),
    ("wrong_model", "wrong model"),
])
def test_models_lists_a_damaged_checkpoint_as_corrupt(capsys, cwd, damage, phrase):
  folder = cwd / "ckpt"
  folder.mkdir()
  for suffix in (".msgpack", ".json"):
    shutil.copy(zoo.CHECKPOINT_DIR / f"mnist_softmax{suffix}", folder)
  weights, meta = folder / "mnist_softmax.msgpack", folder / "mnist_softmax.json"
  if damage == "flip":
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
  elif damage == "truncate":
    weights.write_bytes(weights.read_bytes()[:1000])
  elif damage == "zero_checksum":
    meta.write_text(json.dumps(dict(json.loads(meta.read_text()), sha256="0" * 64)))
  elif damage == "no_meta":
    meta.unlink()
  elif damage == "bad_meta":
    meta.write_text("{not json")
  elif damage == "wrong_model":
    shutil.copy(zoo.CHECKPOINT_DIR / "mnist_lenet.msgpack", weights)
    lenet_meta = json.loads((zoo.CHECKPOINT_DIR / "mnist_lenet.json").read_text())
    meta.write_text(json.dumps(lenet_meta))
  before = _tree(cwd)
  assert cli.main(["models", "--checkpoint-dir", str(folder)]) == 1
  out, err = capsys.readouterr()
  assert "CORRUPT" in out and "Traceback" not in err
  assert len(err.strip().splitlines()) == 1 and phrase in err
  assert _tree(cwd) == before


def test_models_lists_a_healthy_folder_with_exit_0(capsys, cwd):
  folder = cwd / "ckpt"
  folder.mkdir()
  for suffix in (".msgpack", ".json"):
    shutil.copy(zoo.CHECKPOINT_DIR / f"mnist_softmax{suffix}", folder)
  assert cli.main(["models", "--checkpoint-dir", str(folder)]) == 0
  out, err = capsys.readouterr()
  assert "CORRUPT" not in out and "not trained" in out and not err


# --- 7. Processes sharing a folder share its work. ------------------------------------

def test_a_claim_is_exclusive_and_released(tmp_path):
  a, b = claims.Claims(tmp_path), claims.Claims(tmp_path)
  assert a.take("u") and not b.take("u")
  a.release("u")
  assert b.take("u") and not a.take("u")


def test_a_claim_of_a_killed_process_is_taken_over(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  owner = {"host": claims.socket.gethostname(), "pid": dead.pid, "token": "gone"}
  (tmp_path / "u.claim").write_text(json.dumps(owner))
  a, b = claims.Claims(tmp_path), claims.Claims(tmp_path)
  assert a.take("u") and not b.take("u")


def test_a_claim_not_refreshed_is_taken_over_and_a_fresh_one_is_not(tmp_path):
  owner = {"host": "another-host", "pid": 1, "token": "far"}
  (tmp_path / "u.claim").write_text(json.dumps(owner))
  patient = claims.Claims(tmp_path, stale_after_s=60)
  assert not patient.take("u")
  old = time.time() - 120
  os.utime(tmp_path / "u.claim", (old, old))
  assert patient.take("u")
  holder = claims.Claims(tmp_path, stale_after_s=0.5, heartbeat_s=0.05)
  assert holder.take("v")
  with holder.holding("v"):
    time.sleep(1.0)  # the heartbeat keeps it fresh
    assert not claims.Claims(tmp_path, stale_after_s=0.5).take("v")
  assert not (tmp_path / "v.claim").exists()


def _aged(path: Path, seconds: float) -> Path:
  old = time.time() - seconds
  os.utime(path, (old, old))
  return path


@pytest.mark.parametrize("content", [b"", b"\x00\x9c\xff garbage", b'{"host": "h"}', b"[1, 2]",
                                     b'{"host": "h", "pid": 1, "tok'],
                         ids=["empty", "binary", "no-owner", "not-a-table", "cut-short"])
def test_a_claim_that_names_no_owner_is_named_and_taken_over(tmp_path, content):
  _aged(_write_to(tmp_path / "u.claim", content), 2 * claims.WRITE_GRACE_S)
  said = []
  a = claims.Claims(tmp_path, log=said.append)
  assert a.take("u") and not claims.Claims(tmp_path).take("u")
  assert json.loads((tmp_path / "u.claim").read_text()) == a.owner
  assert len(said) == 1 and str(tmp_path / "u.claim") in said[0] and "no owner" in said[0]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["u.claim"]


def test_a_claim_being_written_this_instant_is_not_taken_over(tmp_path):
  _write_to(tmp_path / "u.claim", b"")  # created, owner not written yet
  said = []
  assert not claims.Claims(tmp_path, log=said.append).take("u")
  assert not said and (tmp_path / "u.claim").read_bytes() == b""


def test_a_claim_whose_write_fails_leaves_no_file(tmp_path, monkeypatch):
  def full_disk(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(claims.os, "fsync", full_disk)
  with pytest.raises(OSError, match="No space left"):
    claims.Claims(tmp_path).take("u")
  assert not list(tmp_path.iterdir())


@requires_data
def test_a_sweep_takes_over_a_garbage_claim_and_says_so(tmp_path):
  out = tmp_path / "run"
  first, _ = _sweep(TINY, out)
  part = sorted((out / "parts").glob("*.parquet"))[0]
  part.unlink()
  (out / "claims").mkdir(exist_ok=True)
  claim = _aged(_write_to(out / "claims" / f"{part.name}.claim", b"\x00" * 7), 60)
  again, messages = _sweep(TINY, out)
  assert (again.units_run, again.units_done) == (1, first.units_total)
  assert any(str(claim) in m and "taken over" in m for m in messages), messages
  assert not any("claimed by other processes" in m for m in messages)
  assert not list((out / "claims").iterdir())


@requires_data
def test_two_sweeps_into_one_folder_run_each_unit_once(tmp_path):
  import threading

  out = tmp_path / "run"
  cfg = config.resolve(dict(TINY.raw, batch_size=1))
  outcomes = []
  threads = [threading.Thread(target=lambda: outcomes.append(_sweep(cfg, out)[0]))
             for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  total = outcomes[0].units_total
  assert sum(o.units_run for o in outcomes) == total
  assert outcomes[-1].units_done == total
  assert results.read_run(out).num_rows == total
  assert not list((out / "claims").glob("*"))


# --- 8. Quiet output. -----------------------------------------------------------------

@pytest.mark.parametrize("variant_folder", [True, False])
def test_an_unprepared_tfds_folder_says_nothing(tmp_path, monkeypatch, capfd, variant_folder):
  if variant_folder:
    (tmp_path / "mnist" / "3.0.1").mkdir(parents=True)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
  with pytest.raises(datasets.DatasetNotFoundError, match="not prepared"):
    datasets.load("mnist", "test", tmp_path / "nodata")
  out, err = capfd.readouterr()
  assert "Variant folder" not in out + err and "dataset_info" not in out + err


# --- 6. Rows do not depend on the batch. ------------------------------------------------

def test_one_pixel_model_calls_have_one_shape_whatever_the_batch():
  """XLA rounds differently at different batch shapes, and DE follows the rounding; the
  candidates' model calls take their shape from the config alone, so an image's search is
  the same in any batch (a batch of 7 against 60 changed failed rows before)."""
  shapes = {}

  def spying(batch):
    def apply_fn(params, images):
      if images.shape[0] not in (1, batch):  # candidates, not the shape probe or a pass
        # over the batch (clean and final)
        shapes.setdefault(batch, set()).add(images.shape[0])
      return APPLY(params, images)
    return apply_fn

  config = attacks.ONE_PIXEL.config(population_size=6, num_generations=2, num_slots=4,
                                    chunk_size=13)
  for batch in (3, 9):
    images = attack_models.random_images(batch, 4, 4, 1, seed=batch)
    attacks.one_pixel(spying(batch), PARAMS, images, jnp.zeros(batch, jnp.int32),
                      jax.random.key(0), config)
  assert shapes[3] == shapes[9] == {12}, shapes


@requires_data
def test_settings_that_cannot_fit_the_devices_are_refused(tmp_path, monkeypatch):
  with pytest.raises(config.ConfigError, match="fewer than its 50 parts"):
    _sweep(TINY, tmp_path / "a", shard=(0, 50))
  devices = jax.local_devices()
  monkeypatch.setattr(sweep.jax, "local_devices", lambda: devices * 8)
  with pytest.raises(config.ConfigError, match="batch_size 4 cannot be split over 8 devices"):
    _sweep(TINY, tmp_path / "b")
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@requires_data
def test_parts_of_other_weights_or_another_schema_are_refused_not_overwritten(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  out = tmp_path / "run"
  _sweep(TINY, out)
  parts = sorted((out / "parts").glob("*.parquet"))
  table = results.read_part(parts[0])
  other = table.set_column(table.schema.get_field_index("model_sha256"), "model_sha256",
                           pa.array(["f" * 64] * table.num_rows))
  results.write_part(parts[0], other.to_pydict())
  with pytest.raises(results.ResultsError, match="made with other weights"):
    _sweep(TINY, out)
  pq.write_table(pa.table({"x": [1, 2]}), parts[1])
  before = parts[1].read_bytes()
  results.write_part(parts[0], table.to_pydict())
  with pytest.raises(results.ForeignPartError, match="move it out"):
    _sweep(TINY, out)
  assert parts[1].read_bytes() == before


def test_only_run_joins_a_multi_process_job(capsys, cwd, monkeypatch):
  monkeypatch.setenv("SLURM_NTASKS", "4")  # inside an sbatch allocation, outside srun
  assert cli.main(["models"]) == 0  # does not wait for peers that never come
  capsys.readouterr()
  monkeypatch.delenv("SLURM_NTASKS")
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  fails(capsys, cwd, ["run", "ci"], "cannot join the multi-process job")


# --- 9. Analyses recompute with the run's own model (issue 35). ---------------------------

PIXEL_RUN = {"name": "px", "models": ["mnist_softmax"], "seed": 0, "batch_size": 8,
             "images": {"per_bin": 4}, "bins": {"names": ["all"], "thresholds": []},
             "attacks": {"one_pixel": {"population_size": 20, "num_generations": 3}}}


@pytest.fixture(scope="module")
def retrained_run(tmp_path_factory):
  """A one-pixel run of mnist_softmax made from other weights (`--checkpoint-dir`)."""
  if DATA_DIR is None:
    pytest.skip("needs the datasets")
  root = tmp_path_factory.mktemp("retrained")
  shipped = zoo.load("mnist_softmax")
  other = jax.tree.map(lambda a: a * 0.5, shipped.params)
  from advsweep.models import checkpoints

  checkpoints.save(root / "ckpt" / zoo.entry("mnist_softmax").checkpoint.name, other,
                   {k: v for k, v in shipped.meta.items() if k != "sha256"})
  sweep.run(config.resolve(PIXEL_RUN), root / "run", data_dir=str(DATA_DIR), progress=False,
            estimate=False, checkpoint_dir=str(root / "ckpt"), log=lambda *_: None)
  return root


def _copy_run(src: Path, dst: Path) -> Path:
  shutil.copytree(src, dst)
  return dst


def test_analyze_uses_the_checkpoints_the_run_recorded(capsys, cwd, retrained_run):
  run = _copy_run(retrained_run / "run", cwd / "run")
  meta = json.loads((run / "run.json").read_text())
  assert meta["checkpoint_dir"] == str((retrained_run / "ckpt").resolve())
  assert cli.main(["analyze", "confidence_maps", str(run), "--quick"]) == 0
  capsys.readouterr()
  rows = results.read_run(run)
  other = zoo.load("mnist_softmax", retrained_run / "ckpt").meta["sha256"]
  assert set(rows.column("model_sha256").to_pylist()) == {other}


def test_analyze_refuses_rows_of_other_weights_by_name(capsys, cwd, retrained_run):
  run = _copy_run(retrained_run / "run", cwd / "run")
  fails(capsys, cwd, ["analyze", "noise", str(run), "--checkpoint-dir",
                      str(zoo.CHECKPOINT_DIR)],
        "mnist_softmax rows were made with weights sha256", "--checkpoint-dir")
  meta = json.loads((run / "run.json").read_text())
  del meta["checkpoint_dir"]  # a run that did not record its folder: the shipped weights
  (run / "run.json").write_text(json.dumps(meta))
  for kind in ("noise", "locality", "propagation", "confidence_maps"):
    fails(capsys, cwd, ["analyze", kind, str(run), "--quick"],
          "made with weights sha256", "shipped zoo weights", "--checkpoint-dir")


def test_analyze_names_an_unknown_attack_and_lists_the_runs(capsys, cwd, retrained_run):
  run = _copy_run(retrained_run / "run", cwd / "run")
  fails(capsys, cwd, ["analyze", "noise", str(run), "--attack", "pgdd"],
        "unknown attack 'pgdd'", "the attacks of", "one_pixel")
  fails(capsys, cwd, ["analyze", "class_pairs", str(run), "--attack", "pgd"],
        "has no pgd rows", "its attacks: one_pixel", "--attack")


@requires_data
def test_analyses_of_a_defended_or_users_model_run(capsys, tmp_path):
  defended = dict(PIXEL_RUN, name="defended", models=["mnist_softmax+jpeg:75"])
  run = tmp_path / "run"
  sweep.run(config.resolve(defended), run, data_dir=str(DATA_DIR), progress=False,
            estimate=False, log=lambda *_: None)
  output = analyses.run("noise", run, data_dir=str(DATA_DIR), quick=True)
  cols = output.rows.to_pydict()
  assert "accuracy" in cols["what"] and not any("latent" in m for m in cols["what"])
  assert any("accuracy under noise only" in n for n in output.notes)
  with pytest.raises(ValueError, match="propagation reads a model's layers, and "
                     r"mnist_softmax\+jpeg:75 has none"):
    analyses.run("propagation", run, data_dir=str(DATA_DIR), quick=True)


# --- 10. A user's data and models: the right result or one line (issue 35). ---------------

def _png(path: Path, array: np.ndarray, mode: str | None = None, palette=None) -> Path:
  from PIL import Image

  path.parent.mkdir(parents=True, exist_ok=True)
  image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
  if palette is not None:
    image.putpalette(palette)
  image.save(path)
  return path


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
  values = np.array([[0, 257, 32768, 65535]], np.uint16)
  _png(tmp_path / "0" / "a.png", values)
  images, _ = datasets.load_other(str(tmp_path), "test")
  assert images.shape == (1, 1, 4, 1)
  np.testing.assert_array_equal(images[0, 0, :, 0], [0, 1, 128, 255])


@pytest.mark.parametrize("mode,channels", [("LA", 1), ("grey-palette", 1), ("palette", 3),
                                           ("RGBA", 3), ("1", 1)])
def test_png_modes_keep_the_channels_they_hold(tmp_path, mode, channels):
  grey = np.array([[0, 100], [200, 255]], np.uint8)
  if mode == "LA":
    _png(tmp_path / "0" / "a.png", np.stack([grey, np.full_like(grey, 9)], -1), "LA")
  elif mode in ("grey-palette", "palette"):
    colours = [(v, v, v) for v in range(256)] if mode == "grey-palette" else [
        (v, 255 - v, v // 2) for v in range(256)]
    _png(tmp_path / "0" / "a.png", grey, "P", [c for rgb in colours for c in rgb])
  elif mode == "RGBA":
    _png(tmp_path / "0" / "a.png", np.stack([grey, grey, 255 - grey, np.zeros_like(grey)], -1))
  else:
    _png(tmp_path / "0" / "a.png", grey > 99)
  images, _ = datasets.load_other(str(tmp_path), "test")
  assert images.shape == (1, 2, 2, channels)
  if mode in ("LA", "grey-palette"):
    np.testing.assert_array_equal(images[0, ..., 0], grey)
  if mode == "RGBA":  # alpha dropped, not composited over black
    np.testing.assert_array_equal(images[0], np.stack([grey, grey, 255 - grey], -1))
  if mode == "1":
    np.testing.assert_array_equal(images[0, ..., 0], np.where(grey > 99, 255, 0))


def test_a_folder_mixing_grey_and_colour_reads_as_colour(tmp_path):
  grey = np.array([[10, 20]], np.uint8)
  _png(tmp_path / "0" / "a.png", grey)
  _png(tmp_path / "1" / "b.png", np.stack([grey, grey + 1, grey + 2], -1))
  images, labels = datasets.load_other(str(tmp_path), "test")
  assert images.shape == (2, 1, 2, 3) and labels.tolist() == [0, 1]
  np.testing.assert_array_equal(images[0], np.repeat(grey[..., None], 3, -1))


@pytest.mark.parametrize("damage", ["truncated", "not-a-png", "empty"])
def test_a_broken_png_is_named(capsys, cwd, damage):
  good = _png(cwd / "data" / "0" / "a.png", np.zeros((4, 4), np.uint8))
  bad = cwd / "data" / "1" / "b.png"
  bad.parent.mkdir()
  shutil.copy(good, bad)
  body = bad.read_bytes()
  bad.write_bytes({"truncated": body[:len(body) // 2], "not-a-png": b"GIF89a" + body[6:],
                   "empty": b""}[damage])
  with pytest.raises(datasets.CorruptDataError, match=re.escape(str(bad)) + ": cannot be "
                     "read as an image .*replace or remove it"):
    datasets.load_other(str(cwd / "data"), "test")


def test_an_npz_without_images_is_named(tmp_path):
  np.savez(tmp_path / "mine.npz", x_test=np.zeros((0, 8, 8), np.uint8),
           y_test=np.zeros((0,), np.int64))
  with pytest.raises(datasets.CorruptDataError, match="mine.npz/test: holds no images"):
    datasets.load_other(str(tmp_path / "mine.npz"), "test")


@requires_data
@pytest.mark.parametrize("where", ["data-dir", "cache"])
def test_a_gz_corrupt_mid_stream_is_one_line(capsys, cwd, monkeypatch, where):
  folder = cwd / where / "mnist-raw"
  shutil.copytree(DATA_DIR / "mnist-raw", folder)
  target = folder / "t10k-images-idx3-ubyte.gz"
  body = bytearray(target.read_bytes())
  body[len(body) // 2: len(body) // 2 + 64] = bytes(range(64))  # the header stays intact
  target.write_bytes(bytes(body))
  monkeypatch.setenv("ADVSWEEP_DOWNLOAD", "0")
  if where == "cache":
    monkeypatch.setenv("ADVSWEEP_CACHE_DIR", str(cwd / where))
    monkeypatch.delenv("ADVSWEEP_DATA_DIR", raising=False)
    argv = ["attack", "mnist_softmax", "fgsm", "-n", "2"]
  else:
    argv = ["attack", "mnist_softmax", "fgsm", "-n", "2", "--data-dir", str(cwd / where)]
  fails(capsys, cwd, argv, str(target), "not a valid gzip file", "replace it")


USER_MODULE = """
import jax.numpy as jnp
from advsweep.models import custom, zoo

def _base():
  return zoo.load("mnist_softmax")

def nan_logits():
  m = _base()
  return custom.model("usernets:nan_logits", lambda p, x: m.apply_fn(p, x) * jnp.nan, m.params,
                      dataset="mnist")

def some_inf():
  m = _base()
  def apply(p, x):
    logits = m.apply_fn(p, x)
    return jnp.where(x.mean((1, 2, 3))[:, None] > 0.15, jnp.inf, logits)
  return custom.model("usernets:some_inf", apply, m.params, dataset="mnist")

def class_ids():
  m = _base()
  return custom.model("usernets:class_ids", lambda p, x: m.apply_fn(p, x).argmax(-1),
                      m.params, dataset="mnist")

def raises():
  return {}["weights"]
"""


@pytest.fixture
def user_module(cwd, monkeypatch):
  (cwd / "usernets.py").write_text(USER_MODULE)
  monkeypatch.syspath_prepend(str(cwd))
  yield cwd
  sys.modules.pop("usernets", None)
  sys.modules.pop("brokennets", None)


def _run_config(cwd: Path, model: str) -> str:
  path = cwd / f"{model.partition(':')[2] or 'cfg'}.toml"
  path.write_text(f'name = "u"\nmodels = ["{model}"]\n[images]\nper_bin = 2\npool = 64\n'
                  '[bins]\nnames = ["all"]\nthresholds = []\n[attacks.fgsm]\neps = 0.1\n')
  return str(path)


@requires_data
@pytest.mark.parametrize("model,phrases", [
    ("usernets:nan_logits", ["model usernets:nan_logits gives non-finite logits",
                             "on 64 of 64 images", "fix the model"]),
    ("usernets:some_inf", ["model usernets:some_inf gives non-finite logits", "of 64 images",
                           "(first: image"]),
    ("usernets:class_ids", ["model usernets:class_ids: logits [B, K]", "got int32 (1,)",
                            "not class ids"]),
    ("usernets:raises", ["raises() raised KeyError: 'weights'", "usernets.py:", "fix the "
                         "function"]),
])
def test_a_users_model_that_cannot_be_scored_is_refused(capsys, user_module, model, phrases):
  config_path = _run_config(user_module, model)
  fails(capsys, user_module, ["run", config_path, "--out", "runs/u", "--no-progress"],
        *phrases)


@pytest.mark.parametrize("body,kind", [("1 / 0", "ZeroDivisionError"),
                                       ("raise RuntimeError('no GPU here')", "RuntimeError"),
                                       ("def broken(:", "SyntaxError"),
                                       ("import tensorflow_not_there", "cannot import")])
def test_a_users_module_that_fails_on_import_is_one_line(capsys, user_module, body, kind):
  (user_module / "brokennets.py").write_text(f"{body}\n")
  config_path = _run_config(user_module, "brokennets:net")
  fails(capsys, user_module, ["run", config_path, "--out", "runs/u"], "brokennets", kind)


def test_an_entry_point_whose_module_is_missing_is_one_line(capsys, cwd, monkeypatch):
  from importlib.metadata import EntryPoint

  from advsweep.models import custom

  ghost = EntryPoint(name="ghost", value="no_such_pkg.nets:net", group="advsweep.models")
  monkeypatch.setattr(custom, "entry_points", lambda: {"ghost": ghost})
  fails(capsys, cwd, ["run", _run_config(cwd, "ghost"), "--out", "runs/g"], "model 'ghost'",
        "no_such_pkg.nets:net", "ModuleNotFoundError", "reinstall")


def test_eot_needs_at_least_one_sample():
  from advsweep.models import defenses

  defended = defenses.defend(zoo.load("mnist_softmax"), "randomize:90")
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="EOT samples must be an integer >= 1"):
      defended.eot_apply_fn(bad)
    with pytest.raises(ValueError, match="EOT samples must be an integer >= 1"):
      defended.attack_apply_fn(eot_samples=bad)
