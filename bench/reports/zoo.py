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
