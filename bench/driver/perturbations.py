"""The perturbation itself, kept with a run: sparse changes in the rows, whole images in files.

The analyses of one-pixel and JSMA attacks (propagation maps, locality, chromatic and spatial
statistics) and users who want the adversarial examples need more than a row's summary
numbers. Two forms:

- **Sparse changes in the rows.** For attacks that change a few features (`AttackSpec.sparse`:
  one-pixel, JSMA) each row lists the features it changed as indices into the image flattened
  in (height, width, channel) order, with the clean and the adversarial values
  (`changed_index`, `changed_from`, `changed_to`). The values are the float32 inputs the model
  saw, so re-applying them to the clean image gives the adversarial image bit for bit.
- **Adversarial images in files** (`save_images = true` in a config, or `advsweep run
  --save-images`): one `.npz` per unit under `RUN/images/`, written atomically, read without
  pickle (`read_images` refuses a corrupt or foreign file).
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np

from advsweep.models import files

IMAGES_DIR = "images"
_IMAGE_KEYS = ("example_idx", "adv_images", "config_hash", "model")


def sparse_changes(clean: np.ndarray, adv: np.ndarray
                   ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
  """Per image, the flat indices of the features `adv` changes, their clean and new values.

  Args:
    clean: [B, H, W, C] clean images (float32, as the model saw them).
    adv: [B, H, W, C] adversarial images.
  """
  clean = np.asarray(clean, np.float32).reshape(len(clean), -1)
  adv = np.asarray(adv, np.float32).reshape(len(adv), -1)
  index, old, new = [], [], []
  for c, a in zip(clean, adv, strict=True):
    changed = np.flatnonzero(c != a).astype(np.int32)
    index.append(changed)
    old.append(c[changed])
    new.append(a[changed])
  return index, old, new


def apply_changes(clean: np.ndarray, index: np.ndarray, new: np.ndarray) -> np.ndarray:
  """The adversarial image from a clean image [H, W, C] and a row's changes."""
  index = np.asarray(index, np.int64)
  out = np.array(clean, np.float32).reshape(-1)
  if index.size and (index.min() < 0 or index.max() >= out.size):
    raise ValueError(f"changed_index holds {index.min()}..{index.max()}, outside an image of "
                     f"{out.size} features {tuple(np.shape(clean))}: the rows are from images of "
                     "another shape")
  out[index] = np.asarray(new, np.float32)
  return out.reshape(np.shape(clean))


def feature_coordinates(index: np.ndarray, shape: tuple[int, int, int]
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(row, column, channel) of flat feature indices in an image of `shape` (H, W, C)."""
  return np.unravel_index(np.asarray(index, np.int64), shape)


def changed_pixels(index: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
  """[P, 2] the distinct (row, column) pixels of flat feature indices, in index order."""
  rows, cols, _ = feature_coordinates(index, shape)
  pixels = np.stack([rows, cols], -1)
  _, first = np.unique(rows * shape[1] + cols, return_index=True)
  return pixels[np.sort(first)]


def images_path(out_dir: str | os.PathLike, part_name: str) -> Path:
  """The image file of the unit whose part file is `part_name`."""
  return Path(out_dir) / IMAGES_DIR / (Path(part_name).stem + ".npz")


def write_images(path: str | os.PathLike, *, example_idx: np.ndarray, adv_images: np.ndarray,
                 config_hash: str, model: str) -> None:
  """Writes one unit's adversarial images atomically (numpy's .npz: no pickled objects)."""
  buffer = io.BytesIO()
  np.savez_compressed(buffer, example_idx=np.asarray(example_idx, np.int64),
                      adv_images=np.asarray(adv_images, np.float32),
                      config_hash=np.asarray(config_hash), model=np.asarray(model))
  files.atomic_write_bytes(path, buffer.getvalue())


def read_images(path: str | os.PathLike) -> dict[str, np.ndarray | str]:
  """One unit's images: `example_idx` [N], `adv_images` [N, H, W, C], `config_hash`, `model`.

  Raises:
    ValueError: the file is unreadable, lacks a field or holds mismatched arrays.
  """
  try:
    with np.load(path, allow_pickle=False) as data:
      out = {k: data[k] for k in data.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
    raise ValueError(f"{path} is not a readable advsweep image file ({err}); delete it and "
                     "run the same command again with --save-images: it rewrites the "
                     "unit") from None
  missing = [k for k in _IMAGE_KEYS if k not in out]
  if missing:
    raise ValueError(f"{path} lacks {', '.join(missing)}: not an advsweep image file")
  if out["adv_images"].ndim != 4 or len(out["adv_images"]) != len(out["example_idx"]):
    raise ValueError(f"{path}: {out['adv_images'].shape} images for "
                     f"{len(out['example_idx'])} indices; the file is corrupt")
  out["config_hash"], out["model"] = str(out["config_hash"]), str(out["model"])
  return out
