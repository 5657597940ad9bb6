"""The standard evaluation: AutoAttack's protocol in JAX, per image, with its checks.

An image counts as robust only if it is classified correctly and every attack of the
protocol fails on it (Croce & Hein 2020). The standard version runs, at the budget of the
threat model:

1. APGD-CE: APGD on the cross-entropy loss, 100 iterations;
2. APGD-T: APGD on the targeted DLR loss toward each of the top 9 other classes;
3. FAB-T: the targeted fast adaptive boundary attack toward the same 9 classes;
4. Square: the score-based Square attack, 5,000 queries, which needs no gradient and so
   checks for gradient masking.

Each attack runs only on the images every earlier attack has left robust (`cascade`), as
AutoAttack does; `cascade=False` runs every attack on every clean-correct image, for each
attack's own robust accuracy. The `rand` version, for a randomized model, runs APGD-CE and
APGD-DLR on the expectation over 20 draws instead (`models.defenses`' EOT model).

Every random choice comes from a key folded from the seed, the attack's position in the
protocol and the image's index, so an image's outcome depends neither on the batch nor on
which images an earlier attack left. `evaluate` is the Python entry a user calls on their
own model; `advsweep robustness --standard` runs it on the zoo (`run_zoo`).

References:
  Croce, Hein, Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks, ICML 2020.
  Croce et al., RobustBench: a standardized adversarial robustness benchmark, NeurIPS 2021
  Datasets and Benchmarks (the budgets: L-inf 8/255 and L2 0.5 on CIFAR-10).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from advsweep import attacks
from advsweep.attacks import checks as attack_checks
from advsweep.attacks import common
from advsweep.attacks.gradient import L2, LINF
from advsweep.bench import stats
from advsweep.bench.checks import validity
from advsweep.bench.evaluation import progress as progress_file

STANDARD, RAND = "standard", "rand"
VERSIONS = (STANDARD, RAND)
NORMS = (LINF, L2)
# The usual budgets (the MNIST and CIFAR-10 challenges', RobustBench's).
BUDGETS = {("mnist", LINF): 0.3, ("fashion_mnist", LINF): 0.1, ("cifar10", LINF): 8 / 255,
           ("cifar10", L2): 0.5, ("mnist", L2): 2.0}
EOT_DRAWS = 20  # AutoAttack's rand version


# What an attack of the protocol is, for the checks (`bench.checks.validity`).
CE_LOSS, DLR_LOSS, BOUNDARY, SCORE_BASED = "ce", "dlr", "boundary", "score"
KINDS = (CE_LOSS, DLR_LOSS, BOUNDARY, SCORE_BASED)

# Images per attack call (`batch_size=None`). On a CPU the gradient attacks run faster per
# image on small batches, whose activations stay in the caches, and Square, 5,000 queries in
# sequence, on large ones (fewer calls); an accelerator takes large batches throughout.
BATCH_SIZES = {"cpu": {CE_LOSS: 32, DLR_LOSS: 32, BOUNDARY: 32, SCORE_BASED: 500}}
DEFAULT_BATCH_SIZE = 500


def batch_sizes(batch_size: int | None = None, backend: str | None = None) -> dict[str, int]:
  """Images per attack call by attack kind: `batch_size` for every kind where given, else
  the backend's defaults (`BATCH_SIZES`). An image's outcome does not depend on it."""
  if batch_size is not None:
    attack_checks.check_at_least("batch_size", batch_size, 1)
    return dict.fromkeys(KINDS, int(batch_size))
  backend = jax.default_backend() if backend is None else backend
  return BATCH_SIZES.get(backend, dict.fromkeys(KINDS, DEFAULT_BATCH_SIZE))


@dataclasses.dataclass(frozen=True)
class Step:
  """One attack of the protocol: its column name, registry name, config and kind (one of
  "ce", "dlr", "boundary": gradient attacks by their loss; "score": no gradient)."""

  name: str
  attack: str
  config: Any
  kind: str


def protocol(norm: str = LINF, eps: float = 8 / 255, version: str = STANDARD,
             num_classes: int = 10, *, quick: bool = False) -> list[Step]:
  """AutoAttack's attacks for `version` at budget `eps` in `norm`, in order.

  A model of fewer than 4 classes skips APGD-T, whose targeted DLR loss needs them.
  `quick` cuts the iterations and queries (10 iterations, 3 targets, 200 queries) for a
  smoke run: its figures are upper bounds of the standard evaluation's, never to be quoted
  as it.
  """
  attack_checks.check_choice("norm", norm, NORMS)
  attack_checks.check_choice("version", version, VERSIONS)
  attack_checks.check_at_least("eps", eps, 0.0)
  targets = min(3 if quick else 9, num_classes - 1)
  steps = 10 if quick else 100
  if version == RAND:
    return [Step("APGD-CE", "apgd", attacks.APGDConfig(eps=eps, norm=norm, num_steps=steps),
                 CE_LOSS),
            Step("APGD-DLR", "apgd", attacks.APGDConfig(eps=eps, norm=norm, num_steps=steps,
                                                        loss="dlr"), DLR_LOSS)]
  apgd_t = [Step("APGD-T", "apgd_t", attacks.APGDTConfig(
      eps=eps, norm=norm, num_steps=steps, num_target_classes=targets), DLR_LOSS)]
  if num_classes < 4:  # the targeted DLR loss reads the 4th logit (AutoAttack warns alike)
    apgd_t = []
  return [
      Step("APGD-CE", "apgd", attacks.APGDConfig(eps=eps, norm=norm, num_steps=steps),
           CE_LOSS),
      *apgd_t,
      Step("FAB-T", "fab_t", attacks.FABConfig(eps=eps, norm=norm, num_steps=steps,
                                               num_target_classes=targets), BOUNDARY),
      Step("Square", "square", attacks.SquareConfig(eps=eps, norm=norm,
                                                    num_queries=200 if quick else 5000),
           SCORE_BASED),
  ]


@dataclasses.dataclass
class AttackOutcome:
  """One attack's per-image outcome ([N] arrays over all images of the evaluation).

  Attributes:
    ran: the attack ran on the image (clean-correct and, with the cascade, still robust).
    success: it found an adversarial example within the budget (re-checked by the model).
    adv_pred: the model's prediction on the attack's image (the label where it did not run).
    queries: model evaluations the attack spent on the image (0 where it did not run).
    linf, l2: the perturbation's norms (0 where it did not run).
    seconds: the attack's wall time over all its batches, compilation included.
  """

  ran: np.ndarray
  success: np.ndarray
  adv_pred: np.ndarray
  queries: np.ndarray
  linf: np.ndarray
  l2: np.ndarray
  seconds: float = 0.0


@dataclasses.dataclass
class Evaluation:
  """The standard evaluation of one model on N images.

  Attributes:
    norm, eps, version: the threat model and the protocol.
    labels: [N] the true classes.
    clean_pred: [N] the model's predictions on the clean images.
    clean_correct: [N] clean_pred == labels.
    robust: [N] correct and not fooled by any attack of the protocol: the headline.
    outcomes: per attack (protocol order), its `AttackOutcome`.
    kinds: per attack, its `Step.kind` (what the checks read).
    flags: the checks' findings (`bench.checks.validity`), empty when none fired.
    seconds: wall time of the whole evaluation.
  """

  norm: str
  eps: float
  version: str
  labels: np.ndarray
  clean_pred: np.ndarray
  clean_correct: np.ndarray
  robust: np.ndarray
  outcomes: dict[str, AttackOutcome]
  kinds: dict[str, str]
  flags: list[validity.Flag]
  seconds: float

  @property
  def n(self) -> int:
    return int(self.labels.size)

  def robust_accuracy(self) -> tuple[float, float, float]:
    """(accuracy, low, high): robust accuracy with its 95% Wilson interval."""
    k = int(self.robust.sum())
    low, high = stats.wilson_interval(k, self.n)
    return k / self.n, low, high

  def clean_accuracy(self) -> float:
    return float(self.clean_correct.mean())

  def robust_after(self) -> dict[str, float]:
    """Per attack, the accuracy left once it and every earlier attack have run (AutoAttack's
    running figure): images correct and fooled by none of them."""
    left = self.clean_correct.copy()
    out = {}
    for name, outcome in self.outcomes.items():
      left &= ~outcome.success
      out[name] = float(left.mean())
    return out

  def own_accuracy(self) -> dict[str, float]:
    """Per attack, the accuracy it alone leaves (meaningful for every attack with
    `cascade=False`; with the cascade, an attack's own figure is only an upper bound)."""
    return {name: float((self.clean_correct & ~o.success).mean())
            for name, o in self.outcomes.items()}

  def headline(self) -> str:
    acc, low, high = self.robust_accuracy()
    return (f"robust accuracy {100 * acc:.1f}% ({100 * low:.1f}-{100 * high:.1f}), clean "
            f"{100 * self.clean_accuracy():.1f}%, n = {self.n}, {self.norm} eps "
            f"{self.eps:.4g} ({self.version})")


def _batched(fn: Callable[[np.ndarray], Any], rows: np.ndarray, batch_size: int) -> list[Any]:
  return [fn(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def evaluate(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, images: Any,
             labels: Any, *, norm: str = LINF, eps: float = 8 / 255,
             version: str = STANDARD, seed: int = 0, batch_size: int | None = None,
             cascade: bool = True, quick: bool = False, progress: bool = True,
             attack_apply_fn: Callable[[Any, jax.Array], jax.Array] | None = None,
             indices: np.ndarray | None = None,
             resume: str | os.PathLike | None = None) -> Evaluation:
  """Runs the standard evaluation on a model and returns every image's outcome.

  Args:
    apply_fn: `apply_fn(params, images[B,H,W,C] in [0, 1]) -> logits[B,K]`, differentiable
      (a plain JAX function or a Flax module's apply).
    params: its parameters.
    images: [N,H,W,C] float in [0, 1] (or uint8, divided by 255 here).
    labels: [N] true classes.
    norm: "linf" or "l2".
    eps: the budget (MNIST 0.3, CIFAR-10 8/255 in L-inf; CIFAR-10 0.5 in L2: `BUDGETS`).
    version: "standard", or "rand" for a randomized model (with `attack_apply_fn` its
      expectation over transformation).
    seed: seeds every random choice (each image's keys also fold in its index).
    batch_size: images per attack call; None: the backend's defaults by attack
      (`batch_sizes`), which do not change any image's outcome, only the time.
    cascade: run each attack only on the images every earlier one left robust (AutoAttack).
    quick: a smoke-sized protocol (`protocol`); never the standard figure.
    progress: a progress bar over the attacks' batches.
    attack_apply_fn: the function the attacks differentiate, where it is not `apply_fn`:
      BPDA through a non-differentiable defense (`DefendedModel.attack_apply_fn(bpda=True)`)
      or, for `version="rand"`, the expectation over 20 draws of a randomized model (the
      attacks' gradients then average the draws, as AutoAttack's EOT does). Success is
      always judged by `apply_fn`.
    indices: [N] the images' indices in their dataset, folded into their keys (default
      0..N-1), so a subset gets the same outcomes as the whole.
    resume: a file for the progress (`bench.evaluation.progress`): written after every
      batch of every attack, read when the evaluation starts (an interrupted one goes on
      where it stopped, with the same outcomes), deleted when it ends.

  Returns:
    An `Evaluation`; `.headline()` is the line to quote.

  Raises:
    ValueError: bad input (norm, eps, version, images, labels), with the fix named.
  """
  start = time.perf_counter()
  images = np.asarray(images)
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 255.0
  labels = np.asarray(labels)
  num_classes = attack_checks.check_inputs(apply_fn, params, images, labels)
  steps = protocol(norm, eps, version, num_classes, quick=quick)
  if version == RAND and attack_apply_fn is None:
    raise ValueError("version 'rand' attacks the expectation over the model's random draws: "
                     "pass attack_apply_fn (a randomized model's attack_apply_fn(eot_samples"
                     f"={EOT_DRAWS}))")
  for step in steps:
    attacks.REGISTRY[step.attack].check_config(step.config)
  sizes = batch_sizes(batch_size)
  widest = max(sizes.values())
  n = len(labels)
  indices = np.arange(n) if indices is None else np.asarray(indices)
  logits = np.concatenate(_batched(
      lambda rows: np.asarray(_forward(apply_fn, params, jnp.asarray(images[rows]))),
      np.arange(n), widest))
  clean_pred = logits.argmax(-1)
  clean_correct = clean_pred == labels
  robust = clean_correct.copy()
  flags = validity.before_attacks(apply_fn, params, images[:widest], labels[:widest],
                                  logits)
  attacked_fn = apply_fn if attack_apply_fn is None else attack_apply_fn
  outcomes: dict[str, AttackOutcome] = {}
  root = jax.random.key(seed)
  kept, stamp = None, ""
  if resume is not None:
    stamp = progress_file.fingerprint(params, images, labels, indices, dict(
        norm=norm, eps=float(eps), version=version, seed=seed,
        batch_sizes=[sizes[step.kind] for step in steps],
        cascade=cascade, quick=quick, eot=attack_apply_fn is not None))
    kept = progress_file.load(resume, stamp)
  resumed_s = sum(float(v) for k, v in (kept or {}).items() if k.endswith("/seconds"))
  bar = tqdm(total=len(steps), desc="standard evaluation", disable=not progress,
             mininterval=2.0)
  for position, step in enumerate(steps):
    spec = attacks.REGISTRY[step.attack]
    rows = np.flatnonzero(robust if cascade else clean_correct)
    outcome, done = _kept_outcome(kept, position, n, labels)
    attack_key = jax.random.fold_in(root, position)
    tic = time.perf_counter() - outcome.seconds
    size = sizes[step.kind]
    chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
    for index, chunk in enumerate(chunks):
      if index < done:
        continue
      keys = image_keys(attack_key, indices[chunk])
      result = spec.run(attacked_fn, params, jnp.asarray(images[chunk]),
                        jnp.asarray(labels[chunk], jnp.int32), keys, step.config)
      result = jax.tree.map(np.asarray, result)
      if attacked_fn is not apply_fn:  # judged by the model itself, not the EOT model
        pred = np.asarray(_forward(apply_fn, params, jnp.asarray(result.adv_images))).argmax(-1)
        result = result.replace(adv_pred=pred, success=pred != labels[chunk])
      validity.check_budget(step.name, spec, step.config, result, images[chunk])
      outcome.ran[chunk] = True
      outcome.success[chunk] = result.success
      outcome.adv_pred[chunk] = result.adv_pred
      outcome.queries[chunk] = result.queries
      outcome.linf[chunk] = result.linf
      outcome.l2[chunk] = result.l2
      if resume is not None:
        outcome.seconds = time.perf_counter() - tic
        progress_file.save(resume, stamp, {
            **_outcome_arrays(outcomes.values()), **_outcome_arrays([outcome], position),
            "chunks_done": np.asarray(index + 1)})
    outcome.seconds = time.perf_counter() - tic
    outcomes[step.name] = outcome
    robust &= ~outcome.success
    bar.set_postfix_str(f"{step.name}: robust {100 * robust.mean():.1f}%")
    bar.update()
  bar.close()
  evaluation = Evaluation(norm=norm, eps=float(eps), version=version, labels=labels,
                          clean_pred=clean_pred, clean_correct=clean_correct, robust=robust,
                          outcomes=outcomes, kinds={s.name: s.kind for s in steps},
                          flags=flags,
                          seconds=time.perf_counter() - start + resumed_s)
  evaluation.flags.extend(validity.after_attacks(evaluation))
  progress_file.remove(resume)
  return evaluation


_OUTCOME_FIELDS = ("ran", "success", "adv_pred", "queries", "linf", "l2")


def _outcome_arrays(outcomes, first: int = 0) -> dict[str, np.ndarray]:
  """The outcomes as named arrays for the progress file, by the attacks' positions."""
  arrays = {}
  for position, outcome in enumerate(outcomes, first):
    for field in _OUTCOME_FIELDS:
      arrays[f"{position}/{field}"] = getattr(outcome, field)
    arrays[f"{position}/seconds"] = np.asarray(outcome.seconds)
  return arrays


def _kept_outcome(kept: dict[str, np.ndarray] | None, position: int, n: int,
                  labels: np.ndarray) -> tuple[AttackOutcome, int]:
  """The attack at `position` as the progress file has it, and how many of its batches are
  done (all, for an attack the file holds past; 0 and a blank outcome where it holds none)."""
  if kept is None or f"{position}/ran" not in kept:
    return AttackOutcome(ran=np.zeros(n, bool), success=np.zeros(n, bool),
                         adv_pred=labels.copy(), queries=np.zeros(n, np.int64),
                         linf=np.zeros(n, np.float32), l2=np.zeros(n, np.float32)), 0
  outcome = AttackOutcome(**{f: kept[f"{position}/{f}"].copy() for f in _OUTCOME_FIELDS},
                          seconds=float(kept[f"{position}/seconds"]))
  last = max(int(k.split("/")[0]) for k in kept if k.endswith("/ran"))
  done = int(kept["chunks_done"]) if position == last else np.iinfo(np.int64).max
  return outcome, done


def image_keys(key: jax.Array, indices: np.ndarray) -> jax.Array:
  """[B] keys: `key` folded with each image's index (independent of batch and subset)."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.uint32))


def _forward(apply_fn, params, images):
  """The model's logits, jitted once per model (`attacks.common.bind`)."""
  return common.bind(_apply, apply_fn, params)(images)


def _apply(apply_fn, params, images):
  return apply_fn(params, images)


__all__ = ["BATCH_SIZES", "BUDGETS", "AttackOutcome", "Evaluation", "Step", "batch_sizes",
           "evaluate", "protocol"]
