"""The attack runner, config overrides and the perf benchmark's bookkeeping."""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest

from advsweep import attacks
from advsweep.bench import cli
from advsweep.bench.driver import run_attack
from advsweep.bench.perf import throughput
from tests.attack_models import random_images, small_cnn
from tests.conftest import requires_data


def test_overrides_parse_literals_and_refuse_unknown_fields():
  config = run_attack.make_config("bim", ["eps=0.1", "num_steps=3", "target=least_likely"])
  assert config == attacks.BIMConfig(eps=0.1, num_steps=3, target="least_likely")
  with pytest.raises(ValueError, match="valid fields: eps"):
    run_attack.make_config("bim", ["epsilon=0.1"])
  with pytest.raises(ValueError, match="valid choices: one_pixel"):
    run_attack.make_config("deepfool")
  with pytest.raises(ValueError, match="key=value"):
    run_attack.make_config("fgsm", ["eps"])


def test_overrides_are_toml_values_of_the_fields_type():
  """One grammar for every --set: TOML values, each checked against its field's type."""
  for raw, value in (("false", False), ("true", True)):
    assert run_attack.make_config("one_pixel", [f"stop_on_flip={raw}"]).stop_on_flip is value
  for attack, item, match in (
      ("one_pixel", "stop_on_flip=False", "stop_on_flip takes true or false"),
      ("one_pixel", "stop_on_flip=no", "stop_on_flip takes true or false"),
      ("bim", "eps=true", "eps takes a number"), ("bim", "eps=abc", "eps takes a number"),
      ("bim", "num_steps=2.5", "num_steps takes an integer or nothing"),
      ("bim", "num_steps=0", "num_steps must be an integer >= 1"),
      ("bim", "target=sideways", "unknown target mode 'sideways'")):
    with pytest.raises(ValueError, match=match):
      run_attack.make_config(attack, [item])
  assert run_attack.make_config("bim", ["eps=1"]).eps == 1.0  # an integer is a number


@pytest.mark.parametrize("config,units_per_image", [
    (attacks.FGSMConfig(), 1),
    (attacks.BIMConfig(num_steps=4), 4),
    (attacks.PGDConfig(num_steps=3), 3),
])
def test_perf_counts_the_gradient_passes(config, units_per_image):
  apply_fn, params = small_cnn()
  images = random_images(8, 8, 8, 3)
  name = type(config).__name__[:-len("Config")].lower()
  row = throughput.measure("tiny", apply_fn, params, name, images, np.arange(8) % 5, config)
  assert row["units_per_image"] == units_per_image
  assert row["raw_units_per_s"] > 0 and row["attack_units_per_s"] > 0
  # The model's own time: the attack's units and one re-check forward pass per image.
  bound = (row["units_per_image"] * 8 / row["raw_units_per_s"] + 8 / row["raw_check_per_s"])
  assert row["bound_s"] == pytest.approx(bound)
  assert row["efficiency"] == pytest.approx(bound / row["run_s"])
  assert row["memory_bytes"] >= images.size * 4  # at least the images go in


def test_attack_and_raw_passes_are_timed_in_turn():
  """Every attack call is followed by raw calls, so drift in the machine's speed hits both;
  the medians are those of the calls' own durations."""
  log = []

  def sleeper(name, seconds):
    def call():
      log.append(name)
      time.sleep(seconds)
      return name
    return call

  result, attack_s, unit_s, check_s = throughput.interleaved_seconds(
      sleeper("attack", 0.03), sleeper("unit", 0.01), sleeper("check", 0.004), min_seconds=0.2)
  assert result == "attack"
  assert attack_s == pytest.approx(0.03, abs=0.01) and unit_s == pytest.approx(0.01, abs=0.005)
  assert check_s == pytest.approx(0.004, abs=0.004)
  rounds = "".join(name[0] for name in log).split("a")[1:]
  assert len(rounds) >= 3 and all("u" in r and "c" in r for r in rounds)
  log.clear()  # a slow attack still gets the median of `min_rounds` runs
  throughput.interleaved_seconds(sleeper("attack", 0.03), sleeper("unit", 0.01),
                           sleeper("check", 0.004), min_seconds=0.0, min_rounds=3)
  assert log.count("attack") == 3


def test_one_pixel_unit_batch_is_what_the_model_sees():
  config = attacks.OnePixelConfig(population_size=400, num_slots=16, chunk_size=2048)
  assert attacks.ONE_PIXEL.unit_batch(config, 100) == 1600  # 6400 candidates in 4 chunks
  # From the config alone, so an image's rows do not depend on the batch it came in.
  assert attacks.ONE_PIXEL.unit_batch(config, 2) == 1600
  assert attacks.ONE_PIXEL.unit_batch(config.replace(population_size=50), 2) == 800
  # 50 slots of 50: 40 populations fit in 2048, so two even chunks of 25 populations.
  assert attacks.ONE_PIXEL.unit_batch(config.replace(population_size=50, num_slots=50), 2) == (
      1250)
  assert attacks.ONE_PIXEL.unit_batch(config.replace(chunk_size=300), 9) == 300
  jsma_config = attacks.JSMAConfig(num_slots=32)
  assert attacks.JSMA.unit_batch(jsma_config, 100) == 32  # its working rows
  assert attacks.JSMA.unit_batch(jsma_config, 8) == 8
  assert attacks.BIM.unit_batch(attacks.BIMConfig(), 32) == 32


def test_perf_rows_round_trip_through_parquet(tmp_path):
  rows = [{"model": "m", "attack": "fgsm", "efficiency": 0.9, "images": 3}]
  path = throughput.write_parquet(rows, tmp_path)
  table = pq.read_table(path)
  assert table.column("efficiency").to_pylist() == [0.9]
  assert table.column("device_count").to_pylist() == [jax.device_count()]
  assert "fgsm" in throughput.format_table([{**rows[0], "unit": "fwd+bwd", "unit_batch": 3,
                                       "raw_units_per_s": 1.0, "attack_units_per_s": 0.9,
                                       "images_per_s": 1.0, "units_per_image": 1.0,
                                       "success_rate": 1.0, "compile_s": 0.1, "run_s": 0.1,
                                       "memory_bytes": 0}])


@requires_data
def test_attack_command_on_the_shipped_softmax(capsys, data_dir):
  assert cli.main(["attack", "mnist_softmax", "fgsm", "-n", "50", "--set", "eps=0.25",
                   "--data-dir", str(data_dir)]) == 0
  out = capsys.readouterr().out
  assert "fgsm on mnist_softmax: 50 test images" in out
  rate = float(next(line for line in out.splitlines() if "success_rate" in line).split()[-1])
  assert rate > 0.9  # Goodfellow et al.: 99.9% error at eps 0.25 on the shallow softmax
  assert cli.main(["attack", "mnist_softmax", "fgsm", "--set", "epsilon=1"]) == 2
  assert "valid fields" in capsys.readouterr().err


@requires_data
def test_attack_summary_excludes_misclassified_images(data_dir):
  run = run_attack.run_attack("mnist_softmax", "fgsm", 40, overrides=["eps=0.0"],
                              data_dir=str(data_dir))
  summary = run.summary()
  assert summary["clean_correct"] == int(np.sum(run.clean_pred == run.labels))
  assert summary["success_rate"] == 0.0  # eps 0 changes nothing on correct images
  assert jnp.all(run.result.linf == 0)


def test_version_names_the_release_and_the_revision(capsys):
  with pytest.raises(SystemExit) as done:
    cli.main(["--version"])
  assert done.value.code == 0
  out = capsys.readouterr().out.strip()
  assert re.fullmatch(r"advsweep \d+\.\d+\.\d+ \(git ([0-9a-f]{40}(\+dirty)?|unknown)\)", out)
