"""`advsweep robustness`: one table of every zoo model against the strongest attacks we have.

A defense is only as good as the strongest attack tried on it. The table gives, per model,
the clean accuracy and the accuracy under FGSM, under PGD with restarts, under the
black-box one-pixel attack (k = 1, 3), under JSMA and (MNIST models with a trained
generator) under AdvGAN, each over every image drawn (an image
misclassified when clean counts as an error, as RobustBench and the MNIST challenge count)
with n and a 95% Wilson interval; and, for a defended model, under PGD made on its twin and
evaluated on it (a transfer attack). The defended model sits beside its twin. A model is
flagged where a transfer or a black-box attack beats the white-box PGD with their
intervals apart, its successful changes within PGD's L-inf budget: a white-box attack that
loses to one that knows less has not found what exists (Athalye, Carlini, Wagner 2018,
Sec. 3.1; Carlini et al. 2019, "On evaluating adversarial robustness"). A one-pixel change
beyond that budget lies outside the ball PGD searches, so beating PGD with it says nothing
about masking; the table says so beside the flags instead.
The last column is the worst case at the dataset's L-inf budget: an image counts as robust only
if it is correct under every L-inf attack of its row (FGSM, PGD, AdvGAN, PGD from the twin), the
per-image worst case AutoAttack reports (Croce and Hein 2020). The one-pixel attack and JSMA
change few pixels by any amount, another threat model, so they stay out of it.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from advsweep.attacks import common
from advsweep.bench import stats
from advsweep.bench.checks import masking
from advsweep.bench.driver import config as config_lib
from advsweep.bench.driver import results, sweep
from advsweep.bench.reports import report, tables
from advsweep.models import checkpoints, zoo

CONFIG = "robustness"
WORST_CASE = "L-inf worst case"
# The columns of attacks bounded by the dataset's L-inf eps, which the worst case is over.
LINF_COLUMNS = ("FGSM", "PGD", "AdvGAN", "PGD from twin")
OVERFIT_GAP = 0.5  # FGSM minus PGD accuracy of an adversarially trained model that flags it
HEADER = ("model", "defense", "twin", "n", "clean", "FGSM", "PGD", "1-pixel k=1",
          "1-pixel k=3", "JSMA", "AdvGAN", "PGD from twin", WORST_CASE)
# Column -> (attack, params the cell must have).
COLUMNS = {"FGSM": ("fgsm", {}), "PGD": ("pgd", {}),
           "1-pixel k=1": ("one_pixel", {"num_pixels": 1}),
           "1-pixel k=3": ("one_pixel", {"num_pixels": 3}), "JSMA": ("jsma", {}),
           "AdvGAN": ("advgan", {})}
# The column whose rows carry the twin's transfer check ("PGD from twin") and whose setting
# the title names.
WHITE_BOX = "PGD"


def _rate(hits: np.ndarray) -> tuple[int, int]:
  return int(hits.sum()), len(hits)


def _share(rate: tuple[int, int]) -> str:
  return tables.pct(rate[0] / rate[1])


def _cell_text(k: int, n: int) -> str:
  if not n:
    return "-"
  lo, hi = tables.wilson_interval(k, n)
  return f"{tables.pct(k / n)} ({tables.pct(lo)}-{tables.pct(hi)})"


def _order(models: list[str]) -> list[str]:
  """Each undefended model, followed by the models measured beside it (twins of twins
  too), in zoo order."""
  known = [m for m in zoo.ZOO if m in models] + [m for m in models if m not in zoo.ZOO]
  children: dict[str, list[str]] = {}
  roots = []
  for m in known:
    twin = zoo.ZOO[m].twin if m in zoo.ZOO else ""
    (children.setdefault(twin, []) if twin in known else roots).append(m)
  out: list[str] = []

  def visit(m: str) -> None:
    out.append(m)
    for child in children.get(m, []):
      visit(child)

  for root in roots:
    visit(root)
  return out


def robustness_rows(table: pa.Table) -> tuple[list[list[str]], list[str]]:
  """The robustness table's rows and its flags, from a run's rows."""
  rows, flags, _, _ = _measure(table)
  return rows, flags


def twin_lines(table: pa.Table) -> list[str]:
  """Each defended model against its twin, column by column, image by image: the share of
  the images both were measured on that each keeps correct, the difference with Newcombe's
  95% interval, and the exact McNemar test's verdict (`bench.stats.paired`): the claims of
  Hess et al. (the Gauss network is less susceptible to one-pixel attacks) and of Xie et
  al. (denoising blocks add PGD robustness to adversarial training)."""
  return _twin_lines(_measure(table)[3])


def _twin_pairs(per_image: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
                both_correct: bool = False
                ) -> list[tuple[str, str, list[tuple[str, stats.Paired]]]]:
  """Per defended model measured beside its twin: (model, twin, [(column, paired outcome on
  the images both were measured on)]); with `both_correct`, on those of them that both
  classify correctly when clean, so that a lower clean accuracy does not show as a lower
  accuracy under attack: the share kept is then one minus the attack's success rate, the
  susceptibility Hess et al. compare."""
  out = []
  for model, own in per_image.items():
    twin = zoo.ZOO[model].twin if model in zoo.ZOO else ""
    if twin not in per_image:
      continue
    pairs = []
    correct = (np.intersect1d(_correct_images(own), _correct_images(per_image[twin]))
               if both_correct else None)
    for column in ("clean", *COLUMNS, WORST_CASE):
      if column not in own or column not in per_image[twin]:
        continue
      (ours_idx, ours), (theirs_idx, theirs) = own[column], per_image[twin][column]
      shared, at_ours, at_theirs = np.intersect1d(ours_idx, theirs_idx, return_indices=True)
      if both_correct:
        if column == "clean":
          continue
        kept = np.isin(shared, correct)
        at_ours, at_theirs = at_ours[kept], at_theirs[kept]
      if len(at_ours):
        pairs.append((column, stats.paired(ours[at_ours], theirs[at_theirs])))
    out.append((model, twin, pairs))
  return out


def _correct_images(columns: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
  """The example_idx a model classifies correctly when clean."""
  index, correct = columns["clean"]
  return np.unique(index[correct])


def _twin_lines(per_image: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> list[str]:
  return [f"{model} vs {twin}: " + "; ".join(
      f"{column} {tables.pct(p.a)} vs {tables.pct(p.b)} ({p.verdict()}; "
      f"{100 * p.difference:+.1f} points, {100 * p.low:+.1f} to {100 * p.high:+.1f}, "
      f"p = {p.p_value:.2g}, n = {p.n})" for column, p in pairs)
      for model, twin, pairs in _twin_pairs(per_image)]


TWIN_HEADER = ("model", "twin", "attack", "n", "accuracy", "twin's", "difference (95%)", "p",
               "verdict")


def twin_rows(table: pa.Table, both_correct: bool = False
              ) -> tuple[list[str], list[list[str]]]:
  """`twin_lines` as a table: one row per defended model and column (`both_correct`: on the
  images both classify correctly, `_twin_pairs`)."""
  rows = [[model, twin, column, str(p.n), tables.pct(p.a), tables.pct(p.b),
           f"{100 * p.difference:+.1f} ({100 * p.low:+.1f} to {100 * p.high:+.1f})",
           f"{p.p_value:.2g}", p.verdict()]
          for model, twin, pairs in _twin_pairs(_measure(table)[3], both_correct)
          for column, p in pairs]
  return list(TWIN_HEADER), rows


def _defense_text(model: str, sha256: str) -> str:
  """The defense of the weights the rows measured: the shipped checkpoint's own record where
  they are its weights, else the zoo entry's with the measured weights' first digits (a model
  retrained since: the recipe named may not be theirs)."""
  entry = zoo.ZOO.get(model)
  defense = (entry.defense if entry else "") or "none"
  if entry is None or not sha256 or not entry.checkpoint.is_file():
    return defense
  shipped = checkpoints.load_meta(entry.checkpoint)
  if shipped.get("sha256") == sha256:
    return shipped.get("defense") or defense
  return f"{defense}; earlier weights {sha256[:12]}"


def _measure(table: pa.Table) -> tuple[list[list[str]], list[str],
                                        dict[str, dict[str, tuple[int, int]]],
                                        dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]]:
  """Rows, flags, and per model and column the (correct, n) counts and the per-image
  (example_idx, correct) arrays the twin comparison pairs."""
  cols = report.columns(table)
  index = cols.get("example_idx", np.zeros(len(cols["model"]), np.int64))
  cols["transfer_success"] = np.asarray(table.column("transfer_success").to_pylist(), object)
  params = np.array([json.loads(p) for p in cols["params"]], dtype=object)
  plain = np.array([not config_lib.is_adaptive(p) and not p.get("evade_detector")
                    for p in params], bool)
  robust = cols["clean_correct"] & (cols["adv_pred"] == cols["label"])
  shas = (np.asarray(table.column("model_sha256").to_pylist(), object)
          if "model_sha256" in table.column_names else None)
  rows, flags, by_model, per_image = [], [], {}, {}
  for model in _order(list(dict.fromkeys(cols["model"].tolist()))):
    in_model = (cols["model"] == model) & plain
    entry = zoo.ZOO.get(model)
    first = np.flatnonzero(in_model)
    if not len(first):
      continue
    images = cols["config_hash"] == cols["config_hash"][first[0]]
    clean = _rate(cols["clean_correct"][in_model & images])
    row = [model, _defense_text(model, str(shas[first[0]]) if shas is not None else ""),
           (entry.twin if entry else "") or "-", str(clean[1]), _cell_text(*clean)]
    rates: dict[str, tuple[int, int]] = {"clean": clean}
    by_model[model] = rates
    chosen = {"clean": (index[in_model & images], cols["clean_correct"][in_model & images])}
    per_image[model] = chosen
    linf: list[tuple[np.ndarray, np.ndarray, float | None]] = []  # (image, robust, eps)
    reach: dict[str, float] = {}  # column -> the largest L-inf change among images it fooled
    for column, (attack, wanted) in COLUMNS.items():
      mask = in_model & (cols["attack"] == attack) & np.array(
          [all(p.get(k) == v for k, v in wanted.items()) for p in params], bool)
      hashes = list(dict.fromkeys(cols["config_hash"][mask].tolist()))
      if column in LINF_COLUMNS:  # the worst case: every configuration
        linf += _by_configuration(cols, index, params, mask, robust)
      if len(hashes) > 1:  # several configurations: the strongest (lowest accuracy) counts
        per = [_rate(robust[mask & (cols["config_hash"] == h)]) for h in hashes]
        strongest = min(range(len(per)),
                        key=lambda i: per[i][0] / per[i][1] if per[i][1] else math.inf)
        mask = mask & (cols["config_hash"] == hashes[strongest])
      rates[column] = _rate(robust[mask])
      if rates[column][1]:
        chosen[column] = (index[mask], robust[mask])
        fooled = mask & cols["clean_correct"] & ~robust
        if "linf" in cols:
          reach[column] = float(np.max(cols["linf"][fooled], initial=0.0))
      row.append(_cell_text(*rates[column]))
    pgd = in_model & (cols["attack"] == COLUMNS[WHITE_BOX][0])
    transferred = [v for v in cols["transfer_success"][pgd] if v is not None]
    if transferred:
      fooled = np.asarray([v is True for v in cols["transfer_success"][pgd]], bool)
      rates["transfer"] = _rate(cols["clean_correct"][pgd] & ~fooled)
      transfer_robust = np.zeros(len(robust), bool)
      transfer_robust[pgd] = cols["clean_correct"][pgd] & ~fooled
      linf += _by_configuration(cols, index, params, pgd, transfer_robust)
      row.append(_cell_text(*rates["transfer"]))
    else:
      row.append("-")
    if linf:  # at the largest eps measured, where several were
      top = max((eps for _, _, eps in linf if eps is not None), default=None)
      chosen[WORST_CASE] = worst_case([(i, r) for i, r, eps in linf if eps in (None, top)])
      rates[WORST_CASE] = _rate(chosen[WORST_CASE][1])
    row.append(_cell_text(*rates.get(WORST_CASE, (0, 0))))
    rows.append(row)
    white_box = rates[WHITE_BOX]
    if masking.disjoint_above(white_box, rates["FGSM"]):
      flags.append(f"FLAG {model}: one FGSM step ({_share(rates['FGSM'])}) leaves fewer "
                   f"images correct than PGD ({_share(white_box)}): PGD's steps or budget "
                   "are too small, or the gradient is masked")
    trained_on_attack = entry is not None and entry.recipe.adversary is not None
    fgsm, pgd_rate = rates["FGSM"], white_box
    if (trained_on_attack and fgsm[1] and pgd_rate[1]
        and fgsm[0] / fgsm[1] - pgd_rate[0] / pgd_rate[1] >= OVERFIT_GAP):
      flags.append(f"FLAG {model}: trained on {entry.recipe.adversary}, it keeps "
                   f"{_share(fgsm)} under FGSM but {_share(white_box)} under PGD: robust to "
                   "the one-step attack it was trained on only (catastrophic overfitting, "
                   "Wong et al. 2020)")
    budget = max((p.get("eps", 0.0) for p in params[pgd]), default=None)
    for name in ("transfer", "1-pixel k=1", "1-pixel k=3", "AdvGAN"):
      if name not in rates or not masking.disjoint_above(white_box, rates[name]):
        continue
      if budget is not None and not common.within_linf(reach.get(name, 0.0), budget):
        flags.append(f"not flagged, {model}: {name} ({_share(rates[name])}) leaves fewer "
                     f"images correct than PGD ({_share(white_box)}), but with changes up to "
                     f"{reach[name]:.2f} in L-inf, outside PGD's {budget:.3g}: another threat "
                     "model, not a sign of masking")
        continue
      what = {"transfer": "PGD made on the twin",
              "AdvGAN": "AdvGAN's generator (one forward pass)"}.get(
                  name, f"the black-box {name}")
      flags.append(f"FLAG {model}: {what} ({_share(rates[name])}) leaves fewer images "
                   f"correct than white-box PGD ({_share(white_box)}): a sign of gradient "
                   "masking; the PGD figure overstates the model")
  return rows, flags, by_model, per_image


def _by_configuration(cols: dict[str, np.ndarray], index: np.ndarray, params: np.ndarray,
                      mask: np.ndarray, robust: np.ndarray
                      ) -> list[tuple[np.ndarray, np.ndarray, float | None]]:
  """The rows in `mask`, one (example_idx, robust, eps) per configuration."""
  out = []
  for config_hash in dict.fromkeys(cols["config_hash"][mask].tolist()):
    rows = mask & (cols["config_hash"] == config_hash)
    out.append((index[rows], robust[rows], params[rows][0].get("eps")))
  return out


def worst_case(columns: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
  """Per image, whether it is robust under every attack: `columns` holds one
  (example_idx, robust) pair of arrays per attack, and an image counts on the images every
  attack measured, robust only where no row of it was fooled (several rows of one image in a
  column, as several configurations give, must all hold). Returns (example_idx, robust),
  sorted by example_idx."""
  per_column = []
  for idx, robust in columns:
    order = np.argsort(idx, kind="stable")
    images, starts = np.unique(np.asarray(idx)[order], return_index=True)
    per_column.append((images, np.logical_and.reduceat(np.asarray(robust, bool)[order], starts)
                       if len(images) else np.zeros(0, bool)))
  shared = functools.reduce(np.intersect1d, [images for images, _ in per_column])
  held = np.ones(len(shared), bool)
  for images, robust in per_column:
    held &= robust[np.searchsorted(images, shared)]
  return shared, held


def _pgd_setting(table: pa.Table) -> str:
  cols = report.columns(table)
  settings = sorted({report.params_text(p) for p, a in zip(cols["params"], cols["attack"],
                                                          strict=True)
                     if a == COLUMNS[WHITE_BOX][0]})
  return "; ".join(settings) or "not run"


def lines(table: pa.Table, title: str) -> tuple[list[str], list[str]]:
  """The table and flags as text and as Markdown lines."""
  rows, flags, _, per_image = _measure(table)
  if not any(f.startswith("FLAG") for f in flags):
    flags = ["no model flagged: no transfer, black-box or one-step attack beat white-box PGD "
             "within its budget", *flags]
  note = ("Accuracy over every image drawn (misclassified clean images count as errors), "
          "95% Wilson interval in parentheses. An image is robust to PGD only if every "
          "restart fails; L-inf worst case: correct under FGSM, PGD, AdvGAN and PGD from the "
          f"twin, on the images all of them measured. PGD: {_pgd_setting(table)}.")
  twins = _twin_lines(per_image)
  text = [title, tables.format_text(HEADER, rows), note, "", *flags]
  markdown = [f"## {title}", "", tables.format_markdown(HEADER, rows), "", note, "",
              *[f"- {f}" for f in flags]]
  if twins:
    text += ["", "Beside the twin (accuracy, defended vs twin):", *twins]
    markdown += ["", "### Beside the twin (accuracy, defended vs twin)", "",
                 *[f"- {t}" for t in twins]]
  return text, markdown


def _trained_attack_models(config: config_lib.RunConfig, kept: list[str], log
                           ) -> list[str]:
  """Overrides that keep each attack trained against its target (`AttackSpec.trained_field`:
  AdvGAN) to the models of its table (default: all kept) whose weights are trained already
  (shipped or cached). Training one takes many minutes, so the table does not start it; the
  others are named with the command that trains theirs."""
  from advsweep import attacks
  from advsweep.models.gan import generators

  overrides = []
  for attack, table in config.raw["attacks"].items():
    if attacks.REGISTRY[attack].trained_field is None:
      continue
    settings = {k: v for k, v in table.items() if k not in config_lib.DRIVER_KEYS
                and k != config_lib.ATTACK_MODELS}
    attack_config = config_lib.attack_config(attack, settings)
    wanted = [m for m in table.get(config_lib.ATTACK_MODELS, kept) if m in kept]
    ready = [m for m in wanted if generators.find_for(attack_config, zoo.load(m))]
    missing = [m for m in wanted if m not in ready]
    if missing:
      log(f"robustness: {attack} left out for {', '.join(missing)}: not trained against "
          f"{'it' if len(missing) == 1 else 'them'} yet (advsweep gan {attack} MODEL)")
    overrides.append(f"attacks.{attack}.models={json.dumps(ready)}")
  return overrides


def run(quick: bool = False, out_root: str | Path = "results", data_dir: str | None = None,
        overrides: list[str] | None = None, progress: bool = True, log=print) -> str:
  """Runs (or resumes) the robustness sweep on the trained zoo models and prints the table;
  writes it to `<out_root>/<run name>.md` (robustness.md, robustness-quick.md) and returns
  the Markdown."""
  config = config_lib.load(CONFIG, overrides, quick=quick)
  missing = [m for m in config.raw["models"] if m in zoo.ZOO and m not in zoo.available()]
  kept = [m for m in config.raw["models"] if m not in missing]
  extra = []
  if missing:
    log(f"robustness: not trained, left out: {', '.join(missing)} (`advsweep train NAME`)")
    extra.append(f"models={json.dumps(kept)}")
  extra += _trained_attack_models(config, kept, log)
  if extra:
    config = config_lib.load(CONFIG, [*(overrides or []), *extra], quick=quick)
  out_dir = Path(out_root) / config.name
  sweep.run(config, out_dir, data_dir=data_dir, progress=progress, log=log)
  table = results.read_run(out_dir)
  title = (f"Robustness ({config.name}{', quick' if quick else ''}: {table.num_rows} rows in "
           f"{out_dir})")
  text, markdown = lines(table, title)
  log("\n".join(text))
  body = "\n".join(markdown) + "\n"
  tables.write_text(Path(out_root) / f"{config.name}.md", body)
  return body

