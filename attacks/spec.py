"""One place per attack: the facts the driver and the benchmarks read, kept with the attack.

Each attack module ends with its `AttackSpec`; `attacks/__init__.py` registers them, one line
each. `bench/` never branches on an attack's name: it asks the spec for the config class,
the budget check, the cost, the unit of model work and the smoke-run settings. Adding an
attack is a module and one `register` line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from advsweep.attacks import common

# Units of model work (`AttackSpec.unit`): what one query costs the model.
FORWARD = "fwd"  # a forward pass
FORWARD_BACKWARD = "fwd+bwd"  # a forward pass and the backward pass of a scalar loss
FORWARD_VJP = "fwd+vjp"  # a forward pass and one vector-Jacobian product
FORWARD_TWO_VJPS = "fwd+2vjp"  # a forward pass and two vector-Jacobian products
UNITS = (FORWARD, FORWARD_BACKWARD, FORWARD_VJP, FORWARD_TWO_VJPS)


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """Everything advsweep needs to know about one attack.

  Attributes:
    name: the registry name: a config's `[attacks.NAME]` table and the `attack` column.
    run: the public attack, `run(apply_fn, params, images, labels, key, config=None, *,
      targets=None, evaluator=None) -> AttackResult`.
    core: the pure core with the same signature: runs under `jax.jit`, `jax.vmap` and inside
      a jitted training step (`run` calls it when its inputs are traced).
    prepare: optional, the same signature returning a `common.PreparedCall`: the checked
      call, and `lower()` of its largest jitted piece (for compile time and memory).
    config_cls: the config dataclass; `config_cls()` is the paper's setting.
    check_config: raises ValueError naming a bad value of a config (ranges and choices), so a
      driver can refuse a sweep before any work starts.
    within_budget: `(config, result, num_features) -> [B] bool`, on a result whose fields are
      numpy arrays: the perturbation respects the budget (AutoAttack's validity check).
    forward_equivalents: `(config, num_features, num_classes) -> float`, an upper bound of
      the model work per image in forward passes (a backward pass counts two).
    unit: `config -> str`, the model work of one query (one of `UNITS`).
    unit_batch: `(config, num_images) -> int`, the batch the attack feeds the model.
    setup_queries: queries per image that are not units (the gradient attacks' clean
      forward pass).
    budget_field: the config field a success-against-budget plot puts on its x axis.
    quick: field values of a smoke-sized run (`advsweep perf --quick`).
    fixed_work: field values that give every image the same work (no early stop), for
      timing cost against size.
    sparse: the attack changes a few features, so a run's rows list them
      (`bench.driver.perturbations`: the one-pixel attack, JSMA).
    trained_field: the config field that holds weights trained against the model under
      attack (AdvGAN's generator), None for an attack without; the driver fills it for each
      model (`models.gan.generators.bind`) and records their sha256 in its rows.
  """

  name: str
  run: Callable[..., Any]
  core: Callable[..., Any]
  config_cls: type
  check_config: Callable[[Any], None]
  within_budget: Callable[[Any, Any, int], np.ndarray]
  forward_equivalents: Callable[[Any, int, int], float]
  unit: Callable[[Any], str]
  prepare: Callable[..., Any] | None = None
  unit_batch: Callable[[Any, int], int] = lambda config, num_images: num_images
  setup_queries: int = 0
  budget_field: str | None = None
  quick: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  fixed_work: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  sparse: bool = False
  trained_field: str | None = None

  def config(self, **fields: Any) -> Any:
    """The paper's config with `fields` replaced, checked (`check_config`)."""
    config = self.config_cls(**fields)
    self.check_config(config)
    return config

  def prepared(self, *args: Any, **kwargs: Any) -> Any:
    """`prepare(*args, **kwargs)`, or for an attack without one, its run with nothing to
    lower."""
    if self.prepare is not None:
      return self.prepare(*args, **kwargs)
    return common.PreparedCall(lambda: self.run(*args, **kwargs))

  def units(self, queries: np.ndarray) -> int:
    """Units of model work the attack reports for a batch (see `setup_queries`)."""
    queries = np.asarray(queries, np.int64)
    return int(np.sum(queries - self.setup_queries))


def register(registry: dict[str, AttackSpec], spec: AttackSpec) -> AttackSpec:
  """Adds `spec` under its name; refuses a name that is taken."""
  if spec.name in registry and registry[spec.name] is not spec:
    raise ValueError(f"an attack named {spec.name!r} is already registered; pick another name")
  fields = {f.name for f in dataclasses.fields(spec.config_cls)}
  if spec.trained_field is not None and spec.trained_field not in fields:
    raise ValueError(f"{spec.name}: trained_field {spec.trained_field!r} is not a field of "
                     f"{spec.config_cls.__name__}")
  if spec.budget_field is not None and spec.budget_field not in {
      f.name for f in dataclasses.fields(spec.config_cls)}:
    raise ValueError(f"{spec.name}: budget_field {spec.budget_field!r} is not a field of "
                     f"{spec.config_cls.__name__}")
  registry[spec.name] = spec
  return spec
