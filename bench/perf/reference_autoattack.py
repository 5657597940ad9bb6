"""The reference AutoAttack: torchattacks' port of Croce & Hein's standard evaluation, run on
the zoo's models, for comparison with advsweep's JAX AutoAttack (robust accuracy and speed).

The reference is torchattacks 3.5.1's `AutoAttack(model, norm=..., eps=..., version="standard",
n_classes=10, seed=0)`: APGD-CE, APGD-T (9 targets), FAB-T (9 targets) and Square (5000
queries), each run only on the images the earlier ones left robust. It attacks a
`torch.nn.Module` that takes NCHW images in [0, 1]; `torch_model` gives one for a zoo model in
one of two ways, and every result says which (`kind`):
- `native`: the MNIST LeNet (`PapernotLeNet`, softmax head) rebuilt in PyTorch with the zoo's
  weights copied in: the fair peer for speed, what a competent PyTorch user would run;
- `bridge`: any other model (BatchNorm ResNets, the Gauss head, a user's `apply_fn`) through a
  `torch.autograd.Function` whose forward and backward call a jitted JAX forward pass and its
  `jax.vjp`. Batches are zero-padded to a power of two, so the shrinking sets the attacks run on
  compile a few programs rather than one per size (every zoo model's inference is per image).
  The full batch compiles before the clock starts; the smaller shapes compile inside the timed
  run, and `compile_seconds` says how long they took.

torchattacks' "standard" is not Croce & Hein's: it leaves APGD-CE, APGD-T and FAB-T at its own
default of 10 iterations (the original runs 100), and Square rescales its p schedule to the
5000 queries (`resc_schedule=True`; the original sets it False, the schedule of 10000
queries). `croce_hein=True` sets those four values as the original does; the default runs the
library as its users call it.

Not part of the required install: PyTorch is large and the reference is only needed to
measure against, so CI runs without it and tests/test_reference_autoattack.py skips. It is no
extra of pyproject.toml: torchattacks 3.5.1 declares `torchvision>=0.8.2` and
`requests~=2.25.1`, neither of which it imports, and resolving them would pull torchvision and
downgrade requests (and urllib3) under TFDS. Install it in two steps:

    pip install torch==2.13.0                    # the CPU build, or your platform's
    pip install --no-deps torchattacks==3.5.1    # its scipy, tqdm, numpy come with advsweep

    python -m advsweep.bench.perf.reference_autoattack mnist_lenet_pgd --n 100 --out ref.parquet
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from advsweep.bench.evaluation import progress

INSTALL_HINT = ("the reference AutoAttack needs PyTorch and torchattacks: pip install "
                "torch==2.13.0, then pip install --no-deps torchattacks==3.5.1")

try:
  import torch
except ImportError as err:  # pragma: no cover - the extra is not installed
  raise ImportError(f"{err}; {INSTALL_HINT}") from err

NATIVE, BRIDGE = "native", "bridge"
KINDS = ("auto", NATIVE, BRIDGE)
NORMS = {"linf": "Linf", "l2": "L2"}
# The usual eps of each dataset and norm (Croce & Hein's MNIST and CIFAR-10 settings).
DEFAULT_EPS = {("mnist", "linf"): 0.3, ("fashion_mnist", "linf"): 0.1,
               ("cifar10", "linf"): 8 / 255, ("cifar10", "l2"): 0.5}
# The fastest of 100, 250, 500 and 1000 for the native LeNet (mnist_lenet_pgd) at torch's
# default threads on a 2-core CPU shared with other jobs, by `measure_batch_sizes`: APGD-CE
# 35.2, 32.6, 29.5, 28.5 ms an image, Square at 20 queries 35.6, 21.1, 27.1, 19.6. There every
# call costs tens of milliseconds of threads waiting on each other, so fewer, larger calls win
# (Square's 5000 queries run once per batch). On one thread the order reverses (APGD-CE 9.8,
# 10.8, 14.4, 15.6 ms an image; Square 7.6, 10.0, 13.5, 13.3): pass batch_size=100 with
# threads=1.
DEFAULT_BATCH_SIZE = 1000
# Slack on the perturbation-size check: float32 rounding of `x + delta`.
EPS_TOLERANCE = 1e-5


def versions() -> dict[str, str]:
  """torch's and torchattacks' versions (torchattacks imported here: the CLI's import error
  then names the extra)."""
  try:
    import torchattacks
  except ImportError as err:  # pragma: no cover - the extra is not installed
    raise ImportError(f"{err}; {INSTALL_HINT}") from err
  return {"torch": torch.__version__, "torchattacks": torchattacks.__version__}


# ---------------------------------------------------------------------------------------------
# The torch models


class _Counted(torch.nn.Module):
  """Counts forward calls (`calls`), the images they saw (`images`) and the calls made with
  a gradient requested (`gradient_calls`)."""

  kind = ""

  def __init__(self):
    super().__init__()
    self.reset_counts()

  def reset_counts(self) -> None:
    self.calls = self.images = self.gradient_calls = 0

  def _count(self, x: torch.Tensor) -> None:
    self.calls += 1
    self.images += int(x.shape[0])
    self.gradient_calls += int(torch.is_grad_enabled() and x.requires_grad)


class TorchLeNet(_Counted):
  """`PapernotLeNet` (softmax head) in PyTorch: normalise, conv1..conv4 3x3 VALID + ReLU with a
  2x2 max-pool after conv2 and conv4, fc1/fc2 + ReLU, fc3. NCHW images in [0, 1] -> logits.

  fc1 reads the NCHW flattening; `from_flax` permutes its rows from Flax's NHWC order.
  """

  kind = NATIVE

  def __init__(self, in_channels: int, side: int, mean: Sequence[float], std: Sequence[float],
               num_classes: int = 10, hidden: int = 200):
    super().__init__()
    nn = torch.nn
    self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
    self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))
    self.conv1 = nn.Conv2d(in_channels, 32, 3)
    self.conv2 = nn.Conv2d(32, 32, 3)
    self.conv3 = nn.Conv2d(32, 64, 3)
    self.conv4 = nn.Conv2d(64, 64, 3)
    self.fc1 = nn.Linear(64 * side * side, hidden)
    self.fc2 = nn.Linear(hidden, hidden)
    self.fc3 = nn.Linear(hidden, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    self._count(x)
    f = torch.nn.functional
    x = (x - self.mean) / self.std
    x = f.max_pool2d(f.relu(self.conv2(f.relu(self.conv1(x)))), 2)
    x = f.max_pool2d(f.relu(self.conv4(f.relu(self.conv3(x)))), 2)
    x = f.relu(self.fc1(x.flatten(1)))
    return self.fc3(f.relu(self.fc2(x)))

  @classmethod
  def from_flax(cls, module: Any, params: Any) -> TorchLeNet:
    """The torch twin of a `PapernotLeNet` module and its variables."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float32), params["params"])
    channels = p["conv4"]["kernel"].shape[-1]
    fan_in, hidden = p["fc1"]["kernel"].shape
    side = math.isqrt(fan_in // channels)
    if side * side * channels != fan_in:
      raise ValueError(f"fc1 reads {fan_in} features: not a square map of {channels} channels")
    net = cls(p["conv1"]["kernel"].shape[2], side, module.mean, module.std,
              p["fc3"]["kernel"].shape[1], hidden)
    state = {}
    for name in ("conv1", "conv2", "conv3", "conv4"):
      state[f"{name}.weight"] = p[name]["kernel"].transpose(3, 2, 0, 1)  # HWIO -> OIHW
      state[f"{name}.bias"] = p[name]["bias"]
    # Flax's fc1 rows run over (h, w, c); torch's flatten of NCHW over (c, h, w).
    fc1 = p["fc1"]["kernel"].reshape(side, side, channels, hidden).transpose(2, 0, 1, 3)
    state["fc1.weight"] = fc1.reshape(fan_in, hidden).T
    state["fc1.bias"] = p["fc1"]["bias"]
    for name in ("fc2", "fc3"):
      state[f"{name}.weight"] = p[name]["kernel"].T
      state[f"{name}.bias"] = p[name]["bias"]
    net.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()},
                        strict=False)  # mean and std are set by the constructor
    return net.eval()


def _bucket(n: int) -> int:
  """The padded batch size: the next power of two, at least 8."""
  return max(8, 1 << (n - 1).bit_length())


class _Jitted:
  """The jitted programs of one `apply_fn` on NCHW input, and the shapes they have run on."""

  def __init__(self, apply_fn: Callable[[Any, jnp.ndarray], jnp.ndarray]):
    def logits(params, x_nchw):
      return apply_fn(params, jnp.transpose(x_nchw, (0, 2, 3, 1)))

    self.forward = jax.jit(logits)
    self.forward_vjp = jax.jit(lambda params, x: jax.vjp(lambda x: logits(params, x), x))
    self.pullback = jax.jit(lambda vjp, g: vjp(g)[0])
    self.seen: set[tuple[str, tuple[int, ...]]] = set()


@functools.cache
def _cached_jitted(apply_fn) -> _Jitted:
  return _Jitted(apply_fn)


def _jitted(apply_fn) -> _Jitted:
  """One `_Jitted` per `apply_fn` (a zoo model's `ApplyFn` is equal for equal modules), so a
  second bridge to the same model compiles nothing."""
  try:
    return _cached_jitted(apply_fn)
  except TypeError:  # unhashable
    return _Jitted(apply_fn)


class JaxBridge:
  """Jitted JAX forward and vector-Jacobian product of `apply_fn(params, NHWC)`, called on NCHW
  numpy batches (zero-padded to `_bucket` sizes). Records the time of each first call per
  shape and program (`compile_seconds`: compilation plus one run)."""

  def __init__(self, apply_fn: Callable[[Any, jnp.ndarray], jnp.ndarray], params: Any):
    self.params = params
    self.compile_seconds = 0.0
    jitted = _jitted(apply_fn)
    self._forward, self._forward_vjp = jitted.forward, jitted.forward_vjp
    self._pullback, self._seen = jitted.pullback, jitted.seen

  def _timed(self, name: str, shape: tuple[int, ...], fn, *args):
    if (name, shape) in self._seen:
      return fn(*args)
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    self.compile_seconds += time.perf_counter() - start
    self._seen.add((name, shape))
    return out

  @staticmethod
  def _pad(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    size = _bucket(n)
    if size == n:
      return x
    return np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)])

  def logits(self, x: np.ndarray) -> np.ndarray:
    """Logits [n, K] of NCHW float32 images."""
    xp = self._pad(x)
    out = self._timed("forward", xp.shape, self._forward, self.params, xp)
    return np.array(out[: x.shape[0]])

  def logits_and_pullback(self, x: np.ndarray) -> tuple[np.ndarray, Any]:
    """Logits [n, K] and the VJP to hand back to `input_gradient`."""
    xp = self._pad(x)
    out, vjp = self._timed("forward_vjp", xp.shape, self._forward_vjp, self.params, xp)
    return np.array(out[: x.shape[0]]), vjp

  def input_gradient(self, vjp: Any, g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The NCHW gradient [n, C, H, W] of `sum(g * logits)` through `vjp`."""
    gp = self._pad(g)
    grad = self._timed("pullback", gp.shape, self._pullback, vjp, gp)
    return np.array(grad[: shape[0]])


class _JaxFunction(torch.autograd.Function):
  """torch -> numpy -> JAX: the forward keeps JAX's VJP (its residuals) for the backward."""

  @staticmethod
  def forward(ctx, x: torch.Tensor, bridge: JaxBridge) -> torch.Tensor:
    x_np = x.detach().to(torch.float32).contiguous().numpy()
    if ctx.needs_input_grad[0]:
      logits, vjp = bridge.logits_and_pullback(x_np)
      ctx.vjp, ctx.bridge, ctx.shape = vjp, bridge, x_np.shape
    else:
      logits = bridge.logits(x_np)
    return torch.from_numpy(logits)

  @staticmethod
  def backward(ctx, g: torch.Tensor):
    g_np = g.detach().to(torch.float32).contiguous().numpy()
    grad = ctx.bridge.input_gradient(ctx.vjp, g_np, ctx.shape)
    ctx.vjp = None
    return torch.from_numpy(grad), None


class BridgeModule(_Counted):
  """Any JAX `apply_fn(params, NHWC in [0, 1]) -> logits` as a torch module on NCHW images."""

  kind = BRIDGE

  def __init__(self, apply_fn: Callable[[Any, jnp.ndarray], jnp.ndarray], params: Any):
    super().__init__()
    self.bridge = JaxBridge(apply_fn, params)
    # torchattacks reads the device off the first parameter.
    self._device_anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    self._count(x)
    return _JaxFunction.apply(x, self.bridge)


def _is_native_lenet(module: Any, params: Any) -> bool:
  from advsweep.models import architectures

  if type(module) is not architectures.PapernotLeNet:
    return False
  if module.head != architectures.SOFTMAX or module.LAYERS != architectures.PapernotLeNet.LAYERS:
    return False
  inner = params.get("params", {}) if hasattr(params, "get") else {}
  return set(inner) == {"conv1", "conv2", "conv3", "conv4", "fc1", "fc2", "fc3"}


def torch_model(model: Any, params: Any = None, *, kind: str = "auto") -> torch.nn.Module:
  """A torch module (NCHW float images in [0, 1] -> logits) equal to a JAX model.

  Args:
    model: a `zoo.Model` (or anything with `apply_fn`, `params` and `module`), or a bare
      `apply_fn(params, images[B,H,W,C]) -> logits` with `params` given.
    params: the variables of a bare `apply_fn`; None for a Model.
    kind: `native` (the zoo's MNIST LeNet rebuilt in torch; ValueError for other models),
      `bridge` (JAX behind a `torch.autograd.Function`), or `auto`: native where it can be.

  Returns:
    an eval-mode module whose `kind` attribute says `native` or `bridge`, and which counts
    its forward calls (`calls`, `images`, `gradient_calls`; `reset_counts()`).
  """
  if kind not in KINDS:
    raise ValueError(f"unknown kind {kind!r}; valid choices: {', '.join(KINDS)}")
  if hasattr(model, "apply_fn"):
    if params is not None:
      raise ValueError("params is for a bare apply_fn; a Model carries its own")
    apply_fn, params, module = model.apply_fn, model.params, getattr(model, "module", None)
  elif callable(model):
    if params is None:
      raise ValueError("a bare apply_fn needs its params")
    apply_fn, module = model, None
  else:
    raise TypeError(f"expected a zoo.Model or an apply_fn, got {type(model).__name__}")
  native = module is not None and _is_native_lenet(module, params)
  if kind == NATIVE and not native:
    raise ValueError("kind='native' is only for the zoo's MNIST LeNet (PapernotLeNet, softmax "
                     "head); use kind='bridge' or 'auto'")
  if native and kind != BRIDGE:
    return TorchLeNet.from_flax(module, params)
  return BridgeModule(apply_fn, params).eval()


# ---------------------------------------------------------------------------------------------
# The run


def default_eps(dataset: str, norm: str) -> float:
  if (dataset, norm) not in DEFAULT_EPS:
    raise ValueError(f"no default eps for {dataset} {norm}; pass eps")
  return DEFAULT_EPS[(dataset, norm)]


def autoattack(net: torch.nn.Module, eps: float, norm: str = "linf", seed: int = 0,
               num_classes: int = 10, croce_hein: bool = False):
  """torchattacks' `AutoAttack(version="standard")` on `net`; with `croce_hein` its
  sub-attacks take the original's 100 iterations and Square's unrescaled p schedule."""
  import torchattacks

  atk = torchattacks.AutoAttack(net, norm=NORMS[norm], eps=eps, version="standard",
                                n_classes=num_classes, seed=seed)
  if croce_hein:
    for sub in atk._autoattack.attacks:
      if isinstance(sub, torchattacks.Square):
        sub.rescale_schedule = False
      else:
        sub.steps = 100
  return atk


def _settings(atk) -> dict[str, Any]:
  """The sub-attacks' iteration counts as run."""
  out = {}
  for sub in atk._autoattack.attacks:
    key = type(sub).__name__.lower()
    if hasattr(sub, "steps"):
      out[f"{key}_steps"] = sub.steps
    if hasattr(sub, "n_queries"):
      out["square_queries"] = sub.n_queries
      out["square_rescale_schedule"] = sub.rescale_schedule
  return out


def _jax_predictions(apply_fn, params, images_nhwc: np.ndarray, batch_size: int) -> np.ndarray:
  predict = _jitted_argmax(apply_fn)
  out = [np.asarray(predict(params, jnp.asarray(images_nhwc[i:i + batch_size])))
         for i in range(0, len(images_nhwc), batch_size)]
  return np.concatenate(out) if out else np.zeros((0,), np.int64)


@functools.cache
def _jitted_argmax(apply_fn):
  return jax.jit(lambda params, x: jnp.argmax(apply_fn(params, x), -1))


def perturbation_size(adv: np.ndarray, x: np.ndarray, norm: str) -> np.ndarray:
  """Per-image L-inf or L2 size of `adv - x`."""
  delta = (adv.astype(np.float64) - x.astype(np.float64)).reshape(len(x), -1)
  return np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta ** 2).sum(1))


# What a run's progress file adds up across its parts (an interrupted run and its resumes).
_COUNTS = ("seconds", "compile_seconds", "model_calls", "model_images", "gradient_calls")
_ATTACK_COUNTS = ("seconds", "model_calls", "model_images", "gradient_calls")


def _module_counts(net: Any) -> dict[str, int]:
  """The torch module's counts so far, under the names a run's result and ledger use."""
  return {"model_calls": net.calls, "model_images": net.images,
          "gradient_calls": net.gradient_calls}


class _AttackLedger:
  """Per sub-attack of torchattacks' AutoAttack: its wall time and the model calls, images and
  gradient calls made inside it (what the reference's cost is made of). Wraps each
  sub-attack's `forward` on this instance; the attack's outputs are untouched."""

  def __init__(self, atk: Any, net: Any, kept: dict[str, float] | None = None):
    self.net = net
    self.costs: dict[str, dict[str, float]] = {}
    for sub in atk._autoattack.attacks:
      name = _attack_name(sub)
      self.costs[name] = {k: float((kept or {}).get(f"{name}/{k}", 0.0))
                          for k in _ATTACK_COUNTS}
      sub.forward = self._timed(name, sub.forward)

  def _timed(self, name: str, forward):
    def wrapped(*args, **kwargs):
      before = _module_counts(self.net)
      tic = time.perf_counter()
      try:
        return forward(*args, **kwargs)
      finally:
        cost = self.costs[name]
        cost["seconds"] += time.perf_counter() - tic
        for key, now in _module_counts(self.net).items():
          cost[key] += now - before[key]
    return wrapped

  def flat(self) -> dict[str, np.float64]:
    """The costs as a progress file's scalars (`NAME/seconds`, ...)."""
    return {f"{name}/{k}": np.float64(v) for name, cost in self.costs.items()
            for k, v in cost.items()}


def _attack_name(sub: Any) -> str:
  """AutoAttack's name for a torchattacks sub-attack: APGD-CE, APGD-T, FAB-T, Square."""
  kind = type(sub).__name__
  return {"APGD": "APGD-CE", "APGDT": "APGD-T", "FAB": "FAB-T"}.get(kind, kind)


def _totals(before: dict[str, float], net: Any, start: float,
            compile_before: float) -> dict[str, float]:
  """The earlier parts' counts plus this part's so far."""
  bridge = getattr(net, "bridge", None)
  part = {"seconds": time.perf_counter() - start,
          "compile_seconds": (bridge.compile_seconds - compile_before) if bridge else 0.0,
          **_module_counts(net)}
  return {k: before[k] + part[k] for k in _COUNTS}


def run(name: Any, num_images: int = 1000, eps: float | None = None, norm: str = "linf",
        batch_size: int = DEFAULT_BATCH_SIZE, data_dir: str | os.PathLike | None = None,
        seed: int = 0, *, kind: str = "auto", croce_hein: bool = False,
        threads: int | None = None, images: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        progress_path: str | os.PathLike | None = None) -> dict[str, Any]:
  """torchattacks' standard AutoAttack on the first `num_images` test images of a model.

  Args:
    name: a zoo model's name, or a `zoo.Model`.
    num_images: how many of the first test images.
    eps: perturbation size; default `DEFAULT_EPS` of the model's dataset and norm.
    norm: `linf` or `l2`.
    batch_size: images per `AutoAttack` call.
    data_dir: where the dataset lives (default `$ADVSWEEP_DATA_DIR`).
    seed: AutoAttack's seed.
    kind: `auto`, `native` or `bridge` (`torch_model`).
    croce_hein: run the sub-attacks at the original's settings (module docstring).
    threads: `torch.set_num_threads` for the attack (restored after); None leaves torch's
      default (one thread a core). On a CPU that other jobs share, torch's default threads
      wait on each other at every operation: the LeNet's forward pass of 100 images took
      0.21 s on 2 threads and 0.043 s on 1 on the 2-core machine under load.
    images, labels: uint8 NHWC images and their labels in place of the dataset's.
    progress_path: where to keep the batches done (`bench.evaluation.progress`'s file), so
      that an interrupted run resumes at its next batch. torchattacks seeds every sub-attack
      at each call, so a resumed run returns what an uninterrupted one does; its `seconds`
      and counts add up the parts. The file is removed when the run ends.

  Returns:
    per-image arrays `index`, `label`, `clean_correct`, `robust` (the JAX model's prediction on
    the returned image is the label), `within_eps` (the returned image lies in the eps ball
    and in [0, 1]), `perturbation` (its size in `norm`), `torch_robust` (the same check with
    the torch module) and `adversarial` (NHWC float32); and `seconds` (the attack's wall time,
    conversion and one warm-up forward and backward pass excluded), `compile_seconds` (the
    bridge's first calls per shape, inside `seconds`), `model_calls`, `model_images`,
    `gradient_calls` (the torch module's forward calls during the attack), `torch_threads`,
    `violations`, the accuracies, `kind`, the settings and versions.
  """
  from advsweep.models import datasets, zoo

  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}; valid choices: {', '.join(NORMS)}")
  if batch_size < 1 or num_images < 1:
    raise ValueError("batch_size and num_images must be at least 1")
  model = zoo.load(name) if isinstance(name, str) else name
  dataset = model.meta.get("dataset", "")
  if images is None:
    images, labels = datasets.load(dataset, "test", data_dir)
  images, labels = images[:num_images], np.asarray(labels[:num_images]).astype(np.int64)
  n = len(images)
  eps = default_eps(dataset, norm) if eps is None else float(eps)
  x = images.astype(np.float32) / np.float32(255.0)  # NHWC in [0, 1]
  num_classes = int(jax.eval_shape(model.apply_fn, model.params, x[:1]).shape[-1])

  net = torch_model(model, kind=kind)
  atk = autoattack(net, eps, norm, seed, num_classes, croce_hein)
  bridge = getattr(net, "bridge", None)
  x_t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  y_t = torch.from_numpy(labels)
  default_threads = torch.get_num_threads()
  if threads is not None:
    torch.set_num_threads(threads)
  stamp = progress.fingerprint(model.params, images, labels, np.arange(n), {
      "eps": eps, "norm": norm, "seed": seed, "batch_size": batch_size, "kind": net.kind,
      "croce_hein": croce_hein, **_settings(atk), **versions()})
  kept = progress.load(progress_path, stamp) if progress_path is not None else None
  adv = [torch.from_numpy(kept["adversarial"])] if kept is not None else []
  before = {k: float(kept[k]) if kept is not None else 0.0 for k in _COUNTS}
  ledger = _AttackLedger(atk, net, kept)
  try:
    warm = x_t[:batch_size].clone().requires_grad_()  # torch's and the bridge's first calls
    net(warm).sum().backward()
    compile_before = bridge.compile_seconds if bridge else 0.0
    net.reset_counts()
    torch_threads = torch.get_num_threads()
    start = time.perf_counter()
    for i in range(sum(map(len, adv)), n, batch_size):
      adv.append(atk(x_t[i:i + batch_size], y_t[i:i + batch_size]).detach())
      if progress_path is not None and i + batch_size < n:
        totals = _totals(before, net, start, compile_before)
        progress.save(progress_path, stamp, {"adversarial": torch.cat(adv).numpy(),
                                             **{k: np.float64(v) for k, v in totals.items()},
                                             **ledger.flat()})
    totals = _totals(before, net, start, compile_before)
  finally:
    torch.set_num_threads(default_threads)
  progress.remove(progress_path)
  seconds = totals["seconds"]
  counts = {k: int(totals[k]) for k in ("model_calls", "model_images", "gradient_calls")}
  adv_t = torch.cat(adv)
  with torch.no_grad():
    torch_pred = torch.cat([net(adv_t[i:i + batch_size]).argmax(1)
                            for i in range(0, n, batch_size)]).numpy()
  adv_nhwc = np.ascontiguousarray(adv_t.numpy().transpose(0, 2, 3, 1))

  clean_pred = _jax_predictions(model.apply_fn, model.params, x, batch_size)
  adv_pred = _jax_predictions(model.apply_fn, model.params, adv_nhwc, batch_size)
  size = perturbation_size(adv_nhwc, x, norm)
  in_range = (adv_nhwc.reshape(n, -1).min(1) >= 0) & (adv_nhwc.reshape(n, -1).max(1) <= 1)
  within = (size <= eps + EPS_TOLERANCE) & in_range
  clean_correct, robust = clean_pred == labels, adv_pred == labels
  return {
      "model": model.name, "dataset": dataset, "sha256": model.meta.get("sha256", ""),
      "norm": norm, "eps": eps, "num_images": n, "batch_size": batch_size, "seed": seed,
      "kind": net.kind, "croce_hein": croce_hein, **_settings(atk), **versions(),
      "torch_threads": torch_threads, "seconds": seconds,
      "compile_seconds": totals["compile_seconds"], **counts,
      "attack_costs": {name: {k: (v if k == "seconds" else int(v)) for k, v in cost.items()}
                       for name, cost in ledger.costs.items()},
      "clean_accuracy": float(clean_correct.mean()), "robust_accuracy": float(robust.mean()),
      "violations": int((~within).sum()),
      "torch_jax_disagreements": int((robust != (torch_pred == labels)).sum()),
      "index": np.arange(n), "label": labels, "clean_correct": clean_correct,
      "robust": robust, "torch_robust": torch_pred == labels, "within_eps": within,
      "perturbation": size, "adversarial": adv_nhwc,
  }


ROW_COLUMNS = ("index", "label", "clean_correct", "robust", "within_eps")
SUMMARY_KEYS = ("model", "dataset", "sha256", "norm", "eps", "num_images", "batch_size", "seed",
                "kind", "croce_hein", "torch", "torchattacks", "torch_threads", "seconds",
                "compile_seconds",
                "model_calls", "model_images", "gradient_calls", "clean_accuracy",
                "robust_accuracy", "violations", "torch_jax_disagreements")


def summary(result: dict[str, Any]) -> dict[str, Any]:
  """The run-level fields of a `run` result (no per-image arrays)."""
  keys = [*SUMMARY_KEYS, *(k for k in result if k.endswith(("_steps", "_queries", "_schedule")))]
  return {k: result[k] for k in keys if k in result}


def write_rows(result: dict[str, Any], path: str | os.PathLike) -> Path:
  """Writes the per-image rows (and the run's summary as the schema's metadata) to a parquet
  file, atomically: a temporary file in the same folder, then `os.replace`."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  n = len(result["index"])
  table = pa.table({
      "model": [result["model"]] * n,
      **{c: np.asarray(result[c]) for c in ROW_COLUMNS},
  })
  table = table.replace_schema_metadata(
      {"advsweep.reference_autoattack": json.dumps(summary(result), default=str)})
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(fd)
  try:
    pq.write_table(table, tmp)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return path


def measure_batch_sizes(name: str, sizes: Sequence[int] = (100, 250, 500, 1000),
                        square_queries: int = 20, data_dir: str | os.PathLike | None = None,
                        log: Callable[[str], None] = print) -> dict[int, dict[str, float]]:
  """Milliseconds per image of AutoAttack's two kinds of work at each batch size, on the first
  `size` test images: APGD-CE as AutoAttack runs it (10 gradient steps) and Square at
  `square_queries` queries (forward passes only), each from the clean images. A cheaper
  stand-in for the whole evaluation: how `DEFAULT_BATCH_SIZE` was chosen."""
  from advsweep.models import datasets, zoo

  model = zoo.load(name)
  dataset = model.meta["dataset"]
  images, labels = datasets.load(dataset, "test", data_dir)
  net = torch_model(model)
  atk = autoattack(net, default_eps(dataset, "linf"))
  apgd, *_, square = atk._autoattack.attacks
  square.n_queries = square_queries
  out = {}
  for size in sizes:
    x = torch.from_numpy(np.ascontiguousarray(
        images[:size].astype(np.float32).transpose(0, 3, 1, 2) / 255))
    y = torch.from_numpy(np.asarray(labels[:size]).astype(np.int64))
    out[size] = {}
    for label, sub in (("apgd_ce", apgd), ("square", square)):
      start = time.perf_counter()
      sub(x, y)
      out[size][label] = (time.perf_counter() - start) / len(x) * 1e3
    log(f"batch {size}: APGD-CE {out[size]['apgd_ce']:.2f} ms an image, Square "
        f"({square_queries} queries) {out[size]['square']:.2f} ms an image ({net.kind})")
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m advsweep.bench.perf.reference_autoattack",
      description="torchattacks' standard AutoAttack on a zoo model (the reference).")
  parser.add_argument("model")
  parser.add_argument("--n", type=int, default=1000, help="first N test images (1000)")
  parser.add_argument("--eps", type=float, default=None,
                      help="default: mnist 0.3, fashion_mnist 0.1, cifar10 8/255 (L2: 0.5)")
  parser.add_argument("--norm", choices=sorted(NORMS), default="linf")
  parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--kind", choices=KINDS, default="auto")
  parser.add_argument("--threads", type=int, default=None,
                      help="torch.set_num_threads for the attack (default: torch's own)")
  parser.add_argument("--croce-hein", action="store_true",
                      help="100 iterations for APGD/APGD-T/FAB-T and Square's unrescaled "
                           "schedule, as Croce & Hein's code (torchattacks runs 10)")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--out", default=None, help="per-image rows to this parquet file")
  args = parser.parse_args(argv)
  result = run(args.model, args.n, args.eps, args.norm, args.batch_size, args.data_dir,
               args.seed, kind=args.kind, croce_hein=args.croce_hein, threads=args.threads)
  n = result["num_images"]
  steps = ", ".join(f"{k} {v}" for k, v in summary(result).items()
                    if k.endswith(("_steps", "_queries")))
  print(f"{result['model']} ({result['kind']}; torch {result['torch']}, torchattacks "
        f"{result['torchattacks']}): AutoAttack standard, {args.norm} eps {result['eps']:g}, "
        f"{steps}")
  print(f"  clean accuracy  {result['clean_accuracy']:.1%} ({int(result['clean_correct'].sum())}"
        f"/{n})")
  print(f"  robust accuracy {result['robust_accuracy']:.1%} ({int(result['robust'].sum())}/{n})")
  print(f"  {result['seconds']:.1f} s (batch {result['batch_size']}, "
        f"{result['torch_threads']} torch threads; "
        f"{result['model_calls']} model calls, {result['gradient_calls']} with gradient"
        + (f"; {result['compile_seconds']:.1f} s compiling" if result["kind"] == BRIDGE else "")
        + ")")
  if result["violations"]:
    print(f"  WARNING: {result['violations']} returned images lie outside the eps ball or "
          "[0, 1]")
  if result["torch_jax_disagreements"]:
    print(f"  note: torch and JAX disagree on {result['torch_jax_disagreements']} adversarial "
          "predictions (robust uses JAX's)")
  if args.out:
    print(f"  rows: {write_rows(result, args.out)}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
