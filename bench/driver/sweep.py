"""The sweep driver: models x attack configurations x confidence-binned images -> parquet rows.

Work is cut into units, one per (model, attack configuration, batch of images), in a fixed
order. Each unit's rows go to their own parquet file, written atomically, so:
- resuming skips units whose file is there, readable, of this run and whole (a killed run
  loses at most the units in flight; anything else is run again or refused by name);
- processes sharing a folder claim units before running them (`bench.driver.claims`);
- `--shard K/N` takes every N-th unit from the K-th, and the parts of all shards together
  are exactly the files of one plain run;
- on a cluster, `jax.distributed.initialize()` runs when its environment is present and
  each process takes its own share of units in the same way, on its local devices.
Within a unit the batch is sharded over the local devices with `jax.sharding`. Every random
choice of an attack on an image comes from a key folded from (seed, configuration, image
index), so rows do not depend on batching, sharding or resumption.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import re
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from advsweep import attacks
from advsweep.attacks import checks
from advsweep.bench.checks import detection, masking
from advsweep.bench.driver import claims as claims_lib
from advsweep.bench.driver import compilation, perturbations, results, selection, timing
from advsweep.bench.driver import config as config_lib
from advsweep.bench.driver.config import Cell, ConfigError, RunConfig
from advsweep.models import custom, datasets, files, interrupts, zoo


@dataclasses.dataclass(frozen=True)
class Unit:
  """One results file: a batch of a model's selected images under one attack config."""

  cell: Cell
  index: int  # the batch number within the cell
  positions: np.ndarray  # indices into the model's Selection

  @property
  def filename(self) -> str:
    c = self.cell
    model = re.sub(r"[^A-Za-z0-9._-]", "_", c.model)  # a user's `package.module:function`
    return f"{model}-{c.attack}-{c.config_hash}-{self.index:04d}.parquet"


def parse_shard(text: str | None) -> tuple[int, int]:
  """`"K/N"` (0 <= K < N, 0-based like SLURM_ARRAY_TASK_ID) -> (K, N); None -> (0, 1)."""
  if text is None:
    return 0, 1
  try:
    k, n = (int(x) for x in text.split("/"))
  except ValueError:
    raise ValueError(f"--shard expects K/N with integers, e.g. 0/4; got {text!r}") from None
  if n < 1 or not 0 <= k < n:
    raise ValueError(f"--shard K/N needs 0 <= K < N (K is 0-based); got {text!r}")
  return k, n


def slurm_shard(env: dict[str, str] | None = None) -> tuple[int, int] | None:
  """The shard of a SLURM job-array task, (K, N), from `SLURM_ARRAY_TASK_ID` and
  `SLURM_ARRAY_TASK_COUNT` (K counted from `SLURM_ARRAY_TASK_MIN` in steps of
  `SLURM_ARRAY_TASK_STEP`, so `--array=1-8` and `--array=0-14:2` work); None outside an array.

  Raises:
    ValueError: the variables are set but do not describe a task of the array.
  """
  env = os.environ if env is None else env
  if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
    return None
  try:
    task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
    low = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    step = int(env.get("SLURM_ARRAY_TASK_STEP", "1"))
  except ValueError:
    raise ValueError("the SLURM_ARRAY_TASK_* variables are not integers; pass --shard K/N "
                     "instead") from None
  k, rest = divmod(task - low, max(step, 1))
  if rest or count < 1 or not 0 <= k < count:
    raise ValueError(f"SLURM_ARRAY_TASK_ID={task} is no task of an array of {count} from "
                     f"{low} in steps of {step}; pass --shard K/N instead")
  return k, count


def cell_key(seed: int, cell: Cell) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), int(cell.draw_hash[:8], 16))


EVADE_MARGIN = 0.9  # the detector-aware attack's penalty starts at 90% of the threshold


def evaluation_draws_key(seed: int) -> jax.Array:
  """The key of a randomized defense's draws where rows are decided (selection, success)."""
  return jax.random.fold_in(jax.random.key(seed), 0x0E7A1)


def attack_draws_key(seed: int) -> jax.Array:
  """The key of the draws an attack sees: independent of the evaluation's, so an attack
  cannot win by knowing the draws that judge it."""
  return jax.random.fold_in(jax.random.key(seed), 0xA77AC)


def image_keys(seed: int, cell: Cell, example_idx: np.ndarray) -> jax.Array:
  """One key per image from (seed, the cell's set parameters, image index) alone."""
  base = cell_key(seed, cell)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
      base, jnp.asarray(example_idx, jnp.uint32))


@dataclasses.dataclass
class ModelData:
  """A loaded model with its dataset and its selected images."""

  model: zoo.Model
  images_u8: np.ndarray
  selection: selection.Selection
  dataset: str  # the model's, or the config's for a user's model without one
  num_classes: int

  @functools.cached_property
  def detector_threshold(self) -> float:
    """Papernot et al.'s detector at 5% false positives on this split's clean images."""
    return detection.threshold_at(detection.scores(self.images_u8))


def plan(config: RunConfig, selections: dict[str, selection.Selection]) -> list[Unit]:
  """Every unit of the sweep, in a fixed order (the basis of resuming and sharding)."""
  units = []
  for cell in config.cells():
    sel = selections[cell.model]
    positions = np.arange(len(sel.example_idx))
    if cell.target_class is not None:  # no "attack toward its own class"
      positions = positions[sel.labels != cell.target_class]
    for i, start in enumerate(range(0, len(positions), config.batch_size)):
      units.append(Unit(cell, i, positions[start:start + config.batch_size]))
  return units


class Runner:
  """Runs units on the local devices and writes their parquet files."""

  def __init__(self, config: RunConfig, run_id: str, data_dir: str | None = None):
    self.config = config
    self.run_id = run_id
    self.data_dir = data_dir
    self.devices = jax.local_devices()
    self.mesh = Mesh(np.array(self.devices), ("batch",))
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("batch"))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self._params: dict[str, Any] = {}
    self._trained: dict[tuple[str, str], tuple[Any, str]] = {}

  def trained_config(self, spec: attacks.AttackSpec, cell: Cell, data: ModelData
                     ) -> tuple[Any, str | None]:
    """The cell's config with the weights an attack trains against each model bound
    (`AttackSpec.trained_field`: AdvGAN's generator, found or trained once and cached,
    `models.gan.generators.bind`), and their sha256; the config as it is otherwise."""
    if spec.trained_field is None:
      return cell.config, None
    key = (cell.config_hash, data.model.name)
    if key not in self._trained:
      from advsweep.models.gan import generators

      self._trained[key] = generators.bind(cell.config, data.model, spec.trained_field,
                                           data_dir=self.data_dir)
    return self._trained[key]

  def params(self, data: ModelData) -> Any:
    name = data.model.name
    if name not in self._params:
      self._params[name] = jax.device_put(data.model.params, self.replicated)
    return self._params[name]

  def shard(self, x: np.ndarray | jax.Array) -> jax.Array:
    return jax.device_put(x, self.batch_sharding)

  def attack_params(self, data: ModelData) -> Any:
    """The params an attack is given: the model's, but for a randomized defense with draws
    of another key than the evaluation's (`attack_draws_key`)."""
    name = ("attack", data.model.name)
    if name not in self._params:
      model = data.model.with_draws(attack_draws_key(self.config.seed))
      self._params[name] = jax.device_put(model.params, self.replicated)
    return self._params[name]

  def run_unit(self, unit: Unit, data: ModelData) -> tuple[dict[str, Any], np.ndarray]:
    """Attacks the unit's images; returns its rows (columns of equal length) and its
    adversarial images [N, H, W, C]."""
    cell, sel, model = unit.cell, data.selection, data.model
    n = len(unit.positions)
    pad = (-n) % len(self.devices)
    positions = np.concatenate([unit.positions, np.repeat(unit.positions[-1:], pad)])
    example_idx = sel.example_idx[positions]
    images = self.shard(data.images_u8[example_idx].astype(np.float32) / 255.0)
    labels = self.shard(sel.labels[positions].astype(np.int32))
    keys = self.shard(image_keys(self.config.seed, cell, example_idx))
    targets = None
    if cell.target_class is not None:
      targets = self.shard(np.full(len(positions), cell.target_class, np.int32))
    spec = attacks.REGISTRY[cell.attack]
    config, trained_sha256 = self.trained_config(spec, cell, data)
    if cell.params.get("evade_detector"):  # aim 10% under the threshold, to end under it
      config = dataclasses.replace(
          config, detector_threshold=EVADE_MARGIN * data.detector_threshold)
    apply_fn = model.attack_apply_fn(cell.bpda, cell.eot_samples)
    params = self.attack_params(data)
    compiled_before = compilation.seconds()
    start = time.perf_counter()
    result = spec.run(apply_fn, params, images, labels, keys, config, targets=targets,
                      evaluator=model.pixel_evaluator or attacks.common.FULL_EVALUATION)
    if model.randomized:  # success as the defense's own draws decide it
      result = attacks.common.finalize(model.apply_fn, self.params(data), images,
                                       result.adv_images, labels, result.target,
                                       result.queries, result.evaluation,
                                       result.evaluated)
    result = jax.block_until_ready(result)
    compile_s = compilation.seconds() - compiled_before
    wall = max(time.perf_counter() - start - compile_s, 0.0)
    checked = masking.unit_checks(spec, config, cell, model, apply_fn, params,
                                  self.params(data), images, labels, keys, targets,
                                  result.adv_images)
    r = jax.tree.map(lambda x: np.asarray(x)[:n], result)
    flat = r.adv_images.reshape(n, -1)
    in_range = (flat.min(-1) >= 0.0) & (flat.max(-1) <= 1.0)
    valid = r.finite & in_range & spec.within_budget(config, r, flat.shape[1])
    pos = unit.positions
    bin_names = np.asarray(self.config.bin_names)
    meta = data.model.meta
    const = {
        "run_id": self.run_id,
        "created_at": datetime.datetime.now(datetime.UTC),
        "git_sha": results.git_sha(),
        "versions": results.versions(),
        "device_kind": self.devices[0].device_kind,
        "device_count": len(self.devices),
        "dataset": data.dataset,
        "split": self.config.split,
        "model": cell.model,
        "model_sha256": meta["sha256"],
        "attack": cell.attack,
        "config_json": cell.config_json,
        "config_hash": cell.config_hash,
        "params": cell.params_json,
        "seed": self.config.seed,
        "wall_s": wall / n,
        "compile_s": compile_s,
        "attack_weights_sha256": trained_sha256,
    }
    rows = {k: [v] * n for k, v in const.items()}
    rows.update({
        "example_idx": sel.example_idx[pos],
        "label": sel.labels[pos],
        "clean_pred": sel.clean_pred[pos],
        "clean_conf": sel.clean_conf[pos].astype(np.float32),
        "conf_bin": bin_names[sel.bins[pos]],
        "clean_correct": sel.clean_correct[pos],
        "clean_top5_correct": sel.clean_top5_correct[pos],
        "target": r.target, "adv_pred": r.adv_pred, "adv_conf": r.adv_conf,
        "adv_top5_correct": r.adv_top5_correct, "success": r.success, "l0": r.l0,
        "l0_fraction": r.l0_fraction, "l2": r.l2, "linf": r.linf,
        # EOT spends `eot_samples` model evaluations on every query.
        "queries": r.queries.astype(np.int64) * cell.eot_samples,
        "evaluated": r.evaluated.astype(np.float64) * cell.eot_samples, "valid": valid,
        "evaluation": [r.evaluation] * n,
        "defense": [meta.get("defense") or config_lib.NO_DEFENSE] * n,
        **{k: v[:n] for k, v in checked.items()},
    })
    if spec.sparse:
      clean = np.asarray(images)[:n]
      rows["changed_index"], rows["changed_from"], rows["changed_to"] = (
          perturbations.sparse_changes(clean, r.adv_images))
    else:
      rows.update({k: [None] * n for k in ("changed_index", "changed_from", "changed_to")})
    return rows, r.adv_images


# What a run folder holds besides run.json (a folder with anything else and no run.json is
# refused: an --out naming the folder of run folders would mix a run into other files).
RUN_FOLDER_ENTRIES = frozenset({"parts", "claims", "report", "analysis"})


def open_folder(out_dir: Path, config: RunConfig) -> str:
  """The run id for `out_dir`, reading only: refuses a folder that holds another config's
  units, or other files and no run.json. A folder whose `run.json` names another config but
  holds no unit (a run that failed before its first unit) is taken over when the first unit
  is written."""
  run_id = f"{config.name}-{config.config_hash}"
  if out_dir.exists() and not out_dir.is_dir():
    raise results.ResultsError(f"{out_dir} is a file, not a run folder; pass --out a folder")
  meta = results.read_run_meta(out_dir)
  if meta is None and out_dir.is_dir():
    strangers = sorted(p.name for p in out_dir.iterdir()
                       if p.name not in RUN_FOLDER_ENTRIES and not p.name.startswith("."))
    if strangers:
      raise results.ResultsError(
          f"{out_dir} is no run folder (no run.json) and holds {strangers[0]!r}"
          f"{f' and {len(strangers) - 1} more' if len(strangers) > 1 else ''}; --out names "
          f"the run folder itself: pass --out {out_dir / config.name}")
  if meta is not None and meta.get("config_hash") != config.config_hash:
    if _part_paths(out_dir):
      raise results.ResultsError(
          f"{out_dir} holds run {meta.get('run_id')}, made with another config (hash "
          f"{meta.get('config_hash')}, now {config.config_hash}); pass --out a new folder, "
          "or delete the old one")
  return run_id


def finished(out_dir: Path) -> bool:
  """Whether every unit of the run in `out_dir` has its part (a run.json written before the
  count was kept says nothing: taken as finished)."""
  meta = results.read_run_meta(out_dir) or {}
  return len(_part_paths(out_dir)) >= meta.get("units", 0)


def _part_paths(out_dir: Path) -> list[Path]:
  return sorted(p for p in (out_dir / "parts").glob("*.parquet") if not p.name.startswith("."))


def write_run_meta(out_dir: Path, config: RunConfig, run_id: str,
                   checkpoint_dir: str | None = None, units: int | None = None) -> None:
  """Writes `run.json` (the resolved config and its hash, the number of units of the whole
  sweep, so a reader can tell a finished run from a partial one, and the checkpoint folder
  the zoo models came from where one was given, which the analyses load them from), unless
  it already names this run."""
  meta = results.read_run_meta(out_dir)
  if meta is not None and meta.get("config_hash") == config.config_hash:
    return
  body = {"run_id": run_id, "name": config.name, "config_hash": config.config_hash,
          "config": json.loads(config.to_json()),
          "created_at": datetime.datetime.now(datetime.UTC).isoformat()}
  if checkpoint_dir is not None:
    body["checkpoint_dir"] = str(Path(checkpoint_dir).resolve())
  if units is not None:
    body["units"] = units
  files.atomic_write_text(out_dir / "run.json", json.dumps(body, indent=2, sort_keys=True)
                          + "\n")


def unit_problem(path: Path, unit: Unit, data: ModelData, run_id: str, seed: int,
                 save_images: bool = False) -> str | None:
  """Why the unit must run: None when its part is readable, belongs to this run and holds
  exactly the unit's images (and, with `save_images`, its image file exists); a reason when
  it is missing or unreadable or short.

  Raises:
    ResultsError: the part belongs to another run (another config or seed): mixing the two
      would corrupt both, so it is refused by name.
  """
  if not path.exists():
    return "missing"
  try:
    table = results.read_part(path)
  except results.ForeignPartError:
    raise  # readable but not ours: refused by name, never overwritten
  except results.ResultsError as err:
    return f"unreadable ({' '.join(str(err).split())})"
  cols = table.select(["run_id", "config_hash", "seed", "model", "example_idx",
                       "model_sha256"]).to_pydict()
  if set(cols["model_sha256"]) != {data.model.meta["sha256"]}:
    raise results.ResultsError(
        f"{path} was made with other weights of {unit.cell.model} (sha256 "
        f"{cols['model_sha256'][0][:12]}..., now {data.model.meta['sha256'][:12]}...); pass "
        "--out a new folder for the new weights")
  owners = set(zip(cols["run_id"], cols["seed"], strict=True))
  if owners != {(run_id, seed)} or set(cols["config_hash"]) != {unit.cell.config_hash}:
    other = ", ".join(f"{r} (seed {s})" for r, s in sorted(owners))
    raise results.ResultsError(
        f"{path} belongs to run {other}, not to this run {run_id} (seed {seed}); move it out "
        "of the folder, or pass --out a new folder")
  expected = sorted(data.selection.example_idx[unit.positions].tolist())
  if set(cols["model"]) != {unit.cell.model} or sorted(cols["example_idx"]) != expected:
    return f"holds {table.num_rows} rows, not the unit's {len(expected)} images"
  if save_images and not perturbations.images_path(path.parent.parent, path.name).exists():
    return "its adversarial images are not saved yet (save_images)"
  return None


@functools.cache
def resolve_model(name: str, checkpoint_dir: str | None) -> zoo.Model:
  """The model a config names (`models.custom.resolve`), one per process: jit caches key on
  its apply_fn, so reusing it reuses compiles."""
  return custom.resolve(name, checkpoint_dir)


@functools.cache
def dataset_split(name: str, split: str, data_dir: str | None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """A dataset split's (uint8 images, labels), read-only, loaded once per process."""
  images, labels = datasets.load(name, split, data_dir)
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


def load_models(config: RunConfig, data_dir: str | None,
                checkpoint_dir: str | None = None) -> dict[str, ModelData]:
  """Loads each model and its dataset, and draws its images per confidence bin."""
  out = {}
  cells = config.cells()
  for name in config.models:
    model = resolve_model(name, checkpoint_dir)
    model = model.with_draws(evaluation_draws_key(config.seed))
    dataset = model.meta.get("dataset") or config.raw["dataset"]
    if not dataset:
      raise ConfigError(f"model {name} names no dataset; set dataset = \"FOLDER\" (or a "
                        "dataset name) in the config")
    images_u8, labels = dataset_split(dataset, config.split, data_dir)
    num_classes = _check_fit(name, model, images_u8, labels, cells)
    try:
      sel = selection.select(model.apply_fn, model.params, images_u8, labels,
                             config.thresholds, config.per_bin, config.pool, config.seed)
    except selection.NonFiniteLogitsError as err:
      raise ConfigError(f"model {name} gives {err}") from None
    out[name] = ModelData(model, images_u8, sel, dataset, num_classes)
  return out


def _check_fit(name: str, model: zoo.Model, images_u8: np.ndarray, labels: np.ndarray,
               cells: list[Cell]) -> int:
  """The model's number of classes, checked against its data and the config's targets."""
  probe = np.zeros((1, *images_u8.shape[1:]), np.float32)
  try:
    num_classes = checks.num_classes_of(model.apply_fn, model.params, probe)
  except checks.NotLogitsError as err:
    raise ConfigError(f"model {name}: {err}") from None
  except Exception as err:  # noqa: BLE001  (a user's function can fail in any way)
    raise ConfigError(f"model {name} cannot take this data's images {probe.shape[1:]}: "
                      f"{type(err).__name__}: {err}") from None
  stated = model.meta.get("num_classes")
  if stated is not None and stated != num_classes:
    raise ConfigError(f"model {name} says it has {stated} classes but returns {num_classes}")
  if len(labels) and labels.max() >= num_classes:
    raise ConfigError(f"model {name} has {num_classes} classes but its data has labels up "
                      f"to {labels.max()}")
  for cell in cells:
    if cell.model == name and cell.target_class is not None and (
        cell.target_class >= num_classes):
      raise ConfigError(f"attacks.{cell.attack}.target_class {cell.target_class} is no class "
                        f"of model {name} ({num_classes} classes)")
  return num_classes


@functools.cache
def _forward_rate(model: zoo.Model, shape: tuple[int, ...]) -> float:
  """Forward images/s at batch 256, measured once per model and process."""
  return timing.forward_rate(model.apply_fn, model.params, (256, *shape), min_seconds=0.3)


def estimate_seconds(units: list[Unit], models: dict[str, ModelData]) -> float:
  """An upper bound on the sweep's time: each attack's model work per image in forward-pass
  equivalents (`AttackSpec.forward_equivalents`) at each model's measured forward rate,
  times the EOT draws, plus the transfer attack on a defended model's twin."""
  total = 0.0
  for unit in units:
    cell, data = unit.cell, models[unit.cell.model]
    shape = data.images_u8.shape[1:]
    spec = attacks.REGISTRY[cell.attack]
    per_image = spec.forward_equivalents(cell.config, int(np.prod(shape)), data.num_classes)
    work = per_image * cell.eot_samples
    if masking.runs_transfer(spec, cell, data.model):
      work += per_image  # the transfer attack, on the twin (cheaper: no transform)
    total += work * len(unit.positions) / _forward_rate(data.model, shape)
  return total


def format_duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.0f} s"
  if seconds < 7200:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


@dataclasses.dataclass
class SweepOutcome:
  out_dir: Path
  units_total: int
  units_mine: int
  units_skipped: int  # found done and verified
  units_run: int  # run by this process
  units_done: int  # of the whole sweep, in the folder at the end
  available: dict[str, dict[str, int]]


def run(config: RunConfig, out_dir: str | os.PathLike, *, shard: tuple[int, int] = (0, 1),
        resume: bool = True, data_dir: str | None = None, progress: bool = True,
        estimate: bool = True, stop_after_units: int | None = None,
        stale_after_s: float = claims_lib.DEFAULT_STALE_AFTER_S,
        checkpoint_dir: str | None = None, only: Collection[str] | None = None,
        models: dict[str, ModelData] | None = None, log=print) -> SweepOutcome:
  """Runs this process's share of the sweep, skipping units already written.

  A unit counts as done only when its part is readable, belongs to this run (run id, seed,
  configuration) and holds the unit's images; a missing, unreadable or short part is run
  again, and a part of another run is refused by name. Processes that share a folder (two
  launches, job-array shards) claim each unit before running it (`bench.driver.claims`), so no unit
  runs twice at once, and a claim left by a killed process is taken over.

  Args:
    config: the resolved run config.
    out_dir: the run folder (created; refused if it holds another config's run).
    shard: (K, N): run every N-th unit starting at K. Combined with the jax.distributed
      process index when several processes run.
    resume: skip units whose results exist; False refuses a folder that has any.
    data_dir: local data folder (default $ADVSWEEP_DATA_DIR).
    progress: show a progress bar.
    estimate: measure each model's forward rate and print an upper-bound time estimate.
    stop_after_units: stop after running this many units (to test resumption).
    stale_after_s: a claim not refreshed for this long is taken over.
    checkpoint_dir: where the zoo models' checkpoints are (default: the shipped ones).
    only: run only the units of these part file names (`Unit.filename`): a distributed
      engine's task (`bench.driver.ray_sweep`).
    models: the config's models as `load_models` gives them, loaded already.
    log: where messages go.
  """
  out_dir = Path(out_dir)
  k, n = shard
  process, processes = jax.process_index(), jax.process_count()
  k, n = k * processes + process, n * processes
  run_id = open_folder(out_dir, config)
  if models is None:
    models = load_models(config, data_dir, checkpoint_dir)
  available = _log_selection(config, models, log)
  units = plan(config, {m: d.selection for m, d in models.items()})
  _check_fits_devices(config, units, n)
  _refuse_strangers(out_dir, units)
  mine = units[k::n]
  if only is not None:
    unknown = set(only) - {u.filename for u in units}
    if unknown:
      raise results.ResultsError(f"{sorted(unknown)[0]} is no unit of this run")
    mine = [u for u in mine if u.filename in only]
  todo = pending(mine, models, out_dir, run_id, config, log)
  if not resume and len(todo) < len(mine):
    raise results.ResultsError(f"{out_dir} already has {len(mine) - len(todo)} of this run's "
                               "units; drop --no-resume to continue it, or pass --out a new "
                               "folder")
  shard_text = f" (shard {k}/{n})" if n > 1 else ""
  log(f"{config.name}: {len(units)} units in the sweep, {len(mine)} here{shard_text}, "
      f"{len(mine) - len(todo)} already done, {len(todo)} to run on "
      f"{len(jax.local_devices())} {jax.local_devices()[0].device_kind} device(s)")
  if estimate and todo:
    seconds = estimate_seconds(todo, models)
    log(f"{config.name}: estimated at most {format_duration(seconds)} of model work (each "
        "attack's full loop at the measured forward rate; early stops make it shorter)")
  if todo:
    write_run_meta(out_dir, config, run_id, checkpoint_dir, len(units))
  ran, elsewhere = _run_units(config, run_id, todo, models, out_dir,
                              claims_lib.Claims(out_dir / "claims",
                                                stale_after_s=stale_after_s, log=log),
                              progress, stop_after_units, data_dir)
  if todo:
    log(f"{config.name}: ran {ran} unit{'' if ran == 1 else 's'} here" + (
        f"; {elsewhere} were claimed by other processes sharing {out_dir}" if elsewhere
        else ""))
  done = len({p.name for p in _part_paths(out_dir)} & {u.filename for u in units})
  return SweepOutcome(out_dir, len(units), len(mine), len(mine) - len(todo), ran, done,
                      available)


def pending(units: list[Unit], models: dict[str, ModelData], out_dir: Path, run_id: str,
            config: RunConfig, log=print) -> list[Unit]:
  """The units whose part is missing, unreadable or short (`unit_problem`; saying why where
  a part is there), in order."""
  todo = []
  for unit in units:
    path = out_dir / "parts" / unit.filename
    problem = unit_problem(path, unit, models[unit.cell.model], run_id, config.seed,
                           config.save_images)
    if problem is not None:
      if problem != "missing":
        log(f"{path}: {problem}; running the unit again")
      todo.append(unit)
  return todo


def _log_selection(config: RunConfig, models: dict[str, ModelData], log
                   ) -> dict[str, dict[str, int]]:
  available = {}
  for name, data in models.items():
    counts = dict(zip(config.bin_names, data.selection.available.tolist(), strict=True))
    drawn = np.bincount(data.selection.bins, minlength=len(config.bin_names)).tolist()
    available[name] = counts
    log(f"{name}: images per bin (drawn / available): " + ", ".join(
        f"{b} {d}/{a}" for b, d, a in zip(config.bin_names, drawn, counts.values(),
                                           strict=True))
        + f"; {int((~data.selection.clean_correct).sum())} misclassified (kept, excluded "
        "from success rates)")
    if data.model.pixel_evaluator is None:
      log(f"{name}: its defense transforms the whole image: attacks that evaluate pixels "
          "locally run the full forward pass instead (the rows say evaluation = full)")
  return available


def _check_fits_devices(config: RunConfig, units: list[Unit], parts: int) -> None:
  """Refuses a batch that cannot be split over the local devices, and more shards (times
  processes) than the sweep has units."""
  devices = len(jax.local_devices())
  if config.batch_size < devices:
    raise ConfigError(f"batch_size {config.batch_size} cannot be split over {devices} "
                      f"devices; set batch_size to at least {devices} (a multiple of "
                      f"{devices} wastes nothing)")
  if parts > len(units):
    raise ConfigError(f"the sweep has {len(units)} units, fewer than its {parts} parts "
                      "(--shard N x processes): some would get nothing; use fewer shards or a "
                      "smaller batch_size")


def _refuse_strangers(out_dir: Path, units: list[Unit]) -> None:
  """Refuses parts that are no unit of this run: the report would mix them in."""
  names = {u.filename for u in units}
  strangers = [p for p in _part_paths(out_dir) if p.name not in names]
  if strangers:
    raise results.ResultsError(
        f"{strangers[0]} (and {len(strangers) - 1} more) is no unit of this run: the folder "
        "mixes runs; move those files out, or pass --out a new folder")


def _run_units(config: RunConfig, run_id: str, todo: list[Unit],
               models: dict[str, ModelData], out_dir: Path, claims: claims_lib.Claims,
               progress: bool, stop_after_units: int | None, data_dir: str | None = None
               ) -> tuple[int, int]:
  """Claims, runs and writes each unit; returns (units run, units claimed elsewhere)."""
  parts = out_dir / "parts"
  runner = Runner(config, run_id, data_dir)
  axes = results.axis_schema([cell.params for cell in config.cells()])
  bar = tqdm(total=sum(len(u.positions) for u in todo), unit="img", desc=config.name,
             disable=not progress, file=sys.stderr, dynamic_ncols=True)
  successes = attempts = ran = elsewhere = 0
  try:
    for unit in todo:
      interrupts.check()
      if stop_after_units is not None and ran >= stop_after_units:
        break
      if not claims.take(unit.filename):
        elsewhere += 1
        bar.update(len(unit.positions))
        continue
      with claims.holding(unit.filename):
        data = models[unit.cell.model]
        if unit_problem(parts / unit.filename, unit, data, run_id, config.seed,
                        config.save_images) is None:
          bar.update(len(unit.positions))  # another process finished it meanwhile
          continue
        bar.set_description(f"{config.name} {unit.cell.model} {unit.cell.attack}")
        rows, adv_images = runner.run_unit(unit, data)
        if config.save_images:  # before the part: a written part implies its images
          perturbations.write_images(
              perturbations.images_path(out_dir, unit.filename),
              example_idx=rows["example_idx"], adv_images=adv_images,
              config_hash=unit.cell.config_hash, model=unit.cell.model)
        results.write_part(parts / unit.filename, rows, axes)
      ran += 1
      keep = np.asarray(rows["clean_correct"])
      successes += int(np.asarray(rows["success"])[keep].sum())
      attempts += int(keep.sum())
      bar.update(len(unit.positions))
      bar.set_postfix(success=f"{successes / max(attempts, 1):.1%}", units=f"{ran}/{len(todo)}")
  finally:
    bar.close()
  return ran, elsewhere
