"""A user's own model and data through the driver: a plain-JAX model with 7 classes on
20x24x3 images from a local npz folder through every attack, `report` and `compare`; a Flax
NNX model; a model registered by a package's entry point; PNG folders as data."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from advsweep.bench import cli
from advsweep.bench.driver import config, results
from advsweep.models import custom, datasets, zoo
from tests import byo_models
from tests.conftest import DATA_DIR, requires_data

ATTACKS = """
[attacks.fgsm]
eps = 0.1
[attacks.bim]
eps = 0.05
num_steps = 2
[attacks.pgd]
eps = 0.05
num_steps = 2
[attacks.jsma]
gamma = 0.01
[attacks.one_pixel]
population_size = 8
num_generations = 2
"""


def _config(tmp_path: Path, model: str, attacks: str = ATTACKS, n: int = 12) -> Path:
  data = tmp_path / "data"
  data.mkdir(exist_ok=True)
  np.savez(data / "mine.npz", **byo_models.labelled_data(custom.resolve(model), n))
  path = tmp_path / "mine.toml"
  path.write_text(f'name = "mine"\nmodels = ["{model}"]\ndataset = "{data}"\n'
                  f"batch_size = 5\n[images]\nper_bin = {n}\n"
                  '[bins]\nnames = ["all"]\nthresholds = []\n' + attacks)
  return path


def test_a_seven_class_plain_jax_model_runs_every_attack_report_and_compare(tmp_path, capsys):
  path = _config(tmp_path, "tests.byo_models:seven_class")
  out = tmp_path / "run"
  assert cli.main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
  printed = capsys.readouterr().out
  assert "one_pixel" in printed
  table = results.read_run(out)
  cols = table.to_pydict()
  assert set(cols["attack"]) == {"fgsm", "bim", "pgd", "jsma", "one_pixel"}
  assert table.num_rows == 5 * 12 and set(cols["model"]) == {"tests.byo_models:seven_class"}
  # The one-pixel attack evaluates the user's convnet pixel-locally (derived from its jaxpr).
  assert {(a, e) for a, e in zip(cols["attack"], cols["evaluation"], strict=True)} == {
      ("fgsm", "full"), ("bim", "full"), ("pgd", "full"), ("jsma", "full"),
      ("one_pixel", "pixel_local")}
  assert all(cols["valid"])
  assert max(cols["label"]) < 7 and set(cols["dataset"]) == {str(tmp_path / "data")}
  assert all(cols["clean_correct"])  # the data is labelled by the model
  assert sum(cols["success"]) > 0
  assert cli.main(["report", str(out), "--no-plots"]) == 0
  assert "one_pixel" in capsys.readouterr().out
  again = tmp_path / "again"
  assert cli.main(["run", str(path), "--out", str(again), "--no-progress", "--no-report"]) == 0
  assert cli.main(["compare", str(out), str(again)]) == 0
  assert results.content(results.read_run(again)).equals(results.content(table))


def test_a_flax_nnx_model_runs(tmp_path):
  path = _config(tmp_path, "tests.byo_models:nnx_model", "[attacks.fgsm]\neps = 0.1\n", n=6)
  out = tmp_path / "run"
  assert cli.main(["run", str(path), "--out", str(out), "--no-progress", "--no-report"]) == 0
  assert results.read_run(out).num_rows == 6


def test_bad_model_references_are_one_line(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for reference, phrase in [("nope", "valid choices"),
                            ("no_such_package.models:net", "cannot import no_such_package"),
                            ("tests.byo_models:missing", "has no function 'missing'")]:
    assert cli.main(["run", "ci", "--set", f'models=["{reference}"]']) == 2
    assert phrase in capsys.readouterr().err
  assert not list(tmp_path.iterdir())


def test_a_user_model_without_a_dataset_is_told_to_name_one(tmp_path):
  cfg = config.resolve({"name": "x", "models": ["tests.byo_models:seven_class"],
                        "attacks": {"fgsm": {}}})
  from advsweep.bench.driver import sweep

  with pytest.raises(config.ConfigError, match="names no dataset"):
    sweep.load_models(cfg, None)


def test_an_entry_point_registers_a_model(tmp_path, monkeypatch, capsys):
  info = tmp_path / "my_models-1.0.dist-info"
  info.mkdir()
  (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-models\nVersion: 1.0\n")
  (info / "entry_points.txt").write_text(
      "[advsweep.models]\nseven = tests.byo_models:seven_class\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  assert "seven" in custom.entry_points()
  assert custom.resolve("seven").name == "seven_class"
  assert cli.main(["models"]) == 0
  assert "tests.byo_models:seven_class" in capsys.readouterr().out
  config.resolve({"name": "x", "models": ["seven"], "attacks": {"fgsm": {}}})


def test_png_folders_per_class_and_npz_files_load(tmp_path):
  from PIL import Image

  rng = np.random.default_rng(0)
  for split, n in (("train", 4), ("test", 3)):
    for label in ("cat", "dog"):
      folder = tmp_path / "pngs" / split / label
      folder.mkdir(parents=True)
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
  images, labels = datasets.load(str(tmp_path / "pngs"), "test")
  assert images.shape == (6, 5, 6, 3) and labels.tolist() == [0, 0, 0, 1, 1, 1]
  # A class only in train keeps its label in both splits; palette images are decoded.
  (tmp_path / "pngs" / "train" / "ant").mkdir()
  palette = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).convert("P")
  palette.save(tmp_path / "pngs" / "train" / "ant" / "0.png")
  images, labels = datasets.load(str(tmp_path / "pngs"), "test")
  assert labels.tolist() == [1, 1, 1, 2, 2, 2]  # ant, cat, dog
  train_images, train_labels = datasets.load(str(tmp_path / "pngs"), "train")
  assert train_labels.tolist()[0] == 0 and train_images.shape == (9, 5, 6, 3)
  np.savez(tmp_path / "grey.npz", x_test=np.zeros((4, 9, 9), np.uint8),
           y_test=np.array([0, 4, 2, 1]))
  images, labels = datasets.load(str(tmp_path / "grey.npz"), "test")
  assert images.shape == (4, 9, 9, 1) and labels.dtype == np.int32
  with pytest.raises(datasets.DatasetNotFoundError, match="no data file or folder"):
    datasets.load(str(tmp_path / "missing"), "test")
  np.savez(tmp_path / "bad.npz", x_test=np.zeros((4, 9, 9), np.float32), y_test=np.zeros(4))
  with pytest.raises(datasets.CorruptDataError, match="uint8"):
    datasets.load(str(tmp_path / "bad.npz"), "test")


@requires_data
def test_zoo_checkpoints_from_a_folder_of_ones_own(tmp_path, capsys, monkeypatch):
  import shutil

  from advsweep.models import zoo

  for folder in ("mine", "damaged"):
    (tmp_path / folder).mkdir()
    for suffix in (".msgpack", ".json"):
      shutil.copy(zoo.CHECKPOINT_DIR / f"mnist_softmax{suffix}", tmp_path / folder)
  weights = tmp_path / "damaged" / "mnist_softmax.msgpack"
  weights.write_bytes(weights.read_bytes()[:-10])
  monkeypatch.chdir(tmp_path)
  args = ["run", "ci", "--set", 'models=["mnist_softmax"]', "--set", "images.per_bin=2",
          "--attacks", "fgsm", "--no-progress", "--no-report", "--data-dir", str(DATA_DIR),
          "--checkpoint-dir"]
  assert cli.main([*args, "mine", "--out", "good"]) == 0
  assert cli.main([*args, "damaged", "--out", "bad"]) == 2
  assert "sha256" in capsys.readouterr().err
  assert not (tmp_path / "bad").exists()


# --- Every command takes every model (issue 34). -----------------------------------------

PLAIN_JAX_MODEL = '''
import jax
import jax.numpy as jnp
from advsweep.models import custom


def tiny():
  """A plain-JAX linear classifier of MNIST digits (no Flax), from a fixed key."""
  w = jax.random.normal(jax.random.key(0), (28 * 28, 10)) * 0.01

  def apply_fn(params, images):
    return images.reshape(images.shape[0], -1) @ params["w"]

  return custom.model("mypkg.nets:tiny", apply_fn, {"w": w}, dataset="mnist")
'''


@requires_data
def test_attack_takes_a_users_function_from_the_current_folder(tmp_path, monkeypatch, capsys,
                                                               data_dir):
  (tmp_path / "mypkg").mkdir()
  (tmp_path / "mypkg" / "__init__.py").write_text("")
  (tmp_path / "mypkg" / "nets.py").write_text(PLAIN_JAX_MODEL)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
  monkeypatch.delitem(sys.modules, "mypkg", raising=False)
  monkeypatch.delitem(sys.modules, "mypkg.nets", raising=False)
  assert cli.main(["attack", "mypkg.nets:tiny", "pgd", "-n", "8", "--data-dir",
                   str(data_dir)]) == 0
  out = capsys.readouterr().out
  assert "pgd on mypkg.nets:tiny: 8 test images" in out


@requires_data
def test_attack_takes_a_defended_model_and_a_checkpoint_file(tmp_path, capsys, data_dir):
  assert cli.main(["attack", "mnist_softmax+jpeg:75", "fgsm", "-n", "4", "--data-dir",
                   str(data_dir)]) == 0
  assert "fgsm on mnist_softmax+jpeg:75" in capsys.readouterr().out
  shipped = zoo.entry("mnist_softmax").checkpoint
  for suffix in (".msgpack", ".json"):
    (tmp_path / f"mnist_softmax{suffix}").write_bytes(
        shipped.with_suffix(suffix).read_bytes())
  assert cli.main(["attack", str(tmp_path / "mnist_softmax.msgpack"), "fgsm", "-n", "4",
                   "--data-dir", str(data_dir)]) == 0
  assert "4 test images" in capsys.readouterr().out
  assert cli.main(["attack", str(tmp_path / "nothing.msgpack"), "fgsm"]) == 2
  assert "no checkpoint file" in capsys.readouterr().err


@requires_data
def test_init_writes_a_config_that_runs(tmp_path, monkeypatch, capsys, data_dir):
  (tmp_path / "mypkg").mkdir()
  (tmp_path / "mypkg" / "__init__.py").write_text("")
  (tmp_path / "mypkg" / "nets.py").write_text(PLAIN_JAX_MODEL)
  monkeypatch.chdir(tmp_path)
  monkeypatch.delitem(sys.modules, "mypkg", raising=False)
  monkeypatch.delitem(sys.modules, "mypkg.nets", raising=False)
  assert cli.main(["init", "mypkg.nets:tiny", "--dataset", "mnist"]) == 0
  assert "advsweep run advsweep.toml" in capsys.readouterr().out
  text = (tmp_path / "advsweep.toml").read_text()
  assert 'models = ["mypkg.nets:tiny"]' in text and "eps = [0.15, 0.3]" in text
  assert cli.main(["init", "mypkg.nets:tiny"]) == 2  # no overwrite without --force
  assert "--force" in capsys.readouterr().err
  assert cli.main(["run", "advsweep.toml", "--set", "images.per_bin=4", "--attacks", "fgsm",
                   "--out", "runs/mine", "--no-progress", "--data-dir", str(data_dir)]) == 0
  rows = results.read_run(tmp_path / "runs" / "mine").to_pydict()
  assert set(rows["model"]) == {"mypkg.nets:tiny"} and set(rows["conf_bin"]) == {"all"}
  assert len(rows["model"]) == 8  # 4 images at each of two budgets


def _readme_blocks(language: str) -> list[str]:
  text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
  return re.findall(rf"```{language}\n(.*?)```", text, re.S)


@requires_data
def test_the_readmes_attack_your_own_model_example_as_written(tmp_path, monkeypatch, capsys,
                                                               data_dir):
  """The README's first example, word for word: the module, the three commands, the
  filter and `read`."""
  module = next(b for b in _readme_blocks("python") if b.startswith("# mypkg/nets.py"))
  commands = next(b for b in _readme_blocks("bash") if "advsweep attack mypkg" in b)
  reading = next(b for b in _readme_blocks("python") if "pq.read_table" in b)
  (tmp_path / "mypkg").mkdir()
  (tmp_path / "mypkg" / "__init__.py").write_text("")
  (tmp_path / "mypkg" / "nets.py").write_text(module)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("ADVSWEEP_DATA_DIR", str(data_dir))
  monkeypatch.delitem(sys.modules, "mypkg", raising=False)
  monkeypatch.delitem(sys.modules, "mypkg.nets", raising=False)
  for line in commands.strip().splitlines():
    argv = line.split("#")[0].split()
    assert argv[0] == "advsweep"
    assert cli.main(argv[1:] + (["--no-progress"] if argv[1] == "run" else [])) == 0, line
  capsys.readouterr()
  pd = None
  try:
    import pandas as pd  # noqa: F401
  except ImportError:
    reading = reading.replace('as_="pandas"', 'as_="arrow"')  # pandas is the user's choice
  scope: dict = {}
  exec(reading, scope)  # noqa: S102  (the README's own lines)
  assert scope["rows"].num_rows > 0 and set(scope["rows"].column("eps").to_pylist()) == {0.15}
  assert len(scope["frame"]) == results.read_run(tmp_path / "results" / "mine").num_rows


@requires_data
def test_the_readmes_evaluate_a_defense_example_as_written(data_dir):
  """The README's `evaluate` lines, run on a zoo model's first test images."""
  block = next(b for b in _readme_blocks("python") if "from advsweep.bench import evaluate" in b)
  model = zoo.load("mnist_softmax")
  images, labels = datasets.load("mnist", "test", str(data_dir))
  scope = {"apply_fn": model.apply_fn, "params": model.params,
           "images": images[:8].astype(np.float32) / 255.0, "labels": labels[:8]}
  exec(block, scope)  # noqa: S102  (the README's own lines)
  assert scope["result"].n == 8
  assert scope["result"].headline().startswith("robust accuracy")
