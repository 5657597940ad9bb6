"""The training loop of the zoo models: deterministic from a seed, one jitted step a batch,
resumable (`train_and_evaluate`)."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from advsweep.models import checkpoints, datasets, evaluation, interrupts, zoo
from advsweep.models.training import adversary, steps
from advsweep.models.training import guard as guard_lib
from advsweep.models.training import state as state_lib


@dataclasses.dataclass
class TrainResult:
  meta: dict
  losses: list[float]  # mean training loss per epoch
  variables: Any


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


def _estimate(train_step, state, batch_x, batch_y, key) -> float:
  """Seconds per step: one compile and two timed steps on the first batch (discarded)."""
  out = train_step(state.variables, state.opt_state, batch_x, batch_y, key)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(2):
    jax.block_until_ready(train_step(state.variables, state.opt_state, batch_x, batch_y,
                                     key))
  return (time.perf_counter() - start) / 2


def _minutes(seconds: float) -> str:
  return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def epoch_path(out_dir: str | os.PathLike, name: str, epoch: int) -> Path:
  """Where `keep_epochs` writes epoch `epoch`'s weights: a checkpoint folder of its own
  (`zoo.load(name, checkpoint_dir=path.parent)` loads it)."""
  return Path(out_dir) / f"{name}.epochs" / f"epoch{epoch:03d}" / f"{name}.msgpack"


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
    checkpoint_seconds: float = state_lib.CHECKPOINT_SECONDS,
    on_checkpoint: Callable[[int, int], None] | None = None,
    batch_size: int | None = None,
    guard_images: int = guard_lib.GUARD_IMAGES,
    keep_epochs: bool = False,
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
    keep_epochs: with `out_dir`, also keep each finished epoch's weights as a checkpoint of
      their own, `epoch_path(out_dir, name, epoch)`, so that robustness can be measured
      against epochs (a curve where the budget stops short of the paper's).
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
  tx, train_step = steps.compiled_train_step(module, recipe, recipe.epochs * steps_per_epoch)
  rng = np.random.default_rng(seed)
  guard = guard_lib.make_guard(module, recipe) if recipe.overfit_guard else None
  guard_idx = np.random.default_rng([seed, 1]).permutation(len(train_x))[:guard_images]
  checks = guard_lib.GUARD_CHECKS
  guard_at = sorted({max(1, round((i + 1) * steps_per_epoch / checks)) for i in range(checks)})
  guard_steps = {step: i for i, step in enumerate(guard_at)}  # steps done -> check

  state = state_lib.LoopState.start(
      variables, tx.init(variables["params"]), recipe.epochs, checks,
      state_lib.fingerprint(name, recipe, seed, train_limit, test_limit))
  state_file = state_lib.resume_path(out_dir, name) if out_dir is not None else None
  if state_file is not None and state_file.is_file():
    if restart:
      state_file.unlink()
    else:
      state = state_lib.load_state(state_file, state)
      where = (f"after epoch {int(state.epoch)} of {recipe.epochs}" if not state.step
               else f"in epoch {int(state.epoch) + 1} of {recipe.epochs} after step "
               f"{int(state.step)} of {steps_per_epoch}")
      print(f"{name}: resuming {where} ({state_file})")
  first = int(state.epoch)
  first_step = int(state.step)
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
    total_loss = float(state.epoch_loss) if skip else 0.0
    total_correct = int(state.epoch_correct) if skip else 0
    variables, opt_state = state.variables, state.opt_state
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
          adversary.eps_scale(recipe, global_step, recipe.epochs * steps_per_epoch))
      total_loss += float(loss)
      total_correct += int(correct)
      if step % 10 == 0 or step == steps_per_epoch - 1:
        bar.set_postfix(loss=f"{total_loss / (step + 1):.4f}",
                        acc=f"{total_correct / ((step + 1) * batch):.4f}", refresh=False)
      if guard is not None and step + 1 in guard_steps:
        check = epoch * checks + guard_steps[step + 1]
        robust = np.array(state.robust)
        robust[check] = guard(variables, train_x[guard_idx], train_y[guard_idx],
                              jax.random.fold_in(guard_key, check))
        best_before = np.nanmax(robust[:check]) if check else -np.inf
        state = state.replace(robust=robust,
                              best=variables if robust[check] >= best_before else state.best)
        tqdm.write(f"{name}: PGD-10 accuracy {robust[check]:.3f} on {len(guard_idx)} "
                   "training images")
        if robust[check] < best_before - guard_lib.GUARD_DROP:
          stopped_at = (epoch + 1, (step + 1) / steps_per_epoch)
          break
      now = time.time()
      if (state_file is not None and step + 1 < steps_per_epoch
          and now - last_save >= checkpoint_seconds):
        state = state.advance(variables, opt_state, now - start, step=np.int64(step + 1),
                              epoch_loss=np.float64(total_loss),
                              epoch_correct=np.int64(total_correct))
        state_lib.save_state(state_file, state)
        start = last_save = now
        if on_checkpoint is not None:
          on_checkpoint(epoch, step + 1)
    losses = np.array(state.losses)
    losses[epoch] = total_loss / steps_per_epoch
    state = state.epoch_done(variables, opt_state, time.time() - start, losses)
    if stopped_at is not None:
      robust = np.asarray(state.robust)
      print(f"{name}: PGD-10 accuracy on training images fell from "
            f"{np.nanmax(robust[:check]):.3f} to {robust[check]:.3f} (catastrophic "
            "overfitting): stopping, keeping the weights of the best check", flush=True)
      break
    if state_file is not None:
      state_lib.save_state(state_file, state)
      if keep_epochs:
        checkpoints.save(epoch_path(out_dir, name, epoch + 1), variables, {
            "name": name, "epoch": epoch + 1, "of_epochs": recipe.epochs, "seed": seed,
            "recipe": zoo.recipe_dict(recipe),
            "train_loss": float(losses[epoch]),
            "train_seconds": round(float(state.train_seconds), 1)})
    if on_epoch_end is not None:
      on_epoch_end(epoch + 1)

  # With the guard on, the shipped weights are always those of its best check (the last of
  # equal ones), not the final ones: robustness can fall without a collapse.
  variables = state.best if guard is not None else state.variables
  epochs_run = int(state.epoch)
  losses = [float(v) for v in np.asarray(state.losses)[:epochs_run]]
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
      "train_seconds": round(float(state.train_seconds), 1),
      "device": jax.devices()[0].device_kind,
      "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "versions": {p: importlib.metadata.version(p) for p in ("jax", "flax", "optax")},
  }
  if warm is not None:
    meta["init_from"] = warm
  if guard is not None:
    robust = np.asarray(state.robust)
    done = robust[~np.isnan(robust)]
    meta["overfit_guard"] = {
        "pgd10_train_accuracy_per_check": [round(float(v), 4) for v in done],
        "checks_per_epoch": checks, "images": len(guard_idx),
        "stopped_at": None if stopped_at is None else
        {"epoch": stopped_at[0], "fraction_of_epoch": round(stopped_at[1], 3)},
        "kept": f"check {guard_lib.last_best(done) + 1} of {len(done)}",
        "kept_pgd10_train_accuracy": round(float(done[guard_lib.last_best(done)]), 4)}
  if out_dir is not None:
    meta = checkpoints.save(Path(out_dir) / f"{name}.msgpack", variables, meta)
    if state_file is not None:
      state_file.unlink(missing_ok=True)
  return TrainResult(meta=meta, losses=losses, variables=variables)
