"""Input-transformation defenses as models, and BPDA: a JPEG-defended LeNet holds against
PGD that differentiates through the JPEG (its gradient is zero) and falls to PGD with the
identity's backward pass (Athalye et al. 2018)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advsweep import attacks
from advsweep.bench.checks import masking
from advsweep.models import datasets, defenses, zoo
from tests.conftest import DATA_DIR, requires_data


def test_defense_names_are_parsed_or_refused():
  assert defenses.parse("jpeg:75") == defenses.Defense("jpeg", 75)
  assert defenses.parse("bits:4").name == "bits:4"
  for bad, message in [("jpeg", "valid forms"), ("gauss:3", "unknown defense"),
                       ("jpeg:0", r"\[1, 100\]"), ("bits:x", "valid forms")]:
    with pytest.raises(ValueError, match=message):
      defenses.parse(bad)


@requires_data
def test_bpda_breaks_jpeg_where_the_plain_gradient_sees_nothing():
  model = zoo.load("mnist_lenet")
  images, labels = datasets.load("mnist", "test", DATA_DIR)
  images, labels = jnp.asarray(images[:16], jnp.float32) / 255, jnp.asarray(labels[:16])
  defended = defenses.defend(model, "jpeg:50")
  assert defended.meta["defense"] == "jpeg:50" and defended.meta["twin"] == "mnist_lenet"
  assert defended.pixel_evaluator is None
  np.testing.assert_array_equal(defended.apply_fn(model.params, images),
                                defended.bpda_apply_fn(model.params, images))
  assert defended.apply_fn == defenses.defend(model, "jpeg:50").apply_fn  # shared jit caches
  zero_share = masking.gradient_zero_share
  assert float(zero_share(defended.apply_fn, model.params, images, labels).mean()) == 1.0
  assert float(zero_share(defended.bpda_apply_fn, model.params, images, labels).mean()) < 0.1

  def accuracy(adv):
    return float(jnp.mean(jnp.argmax(defended.apply_fn(model.params, adv), -1) == labels))

  assert accuracy(images) == 1.0
  config = attacks.PGD.config(eps=0.3, step_size=0.075, num_steps=10)
  plain = attacks.pgd(defended.apply_fn, model.params, images, labels, jax.random.key(0),
                      config)
  adaptive = attacks.pgd(defended.bpda_apply_fn, model.params, images, labels,
                         jax.random.key(0), config)
  assert accuracy(plain.adv_images) >= 0.9  # looks robust ...
  assert accuracy(adaptive.adv_images) <= 0.1  # ... and is not
  np.testing.assert_array_equal(adaptive.success, ~(
      jnp.argmax(defended.apply_fn(model.params, adaptive.adv_images), -1) == labels))


@requires_data
def test_defenses_and_bpda_are_sweep_axes(tmp_path):
  from advsweep.bench.driver import config, results, sweep
  from advsweep.bench.reports import report

  cfg = config.resolve({
      "name": "defended", "models": ["mnist_softmax"], "defenses": ["none", "jpeg:50"],
      "batch_size": 12, "images": {"per_bin": 4, "pool": 300},
      "bins": {"thresholds": [0.99, 0.9]},
      "attacks": {"pgd": {"eps": 0.2, "step_size": 0.05, "num_steps": 5,
                          "random_start": False, "bpda": [False, True]}}})
  assert cfg.models == ["mnist_softmax", "mnist_softmax+jpeg:50"]
  sweep.run(cfg, tmp_path / "run", data_dir=str(DATA_DIR), progress=False, estimate=False,
            log=lambda *_: None)
  cols = report.columns(results.read_run(tmp_path / "run"))
  assert set(cols["defense"]) == {"none", "jpeg:50"}
  rate = {}
  for defense in ("none", "jpeg:50"):
    for bpda in (False, True):
      mask = (cols["defense"] == defense) & np.array(
          [('"bpda": true' in p) == bpda for p in cols["params"]]) & cols["clean_correct"]
      if mask.any():
        rate[defense, bpda] = cols["success"][mask].mean()
  assert ("none", True) not in rate  # no transform: BPDA is the plain attack, run once
  # Without a random start, a zero gradient moves nothing: no success at all, while BPDA
  # finds what the undefended model's PGD finds.
  assert rate["jpeg:50", False] == 0 and rate["jpeg:50", True] >= 0.9 * rate["none", False]
  with pytest.raises(config.ConfigError, match="unknown defense"):
    config.resolve(dict(cfg.raw, defenses=["blur:3"]))
  # A config without defenses keeps the hash it had before the axis existed.
  plain = config.resolve({k: v for k, v in cfg.raw.items() if k != "defenses"})
  assert "defenses" not in plain.to_json()


def test_parts_written_before_the_new_columns_read_with_them_null(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  from advsweep.bench.driver import results

  rows = {f.name: [] for f in results.SCHEMA}
  table = pa.Table.from_pydict(rows, schema=results.SCHEMA)
  added = list(results._ADDED)
  for i in range(len(added)):
    pq.write_table(table.drop_columns(added[i:]), tmp_path / "old.parquet")
    assert results.read_part(tmp_path / "old.parquet").schema.equals(results.SCHEMA)


def test_randomize_draws_from_its_key_and_the_image_alone():
  model = zoo.load("mnist_softmax")
  assert defenses.parse("randomize") == defenses.Defense("randomize", 90)
  with pytest.raises(ValueError, match=r"\[50, 100\]"):
    defenses.parse("randomize:20")
  defended = defenses.defend(model, "randomize", key=jax.random.key(1))
  images = jax.random.uniform(jax.random.key(2), (6, 28, 28, 1))
  logits = defended.apply_fn(defended.params, images)
  # The same (key, image) draws the same whatever the batch; another key, other draws.
  np.testing.assert_allclose(defended.apply_fn(defended.params, images[2:4]), logits[2:4],
                             atol=1e-5)
  other = defended.with_draws(jax.random.key(3))
  assert not np.allclose(other.apply_fn(other.params, images), logits)
  # A draw resizes to at least 90% and pads with zeros: the border of a white image is
  # black in some draws, and nothing is black at level 100 (no resize, no offset).
  white = jnp.ones((32, 28, 28, 1))
  keys = jax.random.split(jax.random.key(4), 32)
  shrunk = defended.defense.transform(white, keys)
  assert float(shrunk.min()) == 0.0 and float(shrunk.max()) == pytest.approx(1.0)
  np.testing.assert_allclose(defenses.parse("randomize:100").transform(white, keys), white,
                             atol=1e-6)
  # EOT: the log of the mean probabilities over n draws folded from the key.
  eot = defended.eot_apply_fn(4)
  probs = [jax.nn.softmax(defended.apply_fn(
      {"net": defended.params["net"], "draws": jax.random.fold_in(defended.params["draws"], j)},
      images)) for j in range(4)]
  np.testing.assert_allclose(jnp.exp(eot(defended.params, images)), np.mean(probs, 0),
                             atol=1e-5)
  grad = jax.grad(lambda x: eot(defended.params, x)[:, 0].sum())(images)
  assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.mean(grad == 0)) < 0.5
  assert defended.attack_apply_fn(bpda=True) == defended.apply_fn  # nothing rounds
  with pytest.raises(ValueError, match="deterministic"):
    defenses.defend(model, "jpeg:50").eot_apply_fn(4)


@requires_data
def test_a_defended_sweep_reports_plain_and_adaptive_side_by_side(tmp_path):
  from advsweep.bench.driver import config, results, sweep
  from advsweep.bench.reports import report

  cfg = config.resolve({
      "name": "adaptive", "models": ["mnist_softmax"],
      "defenses": ["none", "jpeg:50", "randomize"], "batch_size": 12,
      "images": {"per_bin": 12, "pool": 300}, "bins": {"names": ["all"], "thresholds": []},
      "attacks": {"fgsm": {"eps": 0.2, "bpda": [False, True], "eot_samples": [1, 3]},
                  "pgd": {"eps": 1.0, "step_size": 0.25, "num_steps": 4,
                          "bpda": [False, True], "eot_samples": [1, 3]}}})
  assert cfg.raw["defenses"] == ["none", "jpeg:50", "randomize:90"]
  cells = cfg.cells()
  # The adaptive keys act only where they mean something: 1 + 2 + 2 cells per attack.
  assert [(c.model, c.bpda, c.eot_samples) for c in cells if c.attack == "fgsm"] == [
      ("mnist_softmax", False, 1), ("mnist_softmax+jpeg:50", False, 1),
      ("mnist_softmax+jpeg:50", True, 1), ("mnist_softmax+randomize:90", False, 1),
      ("mnist_softmax+randomize:90", False, 3)]
  plain = {c.draw_hash for c in cells if c.model.endswith("jpeg:50") and c.attack == "fgsm"}
  assert len(plain) == 1  # plain and adaptive draw alike: they differ only in adapting
  for out in ("a", "b"):
    sweep.run(cfg, tmp_path / out, data_dir=str(DATA_DIR), progress=False, estimate=False,
              log=lambda *_: None)
  table = results.read_run(tmp_path / "a")
  assert results.content(table).equals(results.content(results.read_run(tmp_path / "b")))
  cols = report.columns(table)
  rows = table.to_pylist()

  def fgsm(model, adaptive_key=None):
    """The model's FGSM rows: plain (no adaptive key) or with `adaptive_key`."""
    def wanted(params):
      if adaptive_key is None:
        return "bpda" not in params and "eot_samples" not in params
      return adaptive_key in params
    return [r for r in rows if r["model"] == model and r["attack"] == "fgsm"
            and wanted(r["params"])]

  jpeg_plain = fgsm("mnist_softmax+jpeg:50")
  jpeg_bpda = fgsm("mnist_softmax+jpeg:50", '"bpda": true')
  random_plain = fgsm("mnist_softmax+randomize:90")
  random_eot = fgsm("mnist_softmax+randomize:90", '"eot_samples": 3')
  assert min(r["grad_zero_share"] for r in jpeg_plain) == 1.0
  assert max(r["grad_zero_share"] for r in jpeg_bpda) < 0.5
  assert all(r["transfer_success"] is not None for r in jpeg_plain)
  assert all(r["transfer_success"] is None for r in jpeg_bpda)  # adaptive: no transfer
  # Two draws agree only where both keep the full size (1 in 9 at 28 x 28, level 90).
  assert np.mean([r["forward_repeatable"] for r in random_plain]) <= 0.5
  assert {r["queries"] for r in random_eot} == {3 * q for q in {r["queries"]
                                                                for r in random_plain}}
  assert all(r["forward_repeatable"] for r in jpeg_plain)
  assert (cols["nd_score_clean"] > 0).all() and (cols["nd_score_adv"] > 0).all()
  side, flags = report.defense_section(table)
  by = {(r[0], r[2], r[3]): r for r in side}
  jpeg_row = by["mnist_softmax+jpeg:50", "fgsm", "eps=0.2"]
  assert jpeg_row[7] == "bpda=True" and jpeg_row[5] != "-" and jpeg_row[8] != "-"
  assert by["mnist_softmax+randomize:90", "fgsm", "eps=0.2"][7] == "eot_samples=3"
  text = "\n".join(flags)
  assert "mnist_softmax+jpeg:50 fgsm eps=0.2: masked gradient" in text
  assert "mnist_softmax+randomize:90 fgsm eps=0.2: randomized" in text
  assert "mnist_softmax+jpeg:50 fgsm bpda=True" not in text  # BPDA: nothing masked
  # eps 1 through JPEG's zero gradient finds nothing; with BPDA it always wins.
  assert "mnist_softmax+jpeg:50 pgd eps=1 num_steps=4 step_size=0.25: eps 1" in text
  pgd_bpda = [r for r in rows if r["model"] == "mnist_softmax+jpeg:50" and r["attack"] ==
              "pgd" and '"bpda": true' in r["params"] and r["clean_correct"]]
  assert all(r["success"] for r in pgd_bpda)
  # reproduce's figures match a plain cell by the adaptive keys' defaults.
  from advsweep.bench.reports import reproduce

  figures = [{"what": w, "model": "mnist_softmax+jpeg:50", "attack": "fgsm",
              "params": {"bpda": b}, "metric": "accuracy"} for w, b in (("p", False),
                                                                        ("a", True))]
  [plain_fig, adaptive_fig] = reproduce.figure_rows(table, figures)
  def pct(text):
    return round(float(text.rstrip("%")), 1)

  assert (pct(plain_fig[3]), pct(adaptive_fig[3])) == (pct(jpeg_row[5]), pct(jpeg_row[8]))
  lines = []
  report.report(tmp_path / "a", plots=True, log=lines.append)
  out = "\n".join(lines)
  assert "Defenses: accuracy" in out and "Detection: neighbour-difference" in out
  assert (tmp_path / "a" / "report" / "detection-roc-mnist_softmax.png").stat().st_size > 0


@requires_data
def test_randomized_success_is_judged_on_draws_the_attack_never_saw(tmp_path):
  from advsweep.bench.driver import sweep

  model = defenses.defend(zoo.load("mnist_softmax"), "randomize")
  evaluation = model.with_draws(sweep.evaluation_draws_key(0))
  attack = model.with_draws(sweep.attack_draws_key(0))
  images = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
  assert not np.allclose(evaluation.apply_fn(evaluation.params, images),
                         attack.apply_fn(attack.params, images))


def test_detector_figures_match_their_definitions():
  from advsweep.bench.checks import detection

  rng = np.random.default_rng(0)
  clean, adv = rng.normal(0, 1, 200), rng.normal(1, 1, 150)
  adv[:10] = clean[:10]  # ties count half
  pairs = (adv[:, None] > clean[None, :]).mean() + 0.5 * (adv[:, None] == clean[None, :]).mean()
  assert detection.auc(clean, adv) == pytest.approx(pairs)
  threshold = detection.threshold_at(clean, 0.05)
  assert (clean > threshold).mean() <= 0.05
  assert (clean >= threshold).mean() > 0.05  # the smallest such threshold
  fpr, tpr = detection.roc(clean, adv)
  assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
  assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
  assert np.trapezoid(tpr, fpr) == pytest.approx(pairs, abs=1e-9)
  # The score: squared differences of the four-neighbour pairs, each pair once.
  image = np.zeros((1, 3, 3, 1), np.float32)
  image[0, 1, 1, 0] = 1.0
  assert float(attacks.common.neighbour_difference_score(jnp.asarray(image))[0]) == 4.0


@requires_data
def test_the_detector_aware_attack_stays_under_the_threshold():
  from advsweep.bench.checks import detection

  model = zoo.load("mnist_lenet")
  images_u8, labels = datasets.load("mnist", "test", DATA_DIR)
  threshold = detection.threshold_at(detection.scores(images_u8[:2000]))
  images = jnp.asarray(images_u8[2000:2064], jnp.float32) / 255
  labels = jnp.asarray(labels[2000:2064])
  base = dict(eps=0.3, step_size=0.05, num_steps=20)
  plain = attacks.pgd(model.apply_fn, model.params, images, labels, jax.random.key(0),
                      attacks.PGD.config(**base))
  aware = attacks.pgd(model.apply_fn, model.params, images, labels, jax.random.key(0),
                      attacks.PGD.config(**base, detector_threshold=threshold * 0.9))
  score = attacks.common.neighbour_difference_score
  caught_plain = float(jnp.mean(score(plain.adv_images) > threshold))
  caught_aware = float(jnp.mean(score(aware.adv_images) > threshold))
  # Measured: 28% of plain PGD images caught, none of the detector-aware ones, both at
  # 100% success.
  assert caught_plain >= 0.15 and caught_aware <= 0.02, (caught_plain, caught_aware)
  assert float(jnp.mean(aware.success)) >= 0.9


def test_adaptive_keys_are_checked_when_the_config_loads():
  from advsweep.bench.driver import config

  base = {"name": "x", "models": ["mnist_softmax"], "defenses": ["none", "randomize"]}
  for table, message in [({"eot_samples": 0}, "eot_samples takes a whole number >= 1"),
                         ({"eot_samples": 2.5}, "eot_samples takes a whole number"),
                         ({"bpda": "yes"}, "bpda takes true or false"),
                         ({"evade_detector": 1}, "evade_detector takes true or false")]:
    with pytest.raises(config.ConfigError, match=message):
      config.resolve({**base, "attacks": {"fgsm": table}})
  with pytest.raises(config.ConfigError, match="only the gradient-sign attacks"):
    config.resolve({**base, "attacks": {"one_pixel": {"evade_detector": True}}})
  with pytest.raises(config.ConfigError, match="one defense twice"):
    config.resolve({**base, "defenses": ["randomize", "randomize:90"], "attacks": {"fgsm": {}}})
  # The detector's fields stay out of a config's identity at their defaults.
  plain = config.resolve({**base, "attacks": {"pgd": {}}}).cells()[0]
  assert "detector" not in plain.config_json and "evade_detector" not in plain.config_json
