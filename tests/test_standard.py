"""The standard evaluation: the protocol's bookkeeping (cascade, worst case, keys), its checks
and its refusals, on tiny models."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pytest

from advsweep.bench import evaluate
from advsweep.bench.checks import validity
from advsweep.bench.evaluation import standard
from tests.attack_models import linear_model, random_images, small_cnn
from tests.conftest import requires_data


def _model():
  apply_fn, params = small_cnn(height=8, width=8, channels=1, num_classes=10, seed=3)
  images = np.asarray(random_images(24, 8, 8, 1, seed=5))
  labels = np.asarray(apply_fn(params, jnp.asarray(images))).argmax(-1)
  labels[::6] = (labels[::6] + 1) % 10  # a few clean errors
  return apply_fn, params, images, labels


def test_the_worst_case_is_correct_and_fooled_by_no_attack():
  apply_fn, params, images, labels = _model()
  result = evaluate(apply_fn, params, images, labels, eps=0.03, quick=True, progress=False,
                    batch_size=16)
  fooled = np.zeros(len(labels), bool)
  left = result.clean_correct.copy()
  for name, outcome in result.outcomes.items():
    assert not (outcome.ran & ~left).any(), f"{name} ran on an image already fooled"
    assert (outcome.ran == left).all(), f"{name} skipped a robust image"
    assert not (outcome.success & ~outcome.ran).any()
    np.testing.assert_array_equal(outcome.queries[~outcome.ran], 0)
    fooled |= outcome.success
    left &= ~outcome.success
  np.testing.assert_array_equal(result.robust, result.clean_correct & ~fooled)
  after = list(result.robust_after().values())
  assert after == sorted(after, reverse=True)
  assert after[-1] == pytest.approx(result.robust.mean())
  assert list(result.outcomes) == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
  assert result.headline().startswith(f"robust accuracy {100 * result.robust.mean():.1f}%")
  assert 0 < result.clean_correct.sum() < len(labels)


_IMAGE_KEYS = standard.image_keys


def _batches_counted(monkeypatch, stop_at: int | None = None) -> list[int]:
  """Counts the attack batches an evaluation makes (each draws its images' keys once),
  raising KeyboardInterrupt at batch `stop_at` as a kill would."""
  made, real = [], _IMAGE_KEYS

  def counted(key, indices):
    if len(made) == stop_at:
      raise KeyboardInterrupt
    made.append(1)
    return real(key, indices)

  monkeypatch.setattr(standard, "image_keys", counted)
  return made


def test_an_interrupted_evaluation_goes_on_to_the_same_outcomes(tmp_path, monkeypatch):
  """Killed inside the first attack or in the last one's last batch, an evaluation given
  its progress file runs only the batches left and ends with every image's outcome of an
  uninterrupted run; the file is gone at the end. A torn file, or one of another
  evaluation, is set aside with a warning."""
  apply_fn, params, images, labels = _model()
  kwargs = dict(eps=0.03, quick=True, progress=False, batch_size=4)
  whole = evaluate(apply_fn, params, images, labels, **kwargs)
  batches = sum(-(-int(o.ran.sum()) // 4) for o in whole.outcomes.values())
  assert len([o for o in whole.outcomes.values() if o.ran.any()]) >= 2
  path = tmp_path / "model.partial.npz"
  for stop in (1, batches - 1):
    _batches_counted(monkeypatch, stop_at=stop)
    with pytest.raises(KeyboardInterrupt):
      evaluate(apply_fn, params, images, labels, resume=path, **kwargs)
    assert path.is_file()
    made = _batches_counted(monkeypatch)
    resumed = evaluate(apply_fn, params, images, labels, resume=path, **kwargs)
    assert len(made) == batches - stop  # the batches done before the kill are not run again
    assert not path.exists()
    np.testing.assert_array_equal(resumed.robust, whole.robust)
    for name, outcome in whole.outcomes.items():
      for field in ("ran", "success", "adv_pred", "queries", "linf", "l2"):
        np.testing.assert_array_equal(getattr(resumed.outcomes[name], field),
                                      getattr(outcome, field), err_msg=f"{name} {field}")
  path.write_bytes(b"PK\x03\x04 torn")
  with pytest.warns(UserWarning, match="cannot be read"):
    again = evaluate(apply_fn, params, images, labels, resume=path, **kwargs)
  np.testing.assert_array_equal(again.robust, whole.robust)
  _batches_counted(monkeypatch, stop_at=1)
  with pytest.raises(KeyboardInterrupt):
    evaluate(apply_fn, params, images, labels, resume=path, **{**kwargs, "eps": 0.05})
  made = _batches_counted(monkeypatch)
  with pytest.warns(UserWarning, match="another evaluation"):
    again = evaluate(apply_fn, params, images, labels, resume=path, **kwargs)
  assert len(made) == batches
  np.testing.assert_array_equal(again.robust, whole.robust)


def test_the_cascade_changes_the_work_not_the_outcome():
  """Every image's keys fold in its index, so running each attack on every clean-correct
  image fools the same images in the end, and a subset gets the whole's outcomes."""
  apply_fn, params, images, labels = _model()
  kwargs = dict(eps=0.03, quick=True, progress=False, batch_size=16)
  cascade = evaluate(apply_fn, params, images, labels, **kwargs)
  every = evaluate(apply_fn, params, images, labels, cascade=False, **kwargs)
  np.testing.assert_array_equal(cascade.robust, every.robust)
  assert sum(o.ran.sum() for o in every.outcomes.values()) >= sum(
      o.ran.sum() for o in cascade.outcomes.values())
  part = np.arange(5, 17)
  subset = evaluate(apply_fn, params, images[part], labels[part], indices=part, **kwargs)
  np.testing.assert_array_equal(subset.robust, cascade.robust[part])
  again = evaluate(apply_fn, params, images, labels, **kwargs)
  np.testing.assert_array_equal(again.robust, cascade.robust)


def test_a_linear_model_is_robust_exactly_beyond_its_margin():
  """Two classes, interior pixels: an image is fooled within eps iff its margin over
  ||w_0 - w_1||_1 is below eps. The standard evaluation finds exactly those."""
  apply_fn, params = linear_model(num_classes=2, seed=7)
  w = np.asarray(params["w"])
  images = np.asarray(jnp.clip(random_images(20, seed=8) * 0.2 + 0.4, 0, 1))
  logits = np.asarray(apply_fn(params, jnp.asarray(images)))
  labels = logits.argmax(-1)
  distance = np.abs(logits[:, 0] - logits[:, 1]) / np.abs(w[:, 0] - w[:, 1]).sum()
  eps = float(np.median(distance))
  far = np.abs(distance - eps) > 0.01 * eps
  # Two classes: no targets for APGD-T or FAB-T beyond the one other class.
  result = evaluate(apply_fn, params, images, labels, eps=eps, quick=True, progress=False)
  np.testing.assert_array_equal(result.robust[far], (distance >= eps)[far])


@pytest.mark.parametrize("bad, message", [
    (dict(norm="l1"), "unknown norm 'l1'"),
    (dict(eps=-0.1), "eps must be >= 0"),
    (dict(version="fast"), "unknown version 'fast'"),
    (dict(version="rand"), "attack_apply_fn"),
])
def test_bad_settings_are_refused_with_the_fix(bad, message):
  apply_fn, params, images, labels = _model()
  with pytest.raises(ValueError, match=message):
    evaluate(apply_fn, params, images[:4], labels[:4], progress=False, **bad)


def test_a_model_without_gradients_is_refused_in_one_line():
  apply_fn, params, images, labels = _model()

  def quantised(params, x):
    return apply_fn(params, jnp.round(x * 4) / 4)  # zero gradient almost everywhere

  flag = validity.zero_gradients(quantised, params, images, labels)
  assert flag is not None and flag.name == "zero_gradients"
  assert "BPDA" in str(flag) and "docs/flags.md#zero-gradients" in str(flag)

  import jax

  def opaque(params, x):
    return jax.pure_callback(lambda v: np.asarray(apply_fn(params, v)),
                             jax.ShapeDtypeStruct((x.shape[0], 10), jnp.float32), x)

  with pytest.raises(ValueError, match="cannot be differentiated.*attack_apply_fn"):
    evaluate(opaque, params, images[:4], labels[:4], progress=False)


def test_flags_fire_on_what_they_name():
  apply_fn, params = linear_model(num_classes=10)
  images = np.asarray(random_images(8))
  logits = np.asarray(apply_fn(params, jnp.asarray(images)))
  assert validity.saturated_softmax(logits) is None
  assert validity.saturated_softmax(1000 * logits).name == "saturated_softmax"
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  assert validity.softmax_output(probs).name == "softmax_output"
  assert validity.softmax_output(logits) is None
  counter = itertools.count()

  def noisy(params, x):
    return apply_fn(params, x) + next(counter)

  assert validity.randomized_forward(noisy, params, images).name == "randomized_forward"
  assert validity.randomized_forward(apply_fn, params, images) is None


def _evaluation(successes: dict[str, list[bool]]) -> standard.Evaluation:
  n = len(next(iter(successes.values())))
  outcomes = {k: standard.AttackOutcome(ran=np.ones(n, bool), success=np.asarray(v, bool),
                                        adv_pred=np.zeros(n), queries=np.ones(n),
                                        linf=np.zeros(n), l2=np.zeros(n))
              for k, v in successes.items()}
  ok = np.ones(n, bool)
  kinds = {"APGD-CE": "ce", "APGD-T": "dlr", "FAB-T": "boundary", "Square": "score"}
  return standard.Evaluation("linf", 0.1, "standard", np.zeros(n), np.zeros(n), ok,
                             ok & ~np.any([o.success for o in outcomes.values()], 0),
                             outcomes, kinds, [], 0.0)


def test_square_and_dlr_flags_read_the_outcomes():
  quiet = _evaluation({"APGD-CE": [1, 0, 0, 0], "APGD-T": [0, 0, 0, 0],
                       "FAB-T": [0, 0, 0, 0], "Square": [1, 0, 0, 0]})
  assert validity.after_attacks(quiet) == []
  masked = _evaluation({"APGD-CE": [1, 0, 0, 0], "APGD-T": [0, 1, 0, 0],
                        "FAB-T": [0, 0, 0, 0], "Square": [0, 0, 1, 0]})
  names = [f.name for f in validity.after_attacks(masked)]
  assert names == ["square_beats_white_box", "dlr_beats_ce"]


def test_an_attack_leaving_its_budget_stops_the_evaluation():
  from advsweep import attacks
  apply_fn, params = linear_model()
  images = random_images(2)
  result = attacks.apgd(apply_fn, params, images, jnp.array([0, 1]), 0,
                        attacks.APGDConfig(eps=0.05, num_steps=2))
  config = attacks.APGDConfig(eps=0.01)  # a budget the result does not respect
  with pytest.raises(RuntimeError, match="outside its budget"):
    validity.check_budget("APGD-CE", attacks.APGD, config, result, np.asarray(images))


@pytest.mark.parametrize("argv, message", [
    (["--models", "mnist_lenet", "--norm", "l1"], "invalid choice: 'l1'"),
    (["--models", "mnist_lenett"], "unknown model 'mnist_lenett'"),
    (["--models", "mnist_lenet", "--num-images", "0"], "a whole number >= 1"),
    (["--models", "fashion_mnist_lenet", "--norm", "l2"], "no standard l2 budget"),
    (["--norm", "l2"], "only apply with --standard"),
    (["--models", "mnist_lenet", "--beside", "mnist_lenet", "mnist_lenet_pgd"],
     "both models must be among --models"),
])
def test_the_command_refuses_bad_input_in_one_line_and_writes_nothing(argv, message, tmp_path,
                                                                     capsys):
  from advsweep.bench import cli

  try:
    code = cli.main(["robustness", *(["--standard"] if argv != ["--norm", "l2"] else []),
                     *argv, "--out", str(tmp_path / "out")])
  except SystemExit as exit_:  # argparse's own refusals
    code = exit_.code
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert message in err[-1] and len([line for line in err if "error" in line]) == 1
  assert not list((tmp_path / "out").rglob("*.parquet"))


def _kept(robust: list[bool], twin: str = "") -> tuple[dict, pa.Table]:
  n = len(robust)
  summary = {"defense": "", "twin": twin, "num_images": n, "clean_accuracy": 1.0,
             "robust_after": {"APGD-CE": sum(robust) / n}, "robust_accuracy": sum(robust) / n,
             "robust_interval": [0.0, 1.0], "seconds": 1.0, "flags": []}
  return summary, pa.table({"attack": ["APGD-CE"] * n, "robust": robust})


def test_models_are_paired_with_their_twin_the_zoo_beside_and_the_pairs_asked_for():
  """The logit-paired LeNet is compared with its twin and with the PGD-trained LeNet (the
  zoo's `beside`: the same schedule without logit pairing), image by image; a pair asked
  for is added, and one with a model not evaluated is left out."""
  from advsweep.bench.evaluation import standard_runs

  kept = {"mnist_lenet_alp": _kept([True] * 6 + [False] * 4, twin="mnist_lenet"),
          "mnist_lenet_pgd": _kept([True] * 9 + [False]),
          "mnist_lenet": _kept([False] * 10)}
  assert standard_runs.pairs(kept) == [("mnist_lenet_alp", "mnist_lenet"),
                                       ("mnist_lenet_alp", "mnist_lenet_pgd")]
  assert standard_runs.pairs(kept, [("mnist_lenet_pgd", "mnist_lenet_alp")]) == (
      standard_runs.pairs(kept))  # the same pair the other way round: once
  assert standard_runs.pairs(kept, [("mnist_lenet", "mnist_lenet_pgd"),
                                    ("mnist_lenet", "cifar10_vgg")])[-1] == (
                                        "mnist_lenet", "mnist_lenet_pgd")
  text, _ = standard_runs.lines(kept, "t", [("mnist_lenet", "mnist_lenet_pgd")])
  beside = next(t for t in text if t.startswith("mnist_lenet_alp vs mnist_lenet_pgd"))
  # Robust 6 vs 9 of 10: 0 only here, 3 only there; exact McNemar p = 2 / 2^3.
  assert "robust 60.0% vs 90.0%" in beside and "only here 0, only there 3" in beside
  assert "p = 0.25" in beside
  assert any(t.startswith("mnist_lenet vs mnist_lenet_pgd: robust 0.0% vs 90.0%") for t in text)


@requires_data
def test_a_randomized_defense_gets_the_rand_version_and_files_that_resume(data_dir, tmp_path):
  """`MODEL+randomize` is attacked on its expectation over 20 draws (APGD-CE, APGD-DLR);
  the files are kept and a second run with the same settings reuses them."""
  from advsweep.bench.evaluation import standard_runs

  logged = []
  kwargs = dict(num_images=6, quick=True, out_root=tmp_path, data_dir=str(data_dir),
                progress=False, log=logged.append)
  markdown = standard_runs.run_zoo(["mnist_softmax+randomize:90"], **kwargs)
  summary, table = standard_runs.load(tmp_path / "standard-linf-quick",
                                      "mnist_softmax+randomize:90")
  assert summary["version"] == "rand" and "APGD-DLR" in summary["robust_after"]
  assert set(table.column("attack").to_pylist()) == {"APGD-CE", "APGD-DLR"}
  assert table.num_rows == 12 and "mnist_softmax+randomize:90" in markdown
  logged.clear()
  assert standard_runs.run_zoo(["mnist_softmax+randomize:90"], **kwargs) == markdown
  assert logged[0].startswith("mnist_softmax+randomize:90: kept")


def test_a_gradient_free_attack_beating_a_gradient_attack_is_flagged_by_the_spec():
  """The black-box check reads each attack's spec (gradient-free: its unit is a forward
  pass), not its name: Square or the one-pixel attack beating PGD within PGD's budget."""
  n = 40
  rows = np.arange(2 * n)
  cols = {"clean_correct": np.ones(2 * n, bool),
          "success": np.r_[np.arange(n) < 5, np.arange(n) < 30],
          "linf": np.r_[np.full(n, 0.1), np.full(n, 0.1)]}
  black = rows >= n  # the first n rows are the gradient attack's
  for peer in ("square", "one_pixel"):
    flags = validity.black_box_beats_white_box(
        cols, {"attack": "pgd", "params": {"eps": 0.3}}, [({"attack": peer}, black)], (5, n))
    assert flags and f"black-box {peer} attack (75%)" in flags[0]
  assert not validity.black_box_beats_white_box(  # a gradient attack is no black-box peer
      cols, {"attack": "pgd", "params": {"eps": 0.3}}, [({"attack": "fgsm"}, black)], (5, n))
  assert not validity.black_box_beats_white_box(  # outside the budget
      cols, {"attack": "pgd", "params": {"eps": 0.05}}, [({"attack": "square"}, black)],
      (5, n))



def test_batch_sizes_by_backend_and_by_hand():
  """None picks the backend's sizes per attack kind (small gradient batches on a CPU); a
  number sets every kind; nonsense is refused."""
  cpu = standard.batch_sizes(None, backend="cpu")
  assert cpu == standard.BATCH_SIZES["cpu"]
  assert cpu[standard.DLR_LOSS] < cpu[standard.SCORE_BASED]
  assert set(standard.batch_sizes(None, backend="gpu").values()) == {
      standard.DEFAULT_BATCH_SIZE}
  assert set(standard.batch_sizes(7).values()) == {7}
  with pytest.raises(ValueError, match="batch_size"):
    standard.batch_sizes(0)
