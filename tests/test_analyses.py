"""The papers' analyses (`advsweep analyze`) on a small one-pixel run of cifar10_allconv:
each analysis's numbers against an independent computation or an invariant of the paper's
definition, and its files."""

from __future__ import annotations

import json

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.stats

from advsweep.bench import analyses, cli, stats
from advsweep.bench.analyses import (
  chromatic,
  class_pairs,
  locality,
  noise,
  probe,
  propagation,
)
from advsweep.bench.driver import config, perturbations, results, runs, sweep
from advsweep.models import zoo
from tests.conftest import requires_data

RAW = {
    "name": "pixels", "models": ["cifar10_allconv"], "seed": 0, "batch_size": 8,
    "images": {"per_bin": 8}, "bins": {"names": ["all"], "thresholds": []},
    "attacks": {"one_pixel": {"population_size": 40, "num_generations": 6}},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
  out = tmp_path_factory.mktemp("analyses") / "run"
  sweep.run(config.resolve(RAW), out, data_dir=str(data_dir), progress=False, estimate=False,
            log=lambda *_: None)
  return out


@pytest.fixture(scope="module")
def rows(run_dir):
  table, cols = runs.read_rows(run_dir, "one_pixel")
  assert 0 < (cols["success"] & cols["clean_correct"]).sum() < cols["clean_correct"].sum()
  return table, cols


def test_rank_test_effect_counts_pairs_and_p_follows_the_normal_approximation():
  rng = np.random.default_rng(0)
  a, b = rng.normal(0.3, 1, 40), np.round(rng.normal(0, 1, 30), 1)  # ties in b
  effect, p = stats.rank_test(a, b)
  pairs = (a[:, None] > b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean()
  assert effect == pytest.approx(pairs)
  # No ties across the samples here: z = (U - n1 n2 / 2) / sqrt(n1 n2 (n + 1) / 12) up to
  # the within-b ties' small correction.
  u = pairs * 40 * 30
  z = (u - 600) / np.sqrt(40 * 30 * 71 / 12)
  assert p == pytest.approx(float(scipy.stats.norm.sf(abs(z)) * 2), rel=0.02)
  assert stats.rank_test(np.ones(3), np.ones(4)) == (0.5, 1.0)


def test_ring_is_the_chebyshev_ring_clipped_to_the_image():
  assert len(locality.ring(10, 10, 1, 32, 32)) == 8
  assert len(locality.ring(10, 10, 3, 32, 32)) == 24
  corner = locality.ring(0, 0, 2, 32, 32)
  assert len(corner) == 5 and np.all(np.maximum(*np.abs(corner).T) == 2)


@requires_data
def test_probe_equals_the_full_forward_pass(rows, data_dir):
  _, cols = rows
  model = zoo.load("cifar10_allconv")
  images = runs.clean_images(cols, np.arange(3), str(data_dir))
  tester = probe.PixelProbe(model, images, chunk=64)
  assert tester.evaluation == "pixel_local"
  rng = np.random.default_rng(1)
  ids, rr, cc = rng.integers(0, 3, 50), rng.integers(0, 32, 50), rng.integers(0, 32, 50)
  rr[:2], cc[:2] = (0, 31), (31, 0)  # corners
  colours = rng.random((50, 3), dtype=np.float32)
  changed = images[ids].copy()
  changed[np.arange(50), rr, cc] = colours
  full = np.asarray(model.apply_fn(model.params, changed))
  np.testing.assert_allclose(tester.probs(ids, rr, cc, colours),
                             np.exp(full) / np.exp(full).sum(-1, keepdims=True), atol=2e-5)


@requires_data
def test_class_pairs_rows_sum_to_the_sources_successes(run_dir, rows):
  _, cols = rows
  (m,) = class_pairs.matrices(cols)
  assert m["mode"] == "reached"
  keep = cols["clean_correct"]
  for s in range(10):
    at = keep & (cols["label"] == s)
    assert m["hits"][s].sum() == (at & cols["success"]).sum()
    assert np.all(m["attempts"][s][np.arange(10) != s] == at.sum())
    for t in range(10):
      assert m["hits"][s, t] == (at & cols["success"] & (cols["adv_pred"] == t)).sum()


@requires_data
def test_chromatic_pixels_are_the_rows_changes(run_dir, rows, data_dir):
  table, cols = rows
  px = chromatic.pixel_changes(table, cols)
  clean = runs.clean_images(cols, px["row"], str(data_dir))
  for n, (i, y, x) in enumerate(zip(px["row"], px["y"], px["x"], strict=True)):
    adv = perturbations.apply_changes(clean[n], table["changed_index"][int(i)].as_py(),
                                      table["changed_to"][int(i)].as_py())
    np.testing.assert_array_equal(px["delta"][n], adv[y, x] - clean[n][y, x])
    assert np.count_nonzero(adv != clean[n]) == np.count_nonzero(px["delta"][n])
  assert len(px["row"]) == (cols["l0"][cols["clean_correct"]] == 1).sum()


@requires_data
def test_propagation_stays_inside_the_receptive_field(rows, data_dir):
  table, cols = rows
  i = int(np.flatnonzero(cols["success"] & cols["clean_correct"])[0])
  model = zoo.load("cifar10_allconv")
  clean = runs.clean_images(cols, np.asarray([i]), str(data_dir))
  adv = perturbations.apply_changes(clean[0], table["changed_index"][i].as_py(),
                                    table["changed_to"][i].as_py())[None]
  maps = propagation.layer_maps(model, clean, adv)
  assert [name for name, _, _ in maps[:3]] == ["input", "conv1_act", "conv2_act"]
  (y, x), = perturbations.changed_pixels(table["changed_index"][i].as_py(), (32, 32, 3))
  for depth in (0, 1, 2):  # two 3x3 stride-1 convolutions: the change reaches 1 and 2 pixels
    changed = np.argwhere(maps[depth][1][0] > 0)
    assert len(changed) and np.abs(changed - [y, x]).max() <= depth


@requires_data
@pytest.mark.parametrize("kind", list(analyses.ANALYSES))
def test_each_analysis_writes_its_table_figures_and_headline(run_dir, rows, kind, capsys,
                                                             data_dir):
  assert cli.main(["analyze", kind, str(run_dir), "--quick", "--data-dir", str(data_dir)]) == 0
  printed = capsys.readouterr().out
  assert printed.startswith(f"{kind}:") and "cifar10_allconv" in printed
  folder = run_dir / results.ANALYSIS_DIR
  assert pq.read_table(folder / f"{kind}.parquet").num_rows > 0
  assert (folder / f"{kind}.md").read_text().startswith(f"# {kind}")
  pngs = list(folder.glob(f"{kind}*.png"))
  assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
  assert results.read_run(run_dir).num_rows == 8  # the analyses' parquet is not a part


@requires_data
def test_chromatic_names_unequal_budgets_and_propagation_a_small_sample(run_dir, rows,
                                                                         tmp_path, data_dir):
  _, cols = rows
  won = cols["success"] & cols["clean_correct"]
  assert set(cols["queries"][won]) != set(cols["queries"][~cols["success"]])  # early stops
  assert "Unequal search budgets (cifar10_allconv)" in chromatic.analyze(
      run_dir, data_dir=str(data_dir)).text()
  note = propagation.analyze(run_dir, data_dir=str(data_dir)).text()
  assert f"Fewer than {propagation.IMAGES} successful images" in note
  equal = json.loads(json.dumps(RAW))
  equal["attacks"]["one_pixel"].update(stop_on_flip=False, stop_true_prob=0.0)
  out = tmp_path / "equal"
  sweep.run(config.resolve(equal), out, data_dir=str(data_dir), progress=False,
            estimate=False, log=lambda *_: None)
  _, cols = runs.read_rows(out, "one_pixel")
  assert len(set(cols["queries"])) == 1 and cols["success"].any()
  assert "Unequal" not in chromatic.analyze(out, data_dir=str(data_dir)).text()


@requires_data
def test_a_run_without_the_attack_is_refused(run_dir):
  with pytest.raises(results.ResultsError, match="no jsma rows"):
    analyses.run("locality", run_dir, attack="jsma")
  with pytest.raises(ValueError, match="unknown analysis"):
    analyses.run("nope", run_dir)


def test_the_default_run_config_resolves_full_and_quick():
  full = config.load(analyses.DEFAULT_CONFIG)
  quick = config.load(analyses.DEFAULT_CONFIG, quick=True)
  assert "cifar10_resnet20" in full.models and quick.models == ["cifar10_allconv"]
  # The noise analysis pairs the domain-adapted model with its twin on the same images.
  assert {"cifar10_resnet20_da", "cifar10_resnet20"} <= set(full.models)
  assert {c.attack for c in full.cells()} == {"one_pixel"}
  assert all(c.config.num_pixels == 1 for c in full.cells())


def test_class_pairs_of_a_targeted_sweep_are_success_rates_per_target():
  n = 6
  cols = {"clean_correct": np.array([True] * 5 + [False]), "model": np.array(["m"] * n),
          "config_hash": np.array(["h"] * n), "dataset": np.array(["mnist"] * n),
          "config_json": np.array(['{"target": "explicit"}'] * n),
          "params": np.array(["{}"] * n), "label": np.array([0, 0, 0, 1, 1, 1]),
          "target": np.array([1, 1, 2, 0, 2, 0]), "adv_pred": np.array([1, 3, 2, 0, 1, 0]),
          "success": np.array([True, False, True, True, False, True])}
  (m,) = class_pairs.matrices(cols)
  assert m["mode"] == "targeted"
  assert (m["hits"][0, 1], m["attempts"][0, 1]) == (1, 2)
  assert (m["hits"][0, 2], m["attempts"][0, 2]) == (1, 1)
  assert (m["hits"][1, 0], m["attempts"][1, 0]) == (1, 1)  # the misclassified row left out
  assert (m["hits"][1, 2], m["attempts"][1, 2]) == (0, 1)
  assert m["attempts"].sum() == 5


def test_class_pairs_of_a_sweep_over_target_classes_is_one_matrix():
  # `target_class = [1, 2]` makes two cells with their own hashes: still one matrix.
  base = {"attack": "one_pixel", "target": "explicit", "num_pixels": 1}
  cfg = [json.dumps({**base, "target_class": t}, sort_keys=True) for t in (1, 1, 2, 2)]
  cols = {"clean_correct": np.array([True] * 4), "model": np.array(["m"] * 4),
          "config_hash": np.array(["h1", "h1", "h2", "h2"]),
          "dataset": np.array(["mnist"] * 4), "config_json": np.array(cfg),
          "params": np.array([json.dumps({"target": "explicit", "target_class": t})
                              for t in (1, 1, 2, 2)]),
          "label": np.array([0, 3, 0, 3]), "target": np.array([1, 1, 2, 2]),
          "adv_pred": np.array([1, 3, 0, 2]), "success": np.array([True, False, False, True])}
  (m,) = class_pairs.matrices(cols)
  assert m["config_hash"] == "h1+h2" and "target_class" not in m["params"]
  assert (m["hits"][0, 1], m["attempts"][0, 1], m["hits"][3, 2], m["attempts"][3, 2]) == (
      1, 1, 1, 1)
  assert (m["hits"][0, 2], m["hits"][3, 1], m["attempts"].sum()) == (0, 0, 4)


@requires_data
def test_noise_accuracy_draws_depend_on_the_key_alone(data_dir):
  images, labels = noise.noise_sample("cifar10", "test", str(data_dir), 64, seed=0)
  again, _ = noise.noise_sample("cifar10", "test", str(data_dir), 64, seed=0)
  np.testing.assert_array_equal(images, again)
  model = zoo.load("cifar10_allconv")
  key = jax.random.key(0)
  clean, noisy = noise.accuracy_under_noise(model, images, labels, (1e6, 3.0), key)
  _, repeat = noise.accuracy_under_noise(model, images, labels, (1e6, 3.0), key)
  for e in noisy:  # another model compared on these draws sees the same noisy images
    np.testing.assert_array_equal(noisy[e], repeat[e])
  assert (noisy[1e6] == clean).mean() >= 0.95  # noise far below a grey level
  assert noisy[3.0].mean() < clean.mean() - 0.2
