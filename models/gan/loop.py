"""The training loop of the two-network models (the DCGAN, AdvGAN's generator): one jitted
step a batch, deterministic from the seed, saved every epoch and every `checkpoint_seconds`
within one, and resumed to the weights an uninterrupted run would have (the zoo's resume
file, `models.training.state`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import struct
from tqdm.auto import tqdm

from advsweep.models import interrupts
from advsweep.models.training import state as state_lib


@struct.dataclass
class GanState:
  """Where a two-network training run stands.

  Attributes:
    generator, discriminator: the two networks' variables.
    gen_opt, disc_opt: their optimisers' states.
    epoch: epochs finished; step: steps done in the current epoch.
    sums: [M] the current epoch's metrics summed over its steps.
    history: [epochs, M] each finished epoch's mean metrics.
    train_seconds: training time so far, resumed runs included.
    fingerprint: what a resumed run must share with the run that saved it (static).
  """

  generator: Any
  discriminator: Any
  gen_opt: Any
  disc_opt: Any
  epoch: np.int64
  step: np.int64
  sums: np.ndarray
  history: np.ndarray
  train_seconds: np.float64
  fingerprint: str = struct.field(pytree_node=False, default="")

  @classmethod
  def start(cls, generator: Any, discriminator: Any, gen_opt: Any, disc_opt: Any,
            epochs: int, num_metrics: int, fingerprint: str) -> GanState:
    return cls(generator, discriminator, gen_opt, disc_opt, np.int64(0), np.int64(0),
               np.zeros(num_metrics), np.full((epochs, num_metrics), np.nan),
               np.float64(0.0), fingerprint)


# step(gen, disc, gen_opt, disc_opt, images [B,H,W,C] in [0, 1], labels [B], key)
#   -> (gen, disc, gen_opt, disc_opt, metrics [M])
Step = Callable[..., tuple[Any, Any, Any, Any, jax.Array]]


def train(name: str, state: GanState, step: Step, images_u8: np.ndarray, labels: np.ndarray,
          *, epochs: int, batch_size: int, seed: int, metric_names: Sequence[str],
          state_file: str | os.PathLike | None = None, progress: bool = True,
          checkpoint_seconds: float = state_lib.CHECKPOINT_SECONDS,
          on_checkpoint: Callable[[int, int], None] | None = None) -> GanState:
  """Runs `step` over `epochs` shuffled passes of the images from `state` (or from the
  resume file `state_file`, where one of the same fingerprint exists) and returns the final
  state; the resume file is deleted at the end.

  Every random choice comes from `seed`: the shuffles from a numpy generator seeded with it,
  each step's key from `fold_in(key(seed), global step)`.
  """
  batch = min(batch_size, len(images_u8))
  steps_per_epoch = len(images_u8) // batch
  if steps_per_epoch == 0:
    raise ValueError(f"no full batch of {batch} in {len(images_u8)} training images")
  path = Path(state_file) if state_file is not None else None
  if path is not None and path.is_file():
    state = state_lib.load_state(path, state)
    print(f"{name}: resuming in epoch {int(state.epoch) + 1} of {epochs} after step "
          f"{int(state.step)} of {steps_per_epoch} ({path})", flush=True)
  rng = np.random.default_rng(seed)
  for _ in range(int(state.epoch)):
    rng.permutation(len(images_u8))  # the shuffles of the finished epochs
  base_key = jax.random.key(seed)
  for epoch in range(int(state.epoch), epochs):
    order = rng.permutation(len(images_u8))
    skip = int(state.step)
    sums = np.array(state.sums, np.float64)
    nets = (state.generator, state.discriminator, state.gen_opt, state.disc_opt)
    start = last_save = time.time()
    bar = tqdm(range(skip, steps_per_epoch), desc=f"{name} epoch {epoch + 1}/{epochs}",
               initial=skip, total=steps_per_epoch, disable=not progress, mininterval=2.0)
    for i in bar:
      interrupts.check()
      idx = order[i * batch:(i + 1) * batch]
      key = jax.random.fold_in(base_key, epoch * steps_per_epoch + i)
      *nets, metrics = step(*nets, images_u8[idx].astype(np.float32) / 255.0,
                            labels[idx].astype(np.int32), key)
      sums += np.asarray(metrics, np.float64)
      if i % 10 == 0 or i == steps_per_epoch - 1:
        bar.set_postfix({m: f"{v / (i + 1):.3f}"
                         for m, v in zip(metric_names, sums, strict=True)}, refresh=False)
      now = time.time()
      if path is not None and i + 1 < steps_per_epoch and now - last_save >= checkpoint_seconds:
        state = _advance(state, nets, now - start, step=np.int64(i + 1), sums=sums)
        state_lib.save_state(path, state)
        start = last_save = now
        if on_checkpoint is not None:
          on_checkpoint(epoch, i + 1)
    history = np.array(state.history)
    history[epoch] = sums / steps_per_epoch
    state = _advance(state, nets, time.time() - start, epoch=np.int64(epoch + 1),
                     step=np.int64(0), sums=np.zeros_like(sums), history=history)
    if path is not None:
      state_lib.save_state(path, state)
    print(f"{name}: epoch {epoch + 1}/{epochs} " + ", ".join(
        f"{m} {v:.4f}" for m, v in zip(metric_names, history[epoch], strict=True)), flush=True)
  if path is not None:
    path.unlink(missing_ok=True)
  return state


def _advance(state: GanState, nets: Sequence[Any], seconds: float, **fields: Any
             ) -> GanState:
  gen, disc, gen_opt, disc_opt = nets
  return state.replace(generator=gen, discriminator=disc, gen_opt=gen_opt, disc_opt=disc_opt,
                       train_seconds=np.float64(float(state.train_seconds) + seconds),
                       **fields)
