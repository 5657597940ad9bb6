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
  run = _setup(name, seed=seed, data_dir=data_dir, out_dir=out_dir, epochs=epochs,
               train_limit=train_limit, test_limit=test_limit, batch_size=batch_size,
               guard_images=guard_images)
  state_file = state_lib.resume_path(out_dir, name) if out_dir is not None else None
  state = _resumed(run, run.initial_state, state_file, restart)
  first, first_step = int(state.epoch), int(state.step)
  rng = np.random.default_rng(seed)
  for _ in range(first):
    rng.permutation(len(run.train_x))  # the shuffles of the finished epochs
  _announce(run, state, first, first_step)

  stopped_at = None
  for epoch in range(first, run.recipe.epochs):
    order = rng.permutation(len(run.train_x))
    skip = first_step if epoch == first else 0  # the steps a mid-epoch save holds
    state, stopped_at = _train_epoch(
        run, state, epoch, order, skip, progress=progress, state_file=state_file,
        checkpoint_seconds=checkpoint_seconds, on_checkpoint=on_checkpoint)
    if stopped_at is not None:
      robust = np.asarray(state.robust)
      check = int(np.flatnonzero(~np.isnan(robust))[-1])
      print(f"{name}: PGD-10 accuracy on training images fell from "
            f"{np.nanmax(robust[:check]):.3f} to {robust[check]:.3f} (catastrophic "
            "overfitting): stopping, keeping the weights of the best check", flush=True)
      break
    if state_file is not None:
      state_lib.save_state(state_file, state)
      if keep_epochs:
        _keep_epoch(run, state, epoch, out_dir, seed)
    if on_epoch_end is not None:
      on_epoch_end(epoch + 1)

  # With the guard on, the shipped weights are always those of its best check (the last of
  # equal ones), not the final ones: robustness can fall without a collapse.
  variables = state.best if run.guard is not None else state.variables
  losses = [float(v) for v in np.asarray(state.losses)[:int(state.epoch)]]
  meta = _metadata(run, state, variables, losses, seed=seed, command=command,
                   stopped_at=stopped_at)
  if out_dir is not None:
    meta = checkpoints.save(Path(out_dir) / f"{name}.msgpack", variables, meta)
    if state_file is not None:
      state_file.unlink(missing_ok=True)
  return TrainResult(meta=meta, losses=losses, variables=variables)


@dataclasses.dataclass(frozen=True)
class _Run:
  """What a training run is made of, fixed before its first step."""

  name: str
  spec: zoo.ZooEntry
  recipe: zoo.TrainRecipe
  module: Any
  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  batch: int
  steps_per_epoch: int
  aug_key: jax.Array
  guard_key: jax.Array
  train_step: Callable[..., Any]
  guard: Callable[..., float] | None
  guard_idx: np.ndarray
  guard_steps: dict[int, int]  # steps done in an epoch -> the guard's check in it
  initial_state: state_lib.LoopState
  warm: dict | None


def _setup(name: str, *, seed: int, data_dir, out_dir, epochs, train_limit, test_limit,
           batch_size, guard_images: int) -> _Run:
  """The recipe (with the call's overrides), the data, the initial variables (warm-started
  where the recipe says), the compiled step and the guard."""
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
  variables = zoo.init_variables(module, spec.dataset, init_key)
  warm = None
  if recipe.init_from:
    variables, warm = warm_start(variables, recipe.init_from, out_dir)
  tx, train_step = steps.compiled_train_step(module, recipe, recipe.epochs * steps_per_epoch)
  checks = guard_lib.GUARD_CHECKS
  guard_at = sorted({max(1, round((i + 1) * steps_per_epoch / checks)) for i in range(checks)})
  return _Run(
      name=name, spec=spec, recipe=recipe, module=module, train_x=train_x, train_y=train_y,
      test_x=test_x, test_y=test_y, batch=batch, steps_per_epoch=steps_per_epoch,
      aug_key=aug_key, guard_key=jax.random.fold_in(key, 2), train_step=train_step,
      guard=guard_lib.make_guard(module, recipe) if recipe.overfit_guard else None,
      guard_idx=np.random.default_rng([seed, 1]).permutation(len(train_x))[:guard_images],
      guard_steps={step: i for i, step in enumerate(guard_at)},
      initial_state=state_lib.LoopState.start(
          variables, tx.init(variables["params"]), recipe.epochs, checks,
          state_lib.fingerprint(name, recipe, seed, train_limit, test_limit)),
      warm=warm)


def _resumed(run: _Run, state: state_lib.LoopState, state_file: Path | None,
             restart: bool) -> state_lib.LoopState:
  """The saved state of an interrupted run where there is one (deleted with `restart`)."""
  if state_file is None or not state_file.is_file():
    return state
  if restart:
    state_file.unlink()
    return state
  state = state_lib.load_state(state_file, state)
  epochs = run.recipe.epochs
  where = (f"after epoch {int(state.epoch)} of {epochs}" if not state.step
           else f"in epoch {int(state.epoch) + 1} of {epochs} after step "
           f"{int(state.step)} of {run.steps_per_epoch}")
  print(f"{run.name}: resuming {where} ({state_file})")
  return state


def _announce(run: _Run, state: state_lib.LoopState, first: int, first_step: int) -> None:
  """Prints the steps left and their estimated time, measured on the first batch."""
  seconds_per_step = _estimate(run.train_step, state, run.train_x[:run.batch],
                               run.train_y[:run.batch], run.aug_key)
  remaining = (run.recipe.epochs - first) * run.steps_per_epoch - first_step
  if remaining:
    print(f"{run.name}: {remaining} steps of {run.batch} ({run.steps_per_epoch} an epoch) at "
          f"{seconds_per_step:.3f} s per step: about {_minutes(remaining * seconds_per_step)}"
          f" (measured on the first batch)", flush=True)


def _train_epoch(run: _Run, state: state_lib.LoopState, epoch: int, order: np.ndarray,
                 skip: int, *, progress: bool, state_file: Path | None,
                 checkpoint_seconds: float, on_checkpoint: Callable[[int, int], None] | None
                 ) -> tuple[state_lib.LoopState, tuple[int, float] | None]:
  """One epoch from step `skip` (a mid-epoch save's), saving every `checkpoint_seconds`;
  returns the state at its end and, where the guard saw a collapse and stopped the epoch
  there, (epoch, fraction of the epoch done)."""
  start = last_save = time.time()
  steps_per_epoch, batch, recipe = run.steps_per_epoch, run.batch, run.recipe
  total_loss = float(state.epoch_loss) if skip else 0.0
  total_correct = int(state.epoch_correct) if skip else 0
  variables, opt_state = state.variables, state.opt_state
  stopped_at = None
  bar = tqdm(range(skip, steps_per_epoch), desc=f"{run.name} epoch {epoch + 1}/{recipe.epochs}",
             initial=skip, total=steps_per_epoch, disable=not progress, leave=True,
             mininterval=2.0)
  done = skip  # steps of the epoch done
  for step in bar:
    interrupts.check()
    idx = order[step * batch:(step + 1) * batch]
    global_step = epoch * steps_per_epoch + step
    variables, opt_state, loss, correct = run.train_step(
        variables, opt_state, run.train_x[idx], run.train_y[idx],
        jax.random.fold_in(run.aug_key, global_step),
        adversary.eps_scale(recipe, global_step, recipe.epochs * steps_per_epoch))
    total_loss += float(loss)
    total_correct += int(correct)
    done = step + 1
    if step % 10 == 0 or step == steps_per_epoch - 1:
      bar.set_postfix(loss=f"{total_loss / (step + 1):.4f}",
                      acc=f"{total_correct / ((step + 1) * batch):.4f}", refresh=False)
    if run.guard is not None and step + 1 in run.guard_steps:
      state, collapsed = _guard_check(run, state, variables,
                                      epoch * guard_lib.GUARD_CHECKS + run.guard_steps[step + 1])
      if collapsed:
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
  # A line an epoch, progress bar or not: what a log of a run in the background shows.
  tqdm.write(f"{run.name}: epoch {epoch + 1}/{recipe.epochs}: loss {losses[epoch]:.4f}, "
             f"accuracy {total_correct / (done * batch):.4f} on its training batches, "
             f"{_minutes(float(state.train_seconds))} of training so far")
  return state, stopped_at


def _guard_check(run: _Run, state: state_lib.LoopState, variables: Any, check: int
                 ) -> tuple[state_lib.LoopState, bool]:
  """The guard's check number `check` on `variables`: the state with its accuracy recorded
  (and `variables` as the best where they are, the last of equal ones), and whether the
  accuracy fell by more than `GUARD_DROP` below the best before it."""
  robust = np.array(state.robust)
  robust[check] = run.guard(variables, run.train_x[run.guard_idx], run.train_y[run.guard_idx],
                            jax.random.fold_in(run.guard_key, check))
  best_before = np.nanmax(robust[:check]) if check else -np.inf
  state = state.replace(robust=robust,
                        best=variables if robust[check] >= best_before else state.best)
  tqdm.write(f"{run.name}: PGD-10 accuracy {robust[check]:.3f} on {len(run.guard_idx)} "
             "training images")
  return state, bool(robust[check] < best_before - guard_lib.GUARD_DROP)


def _keep_epoch(run: _Run, state: state_lib.LoopState, epoch: int, out_dir, seed: int) -> None:
  """Epoch `epoch`'s weights as a checkpoint of their own (`keep_epochs`)."""
  checkpoints.save(epoch_path(out_dir, run.name, epoch + 1), state.variables, {
      "name": run.name, "epoch": epoch + 1, "of_epochs": run.recipe.epochs, "seed": seed,
      "recipe": zoo.recipe_dict(run.recipe),
      "train_loss": float(np.asarray(state.losses)[epoch]),
      "train_seconds": round(float(state.train_seconds), 1)})


def _metadata(run: _Run, state: state_lib.LoopState, variables: Any, losses: list[float], *,
              seed: int, command: str | None, stopped_at: tuple[int, float] | None) -> dict:
  """The checkpoint's metadata: test accuracy, the recipe, the training time and, with the
  guard on, its checks and which one's weights ship."""
  spec, name = run.spec, run.name
  apply_fn = zoo.Model(name, run.module, variables, {}).apply_fn
  scores = evaluation.accuracy_summary(apply_fn, variables, run.test_x, run.test_y)
  meta = {
      "name": name,
      "dataset": spec.dataset,
      "architecture": spec.architecture,
      "module": repr(run.module),
      "note": spec.note,
      "defense": spec.defense,
      "twin": spec.twin,
      "parameters": sum(int(np.size(p)) for p in jax.tree.leaves(variables["params"])),
      **scores,
      "train_examples": len(run.train_y),
      "train_loss_per_epoch": losses,
      "recipe": zoo.recipe_dict(run.recipe),
      "seed": seed,
      "train_command": command or f"advsweep train {name} --seed {seed}",
      "train_seconds": round(float(state.train_seconds), 1),
      "device": jax.devices()[0].device_kind,
      "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "versions": {p: importlib.metadata.version(p) for p in ("jax", "flax", "optax")},
  }
  if run.warm is not None:
    meta["init_from"] = run.warm
  if run.guard is not None:
    robust = np.asarray(state.robust)
    done = robust[~np.isnan(robust)]
    kept = guard_lib.last_best(done)
    meta["overfit_guard"] = {
        "pgd10_train_accuracy_per_check": [round(float(v), 4) for v in done],
        "checks_per_epoch": guard_lib.GUARD_CHECKS, "images": len(run.guard_idx),
        "stopped_at": None if stopped_at is None else
        {"epoch": stopped_at[0], "fraction_of_epoch": round(stopped_at[1], 3)},
        "kept": f"check {kept + 1} of {len(done)}",
        "kept_pgd10_train_accuracy": round(float(done[kept]), 4)}
  return meta
