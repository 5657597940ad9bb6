"""Run configs, sweep expansion, confidence bins and the interval helper."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from advsweep import attacks
from advsweep.bench.driver import config, selection
from advsweep.bench.reports import tables

TINY = {"name": "t", "models": ["mnist_lenet"], "attacks": {"fgsm": {"eps": [0.1, 0.2]}}}


def test_every_shipped_config_loads_full_and_quick():
  for name in config.available():
    for quick in (False, True):
      cfg = config.load(name, quick=quick)
      assert cfg.cells(), name
      assert cfg.name.endswith("-quick") == quick


def test_sweep_is_a_product_with_zipped_groups():
  table = {"eps": [0.1, 0.2], "step_size": [0.01, 0.02], "num_steps": [3, 5],
           "target": ["untargeted", "least_likely"], "zip": ["eps", "num_steps"]}
  combos = config.expand(table, "attacks.bim")
  assert len(combos) == 2 * 2 * 2  # (eps, num_steps) zipped x step_size x target
  assert {(c["eps"], c["num_steps"]) for c in combos} == {(0.1, 3), (0.2, 5)}
  with pytest.raises(config.ConfigError, match="same length"):
    config.expand({"eps": [0.1, 0.2], "num_steps": [3], "zip": ["eps", "num_steps"]}, "x")


def test_cells_carry_full_configs_and_stable_hashes():
  cfg = config.resolve(TINY)
  cells = cfg.cells()
  assert [c.config for c in cells] == [attacks.FGSMConfig(eps=0.1), attacks.FGSMConfig(eps=0.2)]
  again = config.resolve(TINY).cells()
  assert [c.config_hash for c in cells] == [c.config_hash for c in again]
  assert cells[0].config_hash != cells[1].config_hash
  assert cfg.config_hash != config.resolve(TINY, ["seed=1"]).config_hash


def test_draws_follow_the_set_parameters_not_the_defaults():
  """A field added with a default changes a cell's identity but not its random draws."""
  cell = config.resolve(TINY).cells()[0]
  other_default = dataclasses.replace(cell, config=cell.config.replace(target="least_likely"))
  assert other_default.config_hash != cell.config_hash
  assert other_default.draw_hash == cell.draw_hash
  assert dataclasses.replace(cell, params={"eps": 0.3}).draw_hash != cell.draw_hash


def test_overrides_reach_any_field_and_refuse_unknown_names():
  cfg = config.resolve(TINY, ["images.per_bin=7", "attacks.fgsm.eps=[0.3]",
                              "attacks.bim.num_steps=2", "bins.thresholds=[0.9, 0.5]"])
  assert cfg.per_bin == 7 and cfg.thresholds == [0.9, 0.5]
  assert [c.attack for c in cfg.cells()] == ["fgsm", "bim"]
  cases = [("epochs=3", "valid keys: name"), ("images.count=3", "images.per_bin"),
           ("attacks.deepfool.eps=1", "valid choices: one_pixel"),
           ("attacks.fgsm.epsilon=1", "valid fields: eps"),
           ("models=['resnet50']", "valid choices: mnist_lenet"),
           ("dataset=imagenet", "trained on mnist, not on the config's dataset imagenet"),
           ("dataset=cifar10", "trained on mnist"), ("bins.thresholds=[0.1, 0.5]", "decreasing"),
           ("bins.names=['a', 'b']", "distinct names"), ("images.per_bin=0", ">= 1"),
           ("batch_size=x", "integer"), ("seed", "KEY=VALUE")]
  for override, message in cases:
    with pytest.raises(config.ConfigError, match=message):
      config.resolve(TINY, [override])
  with pytest.raises(config.ConfigError, match="valid choices: .*ci, defenses"):
    config.load("no_such_config")


def test_explicit_targets_need_target_class():
  raw = dict(TINY, attacks={"jsma": {"target_class": [1, 2]}})
  with pytest.raises(config.ConfigError, match="explicit"):
    config.resolve(raw)
  raw = dict(TINY, attacks={"jsma": {"target_class": [1, 2], "target": "explicit"}})
  assert [c.target_class for c in config.resolve(raw).cells()] == [1, 2]


def test_quick_table_applies_only_with_quick():
  raw = dict(TINY, quick={"images.per_bin": 3})
  assert config.resolve(raw).per_bin == 100
  quick = config.resolve(raw, quick=True)
  assert quick.per_bin == 3 and quick.name == "t-quick"


def test_bins_follow_possas_thresholds():
  conf = np.array([0.95, 0.30, 0.2999, 0.15, 0.1499, 0.0])
  assert selection.assign_bins(conf, [0.30, 0.15]).tolist() == [0, 0, 1, 1, 2, 2]
  assert selection.assign_bins(conf, []).tolist() == [0] * 6


def test_stratified_draw_is_seeded_and_reports_availability():
  rng = np.random.default_rng(0)
  bins = rng.choice(3, size=500, p=[0.9, 0.08, 0.02])
  idx, available = selection.stratified_draw(bins, 3, 20, seed=4)
  assert available.tolist() == np.bincount(bins, minlength=3).tolist()
  counts = np.bincount(bins[idx], minlength=3)
  assert counts.tolist() == np.minimum(available, 20).tolist()
  assert len(set(idx.tolist())) == len(idx)
  again, _ = selection.stratified_draw(bins, 3, 20, seed=4)
  other, _ = selection.stratified_draw(bins, 3, 20, seed=5)
  assert np.array_equal(idx, again) and not np.array_equal(idx, other)


def test_wilson_interval_matches_reference_values():
  # Reference values: Wilson (1927) score interval at z = 1.96, as tabulated by Newcombe
  # (1998), e.g. 0/20 -> 0-0.161 and 81/263 -> 0.2553-0.3662.
  assert tables.wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
  assert tables.wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
  assert tables.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
  assert np.isnan(tables.wilson_interval(0, 0)).all()
