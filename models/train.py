"""Training of the zoo models with optax: deterministic from a seed, one jitted step.

`train_and_evaluate(name, ...)` trains zoo entry `name` with its recipe, measures accuracy on
the full test split and writes the checkpoint and its metadata atomically.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from advsweep.models import checkpoints, datasets, evaluation, zoo


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


def _make_train_step(module, tx, use_augment: bool):
  @jax.jit
  def train_step(variables, opt_state, images_u8, labels, key):
    images = images_u8.astype(jnp.float32) / 255.0
    if use_augment:
      images = augment(key, images)

    def loss_fn(params):
      logits, updates = module.apply({**variables, "params": params}, images, train=True,
                                     mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"])
    step_updates, opt_state = tx.update(grads, opt_state, variables["params"])
    new_vars = {**variables, **updates,
                "params": optax.apply_updates(variables["params"], step_updates)}
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    return new_vars, opt_state, loss, correct

  return train_step


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
) -> TrainResult:
  """Trains zoo entry `name` with its recipe and writes `<out_dir>/<name>.msgpack|.json`.

  Args:
    name: zoo name (see `models.zoo.ZOO`).
    seed: seeds initialisation, shuffling and augmentation.
    data_dir: local data folder (see `models.datasets.load`).
    out_dir: where to write the checkpoint; None writes nothing.
    epochs: overrides the recipe's epoch count.
    train_limit, test_limit: use only the first N images (short runs and tests).
    progress: show a progress bar with loss and accuracy.
    command: the command line to record in the metadata.
  """
  spec = zoo.entry(name)
  recipe = spec.recipe if epochs is None else dataclasses.replace(spec.recipe, epochs=epochs)
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
  variables = zoo.init_variables(module, spec.dataset, init_key)
  tx = make_optimizer(recipe, recipe.epochs * steps_per_epoch)
  opt_state = tx.init(variables["params"])
  train_step = _make_train_step(module, tx, recipe.augment)
  rng = np.random.default_rng(seed)

  losses = []
  start = time.time()
  for epoch in range(recipe.epochs):
    order = rng.permutation(len(train_x))
    total_loss, total_correct = 0.0, 0
    bar = tqdm(range(steps_per_epoch), desc=f"{name} epoch {epoch + 1}/{recipe.epochs}",
               disable=not progress, leave=True, mininterval=2.0)
    for step in bar:
      idx = order[step * batch:(step + 1) * batch]
      step_key = jax.random.fold_in(aug_key, epoch * steps_per_epoch + step)
      variables, opt_state, loss, correct = train_step(
          variables, opt_state, train_x[idx], train_y[idx], step_key)
      total_loss += float(loss)
      total_correct += int(correct)
      if step % 10 == 0 or step == steps_per_epoch - 1:
        bar.set_postfix(loss=f"{total_loss / (step + 1):.4f}",
                        acc=f"{total_correct / ((step + 1) * batch):.4f}", refresh=False)
    losses.append(total_loss / steps_per_epoch)
  train_seconds = time.time() - start

  apply_fn = zoo.Model(name, module, variables, {}).apply_fn
  scores = evaluation.accuracy_summary(apply_fn, variables, test_x, test_y)
  n_params = sum(int(np.size(p)) for p in jax.tree.leaves(variables["params"]))
  meta = {
      "name": name,
      "dataset": spec.dataset,
      "architecture": spec.architecture,
      "module": repr(module),
      "note": spec.note,
      "parameters": n_params,
      **scores,
      "train_examples": len(train_y),
      "train_loss_per_epoch": losses,
      "recipe": dataclasses.asdict(recipe),
      "seed": seed,
      "train_command": command or f"advsweep train {name} --seed {seed}",
      "train_seconds": round(train_seconds, 1),
      "device": jax.devices()[0].device_kind,
      "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "versions": {p: importlib.metadata.version(p) for p in ("jax", "flax", "optax")},
  }
  if out_dir is not None:
    meta = checkpoints.save(Path(out_dir) / f"{name}.msgpack", variables, meta)
  return TrainResult(meta=meta, losses=losses, variables=variables)
