"""How attack cost grows (`advsweep perf scaling`), and that sweeps do not recompile.

Four sweeps, each timed as run time with compilation apart (first call minus second call),
each attack at this benchmark's small budgets (`BUDGETS`; an attack not named there at its
`AttackSpec.quick` settings):
- batch size 1 to 1024 (FGSM, BIM; one-pixel and JSMA to 256) on mnist_lenet;
- image size: MNIST (mnist_lenet) against CIFAR-10 (cifar10_allconv) at batch 64;
- k = 1, 3, 5 pixels, with and without pixel-local evaluation, on both models;
- DE population size 50 to 800 on mnist_lenet.
The one-pixel runs disable early stopping (`AttackSpec.fixed_work`), so every image does the
same work. Then eps (BIM) and F (one-pixel) sweeps count the traces and XLA compiles after
their first value (`jax.monitoring` events): zero means nothing recompiled. Rows go to
`<out>/scaling-<platform>-<stamp>.parquet`, one PNG per sweep to `<out>/scaling-<sweep>.png`.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from advsweep import attacks
from advsweep.bench.perf import throughput
from advsweep.bench.reports import tables
from advsweep.models import datasets, zoo

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_events: collections.Counter = collections.Counter()
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: _events.update([name]))
TRACE = "/jax/core/compile/jaxpr_trace_duration"  # one per function traced for jit
COMPILE = "/jax/core/compile/backend_compile_duration"  # one per XLA compilation


# The budgets of the published scaling table; other attacks run at `AttackSpec.quick`.
BUDGETS = {"fgsm": {"eps": 0.1}, "bim": {"eps": 0.1, "step_size": 0.025, "num_steps": 5},
           "one_pixel": {"population_size": 100, "num_generations": 5}}


def small(attack: str, **fields: Any) -> Any:
  """The attack's small config (`BUDGETS`), its fixed-work settings and `fields` on top."""
  spec = attacks.REGISTRY[attack]
  return spec.config(**{**BUDGETS.get(attack, spec.quick), **spec.fixed_work, **fields})


def timed_attack(model: zoo.Model, attack: str, images: jax.Array, labels: np.ndarray,
                 config: Any) -> dict[str, float]:
  """Compile and run seconds of one attack call (first call minus a second, warm call)."""
  prepared = attacks.REGISTRY[attack].prepared(
      model.apply_fn, model.params, images, labels, jax.random.key(0), config,
      evaluator=model.pixel_evaluator)
  result, compile_s, run = throughput.compile_and_run_seconds(prepared)
  return {"run_s": run, "compile_s": compile_s, "s_per_image": run / len(images),
          "evals_per_image": float(np.mean(np.asarray(result.queries)))}


def _data(name: str, data_dir, count: int) -> tuple[zoo.Model, jax.Array, np.ndarray]:
  model = zoo.load(name)
  images_u8, labels = datasets.load(model.meta["dataset"], "test", data_dir)
  reps = -(-count // len(images_u8))
  images = np.concatenate([images_u8] * reps)[:count]
  return model, jnp.asarray(images, jnp.float32) / 255.0, np.concatenate([labels] * reps)[:count]


def batch_rows(data_dir) -> list[dict[str, Any]]:
  sizes = {"fgsm": [1, 4, 16, 64, 256, 1024], "bim": [1, 4, 16, 64, 256, 1024],
           "one_pixel": [1, 4, 16, 64, 256], "jsma": [1, 4, 16, 64, 256]}
  model, images, labels = _data("mnist_lenet", data_dir, 1024)
  rows = []
  for attack, batches in sizes.items():
    for batch in batches:
      print(f"[scaling] batch {attack} {batch}", flush=True)
      rows.append({"sweep": "batch", "model": "mnist_lenet", "attack": attack, "x": batch,
                   **timed_attack(model, attack, images[:batch], labels[:batch],
                                  small(attack))})
  return rows


def image_size_rows(data_dir) -> list[dict[str, Any]]:
  rows = []
  for name in ("mnist_lenet", "cifar10_allconv"):
    model, images, labels = _data(name, data_dir, 64)
    pixels = int(np.prod(images.shape[1:]))
    for attack in ("fgsm", "bim", "one_pixel", "jsma"):
      print(f"[scaling] image size {name} {attack}", flush=True)
      rows.append({"sweep": "image_size", "model": name, "attack": attack, "x": pixels,
                   **timed_attack(model, attack, images, labels, small(attack))})
  return rows


def pixels_rows(data_dir) -> list[dict[str, Any]]:
  rows = []
  for name in ("mnist_lenet", "cifar10_allconv"):
    model, images, labels = _data(name, data_dir, 8)
    for splice in (True, False):
      for k in (1, 3, 5):
        print(f"[scaling] k {name} k={k} splice={splice}", flush=True)
        config = small("one_pixel", num_pixels=k, splice=splice, num_generations=2)
        rows.append({"sweep": "pixels", "model": name, "attack": f"one_pixel splice={splice}",
                     "x": k, **timed_attack(model, "one_pixel", images, labels, config)})
  return rows


def population_rows(data_dir) -> list[dict[str, Any]]:
  model, images, labels = _data("mnist_lenet", data_dir, 16)
  rows = []
  for population in (50, 100, 200, 400, 800):
    print(f"[scaling] population {population}", flush=True)
    config = small("one_pixel", population_size=population, num_generations=3)
    rows.append({"sweep": "population", "model": "mnist_lenet", "attack": "one_pixel",
                 "x": population, **timed_attack(model, "one_pixel", images, labels, config)})
  return rows


def retrace_rows(data_dir) -> list[dict[str, Any]]:
  """Traces and compiles during the first and the later values of an eps or F sweep."""
  model, images, labels = _data("mnist_lenet", data_dir, 16)
  sweeps = {("bim", "eps"): (0.05, 0.1, 0.2, 0.3),
            ("one_pixel", "differential_weight"): (0.3, 0.5, 0.7, 0.9)}
  base = {"bim": {"num_steps": 3}, "one_pixel": {"population_size": 20, "num_generations": 2}}
  rows = []
  for (attack, field), values in sweeps.items():
    counts = []
    for value in values:
      before = _events.copy()
      config = attacks.REGISTRY[attack].config(**base[attack], **{field: value})
      timed_attack(model, attack, images, labels, config)
      counts.append((_events[TRACE] - before[TRACE], _events[COMPILE] - before[COMPILE]))
    rows.append({"sweep": "retrace", "model": "mnist_lenet", "attack": attack, "x": 0,
                 "field": field, "values": ", ".join(map(str, values)),
                 "first_traces": counts[0][0], "first_compiles": counts[0][1],
                 "later_traces": sum(c[0] for c in counts[1:]),
                 "later_compiles": sum(c[1] for c in counts[1:])})
  return rows


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
  labels = {"batch": "batch size (images)", "image_size": "pixels x channels per image",
            "pixels": "k (pixels changed)", "population": "DE population size"}
  paths = []
  for sweep, xlabel in labels.items():
    sweep_rows = [r for r in rows if r["sweep"] == sweep]
    if not sweep_rows:
      continue
    fig, ax = plt.subplots(figsize=(6, 4))
    for series in sorted({(r["model"], r["attack"]) for r in sweep_rows}):
      points = sorted((r["x"], r["s_per_image"]) for r in sweep_rows
                      if (r["model"], r["attack"]) == series)
      ax.plot(*zip(*points, strict=True), marker="o", label=" ".join(series))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("seconds per image (run, no compile)")
    ax.set_title(f"advsweep cost against {xlabel.split(' (')[0]} ({jax.devices()[0].platform})")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    path = out / f"scaling-{sweep}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def format_table(rows: list[dict[str, Any]]) -> str:
  timing = [r for r in rows if r["sweep"] != "retrace"]
  header = ["sweep", "model", "attack", "x", "s/image", "evals/image", "run s", "compile s"]
  body = [[r["sweep"], r["model"], r["attack"], str(r["x"]), f"{r['s_per_image']:.5f}",
           f"{r['evals_per_image']:.0f}", f"{r['run_s']:.2f}", f"{r['compile_s']:.2f}"]
          for r in timing]
  text = tables.format_text(header, body)
  retrace = [r for r in rows if r["sweep"] == "retrace"]
  if retrace:
    header = ["attack", "swept", "values", "traces (first value)",
              "compiles (first value)", "traces (later values)", "compiles (later values)"]
    body = [[r["attack"], r["field"], r["values"], str(r["first_traces"]),
             str(r["first_compiles"]), str(r["later_traces"]), str(r["later_compiles"])]
            for r in retrace]
    text += "\n\n" + tables.format_text(header, body)
  return text


SWEEPS = {"batch": batch_rows, "image_size": image_size_rows, "pixels": pixels_rows,
          "population": population_rows, "retrace": retrace_rows}


def main(*, sweeps: Sequence[str] | None = None, out: str | os.PathLike = "results/perf",
         data_dir: str | None = None) -> int:
  """`advsweep perf scaling`: the named `sweeps` (default all of `SWEEPS`); prints the
  tables, writes the plots and the parquet file to `out`."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for name in sweeps or list(SWEEPS):
    rows += SWEEPS[name](data_dir)
  print(format_table(rows))
  for path in plot(rows, out):
    print(f"wrote {path}")
  keys = list(dict.fromkeys(k for r in rows for k in r))
  rows = [{k: r.get(k) for k in keys} for r in rows]
  print(f"wrote {throughput.write_parquet(rows, out, prefix='scaling')}")
  return 0
