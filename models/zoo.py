"""The model zoo: each entry is a constructor, a checkpoint file and a JSON metadata file.

`load(name)` returns a `Model` with a pure `apply_fn(params, images[B,H,W,C] in [0,1]) ->
logits[B,K]`, its `params` (all variables, BatchNorm statistics included) and `meta`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from advsweep.models import architectures, checkpoints, datasets

if TYPE_CHECKING:
  from advsweep.attacks.pixel_local import PixelSplicer

CHECKPOINT_DIR = Path(__file__).resolve().parent / "trained"


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
  """How the shipped checkpoint was trained (`advsweep train NAME` uses it).

  The adversarial fields make a defense's recipe (`models.training`): each step attacks the
  batch with `adversary` at `epsilon` and trains on the mixed loss of Goodfellow et al.,
  `clean_weight * L(x) + (1 - clean_weight) * L(x_adv)`, plus Kannan et al.'s logit pairing
  `logit_pairing * ||z(x) - z(x_adv)||^2` where that weight is positive.

  Attributes:
    adversary: None (plain training), "fgsm" (Goodfellow et al.), "fgsm_rs" (FGSM from a
      uniform random start with step `adv_step`: Wong, Rice, Kolter 2020), "pgd" (Madry
      et al.: `adv_steps` steps of `adv_step` from a random start) or "n_fgsm" (de Jorge et
      al. 2022: noise of half-width `adv_noise * epsilon`, one step of `adv_step`, no
      projection onto the eps ball; `models.training.n_fgsm`) or "advgan" (the slides on
      Papernot et al.: adversarial examples from a generator, here the untargeted AdvGAN
      generator at `epsilon` trained against zoo model `adv_generator`, a static copy).
    epsilon: the L-inf budget of the training attack, in [0, 1] pixel units.
    adv_step: the attack's step (None: eps for FGSM, 1.25 eps for FGSM-RS, 2.5 eps / steps
      for PGD, the papers' settings).
    adv_steps: PGD's step count.
    adv_noise: N-FGSM's noise half-width in units of epsilon (de Jorge et al.: 2).
    clean_weight: alpha of the mixed loss (0.5 Goodfellow et al.; 0: only adversarial).
    logit_pairing: lambda of adversarial logit pairing (0: none).
    loss: "cross_entropy", or "gauss" (the Gauss network's binary cross-entropy,
      `architectures.gauss_loss`).
    overfit_guard: four times an epoch, measure PGD-10 accuracy on a fixed batch of
      training images; ship the weights of the best check (the metadata's
      `overfit_guard.kept` names it), and stop early when accuracy falls more than 20 points
      below the best (Wong et al.'s guard against catastrophic overfitting).
    domain_weight: weight of the domain-adaptation loss (Ciprijanovic et al.): the maximum
      mean discrepancy between the penultimate features of the clean batch and of
      Poisson-noised training images (`models.domain`); 0: none.
    domain_exposure: the noisy domain's Poisson exposure (`transforms.poisson_noise`).
    epsilon_ramp: the share of the steps over which the training attack's eps grows
      linearly from 0 to `epsilon` (0: the full eps from the first step).
    adv_generator: for the "advgan" adversary, the zoo model whose AdvGAN generator makes
      the training examples (shipped in `models/trained/gan/`).
    init_from: "" (random initialisation), or the zoo name whose trained checkpoint starts
      the weights: adversarial fine-tuning of a trained network, the usual way to fit
      adversarial training into a small budget. Arrays the two modules share (same path and
      shape) are copied; the rest (a denoising block, another head) keep their
      initialisation (`train.warm_start`).
  """

  epochs: int
  batch_size: int
  optimizer: str  # "adam" or "sgd" (Nesterov momentum 0.9)
  peak_lr: float
  weight_decay: float = 0.0
  augment: bool = False  # random horizontal flip and +-2 pixel translation
  warmup_fraction: float = 0.15
  adversary: str | None = None
  epsilon: float = 0.0
  adv_step: float | None = None
  adv_steps: int = 1
  clean_weight: float = 0.5
  logit_pairing: float = 0.0
  loss: str = "cross_entropy"
  overfit_guard: bool = False
  epsilon_ramp: float = 0.0
  domain_weight: float = 0.0
  domain_exposure: float = 0.0
  init_from: str = ""
  adv_noise: float = 0.0
  adv_generator: str = ""


# Recipe fields added after models shipped: left out of a recipe's JSON at their default, so
# the metadata and the resume states of earlier recipes keep their fingerprints.
RECIPE_OMIT_AT_DEFAULT = ("domain_weight", "domain_exposure", "init_from", "adv_noise",
                          "adv_generator")


def recipe_dict(recipe: TrainRecipe) -> dict[str, Any]:
  """The recipe as JSON-ready fields (the metadata's `recipe`, the resume fingerprint)."""
  out = dataclasses.asdict(recipe)
  for field in dataclasses.fields(recipe):
    if field.name in RECIPE_OMIT_AT_DEFAULT and out[field.name] == field.default:
      del out[field.name]
  return out


@dataclasses.dataclass(frozen=True)
class ZooEntry:
  name: str
  dataset: str
  architecture: str
  constructor: Callable[[], nn.Module]
  recipe: TrainRecipe
  note: str = ""
  defense: str = ""  # the recipe's defense, "" for an undefended model
  twin: str = ""     # the undefended (or un-denoised) model it is measured beside
  # A defended model trained the same way but for this defense's own term, compared with it
  # image by image too (the logit-paired LeNet beside the PGD-trained one: Mosbach et al.).
  beside: str = ""

  @property
  def checkpoint(self) -> Path:
    return CHECKPOINT_DIR / f"{self.name}.msgpack"


def _entry(name, dataset, architecture, constructor, recipe, note="", defense="", twin="",
           beside=""):
  return name, ZooEntry(name, dataset, architecture, constructor, recipe, note, defense, twin,
                        beside)


_MNIST_ADAM = TrainRecipe(epochs=6, batch_size=128, optimizer="adam", peak_lr=2e-3)
# Madry et al.'s MNIST defense sized for this CPU: PGD-7 with step 0.1 from a random start
# (their PGD-40 with step 0.01 costs 5x more per epoch), eps ramped over the first epoch.
_MNIST_PGD = TrainRecipe(
    epochs=8, batch_size=128, optimizer="adam", peak_lr=1e-3, adversary="pgd", epsilon=0.3,
    adv_step=0.1, adv_steps=7, clean_weight=0.0, overfit_guard=True, epsilon_ramp=1 / 8)
_CIFAR_SGD = dict(batch_size=256, optimizer="sgd", peak_lr=0.2, weight_decay=5e-4,
                  augment=True)

# CIFAR-10 defenses: Madry et al.'s PGD training sized for this CPU, PGD-2 with steps of
# eps / 2 from a random start (Andriushchenko and Flammarion's two-step baseline: three
# passes an image), 15 epochs of Wong et al.'s cyclic schedule. Multi-step, because
# single-step training overfits catastrophically on this ResNet-20 (trained-defenses guide).
_CIFAR_PGD = TrainRecipe(
    epochs=15, adversary="pgd", epsilon=8 / 255, adv_step=4 / 255, adv_steps=2,
    clean_weight=0.0, overfit_guard=True, warmup_fraction=0.5,
    **{**_CIFAR_SGD, "batch_size": 128})

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
    # Defenses (`models.training`): each beside the twin it is measured against.
    _entry("mnist_lenet_fgsm", "mnist", "PapernotLeNet", architectures.PapernotLeNet,
           dataclasses.replace(_MNIST_ADAM, epochs=1, adversary="fgsm", epsilon=0.25,
                               clean_weight=0.5),
           "a one-step defense as the paper did it: adversarial training with the mixed loss, "
           "alpha 0.5, FGSM at eps 0.25 (Goodfellow et al. 2015, Sec. 6)", "adv_train:fgsm",
           "mnist_lenet"),
    _entry("mnist_lenet_pgd", "mnist", "PapernotLeNet", architectures.PapernotLeNet,
           _MNIST_PGD,
           "Madry et al.'s adversarial-only training at eps 0.3: PGD-7 (step 0.1, random "
           "start) in place of their PGD-40 for CPU time, 8 epochs, eps growing over the first "
           "epoch, the weights of the best overfitting check shipped", "adv_train:pgd",
           "mnist_lenet"),
    _entry("mnist_lenet_alp", "mnist", "PapernotLeNet", architectures.PapernotLeNet,
           dataclasses.replace(_MNIST_PGD, clean_weight=0.5, logit_pairing=0.5),
           "adversarial logit pairing, Mosbach et al.'s \"50% AT + ALP\" (Kannan et al. 2018): "
           "half clean, half PGD-7 examples, lambda 0.5, on mnist_lenet_pgd's schedule",
           "alp", "mnist_lenet", beside="mnist_lenet_pgd"),
    _entry("mnist_lenet_advgan", "mnist", "PapernotLeNet", architectures.PapernotLeNet,
           dataclasses.replace(_MNIST_ADAM, adversary="advgan", epsilon=0.3,
                               clean_weight=0.5, adv_generator="mnist_lenet"),
           "the slides' GAN defense (Papernot et al.'s \"Defenses\"): the mixed loss, alpha "
           "0.5, on AdvGAN examples at eps 0.3 from the generator trained against "
           "mnist_lenet (a static copy), on its twin's schedule", "adv_train:advgan",
           "mnist_lenet"),
    _entry("mnist_lenet_gauss", "mnist", "PapernotLeNet",
           functools.partial(architectures.PapernotLeNet, head=architectures.GAUSS),
           dataclasses.replace(_MNIST_ADAM, loss="gauss"),
           "Gauss network (Hess et al. 2020): class centroids in place of the softmax layer, "
           "on its twin's schedule", "gauss", "mnist_lenet"),
    _entry("cifar10_resnet20_gauss", "cifar10", "ResNet20",
           functools.partial(architectures.ResNet20, head=architectures.GAUSS),
           TrainRecipe(epochs=6, loss="gauss", **_CIFAR_SGD),
           "Gauss network (Hess et al. 2020) on ResNet-20, on its twin's schedule", "gauss",
           "cifar10_resnet20"),
    _entry("cifar10_resnet20_adv", "cifar10", "ResNet20", architectures.ResNet20,
           _CIFAR_PGD,
           "PGD adversarial training at eps 8/255 (Madry et al.): PGD-2, steps of 4/255 from "
           "a random start, 15 epochs from scratch, cyclic learning rate, with the "
           "overfitting guard", "adv_train:pgd", "cifar10_resnet20"),
    _entry("cifar10_resnet20_denoise", "cifar10", "ResNet20",
           functools.partial(architectures.ResNet20, denoise_after=(2, 3)), _CIFAR_PGD,
           "cifar10_resnet20_adv with non-local-means denoising blocks after stages 2 and 3 "
           "(Xie et al. 2019), the same recipe and seed", "adv_train:pgd+denoise",
           "cifar10_resnet20_adv"),
    # The GPU recipe: the same training at four times the width (4.3M parameters), which
    # this CPU cannot train in a sitting (`advsweep train cifar10_wide_resnet20_adv`).
    _entry("cifar10_wide_resnet20_adv", "cifar10", "ResNet20",
           functools.partial(architectures.ResNet20, width=4.0),
           dataclasses.replace(_CIFAR_PGD, batch_size=512),
           "cifar10_resnet20_adv at 4x width (64/128/256 channels) for an accelerator",
           "adv_train:pgd", "cifar10_resnet20"),
    _entry("cifar10_resnet20_da", "cifar10", "ResNet20", architectures.ResNet20,
           TrainRecipe(epochs=6, domain_weight=1.0, domain_exposure=30.0, **_CIFAR_SGD),
           "cifar10_resnet20's recipe plus domain adaptation (Ciprijanovic et al.): MMD between "
           "the latent features of clean and Poisson-noised (exposure 30) images",
           "domain_adaptation:poisson30", "cifar10_resnet20"),
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
  def undefended(self) -> Model | None:
    """The twin a trained defense is measured beside (`meta["twin"]`), loaded from the
    shipped zoo: the source of the transfer attacks (`bench.checks.masking`). None for a model
    without a twin, or whose twin is not trained."""
    twin = self.meta.get("twin")
    if not twin or twin not in ZOO or twin not in available():
      return None
    return load(twin)

  @functools.cached_property
  def pixel_evaluator(self) -> PixelSplicer | None:
    """The exact pixel-local evaluator of this model, derived from its computation
    (`attacks.pixel_local`; a zoo model's or a user's): pass it to the one-pixel attack as
    `evaluator=`. Where no early layer is local (a dense first layer) its plan is the full
    forward pass, and the attack's rows say `evaluation = full`."""
    from advsweep.attacks import pixel_local  # here: the attacks import evosax, which starts
    # JAX's backend, and `jax.distributed` must start first (`bench.driver.distributed`)

    return pixel_local.splicer_for(self.apply_fn)

  @property
  def randomized(self) -> bool:
    """Whether the forward pass draws anew on every call (an input defense such as
    `randomize`); a plain model is deterministic."""
    return False

  def attack_apply_fn(self, bpda: bool = False, eot_samples: int = 1
                      ) -> Callable[[Any, jnp.ndarray], jnp.ndarray]:
    """What an attack differentiates: a plain model's own `apply_fn` (an input defense
    answers with BPDA or EOT where asked, `models.defenses`)."""
    del bpda
    check_eot_samples(eot_samples)
    return self.apply_fn

  def with_draws(self, key: jax.Array) -> Model:
    """The same model under another key of its randomness: a plain model has none."""
    del key
    return self

  def intermediates(self, params: Any, images: jnp.ndarray
                    ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Logits and every layer's post-activation output, keyed by layer name."""
    logits, state = self.module.apply(params, images, train=False,
                                      mutable=["intermediates"])
    flat = {k: v[0] for k, v in state["intermediates"].items()}
    return logits, flat


def check_eot_samples(samples: Any) -> None:
  """Raises ValueError unless `samples` (draws an EOT forward pass averages) is an integer
  >= 1; 1 is no averaging."""
  if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
    raise ValueError(f"EOT samples must be an integer >= 1 (draws averaged per forward pass, "
                     f"1: no averaging); got {samples!r}")


def init_variables(module: nn.Module, dataset: str, key: jax.Array) -> Any:
  """Fresh variables of `module` for images of `dataset` (one compiled program, not one
  per initialiser)."""
  return _init(module, datasets.info(dataset).shape, key)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init(module: nn.Module, shape: tuple[int, int, int], key: jax.Array) -> Any:
  return module.init(key, jnp.zeros((1, *shape), jnp.float32), train=False)


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
