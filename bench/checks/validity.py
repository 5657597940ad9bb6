"""AutoAttack's checks and the sweep report's masking flags, one named function each: signs
that an evaluation's figure cannot be trusted as it stands.

Each check returns a `Flag` (or None) whose `name` is a section of `docs/flags.md`, where
every flag is explained with what to do about it. `check_budget` is not a flag but a
guard: an attack's output outside its budget or the [0, 1] box is a bug, and the
evaluation stops rather than count it.

References:
  Croce, Hein, Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks, ICML 2020 (autoattack/checks.py of their code: randomness,
  softmax output, zero gradients, Square's success).
  Carlini et al., On evaluating adversarial robustness, 2019 (Sec. 3-5: gradient-free
  attacks beating gradient attacks signal masking).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from advsweep.bench import stats

DOC = "docs/flags.md"
SATURATED = 1 - 1e-6  # a top softmax probability this close to 1 leaves CE without gradient
SATURATED_SHARE = 0.5
ZERO_GRADIENT_SHARE = 0.05
DLR_GAP = 0.05  # APGD-T fooling this share of all images that APGD-CE left


@dataclasses.dataclass(frozen=True)
class Flag:
  """A finding: `name` is its section in docs/flags.md, `message` the line to print."""

  name: str
  message: str

  def __str__(self) -> str:
    return f"FLAG {self.name}: {self.message} (see {DOC}#{self.name.replace('_', '-')})"


def randomized_forward(apply_fn: Any, params: Any, images: np.ndarray) -> Flag | None:
  """The model gives different logits for the same images twice: a randomized defense,
  whose figure needs the `rand` version (attacks on the expectation over draws)."""
  x = jnp.asarray(images)
  first, second = np.asarray(apply_fn(params, x)), np.asarray(apply_fn(params, x))
  if np.allclose(first, second, rtol=1e-5, atol=1e-5, equal_nan=True):
    return None
  return Flag("randomized_forward", "the model's output changes between two calls on the "
              "same images: evaluate it with version 'rand' (EOT over 20 draws)")


def softmax_output(logits: np.ndarray) -> Flag | None:
  """The outputs are probabilities (in [0, 1], rows summing to 1), not logits: CE and DLR
  on them are wrong losses."""
  if logits.size and logits.min() >= 0 and logits.max() <= 1 and np.allclose(
      logits.sum(-1), 1, atol=1e-4):
    return Flag("softmax_output", "the model returns probabilities, not logits: pass the "
                "function before its softmax")
  return None


def saturated_softmax(logits: np.ndarray) -> Flag | None:
  """Most clean images get a top softmax probability of 1 to float precision: the
  cross-entropy's gradient vanishes there and CE-based attacks stall (DLR does not)."""
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1))
  share = float((probs.max(-1) >= SATURATED).mean()) if len(probs) else 0.0
  if share <= SATURATED_SHARE:
    return None
  return Flag("saturated_softmax", f"{100 * share:.0f}% of clean images have a top "
              f"probability >= {SATURATED}: cross-entropy gradients vanish; trust the DLR "
              "and Square columns over APGD-CE")


def zero_gradients(apply_fn: Any, params: Any, images: np.ndarray, labels: np.ndarray
                   ) -> Flag | None:
  """Images whose cross-entropy gradient is all zero or not finite: gradient attacks see
  nothing there (shattered or masked gradients)."""
  def loss(x):
    logits = apply_fn(params, x)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.asarray(labels, jnp.int32)))

  try:
    grad = np.asarray(jax.grad(loss)(jnp.asarray(images))).reshape(len(images), -1)
  except Exception as err:  # JAX raises several types for a function it cannot differentiate
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise ValueError(f"the model cannot be differentiated ({first}): APGD and FAB need "
                     "input gradients; pass attack_apply_fn, a differentiable stand-in "
                     "(BPDA: the identity's gradient through a non-differentiable step)"
                     ) from err
  bad = ~np.isfinite(grad).all(-1) | (np.abs(grad).max(-1) == 0)
  share = float(bad.mean()) if len(bad) else 0.0
  if share <= ZERO_GRADIENT_SHARE:
    return None
  return Flag("zero_gradients", f"{100 * share:.0f}% of images have a zero or non-finite "
              "input gradient: gradient attacks are blind there; see Square's column and "
              "try BPDA or EOT (Athalye et al. 2018)")


def square_beats_white_box(evaluation: Any) -> Flag | None:
  """A score-based attack (Square), which uses no gradient, fools images every gradient
  attack left robust: the gradients mislead (masking), so the white-box figures overstate
  the model."""
  score = _union(evaluation, lambda kind: kind == "score")
  white = _union(evaluation, lambda kind: kind != "score")
  only = score & ~white
  if not only.any():
    return None
  return Flag("square_beats_white_box", f"Square fooled {int(only.sum())} image(s) that "
              "APGD and FAB left robust: a sign of gradient masking")


def dlr_beats_ce(evaluation: Any) -> Flag | None:
  """The DLR attacks (APGD-T, APGD-DLR) fool many images APGD-CE left: the cross-entropy
  loss misleads on this model (saturation, rescaled logits)."""
  if "ce" not in evaluation.kinds.values():
    return None
  ce = _union(evaluation, lambda kind: kind == "ce")
  dlr = _union(evaluation, lambda kind: kind == "dlr")
  share = float((dlr & ~ce).mean()) if len(ce) else 0.0
  if share < DLR_GAP:
    return None
  return Flag("dlr_beats_ce", f"the DLR attacks fooled {100 * share:.1f}% of the images "
              "that APGD-CE left robust: cross-entropy misleads on this model")


def _union(evaluation: Any, wanted) -> np.ndarray:
  """Images fooled by any attack whose kind is `wanted`."""
  out = np.zeros(evaluation.clean_correct.shape, bool)
  for name, outcome in evaluation.outcomes.items():
    if wanted(evaluation.kinds[name]):
      out |= outcome.success
  return out


def before_attacks(apply_fn: Any, params: Any, images: np.ndarray, labels: np.ndarray,
                   logits: np.ndarray) -> list[Flag]:
  """The checks on the model alone (on a sample of images; `logits` on all of them)."""
  found = [randomized_forward(apply_fn, params, images), softmax_output(logits),
           saturated_softmax(logits), zero_gradients(apply_fn, params, images, labels)]
  return [f for f in found if f is not None]


def after_attacks(evaluation: Any) -> list[Flag]:
  """The checks on the attacks' outcomes."""
  found = [square_beats_white_box(evaluation), dlr_beats_ce(evaluation)]
  return [f for f in found if f is not None]


def check_budget(name: str, spec: Any, config: Any, result: Any, images: np.ndarray) -> None:
  """Raises RuntimeError if an attack's images leave its budget or the [0, 1] box (an
  attack's bug: counted, it would make the model look weaker than it is)."""
  adv = np.asarray(result.adv_images)
  inside = spec.within_budget(config, result, int(np.prod(images.shape[1:])))
  in_box = (adv.reshape(len(adv), -1).min(-1) >= 0) & (adv.reshape(len(adv), -1).max(-1) <= 1)
  bad = ~(np.asarray(inside) & in_box)
  if bad.any():
    raise RuntimeError(f"{name} returned {int(bad.sum())} image(s) outside its budget or "
                       "[0, 1]; this is a bug in the attack, please report it")


# --- The per-cell flags of a sweep's report, read from what the driver records per image
# (`bench.checks.masking.unit_checks`): one function per flag, each a message or None.

MASKED_SHARE = 0.5  # a cell whose mean zero-gradient share reaches this is flagged
UNBOUNDED_EPS = 1.0  # an L-inf attack at this eps can reach every image: it must succeed


def _won(cols: dict[str, np.ndarray], rows: np.ndarray) -> tuple[int, int]:
  ok = rows & cols["clean_correct"]
  return int((ok & cols["success"]).sum()), int(ok.sum())


def _rate(values: np.ndarray) -> tuple[int, int]:
  values = np.asarray([v for v in values if v is not None and not (
      isinstance(v, float) and np.isnan(v))], bool)
  return int(values.sum()), len(values)


def _pct(rate: tuple[int, int]) -> str:
  return f"{100 * rate[0] / rate[1]:.0f}%"


def randomized_without_eot(cols: dict[str, np.ndarray], ok: np.ndarray,
                           params: dict[str, Any]) -> str | None:
  """A randomized model (other logits on another draw) attacked without EOT."""
  if cols["forward_repeatable"][ok].all() or params.get("eot_samples", 1) != 1:
    return None
  share = 1 - np.mean(cols["forward_repeatable"][ok].astype(bool))
  return (f"randomized: {100 * share:.0f}% of clean images give other logits on another "
          "draw; attack it with eot_samples > 1")


def masked_gradient(cols: dict[str, np.ndarray], ok: np.ndarray) -> str | None:
  """Half or more of the input gradient's entries zero or not finite, on average."""
  shares = np.asarray([v for v in cols["grad_zero_share"][ok] if v is not None], float)
  shares = shares[~np.isnan(shares)]
  if not len(shares) or shares.mean() < MASKED_SHARE:
    return None
  return (f"masked gradient: {100 * shares.mean():.0f}% of input-gradient entries are zero "
          "or not finite; attack it with bpda = true")


def unbounded_attack_fails(params: dict[str, Any], won: tuple[int, int]) -> str | None:
  """An L-inf budget of 1 reaches any image, yet the attack failed on some."""
  eps = params.get("eps")
  if not isinstance(eps, int | float) or eps < UNBOUNDED_EPS or won[0] == won[1]:
    return None
  return (f"eps {eps:g} can reach any image, yet {won[1] - won[0]} of {won[1]} attacks "
          "failed: the attack does not find what exists")


def transfer_beats_white_box(cols: dict[str, np.ndarray], ok: np.ndarray,
                             won: tuple[int, int]) -> str | None:
  """The attack made on the twin fools more than the white-box attack on the model."""
  transfer = _rate(cols["transfer_success"][ok])
  if not transfer[1] or not stats.disjoint_above(transfer, won):
    return None
  return (f"transfer from the twin ({_pct(transfer)}) beats the white-box attack "
          f"({_pct(won)})")


def black_box_beats_white_box(cols: dict[str, np.ndarray], cell: dict[str, Any],
                              peers: list[tuple[dict[str, Any], np.ndarray]],
                              won: tuple[int, int]) -> list[str]:
  """A gradient-free attack on the same model, whose changes lie within this gradient
  attack's L-inf budget, fools more images (intervals apart)."""
  from advsweep import attacks

  def gradient_free(name: str) -> bool:
    spec = attacks.REGISTRY.get(name)
    return spec is not None and spec.unit(spec.config_cls()) == attacks.spec.FORWARD

  eps = cell["params"].get("eps")
  if not isinstance(eps, int | float) or gradient_free(cell["attack"]):
    return []
  out = []
  for peer, rows in peers:
    if not gradient_free(peer["attack"]):
      continue
    if not attacks.common.within_linf(np.max(cols["linf"][rows], initial=0.0), eps):
      continue  # the peer's changes are outside this budget
    peer_won = _won(cols, rows)
    if stats.disjoint_above(peer_won, won):
      out.append(f"the black-box {peer['attack']} attack ({_pct(peer_won)}) beats this "
                 f"white-box attack ({_pct(won)}) within a budget that contains it")
  return out


def adaptive_beats_plain(cols: dict[str, np.ndarray], adaptive_twin: np.ndarray | None,
                         won: tuple[int, int]) -> str | None:
  """The adaptive attack of the same configuration (BPDA, EOT) fools more images."""
  if adaptive_twin is None:
    return None
  twin_won = _won(cols, adaptive_twin)
  if not stats.disjoint_above(twin_won, won):
    return None
  return (f"the adaptive attack ({_pct(twin_won)}) beats this one ({_pct(won)}): its "
          "accuracy overstates the defense")


def cell_flags(cols: dict[str, np.ndarray], mask: np.ndarray, cell: dict[str, Any],
               peers: list[tuple[dict[str, Any], np.ndarray]],
               adaptive_twin: np.ndarray | None) -> list[str]:
  """The masking warnings of one cell of a sweep (its rows in `mask`, clean-correct ones
  counted).

  Args:
    cols: the run's columns.
    mask: the cell's rows.
    cell: the cell's attack and parsed params (with bpda, eot_samples).
    peers: (cell, rows) of the other cells on the same model, for the black-box check.
    adaptive_twin: the rows of the adaptive attack of the same configuration, for a plain
      cell that has one.
  """
  ok = mask & cols["clean_correct"]
  if not ok.any():
    return []
  won = _won(cols, mask)
  found = [randomized_without_eot(cols, ok, cell["params"]), masked_gradient(cols, ok),
           unbounded_attack_fails(cell["params"], won),
           transfer_beats_white_box(cols, ok, won),
           *black_box_beats_white_box(cols, cell, peers, won),
           adaptive_beats_plain(cols, adaptive_twin, won)]
  return [f for f in found if f is not None]


__all__ = ["DOC", "Flag", "adaptive_beats_plain", "after_attacks", "before_attacks",
           "black_box_beats_white_box", "cell_flags", "check_budget", "dlr_beats_ce",
           "masked_gradient", "randomized_forward", "randomized_without_eot",
           "saturated_softmax", "softmax_output", "square_beats_white_box",
           "transfer_beats_white_box", "unbounded_attack_fails", "zero_gradients"]
