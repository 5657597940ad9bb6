"""Many one-pixel changes of a few images, evaluated fast: the confidence maps and the
locality analysis try thousands of (position, colour) pairs per image.

It evaluates candidates the way the one-pixel attack does (`attacks.pixel.core.
candidate_logits`): pixel-locally where the model's evaluator finds local layers (any
convolutional model), else by the full forward pass, in fixed-size chunks so one compile
serves.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from advsweep.attacks.pixel.core import candidate_logits

CHUNK = 2048


class PixelProbe:
  """Softmax outputs of clean images with one pixel set, for many candidates at once."""

  def __init__(self, model: Any, images: np.ndarray, chunk: int = CHUNK):
    self.images = jnp.asarray(images, jnp.float32)
    self.chunk = chunk
    logits_of, self.evaluation = candidate_logits(
        model.apply_fn, model.params, self.images, 1, model.pixel_evaluator)
    self._probs = jax.jit(lambda ids, c: jax.nn.softmax(logits_of(ids, c), -1))

  def probs(self, ids: np.ndarray, rows: np.ndarray, cols: np.ndarray, colours: np.ndarray
            ) -> np.ndarray:
    """[N, K] probabilities of images `ids` with pixel (rows, cols) set to `colours` [N, C]."""
    ids = np.asarray(ids, np.int32)
    candidates = np.concatenate([np.asarray(rows, np.float32)[:, None] + 0.5,
                                 np.asarray(cols, np.float32)[:, None] + 0.5,
                                 np.asarray(colours, np.float32)], -1)
    out = []
    for start in range(0, len(ids), self.chunk):
      stop = min(start + self.chunk, len(ids))
      pad = self.chunk - (stop - start)
      chunk_ids = np.pad(ids[start:stop], (0, pad))
      chunk = np.pad(candidates[start:stop], ((0, pad), (0, 0)))
      out.append(np.asarray(self._probs(chunk_ids, chunk))[:stop - start])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def colour_grid(channels: int, levels: int) -> np.ndarray:
  """[L^C, C] every colour with each channel at `levels` evenly spaced values in [0, 1]."""
  values = np.linspace(0.0, 1.0, levels, dtype=np.float32)
  grids = np.meshgrid(*([values] * channels), indexing="ij")
  return np.stack([g.reshape(-1) for g in grids], -1)
