"""AdvGAN (Xiao et al. 2018): a generator trained against the target model maps each image
to its perturbation; the attack is one forward pass of it (`core`), its networks are in
`networks`, its training step in `training`. The generator for a model is found or trained
and cached by `advsweep.models.gan.generators`."""

from advsweep.attacks import common, spec
from advsweep.attacks.advgan.core import (
  GENERATOR_FIELD,
  AdvGANConfig,
  advgan,
  advgan_core,
  check_config,
  prepare,
)


def _forward_equivalents(config: AdvGANConfig, num_features: int, num_classes: int) -> float:
  del num_features, num_classes
  return 2.0  # the generator's pass (smaller than most targets) and the re-check


SPEC = spec.AttackSpec(
    name="advgan", run=advgan, core=advgan_core, config_cls=AdvGANConfig, prepare=prepare,
    check_config=check_config, within_budget=common.within_eps,
    forward_equivalents=_forward_equivalents, unit=lambda config: spec.FORWARD,
    budget_field="eps", trained_field=GENERATOR_FIELD)

__all__ = ["SPEC", "AdvGANConfig", "advgan", "advgan_core"]
