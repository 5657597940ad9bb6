"""advsweep attacks: pure, traceable functions with one signature.

    attack(apply_fn, params, images, labels, key, config=None, *, targets=None,
           evaluator=None) -> AttackResult

`config=None` is the paper's setting. Each attack has a pure core with the same signature
(`pgd_core`, `bim_core`, `fgsm_core`, `jsma_core`, `one_pixel_core`, `apgd_core`,
`apgd_t_core`, `fab_core`, `square_core`, `advgan_core`) that runs under
`jax.jit`, `jax.vmap` and inside a jitted training step; the public functions call it when
their inputs are traced and a faster host-side schedule otherwise. `REGISTRY` maps each name
to its `AttackSpec`: everything the driver and the benchmarks need to know about it.
"""

# First, before any module below can start JAX's backend: importing it sets XLA's flags.
from advsweep.attacks import xla_cpu  # noqa: F401

# isort: split
from advsweep.attacks import spec
from advsweep.attacks.advgan import SPEC as ADVGAN
from advsweep.attacks.advgan import AdvGANConfig, advgan, advgan_core
from advsweep.attacks.autopgd import (
  APGD,
  APGD_T,
  APGDConfig,
  APGDTConfig,
  apgd,
  apgd_core,
  apgd_t,
  apgd_t_core,
)
from advsweep.attacks.common import (
  EXPLICIT,
  FULL_EVALUATION,
  LEAST_LIKELY,
  OMIT_AT_DEFAULT,
  PIXEL_LOCAL_EVALUATION,
  RANDOM,
  SAME_RESULTS,
  TARGET_MODES,
  UNTARGETED,
  AttackResult,
  PreparedCall,
  every_other_class,
)
from advsweep.attacks.fast_boundary import SPEC as FAB_T
from advsweep.attacks.fast_boundary import FABConfig, fab, fab_core
from advsweep.attacks.gradient import (
  BIM,
  FGSM,
  PGD,
  BIMConfig,
  FGSMConfig,
  PGDConfig,
  bim,
  bim_core,
  fgsm,
  fgsm_core,
  pgd,
  pgd_core,
)
from advsweep.attacks.pixel import SPEC as ONE_PIXEL
from advsweep.attacks.pixel import one_pixel
from advsweep.attacks.pixel.core import AT_LEAST_ONE_TARGET, OnePixelConfig, one_pixel_core
from advsweep.attacks.saliency import SPEC as JSMA
from advsweep.attacks.saliency import jsma
from advsweep.attacks.saliency.core import JSMAConfig, jsma_core
from advsweep.attacks.spec import AttackSpec
from advsweep.attacks.square_search import SPEC as SQUARE
from advsweep.attacks.square_search import SquareConfig, square, square_core

REGISTRY: dict[str, AttackSpec] = {}


def register(attack_spec: AttackSpec) -> AttackSpec:
  """Makes an attack known to the driver and the benchmarks under `attack_spec.name`."""
  return spec.register(REGISTRY, attack_spec)


# The registry: one line per attack, in the order the driver lists them.
register(ONE_PIXEL)
register(FGSM)
register(BIM)
register(PGD)
register(JSMA)
register(APGD)
register(APGD_T)
register(FAB_T)
register(SQUARE)
register(ADVGAN)

__all__ = [
    "ADVGAN", "AdvGANConfig", "advgan", "advgan_core",
    "APGD", "APGD_T", "APGDConfig", "APGDTConfig", "apgd", "apgd_core", "apgd_t", "apgd_t_core",
    "FAB_T", "FABConfig", "fab", "fab_core", "SQUARE", "SquareConfig", "square", "square_core",
    "AT_LEAST_ONE_TARGET", "BIM", "EXPLICIT", "FGSM", "FULL_EVALUATION", "JSMA", "LEAST_LIKELY",
    "OMIT_AT_DEFAULT", "ONE_PIXEL", "PGD", "PIXEL_LOCAL_EVALUATION", "RANDOM", "REGISTRY",
    "SAME_RESULTS",
    "TARGET_MODES", "UNTARGETED", "AttackResult", "AttackSpec", "BIMConfig", "FGSMConfig",
    "JSMAConfig", "OnePixelConfig", "PGDConfig", "PreparedCall", "bim", "bim_core",
    "every_other_class", "fgsm", "fgsm_core", "jsma", "jsma_core", "one_pixel",
    "one_pixel_core", "pgd", "pgd_core", "register", "spec",
]
