"""The gradient-sign family: FGSM, the basic iterative method (BIM) and PGD.

One core, `_iterate`, takes signed-gradient steps and projects onto the eps ball and [0, 1].
FGSM is BIM with one step of size eps; PGD is BIM with a random start (and an L2 variant).
Target modes are choices of the loss, not new attacks: untargeted ("inverse": climb the loss
of the true label, or of the clean prediction) or toward a target (least-likely, random,
explicit) by descending that class's loss.

References:
  Goodfellow, Shlens, Szegedy, Explaining and Harnessing Adversarial Examples, ICLR 2015.
  Kurakin, Goodfellow, Bengio, Adversarial Examples in the Physical World, ICLR-W 2017.
  Madry et al., Towards Deep Learning Models Resistant to Adversarial Attacks, ICLR 2018.
  Possas, gradient-sign attacks against confidence levels (slides: least-likely and inverse).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from attacks import common

LINF, L2 = "linf", "l2"
AWAY_FROM = ("label", "prediction")


@struct.dataclass
class BIMConfig:
  """Basic iterative method (Kurakin et al., 2017).

  Attributes:
    eps: L-inf budget in [0, 1] pixel units (traced: an eps sweep does not recompile).
    step_size: per-step size; Kurakin's 1/255.
    num_steps: steps; None means Kurakin's rule min(eps*255 + 4, 1.25*eps*255), computed
      before tracing.
    target: a mode of `attacks.common.TARGET_MODES`.
    away_from: for untargeted attacks, climb the loss of the "label" or of the clean
      "prediction" (the slides' inverse perturbation).
  """

  eps: float = 16 / 255
  step_size: float = 1 / 255
  num_steps: int | None = struct.field(pytree_node=False, default=None)
  target: str = struct.field(pytree_node=False, default=common.UNTARGETED)
  away_from: str = struct.field(pytree_node=False, default="label")


@struct.dataclass
class FGSMConfig:
  """Fast gradient sign method (Goodfellow et al., 2015): one step of size eps.

  The default eps = 0.25 is the paper's MNIST setting.
  """

  eps: float = 0.25
  target: str = struct.field(pytree_node=False, default=common.UNTARGETED)
  away_from: str = struct.field(pytree_node=False, default="label")


@struct.dataclass
class PGDConfig:
  """Projected gradient descent with a random start (Madry et al., 2018).

  Defaults are the paper's CIFAR-10 L-inf setting (eps 8/255, step 2/255, 7 steps).
  With `norm="l2"` steps follow the normalised gradient and project onto the L2 ball.
  """

  eps: float = 8 / 255
  step_size: float = 2 / 255
  num_steps: int = struct.field(pytree_node=False, default=7)
  norm: str = struct.field(pytree_node=False, default=LINF)
  random_start: bool = struct.field(pytree_node=False, default=True)
  target: str = struct.field(pytree_node=False, default=common.UNTARGETED)
  away_from: str = struct.field(pytree_node=False, default="label")


def kurakin_num_steps(eps: float) -> int:
  """Kurakin et al.'s step count for BIM: min(eps*255 + 4, 1.25*eps*255), at least 1."""
  return max(1, int(math.ceil(min(eps * 255 + 4, 1.25 * eps * 255))))


def _project(images, adv, eps, norm):
  delta = adv - images
  if norm == LINF:
    delta = jnp.clip(delta, -eps, eps)
  else:
    flat = delta.reshape(delta.shape[0], -1)
    norms = jnp.linalg.norm(flat, axis=-1, keepdims=True)
    flat = flat * jnp.minimum(1.0, eps / jnp.maximum(norms, 1e-12))
    delta = flat.reshape(delta.shape)
  return jnp.clip(images + delta, 0.0, 1.0)


def _random_start(keys, images, eps, norm):
  """A uniform draw from the eps ball around each image (keys: one per image)."""

  def one(key, image):
    if norm == LINF:
      return jax.random.uniform(key, image.shape, image.dtype, -eps, eps)
    # Uniform in the L2 ball: a Gaussian direction and a radius eps * U^(1/d).
    dir_key, radius_key = jax.random.split(key)
    direction = jax.random.normal(dir_key, image.shape, image.dtype)
    direction = direction / jnp.linalg.norm(direction)
    return direction * eps * jax.random.uniform(radius_key) ** (1.0 / image.size)

  return _project(images, images + jax.vmap(one)(keys, images), eps, norm)


def _start(apply_fn, params, images, labels, keys, targets, eps, *, norm, random_start,
           target_mode, away_from):
  """Targets, the class whose loss each step follows (and its sign), and the start point."""
  keys = jax.vmap(lambda k: jax.random.split(k, 2))(common.per_image_keys(keys, len(images)))
  target_keys, start_keys = keys[:, 0], keys[:, 1]
  clean_logits = apply_fn(params, images)
  targets = common.choose_targets(target_mode, target_keys, labels, clean_logits, targets)
  if target_mode != common.UNTARGETED:
    loss_class, sign = targets, -1.0  # descend the target's loss
  else:
    loss_class = labels if away_from == "label" else jnp.argmax(clean_logits, -1)
    sign = 1.0  # climb the loss of the class to leave
  adv = _random_start(start_keys, images, eps, norm) if random_start else images
  return adv, targets, loss_class.astype(jnp.int32), jnp.asarray(sign, images.dtype)


def _step(apply_fn, params, images, adv, loss_class, sign, eps, step_size, *, norm):
  """One signed (L-inf) or normalised (L2) gradient step, projected onto the budget."""

  def loss(x):
    logits = apply_fn(params, x)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, loss_class))

  grad = jax.grad(loss)(adv)
  if norm == LINF:
    direction = jnp.sign(grad)
  else:
    flat = grad.reshape(grad.shape[0], -1)
    flat = flat / jnp.maximum(jnp.linalg.norm(flat, axis=-1, keepdims=True), 1e-12)
    direction = flat.reshape(grad.shape)
  return _project(images, adv + sign * step_size * direction, eps, norm)


def _iterate(apply_fn, params, images, labels, keys, targets, eps, step_size, *, num_steps,
             norm, random_start, target_mode, away_from) -> common.AttackResult:
  """Start, `num_steps` jitted steps, re-check.

  The steps are a host loop over one jitted step rather than a `lax.fori_loop`: on the XLA
  CPU backend a convolution's backward pass inside a `while` body ran 4x slower than the
  same steps unrolled (15.0 s against 3.7 s for 10 steps of the MNIST LeNet on 100 images),
  and unrolling makes compile time grow with the step count. A host loop costs one dispatch
  per step and compiles one step for every step count.
  """
  adv, targets, loss_class, sign = common.bind(
      _start, apply_fn, params, norm=norm, random_start=random_start,
      target_mode=target_mode, away_from=away_from)(images, labels, keys, targets, eps)
  step = common.bind(_step, apply_fn, params, norm=norm)
  for _ in range(num_steps):
    adv = step(images, adv, loss_class, sign, eps, step_size)
  queries = jnp.full(labels.shape, num_steps + 1, jnp.int32)  # clean forward + steps
  return common.finalize(apply_fn, params, images, adv, labels, targets, queries)


def _prepare(apply_fn, params, images, labels, key, targets, *, eps, step_size, num_steps,
             norm, random_start, target_mode, away_from) -> common.PreparedCall:
  """Checks the inputs and returns the jitted core with its arguments."""
  common.validate(apply_fn, params, images, labels, targets=targets, target_mode=target_mode)
  if away_from not in AWAY_FROM:
    raise ValueError(f"away_from must be one of {AWAY_FROM}; got {away_from!r}")
  if norm not in (LINF, L2):
    raise ValueError(f"norm must be 'linf' or 'l2'; got {norm!r}")
  for name, value in (("eps", eps), ("step_size", step_size)):
    if not jnp.all(jnp.asarray(value) >= 0):
      raise ValueError(f"{name} must be >= 0; got {value}")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1; got {num_steps}")
  images = jnp.asarray(images)
  labels = jnp.asarray(labels, jnp.int32)
  eps = jnp.asarray(eps, images.dtype)
  step_size = jnp.asarray(step_size, images.dtype)
  run = functools.partial(
      _iterate, apply_fn, params, images, labels, key,
      None if targets is None else jnp.asarray(targets, jnp.int32), eps, step_size,
      num_steps=num_steps, norm=norm, random_start=random_start, target_mode=target_mode,
      away_from=away_from)
  classes = jnp.zeros_like(labels)
  lower_step = functools.partial(
      common.bind(_step, apply_fn, params, norm=norm).lower, images, images, classes,
      jnp.ones((), images.dtype), eps, step_size)
  return common.PreparedCall(run, lower_step)


def prepare_bim(apply_fn, params, images, labels, key, config=None, *, targets=None
                ) -> common.PreparedCall:
  config = config or BIMConfig()
  num_steps = config.num_steps or kurakin_num_steps(float(config.eps))
  return _prepare(apply_fn, params, images, labels, key, targets, eps=config.eps,
                  step_size=config.step_size, num_steps=num_steps, norm=LINF,
                  random_start=False, target_mode=config.target, away_from=config.away_from)


def prepare_fgsm(apply_fn, params, images, labels, key, config=None, *, targets=None
                 ) -> common.PreparedCall:
  config = config or FGSMConfig()
  return prepare_bim(apply_fn, params, images, labels, key,
                     BIMConfig(eps=config.eps, step_size=config.eps, num_steps=1,
                               target=config.target, away_from=config.away_from),
                     targets=targets)


def prepare_pgd(apply_fn, params, images, labels, key, config=None, *, targets=None
                ) -> common.PreparedCall:
  config = config or PGDConfig()
  return _prepare(apply_fn, params, images, labels, key, targets, eps=config.eps,
                  step_size=config.step_size, num_steps=config.num_steps, norm=config.norm,
                  random_start=config.random_start, target_mode=config.target,
                  away_from=config.away_from)


def bim(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
        key: jax.Array, config: BIMConfig | None = None, *,
        targets: jax.Array | None = None) -> common.AttackResult:
  """Basic iterative method: `num_steps` signed steps of `step_size`, clipped to eps.

  Args:
    apply_fn: `apply_fn(params, images[B,H,W,C]) -> logits[B,K]`.
    params: the model's variables.
    images: [B,H,W,C] float in [0, 1].
    labels: [B] true classes.
    key: PRNG key, or one per image [B] (used by the random target mode).
    config: `BIMConfig`; None is Kurakin et al.'s setting.
    targets: [B] classes for `target="explicit"`.

  References: Kurakin, Goodfellow, Bengio, Adversarial Examples in the Physical World, 2017.
  """
  return prepare_bim(apply_fn, params, images, labels, key, config, targets=targets)()


def fgsm(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
         key: jax.Array, config: FGSMConfig | None = None, *,
         targets: jax.Array | None = None) -> common.AttackResult:
  """Fast gradient sign method: BIM with one step of size eps.

  References: Goodfellow, Shlens, Szegedy, Explaining and Harnessing Adversarial Examples,
  ICLR 2015.
  """
  return prepare_fgsm(apply_fn, params, images, labels, key, config, targets=targets)()


def pgd(apply_fn: common.ApplyFn, params: Any, images: jax.Array, labels: jax.Array,
        key: jax.Array, config: PGDConfig | None = None, *,
        targets: jax.Array | None = None) -> common.AttackResult:
  """Projected gradient descent from a random start in the eps ball, L-inf or L2.

  References: Madry et al., Towards Deep Learning Models Resistant to Adversarial Attacks,
  ICLR 2018.
  """
  return prepare_pgd(apply_fn, params, images, labels, key, config, targets=targets)()
