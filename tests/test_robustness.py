"""The robustness table: accuracy over every image, the strongest configuration, the twin's
row first, the transfer column and the masking flags (on synthetic rows with known counts),
and a real run of `advsweep robustness` on two zoo models."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from advsweep.bench.driver import results
from advsweep.bench.reports import report, reproduce, robustness, tables
from advsweep.models import zoo
from tests.conftest import requires_data


def _rows(model, attack, params, n, robust, clean=None, transfer=None, linf=0.3):
  """n images; the first `robust` stay correct, the first `clean` (default n) are
  clean-correct; transfer: how many the twin's examples fool (None: not run); linf: the
  L-inf size of every change."""
  clean = n if clean is None else clean
  label = np.zeros(n, np.int64)
  adv_pred = np.where(np.arange(n) < robust, 0, 1)
  fooled = None if transfer is None else [bool(i < transfer) for i in range(n)]
  return {"model": [model] * n, "attack": [attack] * n, "params": [json.dumps(params)] * n,
          "config_hash": [f"{attack}{json.dumps(params)}"] * n, "example_idx": list(range(n)),
          "clean_correct": list(np.arange(n) < clean), "label": list(label),
          "adv_pred": list(adv_pred), "transfer_success": fooled or [None] * n,
          "linf": [float(linf)] * n}


def _table(*parts):
  cols = {k: sum((p[k] for p in parts), []) for k in parts[0]}
  return pa.table(cols)


def _cells(model, fgsm, pgd, transfer=None, clean=None):
  return [_rows(model, "fgsm", {"eps": 0.3}, 50, fgsm, clean),
          _rows(model, "pgd", {"eps": 0.3}, 50, pgd, clean, transfer)]


def test_table_counts_every_image_and_flags_masking():
  table = _table(
      # A defended model listed first: the table still puts its twin's row before it.
      *_cells("mnist_lenet_pgd", fgsm=45, pgd=30, transfer=40),  # transfer: 10 correct
      *_cells("mnist_lenet", fgsm=20, pgd=0, clean=48),
      _rows("mnist_lenet", "pgd", {"eps": 0.3, "restarts": 5}, 50, 0, 48),
      # Two JSMA configurations: the stronger one counts.
      _rows("mnist_lenet", "jsma", {"gamma": 0.1}, 50, 30, 48),
      _rows("mnist_lenet", "jsma", {"gamma": 0.2}, 50, 12, 48))
  rows, flags = robustness.robustness_rows(table)
  assert [r[0] for r in rows] == ["mnist_lenet", "mnist_lenet_pgd"]
  twin, defended = (dict(zip(robustness.HEADER, r, strict=True)) for r in rows)
  lo, hi = tables.wilson_interval(48, 50)
  assert twin["clean"] == f"96.0% ({tables.pct(lo)}-{tables.pct(hi)})"
  assert twin["JSMA"].startswith("24.0%") and twin["PGD from twin"] == "-"
  assert defended["twin"] == "mnist_lenet" and defended["defense"] == "adv_train:pgd"
  assert defended["PGD"].startswith("60.0%") and defended["FGSM"].startswith("90.0%")
  assert defended["PGD from twin"].startswith("20.0%")  # 40 of 50 fooled by the transfer
  assert any("PGD made on the twin (20.0%)" in f and "mnist_lenet_pgd" in f for f in flags)
  assert not any("catastrophic" in f for f in flags)  # FGSM 90% vs PGD 60%: a 30-point gap
  rows, flags = robustness.robustness_rows(_table(*_cells("mnist_lenet_pgd", 48, 5)))
  assert any("catastrophic overfitting" in f for f in flags)
  rows, flags = robustness.robustness_rows(_table(*_cells("mnist_lenet", 5, 40)))
  assert any("one FGSM step" in f for f in flags)  # FGSM beating PGD: PGD is too weak
  twins = robustness.twin_lines(_table(*_cells("mnist_lenet_pgd", 45, 30),
                                       *_cells("mnist_lenet", 20, 0)))
  assert twins == [next(t for t in twins if t.startswith("mnist_lenet_pgd vs mnist_lenet"))]
  # Paired on the same 50 images: 30 correct only under the defense, none only under the
  # twin; exact McNemar p = 2 / 2^30.
  assert "PGD 60.0% vs 0.0% (higher; +60.0 points" in twins[0]
  assert f"p = {2 / 2 ** 30:.2g}, n = 50)" in twins[0]
  assert "clean 100.0% vs 100.0% (no difference at 95%; +0.0 points" in twins[0]


def test_black_box_flags_masking_only_within_pgds_budget():
  """The one-pixel attack beating PGD flags masking where its changes lie within PGD's eps;
  a pixel moved by 1.0 is outside the 0.3 ball PGD searches: no flag, a line that says why."""
  def table(linf):
    return _table(*_cells("mnist_lenet_pgd", fgsm=45, pgd=45),
                  _rows("mnist_lenet_pgd", "one_pixel", {"num_pixels": 3}, 50, 20, linf=linf))

  _, flags = robustness.robustness_rows(table(0.25))
  assert any(f.startswith("FLAG mnist_lenet_pgd: the black-box 1-pixel k=3 (40.0%)")
             for f in flags)
  _, flags = robustness.robustness_rows(table(1.0))
  assert not any(f.startswith("FLAG") for f in flags)
  assert any(f.startswith("not flagged, mnist_lenet_pgd: 1-pixel k=3 (40.0%)")
             and "up to 1.00 in L-inf, outside PGD's 0.3" in f for f in flags)
  _, markdown = robustness.lines(table(1.0), "t")
  assert any(line.startswith("- no model flagged") for line in markdown)


def test_worst_case_is_robust_under_every_attack_on_the_shared_images():
  fgsm = (np.array([0, 1, 2, 3, 4]), np.array([True, True, True, False, True]))
  # PGD measured image 2 twice (two configurations: both must hold) and not image 4.
  pgd = (np.array([3, 2, 1, 0, 2, 5]), np.array([True, True, True, False, False, True]))
  images, robust = robustness.worst_case([fgsm, pgd])
  assert images.tolist() == [0, 1, 2, 3]  # 4 and 5: measured by one attack each, left out
  assert robust.tolist() == [False, True, False, False]
  # In the table: the defended model's rows keep images 0-29 under PGD, 0-44 under FGSM,
  # 40-49 under the twin's transfer; the twin's JSMA (L0, out of the L-inf worst case) the
  # first 12 of 50.
  table = _table(*_cells("mnist_lenet_pgd", fgsm=45, pgd=30, transfer=40),
                 *_cells("mnist_lenet", fgsm=20, pgd=15),
                 _rows("mnist_lenet", "jsma", {}, 50, 12),
                 # A smaller budget: the worst case is at the largest eps measured only.
                 _rows("mnist_lenet", "fgsm", {"eps": 0.1}, 50, 3))
  rows = {r[0]: dict(zip(robustness.HEADER, r, strict=True))
          for r in robustness.robustness_rows(table)[0]}
  assert rows["mnist_lenet"][robustness.WORST_CASE].startswith("30.0%")  # min(20, 15) / 50
  assert rows["mnist_lenet_pgd"][robustness.WORST_CASE].startswith("0.0%")  # 0-29 vs 40-49
  twins = robustness.twin_lines(table)
  assert "L-inf worst case 0.0% vs 30.0% (lower; -30.0 points" in twins[0]


def test_twins_on_the_images_both_classify_correctly():
  """Hess et al.'s susceptibility: the defended model is correct on the first 40 of 50 clean
  images and keeps the first 30 under PGD, the twin all 50 and the first 35; on the 40 both
  classify correctly that is 75% against 87.5% (5 images only the twin keeps)."""
  table = _table(*_cells("mnist_lenet_pgd", fgsm=45, pgd=30, clean=40),
                 *_cells("mnist_lenet", fgsm=20, pgd=35))
  header, rows = robustness.twin_rows(table)
  pgd = next(dict(zip(header, r, strict=True)) for r in rows if r[2] == "PGD")
  assert (pgd["n"], pgd["accuracy"], pgd["twin's"]) == ("50", "60.0%", "70.0%")
  header, rows = robustness.twin_rows(table, both_correct=True)
  assert "clean" not in [r[2] for r in rows]
  pgd = next(dict(zip(header, r, strict=True)) for r in rows if r[2] == "PGD")
  assert (pgd["n"], pgd["accuracy"], pgd["twin's"]) == ("40", "75.0%", "87.5%")
  assert pgd["p"] == f"{2 / 2 ** 5:.2g}"


def test_all_image_metrics_count_clean_errors():
  table = _table(_rows("mnist_lenet", "pgd", {"eps": 0.3}, 40, 20, clean=30))
  cols = {k: np.asarray(v) for k, v in table.to_pydict().items()}
  cols["success"] = cols["adv_pred"] != cols["label"]
  cols["adv_top5_correct"] = np.ones(40, bool)
  mask = np.ones(40, bool)
  assert reproduce.metric(cols, mask, "clean_accuracy")[:2] == (0.75, 40)
  assert reproduce.metric(cols, mask, "robust_accuracy")[:2] == (0.5, 40)
  assert reproduce.metric(cols, mask, "adv_error")[:2] == (0.5, 40)
  assert reproduce.metric(cols, mask, "accuracy")[:2] == (pytest.approx(20 / 30), 30)


@requires_data
def test_robustness_command_runs_on_a_defended_model_and_its_twin(data_dir, tmp_path):
  if "mnist_lenet_fgsm" not in zoo.available():
    pytest.skip("mnist_lenet_fgsm is not trained: advsweep train mnist_lenet_fgsm")
  markdown = robustness.run(
      quick=True, out_root=tmp_path, data_dir=str(data_dir), progress=False, log=lambda _: None,
      overrides=['models=["mnist_lenet", "mnist_lenet_fgsm"]', "images.per_bin=4",
                 "attacks.pgd.num_steps=3", "attacks.jsma.gamma=0.03",
                 "attacks.one_pixel.population_size=8", "attacks.one_pixel.num_generations=2"])
  table = results.read_run(tmp_path / "robustness-quick")
  rows, _ = robustness.robustness_rows(table)
  assert [r[0] for r in rows] == ["mnist_lenet", "mnist_lenet_fgsm"]
  assert all(r[3] == "4" for r in rows)
  transfer = robustness.HEADER.index("PGD from twin")
  assert rows[1][transfer] != "-" and rows[0][transfer] == "-"  # it ran on the defense only
  for row in rows:  # the worst case keeps no more images than any one L-inf attack
    shares = [float(row[robustness.HEADER.index(c)].split("%")[0])
              for c in (*robustness.LINF_COLUMNS, robustness.WORST_CASE)
              if row[robustness.HEADER.index(c)] != "-"]
    assert shares[-1] == min(shares)
  # The PGD column is the rows' count of images still correct.
  cols = report.columns(table)
  pgd = (cols["model"] == "mnist_lenet_fgsm") & (cols["attack"] == "pgd")
  kept = int((cols["clean_correct"][pgd] & (cols["adv_pred"][pgd] == cols["label"][pgd])).sum())
  assert rows[1][robustness.HEADER.index("PGD")].startswith(tables.pct(kept / 4))
  assert (tmp_path / "robustness-quick.md").read_text() == markdown
  assert "restarts=2" in markdown
