"""The model zoo: each entry is a constructor, a checkpoint file and a JSON metadata file.

`load(name)` returns a `Model` with a pure `apply_fn(params, images[B,H,W,C] in [0,1]) ->
logits[B,K]`, its `params` (all variables, BatchNorm statistics included) and `meta`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from advsweep.models import architectures, checkpoints, datasets, locality

CHECKPOINT_DIR = Path(__file__).resolve().parent / "trained"


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
  """How the shipped checkpoint was trained (`advsweep train NAME` uses it)."""

  epochs: int
  batch_size: int
  optimizer: str  # "adam" or "sgd" (Nesterov momentum 0.9)
  peak_lr: float
  weight_decay: float = 0.0
  augment: bool = False  # random horizontal flip and +-2 pixel translation
  warmup_fraction: float = 0.15


@dataclasses.dataclass(frozen=True)
class ZooEntry:
  name: str
  dataset: str
  architecture: str
  constructor: Callable[[], nn.Module]
  recipe: TrainRecipe
  note: str = ""

  @property
  def checkpoint(self) -> Path:
    return CHECKPOINT_DIR / f"{self.name}.msgpack"


def _entry(name, dataset, architecture, constructor, recipe, note=""):
  return name, ZooEntry(name, dataset, architecture, constructor, recipe, note)


_MNIST_ADAM = TrainRecipe(epochs=6, batch_size=128, optimizer="adam", peak_lr=2e-3)
_CIFAR_SGD = dict(batch_size=256, optimizer="sgd", peak_lr=0.2, weight_decay=5e-4,
                  augment=True)

ZOO: dict[str, ZooEntry] = dict([
    _entry("mnist_lenet", "mnist", "PapernotLeNet", architectures.PapernotLeNet,
           _MNIST_ADAM, "Papernot et al. (2016) Table 1 network, the JSMA target"),
    _entry("mnist_softmax", "mnist", "SoftmaxRegression", architectures.SoftmaxRegression,
           TrainRecipe(epochs=10, batch_size=128, optimizer="adam", peak_lr=1e-2),
           "shallow softmax of Goodfellow et al. (2015), raw [0,1] pixels"),
    _entry("fashion_mnist_lenet", "fashion_mnist", "PapernotLeNet",
           functools.partial(architectures.PapernotLeNet,
                             mean=architectures.FASHION_MNIST_MEAN,
                             std=architectures.FASHION_MNIST_STD),
           dataclasses.replace(_MNIST_ADAM, epochs=5),
           "Papernot et al.'s LeNet trained on Fashion-MNIST"),
    _entry("cifar10_allconv", "cifar10", "AllConvC",
           functools.partial(architectures.AllConvC, width=1 / 3),
           TrainRecipe(epochs=9, **_CIFAR_SGD),
           "All-CNN-C with BatchNorm at 1/3 width (32/64 channels) for CPU training"),
    _entry("cifar10_nin", "cifar10", "NiN",
           functools.partial(architectures.NiN, width=1 / 3),
           TrainRecipe(epochs=8, **_CIFAR_SGD),
           "Network in Network with BatchNorm at 1/3 width (64/53/32 channels)"),
    _entry("cifar10_vgg", "cifar10", "VGG16",
           functools.partial(architectures.VGG16, width=0.25),
           TrainRecipe(epochs=10, **_CIFAR_SGD),
           "VGG-16 with BatchNorm at 1/4 width (16..128 channels)"),
    _entry("cifar10_resnet20", "cifar10", "ResNet20", architectures.ResNet20,
           TrainRecipe(epochs=6, **_CIFAR_SGD),
           "ResNet-20 at full width (16/32/64 channels)"),
])


def entry(name: str) -> ZooEntry:
  if name not in ZOO:
    raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(ZOO)}")
  return ZOO[name]


@dataclasses.dataclass(frozen=True)
class ApplyFn:
  """Pure inference `(params, images[B,H,W,C] in [0, 1]) -> logits[B,K]` of a zoo module.

  Equal (and hashed alike) for equal modules, so every load of a zoo model shares the jit
  caches that key on `apply_fn` (static arguments, `attacks.common.bind`).
  """

  module: nn.Module

  def __call__(self, params: Any, images: jnp.ndarray) -> jnp.ndarray:
    return self.module.apply(params, images, train=False)


@dataclasses.dataclass(frozen=True, eq=False)  # identity hash: jit caches key on apply_fn
class Model:
  """A model ready to attack: a zoo model, or a user's (`models.custom.model`).

  Attributes:
    name: zoo name, or the name a user's model goes by in the rows.
    module: the zoo's Flax module, or None for a user's model.
    params: the first argument of `apply_fn` (a zoo model's variables, `{"params": ...,
      "batch_stats": ...}`; any pytree for a user's model).
    meta: the metadata dict (dataset, number of classes, sha256, and for the zoo the
      architecture, accuracy and training command).
    function: a user's `apply_fn`, where there is no zoo module.
  """

  name: str
  module: nn.Module | None
  params: Any
  meta: dict
  function: Callable[[Any, jnp.ndarray], jnp.ndarray] | None = None

  @functools.cached_property
  def apply_fn(self) -> Callable[[Any, jnp.ndarray], jnp.ndarray]:
    """Pure inference: `apply_fn(params, images[B,H,W,C] in [0, 1]) -> logits[B,K]`."""
    return self.function if self.function is not None else ApplyFn(self.module)

  @functools.cached_property
  def pixel_evaluator(self) -> locality.PixelSplicer | None:
    """The exact pixel-local evaluator of this architecture (`models.locality`), or None
    where it has none (every user's model, so far): pass it to the one-pixel attack as
    `evaluator=`."""
    return None if self.module is None else locality.splicer_for(self.module)

  def intermediates(self, params: Any, images: jnp.ndarray
                    ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Logits and every layer's post-activation output, keyed by layer name."""
    logits, state = self.module.apply(params, images, train=False,
                                      mutable=["intermediates"])
    flat = {k: v[0] for k, v in state["intermediates"].items()}
    return logits, flat


def init_variables(module: nn.Module, dataset: str, key: jax.Array) -> Any:
  """Fresh variables of `module` for images of `dataset`."""
  h, w, c = datasets.info(dataset).shape
  return module.init(key, jnp.zeros((1, h, w, c), jnp.float32), train=False)


def load(name: str, checkpoint_dir: str | Path | None = None) -> Model:
  """Loads zoo model `name` from its shipped checkpoint (or `checkpoint_dir`)."""
  spec = entry(name)
  path = (Path(checkpoint_dir) / spec.checkpoint.name) if checkpoint_dir else spec.checkpoint
  meta = checkpoints.load_meta(path)
  module = spec.constructor()
  target = jax.eval_shape(lambda: init_variables(module, spec.dataset, jax.random.key(0)))
  target = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), target)
  params = checkpoints.load(path, target, meta)
  return Model(name=name, module=module, params=params, meta=meta)


def available(checkpoint_dir: str | Path | None = None) -> list[str]:
  """Zoo names whose checkpoint files exist."""
  folder = Path(checkpoint_dir) if checkpoint_dir else CHECKPOINT_DIR
  return [n for n, e in ZOO.items() if (folder / e.checkpoint.name).is_file()]
