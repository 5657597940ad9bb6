"""advsweep side by side with the peer libraries (`advsweep perf peers`).

Each advsweep attack and its peer equivalent run in one process on the same zoo weights, the
same images (the first test images the model classifies correctly) and the same jitted JAX
forward pass:
- one-pixel: ART `PixelAttack` (DE, th=1, 100 iterations; ART sizes its population to about
  400) through `BlackBoxClassifierNeuralNetwork`, against ours at population 400 and 100
  generations (Su et al.);
- FGSM, BIM, PGD: Foolbox 3 `JAXModel` and ART `FastGradientMethod` /
  `BasicIterativeMethod` / `ProjectedGradientDescent` through ART's `JaxClassifier`;
- JSMA: ART `SaliencyMapMethod` (theta 1, gamma 0.145, the targets ours drew) through
  `JaxClassifier` given a `class_gradient` (one vector-Jacobian product per requested class,
  as ART's PyTorch classifier does). ART's JSMA is a top-2 single-feature variant, not the
  paper's pair search.
ART's loss and class gradients are jitted once (`_art_jax_classifier`), as a competent user
would write them, and each peer row reports the share of its time spent inside the model and
gradient calls ("in model calls"; not for Foolbox, whose gradient is traced inside Foolbox).

Model evaluations are counted where the forward pass is called, so a gradient counts one
forward (plus its backward pass). Every library is warmed up first (its jitted shapes
compiled), so the times are run times: the median of repeated calls over at least 2 s (one call
for the long attacks). Rows are printed and written to
`<out>/peers-<platform>-<timestamp>.parquet`. The peers are the optional extra
`pip install -e ".[peers]"`.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from advsweep import attacks
from advsweep.bench.driver import timing
from advsweep.bench.perf import throughput
from advsweep.bench.reports import tables
from advsweep.models import datasets

PEER_HINT = 'the peer libraries are an optional extra: pip install -e ".[peers]"'
VARIANT_F = "advsweep F"
JSMA_NOTE = "ART: top-2 single-feature saliency, not the paper's pair search"


@dataclasses.dataclass
class Settings:
  """What every library runs; eps and steps match across libraries."""

  eps: float
  num_steps: int = 10
  pixel_images: int = 32
  gradient_images: int = 256
  jsma_images: int = 100
  pixel_generations: int = 100

  @property
  def step_size(self) -> float:
    return self.eps / 4


def default_settings(dataset: str) -> Settings:
  return Settings(eps=0.1 if dataset in ("mnist", "fashion_mnist") else 8 / 255)


class CountingForward:
  """The jitted forward pass, counting the images it is given and the seconds spent in it.

  `seconds` is wall time inside the model and gradient calls (results waited for), so a
  peer's row shows how much of its time the model took: a peer that spends most of its time
  elsewhere is slow in its own code, not handicapped by ours.
  """

  def __init__(self, apply_fn: Callable, params: Any, probabilities: bool = False):
    logits = jax.jit(lambda x: apply_fn(params, x))
    self.fn = jax.jit(lambda x: jax.nn.softmax(logits(x))) if probabilities else logits
    self.images = 0
    self.seconds = 0.0

  def __call__(self, x):
    self.images += int(x.shape[0])
    if isinstance(x, jax.core.Tracer):  # inside a peer's trace: timed where it runs
      return self.fn(x)
    return self.timed(self.fn, x)

  def timed(self, fn: Callable, *args: Any) -> Any:
    """`fn(*args)` with its results waited for, its time added to `seconds`."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    self.seconds += time.perf_counter() - start
    return out

  def reset(self) -> None:
    self.images, self.seconds = 0, 0.0


def _import_peers():
  try:
    import art  # noqa: F401
    import foolbox  # noqa: F401
  except ImportError as err:
    raise SystemExit(f"advsweep perf peers: {err}; {PEER_HINT}") from err


def _art_jax_classifier(forward: CountingForward, input_shape, num_classes):
  """ART's JaxClassifier set up as a competent user would: the loss gradient and the class
  gradients JSMA needs (which JaxClassifier lacks) jitted once, so no call retraces the
  model; each counts one forward pass per image and its time."""
  from art.experimental.estimators.classification.jax import JaxClassifier

  def loss(_, x, y):
    return jnp.mean(optax.softmax_cross_entropy(forward.fn(x), y))

  loss_grad = jax.jit(jax.grad(lambda x, y: loss(None, x, y)))
  class_vjp = jax.jit(lambda x, cotangent: jax.vjp(forward.fn, x)[1](cotangent)[0])
  jacobian = jax.jit(jax.vmap(jax.jacrev(lambda xi: forward.fn(xi[None])[0])))

  class JittedJaxClassifier(JaxClassifier):
    def loss_gradient(self, x, y, **kwargs):
      forward.images += len(x)
      grads = forward.timed(loss_grad, jnp.asarray(x, jnp.float32),
                            jnp.asarray(y, jnp.float32))
      return np.array(grads)

    def class_gradient(self, x, label=None, **kwargs):
      forward.images += len(x)
      x = jnp.asarray(x, jnp.float32)
      if label is None:
        return np.array(forward.timed(jacobian, x))
      labels = np.broadcast_to(np.asarray(label), (x.shape[0],))
      onehot = jax.nn.one_hot(jnp.asarray(labels), num_classes)
      return np.array(forward.timed(class_vjp, x, onehot))[:, None]

  return JittedJaxClassifier(
      model=[], predict_func=lambda _, x: np.array(forward(jnp.asarray(x))),
      loss_func=loss, update_func=None, input_shape=input_shape, nb_classes=num_classes,
      clip_values=(0.0, 1.0))


def _row(library, attack, model, seconds, evaluations, images, success, features=None,
         note="", model_share=None):
  """One library's figures; `model_share`: the share of a peer's time inside the model and
  gradient calls (ours runs inside one jitted program, where no such split exists)."""
  return {"library": library, "attack": attack, "model": model, "images": images,
          "seconds": seconds, "s_per_image": seconds / images,
          "model_share": model_share,
          "evals_per_image": evaluations / images, "success_rate": float(np.mean(success)),
          "features_changed": features, "note": note}


_PLAIN = object()  # call the attack as its signature suggests: no evaluator=


def _ours(model, name, attack, images, labels, config, warm_config=None, library="advsweep",
          features=False, evaluator: Any = _PLAIN):
  """Our attack: warm-up (compile; `warm_config`: the same compiled function on a cheap
  budget), then a timed run; `features`: report the features changed; `evaluator`: passed
  on where given (the plain call by default). Returns (row, result)."""
  spec = attacks.REGISTRY[attack]
  key = jax.random.key(0)
  args = (model.apply_fn, model.params, images, labels, key)
  extra = {} if evaluator is _PLAIN else {"evaluator": evaluator}
  if warm_config is not None:
    jax.block_until_ready(spec.run(*args, warm_config, **extra))
  prepared = spec.prepared(*args, config, **extra)
  if warm_config is None:
    jax.block_until_ready(prepared())
  result, seconds, _ = timing.timed(prepared)
  success = np.asarray(result.success)
  changed = float(np.mean(np.asarray(result.l0_fraction)[success])) if success.any() else None
  # The rows our model computed (padding and the re-check included), as the peers' are
  # counted at their model.
  row = _row(library, attack, name, seconds, float(np.sum(np.asarray(result.evaluated))),
             len(images), success, changed if features else None)
  return row, result


def one_pixel_rows(model, name, images, labels, settings: Settings) -> list[dict]:
  from art.attacks.evasion import PixelAttack
  from art.estimators.classification import BlackBoxClassifierNeuralNetwork

  images, labels = images[:settings.pixel_images], labels[:settings.pixel_images]
  config = attacks.OnePixelConfig(num_generations=settings.pixel_generations)
  warm = config.replace(stop_true_prob=1.0)
  ours, result = _ours(model, name, "one_pixel", images, labels, config, warm_config=warm)
  ours["note"] = f"attacks.one_pixel(apply_fn, params, ...): evaluation {result.evaluation}"
  full, _ = _ours(model, name, "one_pixel", images, labels, config, warm_config=warm,
                  library="advsweep (full pass)", evaluator=attacks.common.FULL_EVALUATION)
  forward = CountingForward(model.apply_fn, model.params, probabilities=True)
  classifier = BlackBoxClassifierNeuralNetwork(
      lambda x: np.asarray(forward(jnp.asarray(x, jnp.float32))), images.shape[1:],
      int(model.meta.get("num_classes", 10)), clip_values=(0.0, 1.0),
      channels_first=False)  # its default (True) makes ART's PixelAttack set a whole column
  x, y = np.asarray(images), np.asarray(labels)
  PixelAttack(classifier, th=1, es=1, max_iter=1, verbose=False).generate(x[:1], y[:1])
  forward.reset()
  # verbose: ART's own per-image progress bar, since this phase takes minutes.
  attack = PixelAttack(classifier, th=1, es=1, max_iter=settings.pixel_generations,
                       verbose=True)
  adv, seconds, runs, total = timing.timed_with_total(lambda: attack.generate(x, y))
  evaluations, share = forward.images / runs, forward.seconds / total
  success = np.argmax(np.asarray(forward.fn(jnp.asarray(adv))), -1) != y
  changed = int(np.max(np.sum(np.any(np.abs(adv - x) > 1e-6, -1), (1, 2))))
  return [ours, full, _row("ART", "one_pixel", name, seconds, evaluations, len(x), success,
                     note=f"at most {changed} pixel(s) changed", model_share=share)]


def gradient_rows(model, name, images, labels, settings: Settings) -> list[dict]:
  import foolbox as fb
  from art.attacks.evasion import (
      BasicIterativeMethod,
      FastGradientMethod,
      ProjectedGradientDescent,
  )

  images, labels = images[:settings.gradient_images], labels[:settings.gradient_images]
  eps, step, steps = settings.eps, settings.step_size, settings.num_steps
  x, y = np.asarray(images), np.asarray(labels)
  ours_configs = {"fgsm": attacks.FGSMConfig(eps=eps),
                  "bim": attacks.BIMConfig(eps=eps, step_size=step, num_steps=steps),
                  "pgd": attacks.PGDConfig(eps=eps, step_size=step, num_steps=steps)}
  foolbox_attacks = {
      "fgsm": fb.attacks.FGSM(),
      "bim": fb.attacks.LinfBasicIterativeAttack(abs_stepsize=step, steps=steps,
                                                 random_start=False),
      "pgd": fb.attacks.LinfPGD(abs_stepsize=step, steps=steps, random_start=True)}
  forward = CountingForward(model.apply_fn, model.params)
  classifier = _art_jax_classifier(forward, images.shape[1:], 10)
  batch = len(x)
  art_attacks = {
      "fgsm": FastGradientMethod(classifier, norm=np.inf, eps=eps, batch_size=batch),
      "bim": BasicIterativeMethod(classifier, eps=eps, eps_step=step, max_iter=steps,
                                  batch_size=batch, verbose=False),
      "pgd": ProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=step,
                                      max_iter=steps, num_random_init=1, batch_size=batch,
                                      verbose=False)}
  fmodel = fb.JAXModel(forward, bounds=(0.0, 1.0))
  rows = []
  for attack in ("fgsm", "bim", "pgd"):
    ours, _ = _ours(model, name, attack, images, labels, ours_configs[attack])
    rows.append(ours)
    fb_attack = foolbox_attacks[attack]

    def run_foolbox(fb_attack=fb_attack):
      return fb_attack(fmodel, images, jnp.asarray(labels), epsilons=eps)[2]

    run_foolbox()
    forward.reset()
    success, seconds, runs = timing.timed(run_foolbox)
    rows.append(_row("Foolbox", attack, name, seconds, forward.images / runs, batch,
                     np.asarray(success)))
    art_attack = art_attacks[attack]
    art_attack.generate(x, y)
    forward.reset()
    adv, seconds, runs, total = timing.timed_with_total(
        lambda art_attack=art_attack: art_attack.generate(x, y))
    evaluations = forward.images / runs
    success = np.argmax(np.asarray(forward.fn(jnp.asarray(adv))), -1) != y
    rows.append(_row("ART", attack, name, seconds, evaluations, batch, success,
                     model_share=forward.seconds / total))
  return rows


def jsma_rows(model, name, images, labels, settings: Settings) -> list[dict]:
  from art.attacks.evasion import SaliencyMapMethod

  images, labels = images[:settings.jsma_images], labels[:settings.jsma_images]
  ours, result = _ours(model, name, "jsma", images, labels, attacks.JSMAConfig(),
                       features=True)
  ours["note"] = "paper's pair search on the logits (JSMA-Z)"
  ours_f, _ = _ours(model, name, "jsma", images, labels,
                    attacks.JSMAConfig(derivative="probabilities"), library=VARIANT_F,
                    features=True)
  ours_f["note"] = "the same on the softmax (JSMA-F); time column: ART/this"
  targets = np.asarray(result.target)
  forward = CountingForward(model.apply_fn, model.params)
  classifier = _art_jax_classifier(forward, images.shape[1:], 10)
  x = np.asarray(images)
  onehot = np.eye(10, dtype=np.float32)[targets]
  attack = SaliencyMapMethod(classifier, theta=1.0, gamma=0.145, batch_size=len(x),
                             verbose=False)
  # A full warm-up run: ART's JSMA shrinks its batch as images finish, and each new batch
  # size compiles the jitted class gradient once (the timed run then compiles nothing).
  attack.generate(x, onehot)
  forward.reset()
  adv, seconds, runs, total = timing.timed_with_total(lambda: attack.generate(x, onehot))
  evaluations, share = forward.images / runs, forward.seconds / total
  success = np.argmax(np.asarray(forward.fn(jnp.asarray(adv))), -1) == targets
  changed = np.mean(np.abs(adv - x).reshape(len(x), -1) > 1e-6, -1)
  features = float(np.mean(changed[success])) if success.any() else None
  return [ours, ours_f, _row("ART", "jsma", name, seconds, evaluations, len(x), success,
                             features, JSMA_NOTE, model_share=share)]


# Each peer comparison and the attacks of ours it covers (the peers have no others).
RUNNERS = {"one_pixel": (one_pixel_rows, ("one_pixel",)),
           "gradient": (gradient_rows, ("fgsm", "bim", "pgd")),
           "jsma": (jsma_rows, ("jsma",))}


def correct_images(model, data_dir, count: int) -> tuple[jax.Array, np.ndarray]:
  """The first `count` test images the model classifies correctly, in [0, 1]."""
  images_u8, labels = datasets.load(model.meta["dataset"], "test", data_dir)
  images_u8, labels = images_u8[:4 * count], labels[:4 * count]
  images = jnp.asarray(images_u8, jnp.float32) / 255.0
  pred = np.asarray(jnp.argmax(jax.jit(model.apply_fn)(model.params, images), -1))
  keep = np.flatnonzero(pred == labels)[:count]
  return images[keep], labels[keep].astype(np.int32)


def with_speedups(rows: list[dict]) -> list[dict]:
  """Adds `speedup`: a peer row's s/image over ours; for a variant of ours (JSMA-F), ART's
  s/image over the variant's."""
  ours = {(r["model"], r["attack"]): r["s_per_image"] for r in rows
          if r["library"] == "advsweep"}
  art = {(r["model"], r["attack"]): r["s_per_image"] for r in rows if r["library"] == "ART"}
  for r in rows:
    key = (r["model"], r["attack"])
    if r["library"] == "advsweep":
      r["speedup"] = None
    elif r["library"].startswith("advsweep"):
      r["speedup"] = art[key] / r["s_per_image"] if key in art else None
    else:
      r["speedup"] = r["s_per_image"] / ours[key]
  return rows


def format_table(rows: list[dict]) -> str:
  header = ["model", "attack", "library", "images", "s/image", "in model calls",
            "evals/image", "success", "features", "peer/ours time", "note"]
  body = [[r["model"], r["attack"], r["library"], str(r["images"]),
           f"{r['s_per_image']:.4f}",
           "-" if r.get("model_share") is None else f"{100 * r['model_share']:.0f}%",
           f"{r['evals_per_image']:.0f}",
           f"{100 * r['success_rate']:.1f}%",
           "-" if r["features_changed"] is None else f"{100 * r['features_changed']:.2f}%",
           "-" if r["speedup"] is None else f"{r['speedup']:.2f}x", r["note"]]
          for r in rows]
  return tables.format_text(header, body)


def main(*, models: Sequence[str] | None = None, attack_names: Sequence[str] | None = None,
         num_images: int | None = None, pixel_images: int | None = None, quick: bool = False,
         out: str | os.PathLike = "results/perf", data_dir: str | None = None) -> int:
  """`advsweep perf peers`: ours beside ART and Foolbox on each model (default
  `throughput.default_models()`) for the attacks that have a peer (`RUNNERS`; `attack_names`
  picks some). `num_images` sets the gradient and JSMA images, `pixel_images` the
  one-pixel ones; `quick` shrinks everything to a smoke run."""
  _import_peers()
  warnings.filterwarnings("ignore", module="art")
  covered = [a for _, names in RUNNERS.values() for a in names]
  wanted = list(attack_names or covered)
  unknown = [a for a in wanted if a not in covered]
  if unknown:
    raise SystemExit(f"advsweep perf peers: no peer runs {', '.join(unknown)}; the peers "
                     f"cover {', '.join(covered)}")
  rows, notes = [], []
  for model_name in models or throughput.default_models():
    model = throughput.load_model(model_name)
    settings = default_settings(model.meta["dataset"])
    if pixel_images:
      settings.pixel_images = pixel_images
    if num_images:
      settings.gradient_images = settings.jsma_images = num_images
    if quick:
      settings = dataclasses.replace(settings, pixel_images=4, gradient_images=64,
                                     jsma_images=8, pixel_generations=5)
    count = max(settings.pixel_images, settings.gradient_images, settings.jsma_images)
    images, labels = correct_images(model, data_dir, count)
    for group, (runner, names) in RUNNERS.items():
      if not set(names) & set(wanted):
        continue
      print(f"[peers] {model_name} {group}", flush=True)
      rows += [r for r in runner(model, model_name, images, labels, settings)
               if r["attack"] in wanted]
    notes.append(f"{model_name}: one-pixel population 400, {settings.pixel_generations} "
                 f"generations; FGSM/BIM/PGD eps {settings.eps:.4g}, {settings.num_steps} "
                 "steps of eps/4; JSMA theta 1, gamma 0.145")
  rows = with_speedups(rows)
  print(format_table(rows))
  print("\n".join(notes + ["every library calls the same jitted forward pass; times exclude "
                           "compilation (each library is warmed up first)"]))
  path = throughput.write_parquet(rows, out, prefix="peers")
  print(f"wrote {path}")
  return 0
