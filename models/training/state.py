"""The training loop's state, a named pytree (`LoopState`), and its resume file: an interrupted
run is saved every epoch, and within an epoch every `CHECKPOINT_SECONDS`, and resumes to the
weights an uninterrupted run would have."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import numpy as np
from flax import struct

from advsweep.models import checkpoints, zoo
from advsweep.models.files import atomic_write_bytes

RESUME_SUFFIX = ".resume.msgpack"
CHECKPOINT_SECONDS = 600.0  # a mid-epoch save at most this often


@struct.dataclass
class LoopState:
  """Where a training run stands.

  Attributes:
    variables, opt_state: the network's variables and the optimiser's state.
    best: the variables of the overfitting guard's best check (what ships where it is on).
    epoch: epochs finished.
    step, epoch_loss, epoch_correct: steps done in the current epoch, with their summed
      loss and correct count (zero at an epoch's start).
    losses: mean training loss per finished epoch.
    robust: the guard's PGD-10 accuracy per check (nan where not run yet).
    train_seconds: training time so far, resumed runs included.
    fingerprint: what a resumed run must share with the run that saved it (static).
  """

  variables: Any
  opt_state: Any
  best: Any
  epoch: np.int64
  step: np.int64
  epoch_loss: np.float64
  epoch_correct: np.int64
  losses: np.ndarray
  robust: np.ndarray
  train_seconds: np.float64
  fingerprint: str = struct.field(pytree_node=False, default="")

  @classmethod
  def start(cls, variables: Any, opt_state: Any, epochs: int, checks: int,
            fingerprint: str) -> LoopState:
    return cls(variables=variables, opt_state=opt_state, best=variables, epoch=np.int64(0),
               step=np.int64(0), epoch_loss=np.float64(0.0), epoch_correct=np.int64(0),
               losses=np.zeros(epochs), robust=np.full(epochs * checks, np.nan),
               train_seconds=np.float64(0.0), fingerprint=fingerprint)

  def advance(self, variables: Any, opt_state: Any, seconds: float, **fields: Any
              ) -> LoopState:
    """This state after `seconds` more of training that reached `variables`, `opt_state`."""
    return self.replace(variables=variables, opt_state=opt_state, **fields,
                        train_seconds=np.float64(float(self.train_seconds) + seconds))

  def epoch_done(self, variables: Any, opt_state: Any, seconds: float, losses: np.ndarray
                 ) -> LoopState:
    """The state at the start of the next epoch."""
    return self.advance(variables, opt_state, seconds, epoch=np.int64(self.epoch + 1),
                        losses=losses, step=np.int64(0), epoch_loss=np.float64(0.0),
                        epoch_correct=np.int64(0))


def resume_path(out_dir: str | os.PathLike, name: str) -> Path:
  """Where an unfinished training run of `name` keeps its last epoch (`train_and_evaluate`)."""
  return Path(out_dir) / f"{name}{RESUME_SUFFIX}"


def fingerprint(name: str, recipe: zoo.TrainRecipe, seed: int, train_limit: int | None,
                test_limit: int | None) -> str:
  """What a resumed run must share with the run that wrote the state."""
  return json.dumps({"name": name, "recipe": zoo.recipe_dict(recipe), "seed": seed,
                     "train_limit": train_limit, "test_limit": test_limit}, sort_keys=True)


def save_state(path: Path, state: LoopState) -> None:
  """The state as flax msgpack (no pickle), with its fingerprint, atomically."""
  host = jax.tree.map(np.asarray, flax.serialization.to_state_dict(state))
  atomic_write_bytes(path, flax.serialization.msgpack_serialize(
      {**host, "fingerprint": state.fingerprint}))


def load_state(path: Path, target: LoopState) -> LoopState:
  """The saved state of an interrupted run, or an error naming the way out."""
  try:
    raw = flax.serialization.msgpack_restore(path.read_bytes())
  except Exception as err:  # msgpack raises several unrelated types on bad input
    raise checkpoints.CheckpointError(
        f"{path}: not a training state ({err}); delete it or pass --restart") from err
  if not isinstance(raw, dict) or raw.pop("fingerprint", None) != target.fingerprint:
    raise checkpoints.CheckpointError(
        f"{path}: a training state of another recipe, seed or data size; pass --restart "
        "to discard it, or run the command that wrote it")
  try:
    return flax.serialization.from_state_dict(target, raw)
  except (ValueError, KeyError) as err:
    raise checkpoints.CheckpointError(
        f"{path}: a training state of another layout ({err}), written by an earlier "
        "advsweep; pass --restart to discard it") from err


__all__ = ["CHECKPOINT_SECONDS", "RESUME_SUFFIX", "LoopState", "fingerprint", "load_state",
           "resume_path", "save_state"]
