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
  re-check counts as model work: an attack cannot report success without it.);
- compile time, apart from run time, and the compiled executable's memory (arguments,
  outputs and temporaries: the CPU backend reports no live peak).
Rows are printed as a table and written to `<out>/perf-<timestamp>.parquet`.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow as pa
import pyarrow.parquet as pq

from advsweep import attacks
from advsweep.attacks import spec as attack_spec
from advsweep.bench.driver import timing
from advsweep.bench.reports import tables
from advsweep.models import custom, datasets, files, zoo


def _unit_fn(apply_fn: Callable, params: Any, unit: str) -> Callable:
  if unit == attack_spec.FORWARD:
    return jax.jit(lambda x: apply_fn(params, x))
  if unit in (attack_spec.FORWARD_BACKWARD, attack_spec.FORWARD_VJP):  # one backward pass
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
  return timing.throughput(unit_call(apply_fn, params, shape, unit), shape[0], min_seconds)


def compile_and_run_seconds(prepared: Callable[[], Any], min_seconds: float = 0.0
                            ) -> tuple[Any, float, float]:
  """The result, compile seconds (first call minus the run time) and run seconds (the median
  of warm calls over `min_seconds`; one warm call by default)."""
  (first,) = timing.calls(prepared, 0.0)[1]
  result, run_s, _ = timing.timed(prepared, min_seconds)
  return result, max(0.0, first - run_s), run_s


def interleaved_seconds(attack: Callable[[], Any], units: Callable[[], Any],
                        check: Callable[[], Any], min_seconds: float = 1.0,
                        min_rounds: int = 3) -> tuple[Any, float, float, float]:
  """The attack's result and the median seconds of one call of the attack, of the raw unit
  and of the raw re-check, measured in turn, round after round, for at least `min_rounds`
  rounds and `min_seconds` (each round calls the raw ones for up to 0.5 s).

  A CPU's speed drifts over seconds; a ratio of two figures measured one after the other
  takes that drift in, two measured in turn see it alike. Single runs of a long attack vary
  too, hence the median of at least `min_rounds`.
  """
  attack_s, unit_s, check_s, start = [], [], [], time.perf_counter()
  result = None
  while len(attack_s) < min_rounds or time.perf_counter() - start < min_seconds:
    result, (seconds,) = timing.calls(attack, 0.0)
    attack_s.append(seconds)
    unit_s += timing.calls(units, min(seconds, 0.5))[1]
    check_s += timing.calls(check, min(seconds, 0.5) / 4)[1]
  return result, *(float(np.median(t)) for t in (attack_s, unit_s, check_s))


def measure(model_name: str, apply_fn: Callable, params: Any, name: str, images: jax.Array,
            labels: np.ndarray, config: Any = None, seed: int = 0, evaluator: Any = None
            ) -> dict[str, Any]:
  """One row: attack `name` with `config` (None: the paper's) on `images` against the raw
  limit. `evaluator`: the model's pixel-local evaluator, handed to the attack."""
  spec = attacks.REGISTRY[name]
  config = config if config is not None else spec.config_cls()
  prepared = spec.prepared(apply_fn, params, images, labels, jax.random.key(seed), config,
                           evaluator=evaluator)
  memory = prepared.lower().compile().memory_analysis() if prepared.lowered else None
  (first_s,) = timing.calls(prepared, 0.0)[1]  # compiles
  unit = spec.unit(config)
  batch = spec.unit_batch(config, len(images))
  units_call = unit_call(apply_fn, params, (batch, *images.shape[1:]), unit)
  check_call = unit_call(apply_fn, params, images.shape, attack_spec.FORWARD)
  result, run_s, unit_s, check_s = interleaved_seconds(prepared, units_call, check_call)
  compile_s = max(0.0, first_s - run_s)
  raw, raw_check = batch / unit_s, len(images) / check_s
  units = spec.units(result.queries)
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
      "memory_bytes": None if memory is None else int(
          memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes),
      "temp_bytes": None if memory is None else int(memory.temp_size_in_bytes),
      "evaluation": result.evaluation,
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
           "-" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.1f}"]
          for r in rows]
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


def load_model(reference: str) -> zoo.Model:
  """A zoo model, or a user's (`package.module:function`, as a config names one), which must
  name the dataset it classifies."""
  model = custom.resolve(reference)
  if not model.meta.get("dataset"):
    raise SystemExit(f"advsweep perf: model {reference!r} names no dataset; build it with "
                     "advsweep.models.custom.model(..., dataset=...)")
  return model


def main(*, models: Sequence[str] | None = None, attack_names: Sequence[str] | None = None,
         num_images: int | None = None, quick: bool = False,
         out: str | os.PathLike = "results/perf", data_dir: str | None = None) -> int:
  """`advsweep perf`: every attack (`attack_names`, default all registered) on each model
  (default `default_models()`), `num_images` test images (32); `quick`: each attack's
  smoke-sized settings (`AttackSpec.quick`). Prints the table and writes the parquet file."""
  model_names = list(models or default_models())
  if not model_names:
    print("advsweep perf: no trained zoo model found; run `advsweep train mnist_lenet`")
    return 2
  rows, num_images = [], num_images or 32
  for model_name in model_names:
    model = load_model(model_name)
    images_u8, labels = datasets.load(model.meta["dataset"], "test", data_dir)
    images = jnp.asarray(images_u8[:num_images], jnp.float32) / 255.0
    labels = labels[:num_images]
    for name in attack_names or list(attacks.REGISTRY):
      spec = attacks.REGISTRY[name]
      fields = dict(spec.quick) if quick else {}
      config = spec.config(**fields)
      if spec.trained_field is not None:  # weights trained against the model: bind them
        from advsweep.models.gan import generators

        if generators.find_for(config, model) is None:  # training one is not a benchmark
          print(f"[perf] {model_name} {name}: skipped, no weights trained against this model "
                f"(advsweep gan {name} {model_name})", flush=True)
          continue
        config, _ = generators.bind(config, model, spec.trained_field, data_dir=data_dir)
      print(f"[perf] {model_name} {name} {fields or ''}", flush=True)
      rows.append(measure(model_name, model.apply_fn, model.params, name, images, labels,
                          config, evaluator=model.pixel_evaluator))
  print(format_table(rows))
  path = write_parquet(rows, out)
  print(f"wrote {path}")
  return 0
