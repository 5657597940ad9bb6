"""The sweep driver end to end on mnist_lenet: rows, resume, shards, two devices, reports,
regression comparison and paper tables."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from advsweep.bench import cli
from advsweep.bench.driver import config, results, sweep
from advsweep.bench.reports import compare, report, reproduce, tables
from tests.conftest import requires_data

pytestmark = requires_data

RAW = {
    "name": "tiny", "models": ["mnist_lenet"], "seed": 3, "batch_size": 5,
    "images": {"per_bin": 4}, "bins": {"thresholds": [0.99, 0.9]},
    "attacks": {
        "fgsm": {"eps": 0.1, "target": ["least_likely", "untargeted"],
                 "away_from": "prediction"},
        "bim": {"eps": 0.1, "num_steps": 3, "target": ["least_likely", "untargeted"],
                "away_from": "prediction"},
        "jsma": {"gamma": 0.02},
        "one_pixel": {"population_size": 8, "num_generations": 2},
    },
}
CONFIG = config.resolve(RAW)
FLOATS = ("clean_conf", "adv_conf", "l0_fraction", "l2", "linf", "grad_zero_share",
          "nd_score_clean", "nd_score_adv")


def run(out: Path, data_dir: Path, **kwargs) -> sweep.SweepOutcome:
  return sweep.run(CONFIG, out, data_dir=str(data_dir), progress=False, estimate=False,
                   log=lambda *_: None, **kwargs)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, data_dir) -> Path:
  out = tmp_path_factory.mktemp("plain") / "run"
  outcome = run(out, data_dir)
  assert outcome.units_run == outcome.units_total == 6 * 3  # 12 images in batches of 5
  return out


def assert_same_rows(a: pa.Table, b: pa.Table, float_rtol: float = 0.0) -> None:
  a, b = results.content(a), results.content(b)
  assert a.num_rows == b.num_rows
  for name in a.column_names:
    if pa.types.is_list(a.schema.field(name).type):  # the sparse attacks' changes
      x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
      assert [v is None for v in x] == [v is None for v in y], name
      for u, v in zip(x, y, strict=True):
        if u is not None:
          np.testing.assert_allclose(u, v, rtol=float_rtol, err_msg=name)
      continue
    x, y = a.column(name).to_numpy(zero_copy_only=False), b.column(name).to_numpy(
        zero_copy_only=False)
    if name in FLOATS and float_rtol:
      np.testing.assert_allclose(x, y, rtol=float_rtol, atol=1e-6, err_msg=name)
    else:  # a null float (a check that does not apply) reads as NaN on both sides
      assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name


def test_rows_hold_the_schema_and_one_row_per_image_and_config(plain):
  table = results.read_run(plain)
  known = len(results.SCHEMA)  # the results columns, then the run's typed sweep axes
  assert pa.schema(list(table.schema)[:known]).equals(results.SCHEMA)
  assert table.schema.names[known:] == sorted(table.schema.names[known:])
  assert table.num_rows == 12 * 6
  cols = report.columns(table)
  assert set(cols["conf_bin"]) == {"high", "medium", "low"}
  assert np.all(cols["valid"])
  for name in ("l0", "queries"):
    assert np.all(cols[name] >= 0)
  untargeted = cols["target"] < 0
  assert np.array_equal(cols["success"][untargeted],
                        cols["adv_pred"][untargeted] != cols["label"][untargeted])
  targeted = ~untargeted
  assert np.array_equal(cols["success"][targeted],
                        cols["adv_pred"][targeted] == cols["target"][targeted])
  one_pixel = cols["attack"] == "one_pixel"
  assert np.all(cols["l0"][one_pixel] <= 1)
  assert np.all(cols["linf"][cols["attack"] == "fgsm"] <= 0.1 + 1e-6)
  meta = json.loads((plain / "run.json").read_text())
  assert meta["config_hash"] == CONFIG.config_hash
  assert json.loads(cols["config_json"][0])["attack"] == cols["attack"][0]


def test_a_killed_run_resumes_to_the_same_rows(tmp_path, plain, data_dir):
  out = tmp_path / "run"
  first = run(out, data_dir, stop_after_units=7)
  assert first.units_run == 7
  # A unit in flight when the process died leaves at most a hidden temporary file.
  (out / "parts" / ".unit.parquet.tmp").write_bytes(b"partial")
  assert not sweep.finished(out)  # run.json counts the sweep's units: a reader sees 7 of 18
  second = run(out, data_dir)
  assert (second.units_skipped, second.units_run) == (7, 11)
  assert sweep.finished(out)
  assert run(out, data_dir).units_run == 0
  assert_same_rows(results.read_run(out), results.read_run(plain))
  with pytest.raises(results.ResultsError, match="--no-resume"):
    run(out, data_dir, resume=False)


def test_shards_together_equal_the_plain_run(tmp_path, plain, data_dir):
  out = tmp_path / "run"
  a = run(out, data_dir, shard=(0, 2))
  b = run(out, data_dir, shard=(1, 2))
  assert a.units_run + b.units_run == a.units_total and a.units_run == 9
  assert_same_rows(results.read_run(out), results.read_run(plain))
  assert sweep.parse_shard("1/4") == (1, 4)
  for bad in ("4/4", "1", "a/b", "-1/2"):
    with pytest.raises(ValueError, match="K/N"):
      sweep.parse_shard(bad)


def test_a_slurm_array_task_takes_its_shard_from_the_environment():
  def shard(**env):
    return sweep.slurm_shard({f"SLURM_ARRAY_TASK_{k}": str(v) for k, v in env.items()})

  assert shard() is None and shard(ID=3) is None
  assert shard(ID=3, COUNT=8) == (3, 8)
  assert shard(ID=1, COUNT=8, MIN=1) == (0, 8)  # --array=1-8
  assert shard(ID=6, COUNT=8, MIN=0, STEP=2) == (3, 8)  # --array=0-14:2
  for bad in ({"ID": 8, "COUNT": 8}, {"ID": 3, "COUNT": 8, "STEP": 2},
              {"ID": "x", "COUNT": 2}, {"ID": 0, "COUNT": 0}):
    with pytest.raises(ValueError, match="--shard K/N"):
      shard(**bad)


def test_advsweep_run_in_a_job_array_runs_its_shard(tmp_path, data_dir, monkeypatch, capsys):
  from advsweep.bench import cli

  config_file = tmp_path / "tiny.toml"
  config_file.write_text('name = "tiny"\nmodels = ["mnist_softmax"]\nbatch_size = 2\n'
                         '[images]\nper_bin = 2\npool = 40\n[bins]\nnames = ["all"]\n'
                         'thresholds = []\n[attacks.fgsm]\neps = [0.1, 0.2, 0.3]\n')
  monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
  monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
  monkeypatch.setenv("ADVSWEEP_DATA_DIR", str(data_dir))
  assert cli.main(["run", str(config_file), "--out", str(tmp_path / "a"), "--no-progress",
                   "--no-report"]) == 0
  assert "shard 1/3 from SLURM_ARRAY_TASK_ID=1" in capsys.readouterr().out
  explicit = sweep.run(config.load(str(config_file)), tmp_path / "b", shard=(1, 3),
                       data_dir=str(data_dir), progress=False, estimate=False,
                       log=lambda *_: None)
  made = sorted(p.name for p in (tmp_path / "a" / "parts").glob("*.parquet"))
  assert made == sorted(p.name for p in (tmp_path / "b" / "parts").glob("*.parquet"))
  assert len(made) == explicit.units_run == 1


def test_another_config_never_overwrites_a_run(plain, data_dir):
  other = config.resolve(RAW, ["seed=4"])
  with pytest.raises(results.ResultsError, match="another config"):
    sweep.run(other, plain, data_dir=str(data_dir), progress=False, estimate=False,
              log=lambda *_: None)


def test_two_devices_give_the_rows_of_one(tmp_path, plain, data_dir):
  """The batch is sharded over 2 CPU devices; decisions are identical and floats agree to
  rounding (XLA may order a reduction differently per shard)."""
  config_file = tmp_path / "tiny.toml"
  config_file.write_text(_toml(RAW))
  flags = os.environ.get("XLA_FLAGS", "")  # the suite's own (tests/conftest.py), and 2 devices
  env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2",
             ADVSWEEP_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu")
  out = tmp_path / "two"
  proc = subprocess.run(
      [sys.executable, "-m", "advsweep.bench.cli", "run", str(config_file), "--out", str(out),
       "--no-progress", "--no-report"],
      env=env, capture_output=True, text=True, timeout=600,
      cwd=Path(__file__).resolve().parents[1])
  assert proc.returncode == 0, proc.stderr
  assert "on 2 cpu device(s)" in proc.stdout
  two = results.read_run(out)
  assert set(two.column("device_count").to_pylist()) == {2}
  assert_same_rows(two, results.read_run(plain), float_rtol=1e-5)


def _toml(raw: dict) -> str:
  lines = []
  tables = {}
  for key, value in raw.items():
    if isinstance(value, dict):
      tables[key] = value
    else:
      lines.append(f"{key} = {json.dumps(value)}")
  for key, value in tables.items():
    if key == "attacks":
      for name, params in value.items():
        lines.append(f"[attacks.{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in params.items()]
    else:
      lines.append(f"[{key}]")
      lines += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
  return "\n".join(lines) + "\n"


def test_a_corrupt_part_is_refused(tmp_path, plain):
  copy = tmp_path / "copy"
  shutil.copytree(plain, copy)
  part = sorted((copy / "parts").glob("*.parquet"))[0]
  part.write_bytes(part.read_bytes()[:-40])
  with pytest.raises(results.ResultsError, match=f"{part.name} is corrupt"):
    results.read_run(copy)


def test_report_writes_tables_plots_and_possas_layout(tmp_path, plain):
  lines = []
  cells = report.report(plain, tmp_path, log=lines.append)
  text = "\n".join(lines)
  assert "Possas layout: least-likely method, mnist_lenet, eps 0.1" in text
  assert "Possas layout: inverse method" in text
  assert (tmp_path / "summary.md").read_text().startswith("# advsweep report")
  csv = (tmp_path / "summary.csv").read_text().splitlines()
  assert len(csv) == 1 + len(cells) == 1 + 6 * 4  # 3 bins and "all" per config
  table = results.read_run(plain)
  cols = report.columns(table)
  for c in cells:
    mask = (cols["config_hash"] == c.config_hash) & cols["clean_correct"]
    if c.conf_bin != report.ALL_BINS:
      mask &= cols["conf_bin"] == c.conf_bin
    assert c.n == mask.sum() and c.successes == (mask & cols["success"]).sum()
  possas = report.possas_tables(cells)
  assert len(possas) == 2
  for layout in possas.values():
    assert list(layout) == ["high", "medium", "low"]


def test_compare_passes_a_run_against_itself_and_catches_moves(tmp_path, plain, capsys):
  assert compare.compare(plain, plain) == 0
  table = results.read_run(plain)
  cols = report.columns(table)
  flip = (cols["attack"] == "bim") & cols["clean_correct"]
  worse = table.set_column(table.schema.get_field_index("success"), "success",
                           pa.array(np.where(flip, ~cols["success"], cols["success"])))
  results.write_part(tmp_path / "flipped" / "all.parquet", worse.to_pydict())
  assert compare.compare(plain, tmp_path / "flipped") == 1
  assert "SUCCESS RATE" in capsys.readouterr().out
  slow = table.set_column(table.schema.get_field_index("wall_s"), "wall_s",
                          pa.array(cols["wall_s"] * 10))
  results.write_part(tmp_path / "slow" / "all.parquet", slow.to_pydict())
  assert compare.compare(plain, tmp_path / "slow", time_factor=3, time_floor=0) == 1
  assert compare.compare(plain, tmp_path / "slow", time_factor=20, time_floor=0) == 0
  assert compare.compare(plain, tmp_path / "slow", time_factor=3, time_floor=1e6) == 0
  partial = table.filter(pa.array(cols["attack"] != "jsma"))
  results.write_part(tmp_path / "partial" / "all.parquet", partial.to_pydict())
  assert compare.compare(plain, tmp_path / "partial") == 1
  assert "MISSING" in capsys.readouterr().out


def test_paper_figures_are_computed_from_the_matching_rows(plain):
  table = results.read_run(plain)
  figures = [{"what": "w", "attack": "fgsm", "params": {"target": "least_likely"},
              "metric": "success_rate", "value": 0.5}]
  [row] = reproduce.figure_rows(table, figures)
  cols = report.columns(table)
  mask = ((cols["attack"] == "fgsm") & cols["clean_correct"]
          & np.array(['"least_likely"' in p for p in cols["params"]]))
  assert row[3] == f"{100 * cols['success'][mask].mean():.2f}%"
  assert row[4] == str(mask.sum()) and row[2] == "50.00%"
  _, n, (lo, hi) = reproduce.metric(cols, mask, "mean_adv_conf")
  assert n == (mask & cols["success"]).sum() and (n < 2 or lo <= hi)


def test_published_figures_name_real_settings():
  data = reproduce.published()
  assert set(data) == {"su2019", "papernot2016", "goodfellow2015", "possas", "athalye2018",
                       "madry2018", "kannan2018", "xiao2018", "wong2020", "xie2019",
                       "hess2020"}
  for paper, entry in data.items():
    for name in entry["configs"]:
      cfg = config.load(name, quick=True)
      for fig in entry.get("figures", []):
        if fig.get("config", name) != name:  # printed under another of the paper's configs
          continue
        assert fig["metric"] in (reproduce.RATE_METRICS + reproduce.ALL_IMAGE_METRICS
                                 + reproduce.MEAN_METRICS)
        if fig["attack"] == reproduce.STANDARD:  # the standard evaluation of a run's model
          assert fig["metric"] == "robust_accuracy" and fig["model"] in cfg.models
          continue
        assert any(c.attack == fig["attack"] and fig.get("model", c.model) == c.model
                   and reproduce._matches({**config.ADAPTIVE_KEYS, **c.params},
                                          fig.get("params", {}))
                   for c in cfg.cells()), (paper, fig["what"])


def test_a_standard_figure_reads_the_kept_evaluation_of_the_runs_weights(tmp_path):
  """A paper's `attack = "standard"` figure takes the kept standard evaluation's robust
  accuracy and interval, only where it measured the weights the run attacked."""
  import pyarrow.parquet as pq

  rows = pa.table({"model": ["m", "m"], "model_sha256": ["aaa", "aaa"],
                   "params": ["{}", "{}"]})
  fig = {"what": "AA", "model": "m", "attack": reproduce.STANDARD,
         "metric": "robust_accuracy", "value": 0.884, "source": "src"}
  assert reproduce.figure_rows(rows, [fig], tmp_path)[0][3].startswith("not run: advsweep "
                                                                       "robustness --standard")
  kept = tmp_path / "standard-linf"
  kept.mkdir()
  pq.write_table(pa.table({"robust": [True]}), kept / "m.parquet")
  summary = {"model": "m", "model_sha256": "aaa", "robust_accuracy": 0.875,
             "robust_interval": [0.853, 0.894], "num_images": 1000}
  (kept / "m.json").write_text(json.dumps(summary))
  assert reproduce.figure_rows(rows, [fig], tmp_path) == [
      ["AA", "m", "88.40%", "87.50%", "1000", "85.3%-89.4%", "src"]]
  (kept / "m.json").write_text(json.dumps({**summary, "model_sha256": "bbb"}))
  assert reproduce.figure_rows(rows, [fig], tmp_path)[0][3].startswith("other weights")


def test_cli_refuses_bad_input_with_the_valid_choices(capsys):
  assert cli.main(["run", "--set", "models=['resnet50']"]) == 2
  assert "valid choices: mnist_lenet" in capsys.readouterr().err
  assert cli.main(["run", "--attacks", "deepfool"]) == 2
  assert "valid choices: one_pixel" in capsys.readouterr().err


def test_the_sweep_axes_are_typed_columns_a_dataframe_can_filter(tmp_path, data_dir):
  import pyarrow.parquet as pq

  raw = {"name": "typed", "models": ["mnist_softmax"], "batch_size": 4,
         "images": {"per_bin": 2, "pool": 40},
         "attacks": {"bim": {"eps": [0.1, 0.2], "num_steps": 2,
                             "target": ["untargeted", "least_likely"]},
                     "fgsm": {"eps": 0.3}}}
  out = tmp_path / "run"
  sweep.run(config.resolve(raw), out, data_dir=str(data_dir), progress=False,
            estimate=False, log=lambda *_: None)
  table = pq.read_table(out / "parts", filters=[("eps", "==", 0.1)])
  assert table.schema.field("eps").type == pa.float64()
  assert table.schema.field("num_steps").type == pa.int64()
  assert table.schema.field("target_param").type == pa.string()  # `target` is the class
  assert table.num_rows == 4 and set(table.column("target_param").to_pylist()) == {
      "untargeted", "least_likely"}
  rows = results.read_run(out).to_pydict()
  for params, eps, steps in zip(rows["params"], rows["eps"], rows["num_steps"], strict=True):
    assert json.loads(params)["eps"] == eps
    assert json.loads(params).get("num_steps") == steps  # null where a cell does not set it


def test_report_and_compare_speak_json_for_ci(plain, capsys):
  from advsweep.bench import cli
  from advsweep.bench.reports import report

  assert cli.main(["report", str(plain), "--format", "json"]) == 0
  summary = json.loads(capsys.readouterr().out)
  cells = report.summaries(results.read_run(plain), ["high", "medium", "low"])
  assert summary["rows"] == 12 * 6 and len(summary["cells"]) == len(cells)
  first = summary["cells"][0]
  assert first["successes"] == cells[0].successes and first["n"] == cells[0].n
  assert first["interval"][0] <= first["success_rate"] <= first["interval"][1]
  assert not (plain / "report" / "summary.json").exists()  # stdout only
  assert cli.main(["compare", str(plain), str(plain), "--format", "json"]) == 0
  compared = json.loads(capsys.readouterr().out)
  assert compared["failed"] == 0 and compared["cells"] == len(cells)
  assert {d["status"] for d in compared["differences"]} == {"ok"}


def test_the_python_api_runs_and_reads_a_sweep(tmp_path, data_dir):
  from advsweep.bench import read, run

  raw = {"name": "api", "models": ["mnist_softmax"], "batch_size": 4,
         "images": {"per_bin": 4, "pool": 40}, "attacks": {"fgsm": {"eps": [0.1, 0.2]}}}
  rows = run(raw, out=tmp_path / "api", data_dir=str(data_dir), progress=False,
             log=lambda *_: None)
  assert rows.num_rows == 8 and sorted(set(rows.column("eps").to_pylist())) == [0.1, 0.2]
  again = run(raw, out=tmp_path / "api", data_dir=str(data_dir), progress=False,
              log=lambda *_: None)  # resumes: nothing new, the same rows
  assert_same_rows(again, rows)
  assert read(tmp_path / "api").num_rows == 8
  with pytest.raises(ValueError, match="as_ must be one of arrow, pandas, polars"):
    read(tmp_path / "api", as_="excel")


def test_read_gives_a_pandas_frame_where_pandas_is_installed(plain):
  from advsweep.bench import read

  pd = pytest.importorskip("pandas")
  frame = read(plain, as_="pandas")
  assert isinstance(frame, pd.DataFrame) and len(frame) == 12 * 6


def test_the_terminal_shows_a_compact_pivot_and_the_files_every_column(tmp_path, plain):
  lines = []
  cells = report.report(plain, tmp_path, plots=False, log=lines.append)
  text = lines[0]
  header = next(line for line in text.splitlines() if line.startswith("model"))
  assert header.split() == ["model", "attack", "params", "high", "medium", "low", "all", "s/img"]
  settings = {(c.model, c.attack, c.params) for c in cells}
  block = text.split("\n\n")[0].splitlines()  # the pivot, before the Possas layouts
  body = [line for line in block if line.startswith("mnist_lenet")]
  assert len(body) == len(settings) == 6  # one row per setting, not one per bin
  everything = next(c for c in cells if c.conf_bin == report.ALL_BINS)
  low, high = everything.interval
  assert f"({tables.pct(low)}-{tables.pct(high)}) n={everything.n}" in text
  assert "| top-1 err |" in (tmp_path / "summary.md").read_text()  # the full table
