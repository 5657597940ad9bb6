"""Attack throughput against the model's physical limit (`advsweep perf`).

For each attack on each model this measures, in one process:
- the model's raw throughput of the attack's unit of work at the attack's batch size: a
  forward pass (one-pixel), a forward+backward pass (FGSM, BIM, PGD), or a forward pass and
  two vector-Jacobian products (a JSMA iteration; one for JSMA-F);
- the attack's units per second (from the queries it reports) and images per second;
- the efficiency against the physical limit: the time the model alone needs for the attack's
  units plus the one forward pass per image that re-checks its result (at the raw rates),
  divided by the attack's time. 1.0 means no time is spent outside the model's own passes.
  The attack and the raw passes are timed in turn, round after round
  (`interleaved_seconds`), so that a drift in the machine's speed hits both alike. (The
  re-check counts as model work: FGSM cannot report success without it, and leaving it
  out capped FGSM near 0.75 on the LeNet whatever the implementation.);
- compile time, apart from run time, and the compiled executable's memory (arguments,
  outputs and temporaries: the CPU backend reports no live peak).
Rows are printed as a table and written to `<out>/perf-<timestamp>.parquet`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow as pa
import pyarrow.parquet as pq

from advsweep import attacks
from advsweep.bench import run_attack, tables
from advsweep.models import datasets, files, zoo

UNITS = {"fgsm": "fwd+bwd", "bim": "fwd+bwd", "pgd": "fwd+bwd", "jsma": "fwd+2vjp",
         "one_pixel": "fwd"}
QUICK_OVERRIDES = {"one_pixel": ["num_generations=10"], "jsma": ["gamma=0.05"],
                   "bim": ["num_steps=5"], "pgd": ["num_steps=5"], "fgsm": []}


def unit_of(name: str, config: Any) -> str:
  """The attack's unit of model work (JSMA-F takes one VJP per iteration, not two)."""
  if name == "jsma" and config.derivative == "probabilities":
    return "fwd+vjp"
  return UNITS[name]


def _unit_fn(apply_fn: Callable, params: Any, unit: str) -> Callable:
  if unit == "fwd":
    return jax.jit(lambda x: apply_fn(params, x))
  if unit in ("fwd+bwd", "fwd+vjp"):  # one backward pass from a scalar per image
    def loss(x):
      logits = apply_fn(params, x)
      labels = jnp.zeros(x.shape[0], jnp.int32)
      return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    return jax.jit(jax.grad(loss))

  def two_vjps(x):
    logits, vjp = jax.vjp(lambda y: apply_fn(params, y), x)
    onehot = jax.nn.one_hot(jnp.zeros(x.shape[0], jnp.int32), logits.shape[-1])
    return vjp(onehot)[0] + vjp(1.0 - onehot)[0]
  return jax.jit(two_vjps)


def unit_call(apply_fn: Callable, params: Any, shape: tuple[int, ...], unit: str
              ) -> Callable[[], Any]:
  """A warm, jitted call of `unit` on a batch of `shape` (random inputs)."""
  fn = _unit_fn(apply_fn, params, unit)
  x = jax.random.uniform(jax.random.key(0), shape)
  jax.block_until_ready(fn(x))
  return lambda: fn(x)


def raw_throughput(apply_fn: Callable, params: Any, shape: tuple[int, ...], unit: str,
                   min_seconds: float = 1.0) -> float:
  """Images per second of `unit` on a batch of `shape`, after a warm-up call."""
  call = unit_call(apply_fn, params, shape, unit)
  reps, start = 0, time.perf_counter()
  while reps < 3 or time.perf_counter() - start < min_seconds:
    jax.block_until_ready(call())
    reps += 1
  return reps * shape[0] / (time.perf_counter() - start)


def attack_units(name: str, result: attacks.AttackResult) -> int:
  """Units of model work the attack reports: see UNITS."""
  queries = np.asarray(result.queries, np.int64)
  if UNITS[name] == "fwd+bwd":
    return int(np.sum(queries - 1))  # one clean forward pass, then one pass per step
  return int(np.sum(queries))


def unit_batch(name: str, config: Any, num_images: int) -> int:
  """The batch size the attack feeds the model."""
  if name == "one_pixel":  # the attack's even chunks (attacks.one_pixel._one_pixel)
    candidates = min(config.num_slots, num_images) * config.population_size
    num_chunks = -(-candidates // min(config.chunk_size, candidates))
    return -(-candidates // num_chunks)
  if name == "jsma":  # its working rows (continuous batching)
    return min(config.num_slots, num_images)
  return num_images


def _calls(fn: Callable[[], Any], seconds: float, max_runs: int | None = None
           ) -> tuple[Any, list[float]]:
  """The last output and the seconds of each call of `fn`, called until `seconds` have
  passed (at least once, at most `max_runs` times)."""
  times, start, out = [], time.perf_counter(), None
  while not times or (time.perf_counter() - start < seconds
                      and (max_runs is None or len(times) < max_runs)):
    begin = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - begin)
  return out, times


def timed(fn: Callable[[], Any], min_seconds: float = 2.0, max_runs: int = 7
          ) -> tuple[Any, float, int]:
  """The output, the median seconds of repeated calls and how many calls were made.

  Calls repeat until `min_seconds` have passed (at most `max_runs`): one call for the long
  attacks, several for the ones that take milliseconds, whose single timings are noisy.
  """
  out, times = _calls(fn, min_seconds, max_runs)
  return out, float(np.median(times)), len(times)


def compile_and_run_seconds(prepared: Callable[[], Any], min_seconds: float = 0.0
                            ) -> tuple[Any, float, float]:
  """The result, compile seconds (first call minus the run time) and run seconds (the median
  of warm calls over `min_seconds`; one warm call by default)."""
  (first,) = _calls(prepared, 0.0)[1]
  result, run_s, _ = timed(prepared, min_seconds)
  return result, max(0.0, first - run_s), run_s


def interleaved_seconds(attack: Callable[[], Any], units: Callable[[], Any],
                        check: Callable[[], Any], min_seconds: float = 1.0,
                        min_rounds: int = 3) -> tuple[Any, float, float, float]:
  """The attack's result and the median seconds of one call of the attack, of the raw unit
  and of the raw re-check, measured in turn, round after round, for at least `min_rounds`
  rounds and `min_seconds` (each round calls the raw ones for up to 0.5 s).

  The development CPU's speed drifts by 10-30% over seconds; a ratio of two figures
  measured one after the other takes that drift in, two measured in turn see it alike.
  Single runs of the same JSMA call on 32 LeNet images took 1.33 to 1.69 s in a row, hence
  the median of at least three.
  """
  attack_s, unit_s, check_s, start = [], [], [], time.perf_counter()
  result = None
  while len(attack_s) < min_rounds or time.perf_counter() - start < min_seconds:
    result, (seconds,) = _calls(attack, 0.0)
    attack_s.append(seconds)
    unit_s += _calls(units, min(seconds, 0.5))[1]
    check_s += _calls(check, min(seconds, 0.5) / 4)[1]
  return result, *(float(np.median(t)) for t in (attack_s, unit_s, check_s))


def measure(model_name: str, apply_fn: Callable, params: Any, name: str, images: jax.Array,
            labels: np.ndarray, overrides: list[str], seed: int = 0) -> dict[str, Any]:
  """One row: attack `name` (with `key=value` overrides) on `images` against the raw limit."""
  config = run_attack.make_config(name, overrides)
  key = jax.random.key(seed)
  prepared = attacks.PREPARE[name](apply_fn, params, images, labels, key, config)
  memory = prepared.lower().compile().memory_analysis()
  (first_s,) = _calls(prepared, 0.0)[1]  # compiles
  unit = unit_of(name, config)
  batch = unit_batch(name, config, len(images))
  units_call = unit_call(apply_fn, params, (batch, *images.shape[1:]), unit)
  check_call = unit_call(apply_fn, params, images.shape, "fwd")
  result, run_s, unit_s, check_s = interleaved_seconds(prepared, units_call, check_call)
  compile_s = max(0.0, first_s - run_s)
  raw, raw_check = batch / unit_s, len(images) / check_s
  units = attack_units(name, result)
  bound_s = units / raw + len(images) / raw_check  # the model's own time for the passes
  success = np.asarray(result.success)
  return {
      "model": model_name,
      "attack": name,
      "config": str(config),
      "images": len(images),
      "unit": unit,
      "unit_batch": batch,
      "raw_units_per_s": raw,
      "attack_units_per_s": units / run_s,
      "raw_check_per_s": raw_check,
      "bound_s": bound_s,
      "efficiency": bound_s / run_s,
      "images_per_s": len(images) / run_s,
      "s_per_image": run_s / len(images),
      "units_per_image": units / len(images),
      "success_rate": float(success.mean()),
      "compile_s": compile_s,
      "run_s": run_s,
      "memory_bytes": int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                          + memory.temp_size_in_bytes),
      "temp_bytes": int(memory.temp_size_in_bytes),
  }


def default_models() -> list[str]:
  shipped = zoo.available()
  cifar = [n for n in shipped if zoo.entry(n).dataset == "cifar10"]
  return [n for n in ["mnist_lenet", *cifar[:1]] if n in shipped]


def format_table(rows: list[dict[str, Any]]) -> str:
  header = ["model", "attack", "unit", "batch", "raw/s", "attack/s", "efficiency",
            "img/s", "units/img", "success", "compile s", "run s", "memory MB"]
  body = [[r["model"], r["attack"], r["unit"], str(r["unit_batch"]),
           f"{r['raw_units_per_s']:.0f}", f"{r['attack_units_per_s']:.0f}",
           f"{r['efficiency']:.2f}", f"{r['images_per_s']:.2f}",
           f"{r['units_per_image']:.0f}", f"{r['success_rate']:.2f}",
           f"{r['compile_s']:.1f}", f"{r['run_s']:.2f}",
           f"{r['memory_bytes'] / 2**20:.1f}"] for r in rows]
  return tables.format_text(header, body)


def write_parquet(rows: list[dict[str, Any]], folder: str | os.PathLike,
                  prefix: str = "perf") -> Path:
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
  device = jax.devices()[0]
  extra = {"device_kind": device.device_kind, "device_count": jax.device_count(),
           "platform": device.platform, "host": platform.node(), "jax": jax.__version__,
           "created_at": stamp}
  table = pa.Table.from_pylist([{**r, **extra} for r in rows])
  path = Path(folder) / f"{prefix}-{device.platform}-{stamp}.parquet"
  sink = pa.BufferOutputStream()
  pq.write_table(table, sink)
  files.atomic_write_bytes(path, sink.getvalue().to_pybytes())
  return path


def main(args: argparse.Namespace) -> int:
  model_names = args.models or default_models()
  if not model_names:
    print("advsweep perf: no trained zoo model found; run `advsweep train mnist_lenet`")
    return 2
  attack_names = args.attacks or list(attacks.REGISTRY)
  rows, num_images = [], args.num_images or 32
  for model_name in model_names:
    model = zoo.load(model_name)
    images_u8, labels = datasets.load(model.meta["dataset"], "test", args.data_dir)
    images = jnp.asarray(images_u8[:num_images], jnp.float32) / 255.0
    labels = labels[:num_images]
    for name in attack_names:
      overrides = QUICK_OVERRIDES[name] if args.quick else []
      print(f"[perf] {model_name} {name} {' '.join(overrides)}", flush=True)
      rows.append(measure(model_name, model.apply_fn, model.params, name, images, labels,
                          overrides))
  print(format_table(rows))
  path = write_parquet(rows, args.out)
  print(f"wrote {path}")
  return 0
