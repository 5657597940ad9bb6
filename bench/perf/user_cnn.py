"""A CIFAR-10 CNN as a user would write and train it, outside the zoo, for the benchmarks'
user's-model path
(`advsweep perf peers --models advsweep.bench.perf.user_models:cifar10_user_cnn`).

Nothing in it is advsweep's: a Flax module of its own design (GELU, average and max pools, a
global mean head), trained by a plain optax loop, its weights saved with flax's msgpack
serialisation. advsweep sees only `apply_fn(params, images)` and the params, so the attacks'
pixel-local evaluation must be derived from the function (`attacks.pixel_local`), and the
figures measure what a user with their own model gets.

Train (about 10 minutes on a 2-core CPU; the weights land in `results/perf/`):

    python -m advsweep.bench.perf.user_cnn --data-dir DATA_DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from advsweep.models import datasets, files

WEIGHTS = Path(__file__).resolve().parents[2] / "results" / "perf" / "user-cnn-cifar10.msgpack"
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.247, 0.2435, 0.2616], np.float32)


class UserCNN(nn.Module):
  """Five 3x3 convolutions (32-32 | avg pool | 64-64 | max pool | 128), GELU, a global mean
  and one dense layer: about 140k parameters, no BatchNorm."""

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = (images - MEAN) / STD
    for width in (32, 32):
      x = nn.gelu(nn.Conv(width, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    for width in (64, 64):
      x = nn.gelu(nn.Conv(width, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.gelu(nn.Conv(128, (3, 3))(x))
    return nn.Dense(10)(x.mean(axis=(1, 2)))


def apply_fn(params, images: jax.Array) -> jax.Array:
  """Logits of [B, 32, 32, 3] images in [0, 1]."""
  return UserCNN().apply(params, images)


def load(path: str | Path = WEIGHTS) -> tuple[dict, dict]:
  """(params, metadata) from the msgpack file and its JSON beside it; no code runs."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found; train the user's CNN first: python -m "
                            "advsweep.bench.perf.user_cnn --data-dir DATA_DIR")
  template = UserCNN().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  params = flax.serialization.from_bytes(template, path.read_bytes())
  return params, json.loads(path.with_suffix(".json").read_text())


def _augment(rng: np.random.Generator, batch: np.ndarray) -> np.ndarray:
  """Random horizontal flips and 4-pixel translations (reflect padding)."""
  flip = rng.random(len(batch)) < 0.5
  batch = np.where(flip[:, None, None, None], batch[:, :, ::-1], batch)
  padded = np.pad(batch, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
  dy, dx = rng.integers(0, 9, 2)
  return padded[:, dy:dy + 32, dx:dx + 32]


def train(data_dir: str | None, out: Path, epochs: int = 6, batch_size: int = 128,
          seed: int = 0, limit: int | None = None) -> tuple[dict, dict]:
  """AdamW on a cosine one-cycle schedule, cross-entropy, flips and translations; writes
  `out` and its JSON and returns (params, metadata)."""
  train_x, train_y = datasets.load("cifar10", "train", data_dir)
  test_x, test_y = datasets.load("cifar10", "test", data_dir)
  if limit:
    train_x, train_y, test_x, test_y = train_x[:limit], train_y[:limit], test_x[:limit], \
        test_y[:limit]
  steps = epochs * (len(train_x) // batch_size)
  tx = optax.adamw(optax.cosine_onecycle_schedule(steps, 3e-3), weight_decay=5e-4)
  params = UserCNN().init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, labels):
    def loss_fn(p):
      logits = apply_fn(p, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  start = time.time()
  for epoch in range(epochs):
    order = rng.permutation(len(train_x))
    losses = []
    for s in range(len(train_x) // batch_size):
      at = order[s * batch_size:(s + 1) * batch_size]
      images = _augment(rng, train_x[at].astype(np.float32) / 255.0)
      params, opt_state, loss = step(params, opt_state, jnp.asarray(images),
                                     jnp.asarray(train_y[at]))
      losses.append(float(loss))
    print(f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.3f} "
          f"({time.time() - start:.0f} s)", flush=True)
  predict = jax.jit(apply_fn)
  right = sum(int((np.asarray(predict(params, jnp.asarray(
      test_x[s:s + 500].astype(np.float32) / 255.0))).argmax(-1) == test_y[s:s + 500]).sum())
      for s in range(0, len(test_x), 500))
  meta = {"test_accuracy": right / len(test_x), "test_examples": len(test_x),
          "epochs": epochs, "seed": seed, "train_seconds": round(time.time() - start, 1),
          "parameters": int(sum(np.size(p) for p in jax.tree.leaves(params)))}
  files.atomic_write_bytes(out, flax.serialization.to_bytes(params))
  files.atomic_write_text(out.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
  return params, meta


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--out", type=Path, default=WEIGHTS)
  parser.add_argument("--epochs", type=int, default=6)
  parser.add_argument("--limit", type=int, default=None, help="train on the first N images")
  args = parser.parse_args(argv)
  _, meta = train(args.data_dir, args.out, args.epochs, limit=args.limit)
  print(json.dumps(meta, indent=2))


if __name__ == "__main__":
  main()
