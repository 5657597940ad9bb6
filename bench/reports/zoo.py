"""The zoo as a table (`advsweep models`, and the documentation's generated zoo page): each
entry's dataset, architecture, defense, twin, parameters, test accuracy and checkpoint size,
every checkpoint verified as `models.load` verifies it."""

from __future__ import annotations

from pathlib import Path

from advsweep.models import checkpoints, custom, zoo

HEADER = ("model", "dataset", "architecture", "defense", "twin", "params", "test acc",
          "n test", "size", "training s", "note")


def rows(folder: Path, *, entry_points: bool = True) -> tuple[list[list[str]], list[str]]:
  """The table's rows for the checkpoints in `folder`, and the verification failures."""
  out, failures = [], []
  for name, spec in zoo.ZOO.items():
    path = folder / spec.checkpoint.name
    defense, twin = spec.defense or "none", spec.twin or "-"
    if not path.is_file():
      out.append((name, spec.dataset, spec.architecture, defense, twin, "-", "not trained",
                  "-", "-", "-", f"run `advsweep train {name}`"))
      continue
    try:
      meta = zoo.load(name, folder).meta
    except checkpoints.CheckpointError as err:
      failures.append(str(err))
      out.append((name, spec.dataset, spec.architecture, defense, twin, "-", "CORRUPT", "-",
                  "-", "-", "fails verification (below)"))
      continue
    # The shipped weights' own record: a recipe changed since they were trained says so here.
    defense = meta.get("defense") or defense
    out.append((name, spec.dataset, spec.architecture, defense, twin,
                f"{meta['parameters']:,}", f"{100 * meta['test_accuracy']:.2f}%",
                f"{meta['test_examples']:,}", f"{path.stat().st_size / 1e6:.2f} MB",
                "-" if meta.get("train_seconds") is None else f"{meta['train_seconds']:,.0f}",
                meta.get("note") or spec.note))
  if entry_points:
    for name, entry_point in custom.entry_points().items():
      out.append((name, "-", "user (entry point)", "-", "-", "-", "-", "-", "-", "-",
                  entry_point.value))
  return [[str(c) for c in r] for r in out], failures


TRAINING_HEADER = ("model", "epochs", "training attack", "eps", "start", "guard kept",
                   "PGD-10 train acc, last check of each epoch", "training s")


def _attack_text(recipe: dict) -> str:
  if not recipe.get("adversary"):
    return "none"
  steps = recipe.get("adv_steps") or 1
  name = recipe["adversary"] + (f"-{steps}" if steps > 1 else "")
  clean = recipe.get("clean_weight") or 0.0
  pairing = recipe.get("logit_pairing") or 0.0
  mix = f", {clean:g} clean" if clean else ""
  return name + mix + (f", logit pairing {pairing:g}" if pairing else "")


def _eps_text(eps: float | None, dataset: str) -> str:
  if not eps:
    return "-"
  return f"{round(eps * 255)}/255" if dataset == "cifar10" else f"{eps:g}"


def training_rows(folder: Path) -> list[list[str]]:
  """The defended models' recipes as their shipped weights record them: epochs, the attack
  trained on, where training started, and the overfitting guard's PGD-10 accuracy on its
  training images (Wong, Rice, Kolter 2020: the check that catches catastrophic overfitting),
  so the shipped checkpoint's history reads beside its figures. Reads the metadata only:
  `rows` verifies the weights."""
  out = []
  for name, spec in zoo.ZOO.items():
    path = folder / spec.checkpoint.name
    if not spec.defense or not path.is_file():
      continue
    meta = checkpoints.load_meta(path)
    recipe, guard = meta.get("recipe") or {}, meta.get("overfit_guard") or {}
    checks = guard.get("pgd10_train_accuracy_per_check") or []
    per_epoch = guard.get("checks_per_epoch") or 1
    epoch_ends = checks[per_epoch - 1::per_epoch] or checks
    out.append([name, str(recipe.get("epochs", "-")), _attack_text(recipe),
                _eps_text(recipe.get("epsilon"), spec.dataset),
                (meta.get("init_from") or {}).get("from", "scratch"),
                guard.get("kept", "-") if guard else "no guard",
                ", ".join(f"{100 * a:.1f}" for a in epoch_ends) or "-",
                "-" if meta.get("train_seconds") is None else f"{meta['train_seconds']:,.0f}"])
  return out
