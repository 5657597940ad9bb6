"""Run configs: TOML files in `bench/configs/` and the papers' folders, `--set` overrides, and
their sweep expansion.

A config declares the models, the images (how many per confidence bin, drawn with the run's
seed), the bins, and the attacks with their parameters. A list value sweeps that parameter;
the sweep is the product of all lists, except the groups named in `zip`, whose lists advance
together. One file serves the full run and the `--quick` run: its `[quick]` table holds
overrides in `--set` syntax. TOML, not Python: a config is data, and loading one runs no code.

    name = "main"
    models = ["mnist_lenet"]
    [images]
    per_bin = 100
    [bins]
    thresholds = [0.99, 0.90]          # high >= 0.99 > medium >= 0.90 > low
    [attacks.bim]
    eps = [0.1, 0.2]
    target = ["least_likely", "untargeted"]
    [quick]
    "images.per_bin" = 10
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from advsweep import attacks
from advsweep.models import custom, datasets, zoo
from advsweep.models import defenses as defenses_lib

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = "main"

# The top-level fields of a config, each with its default (None: required).
TOP_LEVEL = {
    "name": None,
    "description": "",
    "models": None,
    "dataset": "",  # optional: every zoo model must be trained on it; a user model without
    # a dataset of its own takes it (a zoo name, a data folder or .npz, a TFDS name)
    "split": "test",
    "seed": 0,
    "batch_size": 100,  # images per attack call, and per results file
    "images": {},
    "bins": {},
    "attacks": None,
    "defenses": ["none"],  # input transformations each model is also run behind (jpeg:75 ...)
    "save_images": False,  # also write each unit's adversarial images (bench.driver.perturbations)
    "quick": {},
}
IMAGES = {"per_bin": 100, "pool": 0}  # pool: draw from the first `pool` images (0: all)
# Possas's slides: high >= 30%, medium 15-30%, low < 15% top-1 softmax probability.
# Without a [bins] table, one bin of all images: the Possas slides' confidence bins (high >
# 0.30 > medium > 0.15 > low) put nearly every image of a well-trained 10-class model in one
# bin, so only the configs that reproduce the slides set them.
BINS = {"names": ["all"], "thresholds": []}
# Attack-table keys that are not config fields: `target_class`; the adaptive attacks on a
# defended model (`models.defenses`): `bpda` (the identity's gradient through a transform
# that rounds) and `eot_samples` (the gradient, or fitness, averaged over n draws of a
# randomized defense); `evade_detector` (the gradient attacks keep the neighbour-difference
# score under the detector's threshold at 5% false positives, `bench.checks.detection`);
# `dataset` (the values apply only to models of that dataset: a budget per dataset, zipped
# with eps, e.g. 0.3 on MNIST and 8/255 on CIFAR-10 in one table).
# An attack table's `models`: the attack runs only on these of the config's models (an attack
# whose cost is per model, as AdvGAN's generator training, on a few of them).
ATTACK_MODELS = "models"
DRIVER_KEYS = ("zip", "target_class", "bpda", "eot_samples", "evade_detector", "dataset")
# The driver keys whose effect depends on the defense, and what they are on other models.
ADAPTIVE_KEYS = {"bpda": False, "eot_samples": 1}
NO_DEFENSE = "none"
_NAME = re.compile(r"[A-Za-z0-9._-]+")


class ConfigError(ValueError):
  """A config or override names something that does not exist, or has a bad value."""


def short_hash(text: str) -> str:
  """The first 16 hex digits of the text's SHA-256."""
  return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Cell:
  """One attack configuration on one model: a cell of the sweep.

  Attributes:
    model: zoo model name.
    attack: attack name (`attacks.REGISTRY`).
    config: the attack's config dataclass.
    params: the parameters the config file set for this cell (swept or fixed).
    target_class: explicit target class for every image (images of that class are
      skipped), or None.
  """

  model: str
  attack: str
  config: Any
  params: dict[str, Any]
  target_class: int | None = None
  bpda: bool = False  # gradients through a defense's transform as the identity's
  eot_samples: int = 1  # draws of a randomized defense each gradient (or fitness) averages

  @property
  def adaptive(self) -> bool:
    """The attack adapts to the model's defense (BPDA or EOT)."""
    return is_adaptive(self.params)

  @property
  def config_json(self) -> str:
    fields = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)
              if not f.metadata.get(attacks.SAME_RESULTS)
              and not (f.metadata.get(attacks.OMIT_AT_DEFAULT)
                       and getattr(self.config, f.name) == f.default)}
    fields = {k: (float(v) if hasattr(v, "dtype") else v) for k, v in fields.items()}
    # Only when set, so cells made before these keys keep their hash.
    if self.bpda:
      fields["bpda"] = True
    if self.eot_samples > 1:
      fields["eot_samples"] = self.eot_samples
    if self.params.get("evade_detector"):
      fields["evade_detector"] = True
    return json.dumps({"attack": self.attack, "target_class": self.target_class, **fields},
                      sort_keys=True)

  @property
  def config_hash(self) -> str:
    return short_hash(self.config_json)

  @property
  def params_json(self) -> str:
    return json.dumps(self.params, sort_keys=True)

  @property
  def draw_hash(self) -> str:
    """What seeds the cell's random draws: the attack, the target class and the parameters
    the config file set, not the defaults, so a config field added later (with a default
    that keeps earlier results) keeps earlier draws too; an adaptive attack (BPDA, EOT, the
    detector's penalty) draws as its plain twin does, so the two differ only in adapting.
    `config_hash` is the identity."""
    params = {k: v for k, v in self.params.items()
              if k not in (*ADAPTIVE_KEYS, "evade_detector")}
    return short_hash(json.dumps({"attack": self.attack, "target_class": self.target_class,
                                  "params": params}, sort_keys=True))


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A resolved config: defaults filled in, overrides applied, every name checked."""

  raw: dict[str, Any]

  @property
  def name(self) -> str:
    return self.raw["name"]

  @property
  def models(self) -> list[str]:
    """Every model, and every model behind every defense (`MODEL+jpeg:75`)."""
    return [m if d == NO_DEFENSE else f"{m}+{d}" for m in self.raw["models"]
            for d in self.raw["defenses"]]

  @property
  def seed(self) -> int:
    return int(self.raw["seed"])

  @property
  def split(self) -> str:
    return self.raw["split"]

  @property
  def save_images(self) -> bool:
    return bool(self.raw["save_images"])

  @property
  def batch_size(self) -> int:
    return int(self.raw["batch_size"])

  @property
  def per_bin(self) -> int:
    return int(self.raw["images"]["per_bin"])

  @property
  def pool(self) -> int:
    return int(self.raw["images"]["pool"])

  @property
  def bin_names(self) -> list[str]:
    return list(self.raw["bins"]["names"])

  @property
  def thresholds(self) -> list[float]:
    return [float(t) for t in self.raw["bins"]["thresholds"]]

  def to_json(self) -> str:
    # What is saved beside the rows (save_images) does not change them.
    body = {k: v for k, v in self.raw.items() if k not in ("quick", "save_images")}
    if body.get("defenses") == [NO_DEFENSE]:  # the default: runs made before it keep
      del body["defenses"]                    # their hash
    return json.dumps(body, sort_keys=True)

  @property
  def config_hash(self) -> str:
    """Everything that decides the rows; a run folder belongs to one hash."""
    return short_hash(self.to_json())

  def cells(self) -> list[Cell]:
    """The sweep: every model x attack x parameter combination, in config order."""
    out, seen = [], {}
    for model in self.models:
      defense = _defense_of(model)
      for attack, table in self.raw["attacks"].items():
        table = dict(table)
        only = table.pop(ATTACK_MODELS, None)
        if only is not None and model not in only and _base_of(model) not in only:
          continue
        for params in expand(table, f"attacks.{attack}"):
          _check_driver_keys(params, f"attacks.{attack}")
          if "dataset" in params and params["dataset"] != self._dataset_of(model, attack):
            continue
          params, normalised = _effective(params, defense)
          fields = {k: v for k, v in params.items() if k not in DRIVER_KEYS}
          config = attack_config(attack, fields)
          if params.get("evade_detector") and not hasattr(config, "detector_threshold"):
            raise ConfigError(f"attacks.{attack}.evade_detector: only the gradient-sign "
                              "attacks (fgsm, bim, pgd) take the detector's penalty")
          target_class = params.get("target_class")
          cell = Cell(model, attack, config, params,
                      None if target_class is None else int(target_class),
                      params.get("bpda", False), params.get("eot_samples", 1))
          key = (cell.model, cell.config_hash)
          if key in seen:
            if normalised or seen[key]:
              continue  # e.g. bpda=true on an undefended model: the plain attack, once
            raise ConfigError("the sweep lists the same attack configuration twice; remove "
                              "the duplicate values")
          seen[key] = normalised
          out.append(cell)
    return out


  def _dataset_of(self, model: str, attack: str) -> str:
    """The dataset a model classifies, for the attack tables' `dataset` key."""
    base, _ = custom.split_defense(model)
    if base in zoo.ZOO:
      return zoo.entry(base).dataset
    if self.raw["dataset"]:
      return self.raw["dataset"]
    raise ConfigError(f"attacks.{attack}.dataset: the dataset of model {base} is known only "
                      "once it loads; set the config's `dataset` to use the key")


def bin_names(thresholds: Any) -> list[str]:
  """Names for the bins of `thresholds` where a config gives none: all, high/low,
  high/medium/low, else bin0 (the most confident) to binN."""
  count = len(thresholds) + 1 if isinstance(thresholds, list) else 0
  return {1: ["all"], 2: ["high", "low"], 3: ["high", "medium", "low"]}.get(
      count, [f"bin{i}" for i in range(count)])


def is_adaptive(params: dict[str, Any]) -> bool:
  """A cell's parameters ask for an attack that adapts to a defense (BPDA or EOT)."""
  return any(params.get(k, default) != default for k, default in ADAPTIVE_KEYS.items())


def _base_of(model: str) -> str:
  return custom.split_defense(model)[0]


def _defense_of(model: str) -> defenses_lib.Defense | None:
  _, defense = custom.split_defense(model)
  return None if defense is None else defenses_lib.parse(defense)


def _check_driver_keys(params: dict[str, Any], where: str) -> None:
  for key in ("bpda", "evade_detector"):
    if not isinstance(params.get(key, False), bool):
      raise ConfigError(f"{where}.{key} takes true or false; got {params[key]!r}")
  samples = params.get("eot_samples", 1)
  if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
    raise ConfigError(f"{where}.eot_samples takes a whole number >= 1; got {samples!r}")
  if "dataset" in params and not isinstance(params["dataset"], str):
    raise ConfigError(f"{where}.dataset takes a dataset name, e.g. \"mnist\"; got "
                      f"{params['dataset']!r}")


def _effective(params: dict[str, Any], defense: defenses_lib.Defense | None
               ) -> tuple[dict[str, Any], bool]:
  """The parameters as they act on a model behind `defense`: BPDA only where the transform
  rounds, EOT only where it draws; elsewhere the key is dropped (the plain attack), and the
  flag says so."""
  applies = {"bpda": defense is not None and defense.shatters_gradients,
             "eot_samples": defense is not None and defense.randomized}
  dropped = {k for k, default in ADAPTIVE_KEYS.items()
             if k in params and (not applies[k] or params[k] == default)}
  if params.get("evade_detector") is False:
    dropped.add("evade_detector")  # the plain attack
  if not dropped:
    return params, False
  return {k: v for k, v in params.items() if k not in dropped}, True


def expand(table: dict[str, Any], where: str) -> list[dict[str, Any]]:
  """Expands one attack table into parameter dicts: product of lists, `zip` groups zipped."""
  table = dict(table)
  groups = table.pop("zip", [])
  if groups and isinstance(groups[0], str):
    groups = [groups]
  zipped = {k for group in groups for k in group}
  for key in zipped:
    if key not in table or not isinstance(table[key], list):
      raise ConfigError(f"{where}.zip names {key!r}, which must be a list in {where}")
  axes: list[list[dict[str, Any]]] = []
  for group in groups:
    lengths = {len(table[k]) for k in group}
    if len(lengths) != 1:
      raise ConfigError(f"{where}.zip: the lists {group} must have the same length; got "
                        + ", ".join(f"{k}: {len(table[k])}" for k in group))
    axes.append([dict(zip(group, values, strict=True))
                 for values in zip(*(table[k] for k in group), strict=True)])
  for key, value in table.items():
    if key in zipped:
      continue
    values = value if isinstance(value, list) else [value]
    if not values:
      raise ConfigError(f"{where}.{key} is an empty list")
    axes.append([{key: v} for v in values])
  combos = []
  for parts in itertools.product(*axes):
    combo: dict[str, Any] = {}
    for part in parts:
      combo.update(part)
    combos.append(combo)
  return combos


def config_path(name_or_path: str) -> Path:
  """A config by name (`main` is `bench/configs/main.toml`, `su2019` is in its paper's folder,
  `bench/papers/su2019/`) or by path."""
  path = Path(name_or_path)
  if path.suffix == ".toml" or path.exists():
    if not path.is_file():
      raise ConfigError(f"no config file {path}")
    return path
  path = _named_configs().get(name_or_path)
  if path is None:
    raise ConfigError(f"unknown config {name_or_path!r}; valid choices: "
                      f"{', '.join(available())}, or a path to a .toml file")
  return path


def _named_configs() -> dict[str, Path]:
  """The shipped configs by name: `bench/configs/` and the papers' folders."""
  from advsweep.bench import papers

  return {**{p.stem: p for p in CONFIG_DIR.glob("*.toml")}, **papers.config_files()}


def available() -> list[str]:
  return sorted(_named_configs())


def parse_value(raw: str) -> Any:
  """A TOML value (`0.1`, `[0.1, 0.2]`, `"x"`, `true`); anything else is a bare string."""
  try:
    return tomllib.loads(f"v = {raw}")["v"]
  except tomllib.TOMLDecodeError:
    return raw


def apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
  """Sets `a.b.c = value` in the nested dict, refusing keys the schema does not know."""
  parts = dotted.split(".")
  top = parts[0]
  if top not in TOP_LEVEL:
    raise ConfigError(f"unknown config key {top!r}; valid keys: {', '.join(TOP_LEVEL)}")
  if len(parts) == 1:
    raw[top] = value
    return
  if top in ("images", "bins") and len(parts) == 2:
    valid = IMAGES if top == "images" else BINS
    if parts[1] not in valid:
      raise ConfigError(f"unknown key {dotted!r}; valid keys: "
                        + ", ".join(f"{top}.{k}" for k in valid))
    raw.setdefault(top, {})[parts[1]] = value
    return
  if top == "attacks" and len(parts) in (2, 3):
    check_attack_name(parts[1])
    tables = raw.setdefault("attacks", {})
    if not isinstance(tables, dict) or not isinstance(tables.get(parts[1], {}), dict):
      raise ConfigError(f"cannot set {dotted}: attacks must be a table of [attacks.NAME] "
                        "tables")
    if len(parts) == 2:
      if not isinstance(value, dict):
        raise ConfigError(f"{dotted} must be a table of parameters, e.g. "
                          f"--set {dotted}.eps=0.1")
      tables[parts[1]] = value
    else:
      check_attack_field(parts[1], parts[2])
      tables.setdefault(parts[1], {})[parts[2]] = value
    return
  raise ConfigError(f"cannot set {dotted!r}: valid forms are KEY, images.KEY, bins.KEY, "
                    "attacks.ATTACK and attacks.ATTACK.FIELD")


def check_attack_name(name: str) -> None:
  if name not in attacks.REGISTRY:
    raise ConfigError(f"unknown attack {name!r}; valid choices: {', '.join(attacks.REGISTRY)}")


def check_attack_field(attack: str, field: str) -> None:
  spec = attacks.REGISTRY[attack]
  if field == spec.trained_field:
    raise ConfigError(f"attacks.{attack}.{field} is trained against each model by the driver "
                      "(advsweep gan advgan MODEL trains one ahead); leave it out")
  fields = [f.name for f in dataclasses.fields(spec.config_cls) if f.name != spec.trained_field]
  if field not in fields and field not in DRIVER_KEYS and field != ATTACK_MODELS:
    raise ConfigError(f"unknown field {field!r} for attack {attack}; valid fields: "
                      f"{', '.join(fields + list(DRIVER_KEYS))}")


def _type_name(hint: Any) -> str:
  names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
           type(None): "nothing"}
  options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
  return " or ".join(names.get(o, getattr(o, "__name__", str(o))) for o in options)


def _typed(value: Any, hint: Any, where: str) -> Any:
  """`value` as the field type `hint` asks for (an int is a float too), or ConfigError."""
  options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
  for option in options:
    if option is bool and isinstance(value, bool):
      return value
    if option is int and isinstance(value, int) and not isinstance(value, bool):
      return value
    if option is float and isinstance(value, int | float) and not isinstance(value, bool):
      return float(value)
    if option is str and isinstance(value, str):
      return value
    if option is type(None) and value is None:
      return value
  raise ConfigError(f"{where} takes {_type_name(hint)}; got {value!r} (values are TOML: "
                    "true, false, 0.1, 3, \"least_likely\")")


def attack_config(attack: str, fields: dict[str, Any], where: str = "attacks") -> Any:
  """The attack's config (the paper's) with `fields` set: every field known, every value of
  its field's type, and the attack's own checks passed (`AttackSpec.check_config`).

  Raises:
    ConfigError: naming the attack, the field and what it takes.
  """
  check_attack_name(attack)
  spec = attacks.REGISTRY[attack]
  hints = typing.get_type_hints(spec.config_cls)
  name = f"{where}.{attack}" if where else attack
  typed = {}
  for field, value in fields.items():
    check_attack_field(attack, field)
    typed[field] = _typed(value, hints[field], f"{name}.{field}")
  try:
    return spec.config(**typed)
  except (TypeError, ValueError) as err:
    raise ConfigError(f"{name}: {err}") from None


def load(name_or_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None,
         quick: bool = False) -> RunConfig:
  """Reads a config, applies its `[quick]` table (if `quick`) and `--set` overrides, checks it.

  Raises:
    ConfigError: an unknown key, model, attack, dataset or bin setting, with the valid choices.
  """
  path = config_path(name_or_path)
  try:
    raw = tomllib.loads(path.read_text())
  except tomllib.TOMLDecodeError as err:
    raise ConfigError(f"{path} is not valid TOML: {err}") from None
  return resolve(raw, overrides, quick, source=str(path))


def resolve(raw: dict[str, Any], overrides: list[str] | None = None, quick: bool = False,
            source: str = "config") -> RunConfig:
  """Fills defaults into a parsed config, applies overrides and checks every name."""
  raw = copy.deepcopy(raw)
  for key in raw:
    if key not in TOP_LEVEL:
      raise ConfigError(f"{source}: unknown key {key!r}; valid keys: {', '.join(TOP_LEVEL)}")
  for key in ("images", "bins", "quick"):
    if not isinstance(raw.get(key, {}), dict):
      raise ConfigError(f"{source}: {key} must be a table ([{key}]); got {raw[key]!r}")
  assignments: list[tuple[str, Any]] = []
  if quick:
    assignments += list(raw.get("quick", {}).items())
  for item in overrides or []:
    key, sep, value = item.partition("=")
    if not sep:
      raise ConfigError(f"--set expects KEY=VALUE; got {item!r}")
    assignments.append((key.strip(), parse_value(value.strip())))
  for key, value in assignments:
    apply_override(raw, key, value)
  if quick and raw.get("name"):
    raw["name"] = f"{raw['name']}-quick"
  for key, default in TOP_LEVEL.items():
    if key not in raw:
      if default is None:
        raise ConfigError(f"{source}: missing required key {key!r}")
      raw[key] = copy.deepcopy(default)
  for key in ("images", "bins"):
    if not isinstance(raw[key], dict):
      raise ConfigError(f"{source}: {key} must be a table ([{key}]); got {raw[key]!r}")
  for key in raw["images"]:
    if key not in IMAGES:
      raise ConfigError(f"{source}: unknown key images.{key}; valid: {', '.join(IMAGES)}")
  for key in raw["bins"]:
    if key not in BINS:
      raise ConfigError(f"{source}: unknown key bins.{key}; valid: {', '.join(BINS)}")
  raw["images"] = {**IMAGES, **raw["images"]}
  if "thresholds" in raw["bins"] and "names" not in raw["bins"]:
    raw["bins"] = {**raw["bins"], "names": bin_names(raw["bins"]["thresholds"])}
  raw["bins"] = {**BINS, **raw["bins"]}
  _check(raw, source)
  config = RunConfig(raw)
  config.cells()  # builds every attack config: bad fields fail here, not mid-run
  return config


def _integer(value: Any, where: str, low: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    raise ConfigError(f"{where} must be an integer >= {low}; got {value!r}")


def _strings(value: Any, where: str, example: str) -> None:
  if (not isinstance(value, list) or not value
      or not all(isinstance(v, str) and v for v in value)):
    raise ConfigError(f"{where} must be a non-empty list of names, e.g. {where} = "
                      f"{example}; got {value!r}")


def _check(raw: dict[str, Any], source: str) -> None:
  """Every top-level value's type and range, before any data loads or file is written."""
  if not isinstance(raw["name"], str) or not _NAME.fullmatch(raw["name"]):
    raise ConfigError(f"{source}: name must be letters, digits, '.', '_' or '-' (it names "
                      f"the run folder); got {raw['name']!r}")
  for key in ("description", "dataset", "split"):
    if not isinstance(raw[key], str):
      raise ConfigError(f"{key} must be a string; got {raw[key]!r}")
  if not isinstance(raw["save_images"], bool):
    raise ConfigError(f"{source}: save_images takes true or false; got {raw['save_images']!r}")
  _strings(raw["models"], "models", '["mnist_lenet"]')
  _strings(raw["defenses"], "defenses", '["none", "jpeg:75"]')
  canonical = []
  for defense in raw["defenses"]:
    if defense != NO_DEFENSE:
      try:
        defense = defenses_lib.parse(defense).name  # "randomize" is "randomize:90"
      except ValueError as err:
        raise ConfigError(f"defenses: {err}") from None
    canonical.append(defense)
  if len(set(canonical)) != len(canonical):
    raise ConfigError(f"defenses lists one defense twice: {raw['defenses']}")
  raw["defenses"] = canonical
  if raw["defenses"] != [NO_DEFENSE] and any("+" in m for m in raw["models"]):
    raise ConfigError("models already behind a defense (MODEL+DEFENSE) cannot take the "
                      "defenses axis too; list the plain models, or drop `defenses`")
  for model in raw["models"]:
    try:
      custom.check_reference(model)
    except custom.ModelReferenceError as err:
      raise ConfigError(str(err)) from None
  if raw["dataset"]:
    dataset = raw["dataset"]
    if dataset not in datasets.DATASETS and ("/" in dataset or dataset.endswith(".npz")) and (
        not Path(dataset).expanduser().exists()):
      raise ConfigError(f"dataset {dataset!r}: no such file or folder; name one of "
                        f"{', '.join(datasets.DATASETS)}, a data folder or a TFDS dataset")
    for model in (m for m in raw["models"] if m in zoo.ZOO):
      if zoo.entry(model).dataset != raw["dataset"]:
        raise ConfigError(f"model {model} is trained on {zoo.entry(model).dataset}, not on "
                          f"the config's dataset {raw['dataset']}")
  if raw["split"] not in datasets.SPLITS:
    raise ConfigError(f"split must be one of {', '.join(datasets.SPLITS)}; got "
                      f"{raw['split']!r}")
  _integer(raw["seed"], "seed", 0)
  _integer(raw["batch_size"], "batch_size", 1)
  _integer(raw["images"]["per_bin"], "images.per_bin", 1)
  _integer(raw["images"]["pool"], "images.pool", 0)
  _check_bins(raw["bins"]["names"], raw["bins"]["thresholds"])
  _check_attacks(raw["attacks"], raw["models"], source, raw["dataset"])


def _check_bins(names: Any, thresholds: Any) -> None:
  _strings(names, "bins.names", '["high", "medium", "low"]')
  if not isinstance(thresholds, list) or not all(
      isinstance(t, int | float) and not isinstance(t, bool) for t in thresholds):
    raise ConfigError(f"bins.thresholds must be a list of probabilities, e.g. [0.30, 0.15]; "
                      f"got {thresholds!r}")
  if len(names) != len(thresholds) + 1 or len(set(names)) != len(names):
    raise ConfigError(f"bins: {len(thresholds)} thresholds need {len(thresholds) + 1} "
                      f"distinct names; got {names}")
  if any(not 0 <= t <= 1 for t in thresholds) or sorted(thresholds, reverse=True) != list(
      thresholds) or len(set(thresholds)) != len(thresholds):
    raise ConfigError(f"bins.thresholds must be strictly decreasing probabilities in [0, 1] "
                      f"(high first); got {thresholds}")


def _check_attacks(tables: Any, models: list[str], source: str, dataset: str = "") -> None:
  if not isinstance(tables, dict) or not tables:
    raise ConfigError(f"{source}: attacks must be a table of [attacks.NAME] tables; valid "
                      f"names: {', '.join(attacks.REGISTRY)}")
  # Classes are known here for zoo models; a user's model is checked when it loads.
  classes = min((datasets.info(zoo.entry(m).dataset).num_classes for m in models
                 if m in zoo.ZOO), default=None)
  for attack, table in tables.items():
    check_attack_name(attack)
    if not isinstance(table, dict):
      raise ConfigError(f"attacks.{attack} must be a table of fields, e.g. [attacks.{attack}] "
                        f"with one field per line; got {table!r}")
    for field in table:
      check_attack_field(attack, field)
    only = table.get(ATTACK_MODELS)
    if only is not None and (not isinstance(only, list)
                             or not all(isinstance(m, str) for m in only)):
      raise ConfigError(f"attacks.{attack}.models must list model names, e.g. models = "
                        f"[\"mnist_lenet\"]; got {only!r}")
    for name in only or []:
      if name not in models:
        raise ConfigError(f"attacks.{attack}.models names {name!r}, which is not among the "
                          f"config's models ({', '.join(models)}); add it there or remove it")
    wanted = table.get("dataset", [])
    for name in wanted if isinstance(wanted, list) else [wanted]:
      if name not in datasets.DATASETS and name != dataset:
        valid = sorted((set(datasets.DATASETS) | {dataset}) - {""})
        raise ConfigError(f"attacks.{attack}.dataset: unknown dataset {name!r}; valid "
                          f"choices: {', '.join(valid)}")
    groups = table.get("zip", [])
    if not isinstance(groups, list) or not all(
        isinstance(g, str) or (isinstance(g, list) and all(isinstance(k, str) for k in g))
        for g in groups):
      raise ConfigError(f"attacks.{attack}.zip must list field names, e.g. zip = [\"eps\", "
                        f"\"num_steps\"]; got {groups!r}")
    targets = table.get("target_class")
    if targets is not None:
      target_modes = table.get("target", [])
      target_modes = target_modes if isinstance(target_modes, list) else [target_modes]
      if target_modes != [attacks.EXPLICIT]:
        raise ConfigError(f"attacks.{attack}.target_class needs target = \"explicit\"")
      for value in targets if isinstance(targets, list) else [targets]:
        if (not isinstance(value, int) or isinstance(value, bool) or value < 0
            or (classes is not None and value >= classes)):
          raise ConfigError(f"attacks.{attack}.target_class must be a class index in "
                            f"[0, {classes or 'K'}); got {value!r}")
