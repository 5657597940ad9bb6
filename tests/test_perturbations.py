"""The perturbation kept with a run: sparse attacks' changes in the rows, and adversarial
images saved per unit, each re-applied to the clean image to reproduce the row's prediction."""

from __future__ import annotations

import numpy as np
import pytest

from advsweep.bench.driver import config, perturbations, results, sweep
from advsweep.bench.reports import report
from advsweep.models import datasets, zoo
from tests.conftest import requires_data

RAW = {
    "name": "saved", "models": ["mnist_lenet"], "seed": 1, "batch_size": 3,
    "images": {"per_bin": 3}, "bins": {"names": ["all"], "thresholds": []},
    "save_images": True,
    "attacks": {
        "fgsm": {"eps": 0.2},
        "jsma": {"gamma": 0.03},
        "one_pixel": {"num_pixels": 2, "population_size": 8, "num_generations": 2},
    },
}


def _run(out, data_dir, raw=RAW):
  return sweep.run(config.resolve(raw), out, data_dir=str(data_dir), progress=False,
                   estimate=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, data_dir):
  out = tmp_path_factory.mktemp("saved") / "run"
  _run(out, data_dir)
  return out


def _predict(images: np.ndarray) -> np.ndarray:
  model = zoo.load("mnist_lenet")
  return np.asarray(model.apply_fn(model.params, images)).argmax(-1)


@requires_data
def test_sparse_rows_reapplied_to_the_clean_image_reproduce_the_prediction(saved, data_dir):
  cols = report.columns(results.read_run(saved))
  table = results.read_run(saved).to_pydict()
  clean_u8, _ = datasets.load("mnist", "test", data_dir)
  sparse = np.isin(cols["attack"], ["jsma", "one_pixel"])
  assert sparse.sum() == 6 and (~sparse).sum() == 3
  rebuilt, wanted = [], []
  for i in np.flatnonzero(sparse):
    clean = clean_u8[cols["example_idx"][i]].astype(np.float32) / 255.0
    index, old, new = (np.asarray(table[k][i]) for k in
                       ("changed_index", "changed_from", "changed_to"))
    assert len(index) == cols["l0"][i]  # MNIST: one feature per pixel
    np.testing.assert_array_equal(old, clean.reshape(-1)[index])  # the clean values
    assert np.all(old != new)
    rebuilt.append(perturbations.apply_changes(clean, index, new))
    wanted.append(cols["adv_pred"][i])
  np.testing.assert_array_equal(_predict(np.stack(rebuilt)), wanted)
  for i in np.flatnonzero(~sparse):  # FGSM changes every feature: nothing listed
    assert table["changed_index"][i] is None


@requires_data
def test_saved_images_match_the_rows_and_reproduce_the_prediction(saved, data_dir):
  table = results.read_run(saved).to_pydict()
  clean_u8, _ = datasets.load("mnist", "test", data_dir)
  files = sorted((saved / perturbations.IMAGES_DIR).glob("*.npz"))
  assert len(files) == len(list((saved / "parts").glob("*.parquet"))) == 3
  by_key = {(h, e): i for i, (h, e) in enumerate(
      zip(table["config_hash"], table["example_idx"], strict=True))}
  for path in files:
    saved_unit = perturbations.read_images(path)
    rows = [by_key[(saved_unit["config_hash"], e)] for e in saved_unit["example_idx"]]
    np.testing.assert_array_equal(_predict(saved_unit["adv_images"]),
                                  [table["adv_pred"][i] for i in rows])
    for image, i in zip(saved_unit["adv_images"], rows, strict=True):
      if table["changed_index"][i] is not None:  # the two forms agree bit for bit
        clean = clean_u8[table["example_idx"][i]].astype(np.float32) / 255.0
        np.testing.assert_array_equal(perturbations.apply_changes(
            clean, table["changed_index"][i], table["changed_to"][i]), image)


@requires_data
def test_turning_save_images_on_for_a_finished_run_writes_them_same_rows(tmp_path, data_dir):
  raw = {**RAW, "save_images": False, "attacks": {"fgsm": {"eps": 0.2}}}
  out = tmp_path / "run"
  _run(out, data_dir, raw)
  before = results.content(results.read_run(out))
  assert not (out / perturbations.IMAGES_DIR).exists()
  outcome = _run(out, data_dir, {**raw, "save_images": True})  # same hash: same folder
  assert outcome.units_run == 1
  assert len(list((out / perturbations.IMAGES_DIR).glob("*.npz"))) == 1
  assert results.content(results.read_run(out)).equals(before)


def test_a_corrupt_or_foreign_image_file_is_refused(tmp_path):
  path = tmp_path / "u.npz"
  path.write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="not a readable advsweep image file"):
    perturbations.read_images(path)
  np.savez(path, adv_images=np.zeros((1, 2, 2, 1)))
  with pytest.raises(ValueError, match="lacks example_idx"):
    perturbations.read_images(path)
  perturbations.write_images(path, example_idx=np.arange(2), adv_images=np.zeros((3, 2, 2, 1)),
                             config_hash="h", model="m")
  with pytest.raises(ValueError, match="corrupt"):
    perturbations.read_images(path)


def test_sparse_changes_round_trip_and_coordinates():
  rng = np.random.default_rng(0)
  clean = rng.random((2, 4, 5, 3), dtype=np.float32)
  adv = clean.copy()
  adv[0, 1, 2, :] = 0.5
  adv[1, 3, 4, 1] = 1.0
  index, old, new = perturbations.sparse_changes(clean, adv)
  assert [len(i) for i in index] == [3, 1]
  for k in range(2):
    np.testing.assert_array_equal(perturbations.apply_changes(clean[k], index[k], new[k]), adv[k])
  np.testing.assert_array_equal(perturbations.changed_pixels(index[0], (4, 5, 3)), [[1, 2]])
  np.testing.assert_array_equal(
      np.stack(perturbations.feature_coordinates(index[1], (4, 5, 3)), -1), [[3, 4, 1]])
  with pytest.raises(ValueError, match="another shape"):
    perturbations.apply_changes(clean[0], [60], [0.0])
