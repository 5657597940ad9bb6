"""Training of the zoo models with optax: deterministic from a seed, one jitted step.

`train_and_evaluate(name, ...)` trains zoo entry `name` with its recipe, measures accuracy on
the full test split and writes the checkpoint and its metadata atomically. A defense's recipe
attacks each batch inside the jitted step with the gradient attacks' traceable core
(`attacks.gradient.pgd_core`): adversarial training (Goodfellow et al. 2015; Madry et al.
2018; Wong, Rice, Kolter 2020), logit pairing (Kannan, Kurakin, Goodfellow 2018). Domain
adaptation (Ciprijanovic et al.) adds an MMD loss toward Poisson-noised images. Each epoch
is saved, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.metadata
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from advsweep.attacks import gradient
from advsweep.models import (
    architectures,
    checkpoints,
    datasets,
    domain,
    evaluation,
    interrupts,
    transforms,
    zoo,
)
from advsweep.models.files import atomic_write_bytes


@dataclasses.dataclass
class TrainResult:
  meta: dict
  losses: list[float]  # mean training loss per epoch
  variables: Any


def make_optimizer(recipe: zoo.TrainRecipe, total_steps: int) -> optax.GradientTransformation:
  """One-cycle schedule (linear warm-up, then linear decay to zero) with Adam or SGD."""
  warmup = max(1, int(recipe.warmup_fraction * total_steps))
  schedule = optax.join_schedules([
      optax.linear_schedule(recipe.peak_lr / 10, recipe.peak_lr, warmup),
      optax.linear_schedule(recipe.peak_lr, 0.0, max(1, total_steps - warmup)),
  ], [warmup])
  if recipe.optimizer == "adam":
    base = optax.adam(schedule)
  elif recipe.optimizer == "sgd":
    base = optax.sgd(schedule, momentum=0.9, nesterov=True)
  else:
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; valid choices: adam, sgd")
  if not recipe.weight_decay:
    return base
  # Decay only the weight matrices and kernels, not biases or BatchNorm scales.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
  return optax.chain(optax.add_decayed_weights(recipe.weight_decay, decay_mask), base)


def augment(key: jax.Array, images: jnp.ndarray, max_shift: int = 2) -> jnp.ndarray:
  """Random horizontal flip and translation by up to `max_shift` pixels (reflect padding)."""

  def one(key, image):
    flip_key, shift_key = jax.random.split(key)
    image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
    padded = jnp.pad(image, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                     mode="reflect")
    dy, dx = jax.random.randint(shift_key, (2,), 0, 2 * max_shift + 1)
    return jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)

  return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


def training_attack(recipe: zoo.TrainRecipe) -> Any:
  """The attack config of an adversarial recipe (`attacks.gradient`), None for plain
  training: FGSM at eps (Goodfellow et al.), FGSM from a random start with step 1.25 eps
  (Wong et al.'s default), or PGD with steps of 2.5 eps / steps (Madry et al.)."""
  if recipe.adversary is None:
    return None
  eps = recipe.epsilon
  if recipe.adversary == "fgsm":  # FGSM as the PGD setting it is: one step of eps
    return gradient.PGDConfig(eps=eps, step_size=eps, num_steps=1, random_start=False)
  if recipe.adversary == "fgsm_rs":
    step = recipe.adv_step if recipe.adv_step is not None else 1.25 * eps
    return gradient.PGDConfig(eps=eps, step_size=step, num_steps=1, random_start=True)
  if recipe.adversary == "pgd":
    step = recipe.adv_step if recipe.adv_step is not None else 2.5 * eps / recipe.adv_steps
    return gradient.PGDConfig(eps=eps, step_size=step, num_steps=recipe.adv_steps)
  if recipe.adversary == "n_fgsm":  # the PGD fields carry N-FGSM's eps and step
    step = recipe.adv_step if recipe.adv_step is not None else eps
    return gradient.PGDConfig(eps=eps, step_size=step, num_steps=1)
  raise ValueError(f"unknown adversary {recipe.adversary!r}; valid choices: fgsm, fgsm_rs, "
                   "pgd, n_fgsm")


def n_fgsm(apply_fn: Any, params: Any, images: jax.Array, labels: jax.Array, key: jax.Array,
           eps: jax.Array, step: jax.Array, noise: float) -> jax.Array:
  """N-FGSM's training example (de Jorge et al. 2022, "Make some noise"): uniform noise of
  half-width `noise * eps`, one signed gradient step of `step`, no projection back onto the
  eps ball (only onto [0, 1]): the larger noise and the missing clip are what keep
  single-step training from overfitting catastrophically at 8/255."""
  start = images + jax.random.uniform(key, images.shape, images.dtype, -noise * eps,
                                      noise * eps)

  def loss(x):
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x),
                                                                   labels))

  return jnp.clip(start + step * jnp.sign(jax.grad(loss)(start)), 0.0, 1.0)


def _per_image_loss(recipe: zoo.TrainRecipe):
  if recipe.loss == "cross_entropy":
    return optax.softmax_cross_entropy_with_integer_labels
  if recipe.loss == "gauss":
    return architectures.gauss_loss
  raise ValueError(f"unknown loss {recipe.loss!r}; valid choices: cross_entropy, gauss")


def _make_train_step(module, tx, recipe: zoo.TrainRecipe):
  attack = training_attack(recipe)
  per_image_loss = _per_image_loss(recipe)
  needs_clean = attack is None or recipe.clean_weight > 0 or recipe.logit_pairing > 0
  if recipe.domain_weight > 0:
    if attack is not None:
      raise ValueError("a recipe takes adversarial training or domain adaptation, not both")
    if recipe.domain_exposure <= 0:
      raise ValueError("domain_weight needs domain_exposure > 0 (the noisy domain's Poisson "
                       "exposure)")
    return _make_domain_step(module, tx, recipe, per_image_loss)

  @jax.jit
  def train_step(variables, opt_state, images_u8, labels, key, eps_scale=1.0):
    aug_key, attack_key = jax.random.split(key)
    images = images_u8.astype(jnp.float32) / 255.0
    if recipe.augment:
      images = augment(aug_key, images)

    def forward(params, x):
      return module.apply({**variables, "params": params}, x, train=True,
                          mutable=["batch_stats"])

    if attack is not None:
      # The attack sees the network as the loss does (training-mode BatchNorm); the
      # statistics it would update are dropped.
      attack_fn = lambda params, x: forward(params, x)[0]  # noqa: E731
      scaled = attack.replace(eps=attack.eps * eps_scale,
                              step_size=attack.step_size * eps_scale)
      if recipe.adversary == "n_fgsm":
        adv = n_fgsm(attack_fn, variables["params"], images, labels, attack_key, scaled.eps,
                     scaled.step_size, recipe.adv_noise)
      else:
        adv = gradient.pgd_core(attack_fn, variables["params"], images, labels, attack_key,
                                scaled).adv_images
      adv = jax.lax.stop_gradient(adv)
      batch = jnp.concatenate([images, adv]) if needs_clean else adv
    else:
      batch = images

    def loss_fn(params):
      logits, updates = forward(params, batch)  # one batch: BatchNorm sees clean and adv
      n = len(labels)
      if attack is None:
        loss = per_image_loss(logits, labels).mean()
        return loss, (logits, updates)
      clean_logits, adv_logits = (logits[:n], logits[n:]) if needs_clean else (None, logits)
      loss = (1 - recipe.clean_weight) * per_image_loss(adv_logits, labels).mean()
      if recipe.clean_weight > 0:
        loss += recipe.clean_weight * per_image_loss(clean_logits, labels).mean()
      if recipe.logit_pairing > 0:
        pairing = jnp.sum((clean_logits - adv_logits) ** 2, -1).mean()
        loss += recipe.logit_pairing * pairing
      return loss, (clean_logits if needs_clean else adv_logits, updates)

    return _descend(loss_fn, tx, variables, opt_state, labels)

  return train_step


@functools.lru_cache(maxsize=8)
def _compiled_train_step(module, recipe: zoo.TrainRecipe, total_steps: int):
  """The optimiser `make_optimizer(recipe, total_steps)` and its `_make_train_step`, built
  once per process for equal arguments, so a resumed or repeated run reuses the compiled
  step."""
  tx = make_optimizer(recipe, total_steps)
  return tx, _make_train_step(module, tx, recipe)


def _descend(loss_fn, tx, variables, opt_state, labels):
  """One optimiser step on `loss_fn(params) -> (loss, (logits, state updates))`: the new
  variables and optimiser state, the loss and the batch's correct count (traced)."""
  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      variables["params"])
  step_updates, opt_state = tx.update(grads, opt_state, variables["params"])
  new_vars = {**variables, **updates,
              "params": optax.apply_updates(variables["params"], step_updates)}
  correct = jnp.sum(jnp.argmax(logits, -1) == labels)
  return new_vars, opt_state, loss, correct


def _make_domain_step(module, tx, recipe: zoo.TrainRecipe, per_image_loss):
  """Cross-entropy on the clean batch plus `domain_weight` times the MMD between its latent
  features and those of other training images with Poisson noise (`models.domain`). The
  noisy pass runs in training mode but its BatchNorm statistics are dropped, so the running
  statistics stay the clean domain's, like the undefended twin's."""

  @jax.jit
  def train_step(variables, opt_state, images_u8, labels, key, eps_scale=1.0):
    del eps_scale
    aug_key, noise_key = jax.random.split(key)
    images = images_u8.astype(jnp.float32) / 255.0
    if recipe.augment:
      images = augment(aug_key, images)
    # The noisy domain: the batch's other half of images (not the same ones), unlabelled.
    noisy = transforms.poisson_noise(noise_key, jnp.roll(images, len(images) // 2, axis=0),
                                     recipe.domain_exposure)

    def forward(params, x):
      logits, state = module.apply({**variables, "params": params}, x, train=True,
                                   mutable=["batch_stats", "intermediates"])
      latent = architectures.penultimate(state["intermediates"])
      return logits, latent, {k: v for k, v in state.items() if k != "intermediates"}

    def loss_fn(params):
      logits, clean_latent, updates = forward(params, images)
      _, noisy_latent, _ = forward(params, noisy)
      loss = per_image_loss(logits, labels).mean()
      loss += recipe.domain_weight * domain.mmd(clean_latent, noisy_latent)
      return loss, (logits, updates)

    return _descend(loss_fn, tx, variables, opt_state, labels)

  return train_step


def _eps_scale(recipe: zoo.TrainRecipe, step: int, total: int) -> float:
  """The share of `epsilon` the training attack uses at `step` (`TrainRecipe.epsilon_ramp`)."""
  ramp = recipe.epsilon_ramp * total
  return 1.0 if ramp <= 0 else min(1.0, (step + 1) / ramp)


GUARD_IMAGES = 512
GUARD_DROP = 0.2   # a fall of PGD accuracy by more than this stops the run
GUARD_CHECKS = 4   # checks per epoch: the collapse can come within an epoch


@functools.lru_cache(maxsize=8)
def _make_guard(module, recipe: zoo.TrainRecipe):
  """PGD-10 accuracy at the recipe's eps (step eps/4, random start), for the overfitting
  guard: Wong et al. detect catastrophic overfitting by PGD accuracy on training data."""
  config = gradient.PGDConfig(eps=recipe.epsilon, step_size=recipe.epsilon / 4, num_steps=10)
  apply_fn = zoo.ApplyFn(module)

  @jax.jit
  def robust_correct(variables, images_u8, labels, key):
    images = images_u8.astype(jnp.float32) / 255.0
    result = gradient.pgd_core(apply_fn, variables, images, labels, key, config)
    return jnp.sum(~result.success)

  def accuracy(variables, images_u8, labels, key) -> float:
    total = 0
    for start in range(0, len(labels), 256):
      total += int(robust_correct(variables, images_u8[start:start + 256],
                                  labels[start:start + 256], jax.random.fold_in(key, start)))
    return total / len(labels)

  return accuracy


def _last_best(robust: np.ndarray) -> int:
  """The index of the guard's best check, the last of equal ones (as the loop keeps them)."""
  return int(len(robust) - 1 - np.argmax(robust[::-1]))


def warm_start(variables: Any, source: str,
               checkpoint_dir: str | os.PathLike | None = None) -> tuple[Any, dict]:
  """`variables` with every array zoo model `source`'s checkpoint shares with them.

  An array is shared where its path and shape match (a denoised ResNet-20 shares all of the
  plain ResNet-20's; a Gauss head shares its trunk). The rest keep their initialisation.
  The checkpoint is read from `checkpoint_dir` where it is there, else from the zoo's.

  Returns:
    The merged variables, and a record for the metadata: the source, its checkpoint's
    sha256 and the paths left at their initialisation.
  """
  here = checkpoint_dir is not None and (
      Path(checkpoint_dir) / zoo.entry(source).checkpoint.name).is_file()
  folder = checkpoint_dir if here else None
  try:
    trained = zoo.load(source, folder)
  except checkpoints.CheckpointError as err:
    raise checkpoints.CheckpointError(
        f"this recipe starts from {source!r}'s weights, which cannot be loaded ({err}); "
        f"run `advsweep train {source}` first") from err
  from_source = flax.traverse_util.flatten_dict(trained.params, sep="/")
  flat = flax.traverse_util.flatten_dict(variables, sep="/")
  fresh = {k for k, v in flat.items()
           if k not in from_source or np.shape(from_source[k]) != np.shape(v)}
  if len(fresh) == len(flat):
    raise ValueError(f"zoo model {source!r} shares no weights with this module; a recipe's "
                     "init_from must name a model of the same architecture")
  merged = {k: v if k in fresh else jnp.asarray(from_source[k]) for k, v in flat.items()}
  record = {"from": source, "sha256": trained.meta["sha256"], "fresh": sorted(fresh)}
  return flax.traverse_util.unflatten_dict(merged, sep="/"), record


RESUME_SUFFIX = ".resume.msgpack"
CHECKPOINT_SECONDS = 600.0  # a mid-epoch save at most this often


def resume_path(out_dir: str | os.PathLike, name: str) -> Path:
  """Where an unfinished training run of `name` keeps its last epoch (`train_and_evaluate`)."""
  return Path(out_dir) / f"{name}{RESUME_SUFFIX}"


def _fingerprint(name, recipe, seed, train_limit, test_limit) -> str:
  """What a resumed run must share with the run that wrote the state."""
  return json.dumps({"name": name, "recipe": zoo.recipe_dict(recipe), "seed": seed,
                     "train_limit": train_limit, "test_limit": test_limit}, sort_keys=True)


def _save_state(path: Path, state: dict) -> None:
  host = jax.tree.map(np.asarray, {k: v for k, v in state.items() if k != "fingerprint"})
  atomic_write_bytes(path, flax.serialization.to_bytes(
      {**host, "fingerprint": state["fingerprint"]}))


def _load_state(path: Path, target: dict, fingerprint: str) -> dict:
  """The saved state of an interrupted run, or an error naming the way out."""
  data = path.read_bytes()
  try:
    raw = flax.serialization.msgpack_restore(data)
  except Exception as err:  # msgpack raises several unrelated types on bad input
    raise checkpoints.CheckpointError(
        f"{path}: not a training state ({err}); delete it or pass --restart") from err
  if not isinstance(raw, dict) or raw.get("fingerprint") != fingerprint:
    raise checkpoints.CheckpointError(
        f"{path}: a training state of another recipe, seed or data size; pass --restart "
        "to discard it, or run the command that wrote it")
  try:
    return flax.serialization.from_bytes(target, data)
  except (ValueError, KeyError) as err:
    raise checkpoints.CheckpointError(
        f"{path}: a training state of another layout ({err}), written by an earlier "
        "advsweep; pass --restart to discard it") from err


# A state's position within its epoch: steps done and their summed loss and correct count.
_EPOCH_START = {"step": np.int64(0), "epoch_loss": np.float64(0.0),
                "epoch_correct": np.int64(0)}


def _advance(state: dict, variables, opt_state, seconds: float, **fields) -> dict:
  """`state` after `seconds` more of training that reached `variables` and `opt_state`."""
  return {**state, "variables": variables, "opt_state": opt_state, **fields,
          "train_seconds": np.float64(float(state["train_seconds"]) + seconds)}


def _estimate(train_step, state, batch_x, batch_y, key) -> float:
  """Seconds per step: one compile and two timed steps on the first batch (discarded)."""
  out = train_step(state["variables"], state["opt_state"], batch_x, batch_y, key)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(2):
    jax.block_until_ready(train_step(state["variables"], state["opt_state"], batch_x,
                                     batch_y, key))
  return (time.perf_counter() - start) / 2


def _minutes(seconds: float) -> str:
  return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def train_and_evaluate(
    name: str,
    *,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    epochs: int | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    progress: bool = True,
    command: str | None = None,
    restart: bool = False,
    on_epoch_end: Callable[[int], None] | None = None,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
    on_checkpoint: Callable[[int, int], None] | None = None,
    batch_size: int | None = None,
    guard_images: int = GUARD_IMAGES,
) -> TrainResult:
  """Trains zoo entry `name` with its recipe and writes `<out_dir>/<name>.msgpack|.json`.

  With `out_dir`, every finished epoch, and within an epoch every `checkpoint_seconds`, is
  saved to `resume_path(out_dir, name)` (weights, optimiser state, the guard's checks, the
  epoch's running loss), atomically; a later call with the same
  arguments resumes from it and ends with the weights an uninterrupted run would have, then
  deletes it.

  Args:
    name: zoo name (see `models.zoo.ZOO`).
    seed: seeds initialisation, shuffling, augmentation and the training attack.
    data_dir: local data folder (see `models.datasets.load`).
    out_dir: where to write the checkpoint; None writes nothing (and cannot resume).
    epochs: overrides the recipe's epoch count.
    train_limit, test_limit: use only the first N images (short runs and tests).
    progress: show a progress bar with loss and accuracy.
    command: the command line to record in the metadata.
    restart: discard a saved state instead of resuming from it.
    on_epoch_end: called with the epoch count after each epoch's state is saved.
    checkpoint_seconds: within an epoch, the state is also saved after the first step that
      ends this long after the last save (a CIFAR-10 adversarial epoch takes 40 minutes
      here); a resumed run continues from that step.
    on_checkpoint: called with (epoch, steps done in it) after each such save.
    batch_size: overrides the recipe's batch size (short runs and tests).
    guard_images: training images the overfitting guard attacks at each check.
  """
  spec = zoo.entry(name)
  recipe = spec.recipe if epochs is None else dataclasses.replace(spec.recipe, epochs=epochs)
  if batch_size is not None:
    recipe = dataclasses.replace(recipe, batch_size=batch_size)
  train_x, train_y = datasets.load(spec.dataset, "train", data_dir)
  test_x, test_y = datasets.load(spec.dataset, "test", data_dir)
  train_x, train_y = train_x[:train_limit], train_y[:train_limit]
  test_x, test_y = test_x[:test_limit], test_y[:test_limit]
  batch = min(recipe.batch_size, len(train_x))
  steps_per_epoch = len(train_x) // batch
  if steps_per_epoch == 0:
    raise ValueError(f"no full batch of {batch} in {len(train_x)} training images")

  module = spec.constructor()
  key = jax.random.key(seed)
  init_key, aug_key = jax.random.split(key)
  guard_key = jax.random.fold_in(key, 2)
  variables = zoo.init_variables(module, spec.dataset, init_key)
  warm = None
  if recipe.init_from:
    variables, warm = warm_start(variables, recipe.init_from, out_dir)
  tx, train_step = _compiled_train_step(module, recipe, recipe.epochs * steps_per_epoch)
  rng = np.random.default_rng(seed)
  guard = _make_guard(module, recipe) if recipe.overfit_guard else None
  guard_idx = np.random.default_rng([seed, 1]).permutation(len(train_x))[:guard_images]
  guard_at = sorted({max(1, round((i + 1) * steps_per_epoch / GUARD_CHECKS))
                     for i in range(GUARD_CHECKS)})
  guard_steps = {step: i for i, step in enumerate(guard_at)}  # steps done -> check

  fingerprint = _fingerprint(name, recipe, seed, train_limit, test_limit)
  state = {"variables": variables, "opt_state": tx.init(variables["params"]),
           "best": variables, "epoch": np.int64(0), "train_seconds": np.float64(0.0),
           **_EPOCH_START,
           "losses": np.zeros(recipe.epochs),
           "robust": np.full(recipe.epochs * GUARD_CHECKS, np.nan),
           "fingerprint": fingerprint}
  state_file = resume_path(out_dir, name) if out_dir is not None else None
  if state_file is not None and state_file.is_file():
    if restart:
      state_file.unlink()
    else:
      state = _load_state(state_file, state, fingerprint)
      where = (f"after epoch {int(state['epoch'])} of {recipe.epochs}" if not state["step"]
               else f"in epoch {int(state['epoch']) + 1} of {recipe.epochs} after step "
               f"{int(state['step'])} of {steps_per_epoch}")
      print(f"{name}: resuming {where} ({state_file})")
  first = int(state["epoch"])
  first_step = int(state["step"])
  for _ in range(first):
    rng.permutation(len(train_x))  # the shuffles of the finished epochs

  seconds_per_step = _estimate(train_step, state, train_x[:batch], train_y[:batch], aug_key)
  remaining = (recipe.epochs - first) * steps_per_epoch - first_step
  if remaining:
    print(f"{name}: {remaining} steps of {batch} ({steps_per_epoch} an epoch) at "
          f"{seconds_per_step:.3f} s per step: about {_minutes(remaining * seconds_per_step)}"
          f" (measured on the first batch)", flush=True)

  stopped_at = None
  for epoch in range(first, recipe.epochs):
    start = last_save = time.time()
    order = rng.permutation(len(train_x))
    skip = first_step if epoch == first else 0  # the steps a mid-epoch save holds
    total_loss = float(state["epoch_loss"]) if skip else 0.0
    total_correct = int(state["epoch_correct"]) if skip else 0
    variables, opt_state = state["variables"], state["opt_state"]
    bar = tqdm(range(skip, steps_per_epoch), desc=f"{name} epoch {epoch + 1}/{recipe.epochs}",
               initial=skip, total=steps_per_epoch, disable=not progress, leave=True,
               mininterval=2.0)
    for step in bar:
      interrupts.check()
      idx = order[step * batch:(step + 1) * batch]
      global_step = epoch * steps_per_epoch + step
      step_key = jax.random.fold_in(aug_key, global_step)
      variables, opt_state, loss, correct = train_step(
          variables, opt_state, train_x[idx], train_y[idx], step_key,
          _eps_scale(recipe, global_step, recipe.epochs * steps_per_epoch))
      total_loss += float(loss)
      total_correct += int(correct)
      if step % 10 == 0 or step == steps_per_epoch - 1:
        bar.set_postfix(loss=f"{total_loss / (step + 1):.4f}",
                        acc=f"{total_correct / ((step + 1) * batch):.4f}", refresh=False)
      if guard is not None and step + 1 in guard_steps:
        check = epoch * GUARD_CHECKS + guard_steps[step + 1]
        robust = np.array(state["robust"])
        robust[check] = guard(variables, train_x[guard_idx], train_y[guard_idx],
                              jax.random.fold_in(guard_key, check))
        best_before = np.nanmax(robust[:check]) if check else -np.inf
        state = {**state, "robust": robust,
                 "best": variables if robust[check] >= best_before else state["best"]}
        tqdm.write(f"{name}: PGD-10 accuracy {robust[check]:.3f} on {len(guard_idx)} "
                   "training images")
        if robust[check] < best_before - GUARD_DROP:
          stopped_at = (epoch + 1, (step + 1) / steps_per_epoch)
          break
      now = time.time()
      if (state_file is not None and step + 1 < steps_per_epoch
          and now - last_save >= checkpoint_seconds):
        state = _advance(state, variables, opt_state, now - start, step=np.int64(step + 1),
                         epoch_loss=np.float64(total_loss),
                         epoch_correct=np.int64(total_correct))
        _save_state(state_file, state)
        start = last_save = now
        if on_checkpoint is not None:
          on_checkpoint(epoch, step + 1)
    losses = np.array(state["losses"])
    losses[epoch] = total_loss / steps_per_epoch
    state = _advance(state, variables, opt_state, time.time() - start,
                     epoch=np.int64(epoch + 1), losses=losses, **_EPOCH_START)
    if stopped_at is not None:
      robust = np.asarray(state["robust"])
      print(f"{name}: PGD-10 accuracy on training images fell from "
            f"{np.nanmax(robust[:check]):.3f} to {robust[check]:.3f} (catastrophic "
            "overfitting): stopping, keeping the weights of the best check", flush=True)
      break
    if state_file is not None:
      _save_state(state_file, state)
    if on_epoch_end is not None:
      on_epoch_end(epoch + 1)

  # With the guard on, the shipped weights are always those of its best check (the last of
  # equal ones), not the final ones: robustness can fall without a collapse.
  variables = state["best"] if guard is not None else state["variables"]
  epochs_run = int(state["epoch"])
  losses = [float(v) for v in np.asarray(state["losses"])[:epochs_run]]
  apply_fn = zoo.Model(name, module, variables, {}).apply_fn
  scores = evaluation.accuracy_summary(apply_fn, variables, test_x, test_y)
  n_params = sum(int(np.size(p)) for p in jax.tree.leaves(variables["params"]))
  meta = {
      "name": name,
      "dataset": spec.dataset,
      "architecture": spec.architecture,
      "module": repr(module),
      "note": spec.note,
      "defense": spec.defense,
      "twin": spec.twin,
      "parameters": n_params,
      **scores,
      "train_examples": len(train_y),
      "train_loss_per_epoch": losses,
      "recipe": zoo.recipe_dict(recipe),
      "seed": seed,
      "train_command": command or f"advsweep train {name} --seed {seed}",
      "train_seconds": round(float(state["train_seconds"]), 1),
      "device": jax.devices()[0].device_kind,
      "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "versions": {p: importlib.metadata.version(p) for p in ("jax", "flax", "optax")},
  }
  if warm is not None:
    meta["init_from"] = warm
  if guard is not None:
    robust = np.asarray(state["robust"])
    done = robust[~np.isnan(robust)]
    meta["overfit_guard"] = {
        "pgd10_train_accuracy_per_check": [round(float(v), 4) for v in done],
        "checks_per_epoch": GUARD_CHECKS, "images": len(guard_idx),
        "stopped_at": None if stopped_at is None else
        {"epoch": stopped_at[0], "fraction_of_epoch": round(stopped_at[1], 3)},
        "kept": f"check {_last_best(done) + 1} of {len(done)}",
        "kept_pgd10_train_accuracy": round(float(done[_last_best(done)]), 4)}
  if out_dir is not None:
    meta = checkpoints.save(Path(out_dir) / f"{name}.msgpack", variables, meta)
    if state_file is not None:
      state_file.unlink(missing_ok=True)
  return TrainResult(meta=meta, losses=losses, variables=variables)
