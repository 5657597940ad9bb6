"""Run one attack on one model (any reference `models.custom.resolve` takes, or a checkpoint
file) over the first N test images of its dataset and summarise it."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from advsweep import attacks
from advsweep.bench.driver import config
from advsweep.models import custom, datasets, zoo


def make_config(attack_name: str, assignments: list[str] | None = None) -> Any:
  """The attack's paper config with `key=value` overrides applied, values in TOML (the one
  grammar of every `--set`; a bare word is a string: `target=least_likely`)."""
  fields = {}
  for item in assignments or []:
    key, sep, raw = item.partition("=")
    if not sep:
      raise config.ConfigError(f"--set expects key=value; got {item!r}")
    fields[key.strip()] = config.parse_value(raw.strip())
  return config.attack_config(attack_name, fields, where="")


@dataclasses.dataclass
class AttackRun:
  model: str
  attack: str
  config: Any
  labels: np.ndarray
  clean_pred: np.ndarray
  result: attacks.AttackResult
  compile_seconds: float  # ahead-of-time compile of the attack's largest jitted piece
  wall_seconds: float  # the attack's one run, its own compilation included
  trained_sha256: str | None = None  # the attack's own trained weights (AdvGAN's generator)

  def summary(self) -> dict[str, float]:
    """Figures over the clean-correct images (the papers exclude misclassified ones)."""
    r = jax.tree.map(np.asarray, self.result)
    keep = self.clean_pred == self.labels
    n = int(keep.sum())
    mean = lambda x: float(np.mean(x[keep])) if n else float("nan")  # noqa: E731
    return {
        "images": len(keep),
        "clean_correct": n,
        "success_rate": mean(r.success),
        "top1_error": mean(r.adv_pred != self.labels),
        "top5_error": mean(~r.adv_top5_correct),
        "mean_adv_conf": mean(r.adv_conf),
        "mean_adv_conf_success": float(np.mean(r.adv_conf[keep & r.success]))
        if (keep & r.success).any() else float("nan"),
        "mean_queries": mean(r.queries),
        "mean_l0": mean(r.l0),
        "mean_l0_fraction": mean(r.l0_fraction),
        "mean_l0_fraction_success": float(np.mean(r.l0_fraction[keep & r.success]))
        if (keep & r.success).any() else float("nan"),
        "mean_linf": mean(r.linf),
        "mean_l2": mean(r.l2),
        "non_finite": int((~r.finite).sum()),
        "compile_s": self.compile_seconds,
        "wall_s": self.wall_seconds,
        "s_per_image": self.wall_seconds / max(1, len(keep)),
    }


def load_model(reference: str, checkpoint_dir: str | None = None) -> zoo.Model:
  """A model by any reference `models.custom.resolve` takes, or a zoo checkpoint file
  `DIR/NAME.msgpack` (its `NAME.json` beside it names the zoo entry)."""
  path = Path(reference)
  if path.suffix == ".msgpack":
    if not path.is_file():
      raise FileNotFoundError(f"no checkpoint file {path}; name a NAME.msgpack written by "
                              "advsweep train (its NAME.json beside it)")
    name = path.stem
    if name not in zoo.ZOO:
      raise custom.ModelReferenceError(f"{path}: {name!r} is no zoo model, so its "
                                       "architecture is unknown; name a zoo checkpoint, or "
                                       "load your weights in a package.module:function")
    return zoo.load(name, path.parent)
  return custom.resolve(reference, checkpoint_dir)


def run_attack(model_name: str, attack_name: str, num_images: int = 100, *, seed: int = 0,
               overrides: list[str] | None = None, data_dir: str | None = None,
               model: zoo.Model | None = None, checkpoint_dir: str | None = None
               ) -> AttackRun:
  """Attacks the first `num_images` test images of the model's dataset, once.

  `compile_seconds` is the time to compile the attack's largest jitted piece ahead of time;
  `wall_seconds` is the attack's run, which compiles again (an ahead-of-time executable
  does not enter jit's cache): `advsweep perf` separates the two exactly.
  """
  attack_config = make_config(attack_name, overrides)  # checks the name, fields and values
  model = model or load_model(model_name, checkpoint_dir)
  dataset = model.meta.get("dataset")
  if not dataset:
    raise config.ConfigError(f"model {model_name} names no dataset; give it one "
                             "(custom.model(..., dataset=...)) to attack it here")
  images_u8, labels = datasets.load(dataset, "test", data_dir)
  images = jnp.asarray(images_u8[:num_images], jnp.float32) / 255.0
  labels = labels[:num_images]
  key = jax.random.key(seed)
  clean_pred = np.asarray(jnp.argmax(jax.jit(model.apply_fn)(model.params, images), -1))
  spec = attacks.REGISTRY[attack_name]
  bound, trained_sha256 = attack_config, None
  if spec.trained_field is not None:  # AdvGAN: the generator trained against this model
    from advsweep.models.gan import generators

    bound, trained_sha256 = generators.bind(attack_config, model, spec.trained_field,
                                            data_dir=data_dir)
  prepared = spec.prepared(
      model.attack_apply_fn(), model.params, images, labels, key, bound,
      evaluator=model.pixel_evaluator or attacks.common.FULL_EVALUATION)
  start = time.perf_counter()
  if prepared.lowered is not None:  # compile time of the attack's largest jitted piece,
    prepared.lower().compile()  # measured apart (the run below compiles it again)
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  result = jax.block_until_ready(prepared())
  wall = time.perf_counter() - start
  return AttackRun(model_name, attack_name, attack_config, labels, clean_pred, result,
                   compile_seconds=compile_seconds, wall_seconds=wall,
                   trained_sha256=trained_sha256)


def format_summary(run: AttackRun) -> str:
  s = run.summary()
  lines = [f"{run.attack} on {run.model}: {s['images']} test images, "
           f"{s['clean_correct']} correctly classified (the rest excluded)",
           f"  config: {run.config}"]
  if run.trained_sha256 is not None:
    lines.append(f"  trained against this model: weights sha256 {run.trained_sha256}")
  for key in ("success_rate", "top1_error", "top5_error", "mean_adv_conf",
              "mean_adv_conf_success", "mean_queries", "mean_l0", "mean_l0_fraction",
              "mean_l0_fraction_success", "mean_linf", "mean_l2", "non_finite",
              "compile_s", "wall_s", "s_per_image"):
    value = s[key]
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    lines.append(f"  {key:<22} {text}")
  return "\n".join(lines)
