"""bench/perf/reference_autoattack.py: the torch models equal the JAX ones (logits and input
gradients), and a tiny torchattacks AutoAttack run checks its own output. Skipped without the
optional extra (pip install -e ".[reference]")."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchattacks")

from advsweep.bench.perf import reference_autoattack as ref  # noqa: E402
from advsweep.models import datasets, zoo  # noqa: E402
from tests import attack_models  # noqa: E402
from tests.conftest import requires_data  # noqa: E402


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def _logits_and_class0_gradient(net: torch.nn.Module, x: np.ndarray):
  xt = _nchw(x).requires_grad_()
  logits = net(xt)
  logits[:, 0].sum().backward()
  return logits.detach().numpy(), xt.grad.numpy().transpose(0, 2, 3, 1)


def _jax_logits_and_class0_gradient(apply_fn, params, x: np.ndarray):
  x = jnp.asarray(x, jnp.float32)
  grad = jax.grad(lambda x: apply_fn(params, x)[:, 0].sum())(x)
  return np.asarray(apply_fn(params, x)), np.asarray(grad)


@pytest.fixture(scope="module")
def lenet():
  return zoo.load("mnist_lenet")


@requires_data
def test_native_lenet_equals_the_jax_model(lenet, data_dir):
  x, _ = datasets.load("mnist", "test", data_dir)
  x = x[:16].astype(np.float32) / 255
  net = ref.torch_model(lenet)
  assert net.kind == ref.NATIVE and isinstance(net, ref.TorchLeNet)
  logits, grad = _logits_and_class0_gradient(net, x)
  want_logits, want_grad = _jax_logits_and_class0_gradient(lenet.apply_fn, lenet.params, x)
  np.testing.assert_allclose(logits, want_logits, atol=1e-4)
  np.testing.assert_allclose(grad, want_grad, atol=1e-4)
  assert (net.calls, net.images, net.gradient_calls) == (1, 16, 1)


def test_bridge_equals_jax_on_a_small_cnn():
  apply_fn, params = attack_models.small_cnn()
  x = np.asarray(jax.random.uniform(jax.random.key(1), (5, 8, 8, 3)))  # padded to 8 inside
  net = ref.torch_model(apply_fn, params)
  assert net.kind == ref.BRIDGE
  logits, grad = _logits_and_class0_gradient(net, x)
  want_logits, want_grad = _jax_logits_and_class0_gradient(apply_fn, params, x)
  assert logits.shape == (5, 5) and grad.shape == x.shape
  np.testing.assert_allclose(logits, want_logits, atol=1e-5)
  np.testing.assert_allclose(grad, want_grad, atol=1e-5)
  with torch.no_grad():  # no gradient asked: the plain forward
    np.testing.assert_allclose(net(_nchw(x[:3])).numpy(), want_logits[:3], atol=1e-5)
  assert (net.calls, net.images, net.gradient_calls) == (2, 8, 1)
  assert net.bridge.compile_seconds > 0


def test_torch_model_kinds(lenet):
  apply_fn, params = attack_models.small_cnn()
  assert ref.torch_model(lenet, kind="bridge").kind == ref.BRIDGE
  with pytest.raises(ValueError, match="native"):
    ref.torch_model(apply_fn, params, kind="native")
  with pytest.raises(ValueError, match="params"):
    ref.torch_model(apply_fn)
  with pytest.raises(ValueError, match="kind"):
    ref.torch_model(lenet, kind="onnx")
  assert ref.torch_model(zoo.load("mnist_lenet_gauss")).kind == ref.BRIDGE  # Gauss head
  assert ref._bucket(1) == 8 and ref._bucket(9) == 16 and ref._bucket(16) == 16


def test_croce_hein_settings(lenet):
  net = ref.torch_model(lenet)
  assert ref._settings(ref.autoattack(net, 0.3)) == {
      "apgd_steps": 10, "apgdt_steps": 10, "fab_steps": 10, "square_queries": 5000,
      "square_rescale_schedule": True}
  assert ref._settings(ref.autoattack(net, 0.3, croce_hein=True)) == {
      "apgd_steps": 100, "apgdt_steps": 100, "fab_steps": 100, "square_queries": 5000,
      "square_rescale_schedule": False}


def test_perturbation_size():
  x = np.zeros((2, 2, 2, 1), np.float32)
  adv = x.copy()
  adv[0, 0, 0, 0], adv[1, :, :, 0] = 0.3, 0.1
  np.testing.assert_allclose(ref.perturbation_size(adv, x, "linf"), [0.3, 0.1], rtol=1e-6)
  np.testing.assert_allclose(ref.perturbation_size(adv, x, "l2"), [0.3, 0.2], rtol=1e-6)


@requires_data
def test_tiny_run_checks_its_output_and_writes_rows(lenet, data_dir, tmp_path, capsys):
  """AutoAttack standard on 4 MNIST images of the undefended LeNet (APGD-CE fools them all, so
  the later attacks stop early), native and through the bridge."""
  result = ref.run(lenet, num_images=4, data_dir=data_dir, batch_size=4)
  assert result["kind"] == ref.NATIVE and result["eps"] == 0.3 and result["norm"] == "linf"
  assert result["torch"] == torch.__version__ and result["torchattacks"] == "3.5.1"
  for key in ("index", "label", "clean_correct", "robust", "within_eps", "perturbation"):
    assert result[key].shape == (4,), key
  assert result["clean_correct"].all() and not result["robust"].any()
  assert result["within_eps"].all() and result["violations"] == 0
  assert (result["perturbation"] <= 0.3 + ref.EPS_TOLERANCE).all()
  assert result["torch_jax_disagreements"] == 0
  assert result["model_calls"] > 0 and result["gradient_calls"] > 0 and result["seconds"] > 0
  # The cost per sub-attack: APGD-CE fooled all four, so AutoAttack never called the others;
  # the ledger's calls are the module's, less MultiAttack's own checks between attacks.
  costs = result["attack_costs"]
  assert list(costs) == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
  assert costs["APGD-CE"]["model_images"] > 0 and costs["APGD-CE"]["gradient_calls"] > 0
  assert all(costs[a]["model_calls"] == 0 for a in ("APGD-T", "FAB-T", "Square"))
  assert costs["APGD-CE"]["model_images"] == result["model_images"] - 4  # one check of 4
  assert 0 < costs["APGD-CE"]["seconds"] <= result["seconds"]
  # robust is the JAX model's verdict on the returned images
  adv_pred = np.asarray(jnp.argmax(lenet.apply_fn(lenet.params, result["adversarial"]), -1))
  np.testing.assert_array_equal(result["robust"], adv_pred == result["label"])

  bridged = ref.run(lenet, num_images=4, data_dir=data_dir, batch_size=4, kind="bridge")
  assert bridged["kind"] == ref.BRIDGE and bridged["violations"] == 0
  np.testing.assert_array_equal(bridged["robust"], result["robust"])

  import pyarrow.parquet as pq

  path = ref.write_rows(result, tmp_path / "rows" / "ref.parquet")
  table = pq.read_table(path)
  assert table.column_names == ["model", "index", "label", "clean_correct", "robust",
                                "within_eps"]
  assert table.column("robust").to_pylist() == [False] * 4
  meta = json.loads(table.schema.metadata[b"advsweep.reference_autoattack"])
  assert meta["kind"] == ref.NATIVE and meta["num_images"] == 4 and meta["apgd_steps"] == 10
  assert [p.name for p in path.parent.iterdir()] == ["ref.parquet"]  # no temporary left


class _Stopped(Exception):
  """The break in the middle of a run."""


@requires_data
def test_interrupted_run_resumes_at_its_next_batch(lenet, data_dir, tmp_path, monkeypatch):
  """A run stopped after its first batch keeps it in the progress file; the next run attacks
  only the second batch and returns what an uninterrupted run does."""
  whole = ref.run(lenet, num_images=8, data_dir=data_dir, batch_size=4)
  path = tmp_path / "ref.partial.npz"
  real_autoattack, calls, stop_at = ref.autoattack, [], [2]

  def stopping_after_one_batch(*args, **kwargs):
    atk = real_autoattack(*args, **kwargs)

    def attack(x, y):
      calls.append(len(x))
      if len(calls) in stop_at:
        raise _Stopped
      return atk(x, y)
    attack._autoattack = atk._autoattack  # what _settings reads
    return attack

  monkeypatch.setattr(ref, "autoattack", stopping_after_one_batch)
  with pytest.raises(_Stopped):
    ref.run(lenet, num_images=8, data_dir=data_dir, batch_size=4, progress_path=path)
  with np.load(path, allow_pickle=False) as kept:
    assert kept["adversarial"].shape == (4, 1, 28, 28)
    first_calls = int(kept["model_calls"])
  assert first_calls > 0

  calls.clear()
  stop_at.clear()
  resumed = ref.run(lenet, num_images=8, data_dir=data_dir, batch_size=4, progress_path=path)
  assert calls == [4]  # only the second batch
  assert not path.exists()
  np.testing.assert_array_equal(resumed["adversarial"], whole["adversarial"])
  np.testing.assert_array_equal(resumed["robust"], whole["robust"])
  assert resumed["model_calls"] == whole["model_calls"] > first_calls
  for attack, cost in whole["attack_costs"].items():  # the parts' ledgers add up
    assert resumed["attack_costs"][attack]["model_images"] == cost["model_images"], attack

  with pytest.warns(UserWarning, match="another evaluation"):  # other settings: afresh
    ref.progress.save(path, "not this run", {"adversarial": np.zeros((4, 1, 28, 28))})
    calls.clear()
    ref.run(lenet, num_images=8, data_dir=data_dir, batch_size=4, progress_path=path)
  assert calls == [4, 4]


@requires_data
def test_standard_vs_reference_writes_one_comparison_and_no_progress(data_dir, tmp_path,
                                                                     capsys):
  """The comparison on 4 images of the undefended LeNet: both fool all four, the file is
  named by the weights, and the reference's progress file is gone once it ends."""
  from advsweep.bench.perf import standard_vs_reference as versus

  assert versus.main(["--models", "mnist_lenet", "--n", "4", "--data-dir", str(data_dir),
                      "--out", str(tmp_path)]) == 0
  sha = zoo.load("mnist_lenet").meta["sha256"]
  assert [p.name for p in tmp_path.iterdir()] == [f"mnist_lenet-4-{sha[:12]}.json"]
  result = json.loads((tmp_path / f"mnist_lenet-4-{sha[:12]}.json").read_text())
  assert result["ours"]["robust"] == result["reference"]["robust"] == 0.0
  assert result["within_one_point"] and result["only_ours_robust"] == 0
  assert "mnist_lenet" in capsys.readouterr().out
  # A timing on set torch threads is kept beside it, never over it, and says how it ran.
  assert versus.main(["--models", "mnist_lenet", "--n", "4", "--data-dir", str(data_dir),
                      "--threads", "1", "--out", str(tmp_path)]) == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == [f"mnist_lenet-4-{sha[:12]}.json",
                                                         f"mnist_lenet-4-t1-{sha[:12]}.json"]
  timed = json.loads((tmp_path / f"mnist_lenet-4-t1-{sha[:12]}.json").read_text())
  assert versus.row(timed)[versus.HEADER.index("reference run")].startswith("native, 1 thread")
  assert [r[versus.COST_HEADER.index("attack")] for r in versus.cost_rows(timed)][:4] == [
      "APGD-CE", "APGD-T", "FAB-T", "Square"]
  assert 0 <= timed["ours"]["compile_seconds"] <= timed["ours"]["seconds"]
  assert versus.cost_rows(result | {"ours": result["ours"] | {"seconds": float("nan")}}) == []
  assert versus.result_stem("m", 10, None, sha, 1, "l2") == f"m-10-l2-t1-{sha[:12]}"
  assert versus.row(timed)[versus.HEADER.index("norm")] == "L-inf"
