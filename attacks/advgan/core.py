"""The AdvGAN attack: one forward pass of a generator trained against the target model.

The adversarial image is `clip(x + eps * G(x, t), 0, 1)`: the generator's tanh output scaled
to the L-inf budget and clipped to the image range, so AdvGAN sits in the same tables as
the other eps-bounded attacks. At attack time the target model is not queried (the paper's
semi-whitebox setting: its gradients were used only to train the generator); the
least-likely target mode spends one clean forward pass to pick the class.

`advgan_core` is pure: it runs under `jax.jit`, `jax.vmap` and inside a jitted training
step. The generator's variables travel in the config (`AdvGANConfig.generator`), filled in
for each target model by `advsweep.models.gan.generators.bind` (the driver does it); the
generator is trained by `attacks.advgan.training`.

References: Xiao, Li, Zhu, He, Liu, Song, Generating Adversarial Examples with Adversarial
Networks, IJCAI 2018.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from advsweep.attacks import checks, common
from advsweep.attacks.advgan.networks import PerturbationGenerator

GENERATOR_FIELD = "generator"


@struct.dataclass
class AdvGANConfig:
  """AdvGAN attack settings; the default eps is the paper's MNIST budget.

  Attributes:
    eps: the L-inf budget in [0, 1] pixel units; the generator must have been trained at
      it (`generators.bind` finds or trains the one for the model and eps).
    target: a mode of `attacks.common.TARGET_MODES`; every mode but "untargeted" uses the
      targeted generator, which takes the target class as input.
    width: the generator's first-layer channels (the paper's 8).
    generator: the generator's variables (`{"params": ...}`), trained against the model
      under attack; None until bound.
    image_shape: the [H, W, C] of the images the generator was trained on (set with it);
      images of another shape are refused.
  """

  eps: float = 0.3
  target: str = struct.field(pytree_node=False, default=common.UNTARGETED)
  width: int = struct.field(pytree_node=False, default=8)
  generator: Any = struct.field(default=None, metadata={common.OMIT_AT_DEFAULT: True})
  image_shape: tuple[int, ...] | None = struct.field(
      pytree_node=False, default=None, metadata={common.OMIT_AT_DEFAULT: True})

  @property
  def targeted(self) -> bool:
    return self.target != common.UNTARGETED

  def __repr__(self) -> str:  # the generator's size, not its arrays
    generator = ("None" if self.generator is None else
                 f"<{sum(int(np.size(p)) for p in jax.tree.leaves(self.generator)):,} weights>")
    return (f"AdvGANConfig(eps={self.eps!r}, target={self.target!r}, width={self.width!r}, "
            f"generator={generator}, image_shape={self.image_shape!r})")


def check_config(config: AdvGANConfig) -> None:
  """Raises ValueError naming a bad value of an AdvGAN config (the generator may still be
  unbound: the driver binds it per model)."""
  checks.check_at_least("eps", config.eps, 0.0)
  if checks.is_concrete(config.eps) and float(config.eps) > 1.0:
    raise ValueError(f"eps must be at most 1 (pixels lie in [0, 1]); got {config.eps}")
  checks.check_choice("target mode", config.target, common.TARGET_MODES)
  if isinstance(config.width, bool) or not isinstance(config.width, int) or config.width < 1:
    raise ValueError(f"width must be an integer >= 1; got {config.width!r}")


def _require_generator(config: AdvGANConfig) -> None:
  if config.generator is None:
    raise ValueError("AdvGAN needs a generator trained against the model under attack: "
                     "bind one with advsweep.models.gan.generators.bind(config, model) "
                     "(a sweep's driver does it for you)")


def perturb(generator: Any, images: jax.Array, targets: jax.Array | None, eps: Any, *,
            num_classes: int, targeted: bool, width: int) -> jax.Array:
  """[B,H,W,C] `clip(images + eps * G(images, targets), 0, 1)`."""
  net = PerturbationGenerator(num_classes=num_classes, targeted=targeted, width=width)
  delta = common.budget(eps, images.dtype) * net.apply(generator, images,
                                                       targets if targeted else None)
  return jnp.clip(images + delta, 0.0, 1.0)


def advgan_core(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
                key: jax.Array, config: AdvGANConfig | None = None, *,
                targets: jax.Array | None = None, evaluator: Any = None
                ) -> common.AttackResult:
  """The attack's pure core (arguments as `attacks.gradient.bim`); traceable end to end."""
  del evaluator
  config = config or AdvGANConfig()
  _require_generator(config)
  num_classes = checks.num_classes_of(apply_fn, params, images)
  keys = common.per_image_keys(key, images.shape[0])
  clean_logits = (apply_fn(params, images) if config.target == common.LEAST_LIKELY
                  else jnp.zeros((images.shape[0], num_classes), images.dtype))
  run_targets = common.choose_targets(config.target, keys, labels, clean_logits, targets)
  adv = perturb(config.generator, images, run_targets, config.eps, num_classes=num_classes,
                targeted=config.targeted, width=config.width)
  queries = jnp.full(labels.shape, int(config.target == common.LEAST_LIKELY), jnp.int32)
  return common.finalize(apply_fn, params, images, adv, labels, run_targets, queries)


def prepare(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
            key: jax.Array, config: AdvGANConfig | None = None, *,
            targets: jax.Array | None = None, evaluator: Any = None) -> common.PreparedCall:
  """Checks the inputs; returns the attack, ready to run (jitted with the model's params
  closed over where they are concrete)."""
  del evaluator
  config = config if config is not None else AdvGANConfig()
  check_config(config)
  images, labels, targets, _, concrete = checks.checked_inputs(
      apply_fn, params, images, labels, key, config, targets=targets,
      target_mode=config.target, target_modes=common.TARGET_MODES)
  _require_generator(config)
  shape = tuple(images.shape[1:])
  if config.image_shape is not None and tuple(config.image_shape) != shape:
    raise ValueError(
        f"the AdvGAN generator was trained on {_shape_text(config.image_shape)} images, the "
        f"images given are {_shape_text(shape)}: train a generator against this model "
        "(advsweep gan advgan MODEL)")
  call = functools.partial(advgan_core, apply_fn, params, images, labels, key, config,
                           targets=targets)
  if not concrete:
    return common.PreparedCall(call)
  jitted = common.bind(_run, apply_fn, params)
  return common.PreparedCall(
      functools.partial(jitted, images, labels, key, config, targets),
      functools.partial(jitted.lower, images, labels, key, config, targets))


def _shape_text(shape: tuple[int, ...]) -> str:
  return "x".join(str(int(d)) for d in shape)


def _run(apply_fn, params, images, labels, key, config, targets):
  return advgan_core(apply_fn, params, images, labels, key, config, targets=targets)


def advgan(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
           key: jax.Array, config: AdvGANConfig | None = None, *,
           targets: jax.Array | None = None, evaluator: Any = None) -> common.AttackResult:
  """AdvGAN: the bound generator's perturbation, scaled to eps and clipped to [0, 1].

  Args:
    apply_fn: `apply_fn(params, images[B,H,W,C]) -> logits[B,K]`.
    params: the model's variables.
    images: [B,H,W,C] float in [0, 1].
    labels: [B] true classes.
    key: PRNG key, or one per image [B] (used by the random target mode).
    config: `AdvGANConfig` with its generator bound.
    targets: [B] classes for `target="explicit"`.
    evaluator: ignored (the attacks' one signature).

  References: Xiao et al., Generating Adversarial Examples with Adversarial Networks,
  IJCAI 2018.
  """
  return prepare(apply_fn, params, images, labels, key, config, targets=targets,
                 evaluator=evaluator)()
