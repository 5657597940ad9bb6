"""advsweep attacks: pure, jitted functions with one signature.

    attack(apply_fn, params, images, labels, key, config=None, *, targets=None) -> AttackResult

`config=None` is the paper's setting. `REGISTRY` maps names to (function, config class).
"""

from attacks.common import (
    EXPLICIT,
    LEAST_LIKELY,
    RANDOM,
    SAME_RESULTS,
    TARGET_MODES,
    UNTARGETED,
    AttackResult,
    every_other_class,
)
from attacks.gradient import (
    BIMConfig,
    FGSMConfig,
    PGDConfig,
    bim,
    fgsm,
    pgd,
    prepare_bim,
    prepare_fgsm,
    prepare_pgd,
)
from attacks.jsma import JSMAConfig, jsma, prepare_jsma
from attacks.one_pixel import AT_LEAST_ONE_TARGET, OnePixelConfig, one_pixel, prepare_one_pixel

REGISTRY = {
    "one_pixel": (one_pixel, OnePixelConfig),
    "fgsm": (fgsm, FGSMConfig),
    "bim": (bim, BIMConfig),
    "pgd": (pgd, PGDConfig),
    "jsma": (jsma, JSMAConfig),
}

# Each attack's checked, not yet run, call of its jitted core (see common.PreparedCall).
PREPARE = {
    "one_pixel": prepare_one_pixel,
    "fgsm": prepare_fgsm,
    "bim": prepare_bim,
    "pgd": prepare_pgd,
    "jsma": prepare_jsma,
}

__all__ = [
    "AT_LEAST_ONE_TARGET", "EXPLICIT", "LEAST_LIKELY", "PREPARE", "RANDOM", "REGISTRY",
    "SAME_RESULTS",
    "TARGET_MODES", "UNTARGETED", "AttackResult", "BIMConfig", "FGSMConfig", "JSMAConfig",
    "OnePixelConfig", "PGDConfig", "bim", "every_other_class", "fgsm", "jsma", "one_pixel",
    "pgd", "prepare_bim", "prepare_fgsm", "prepare_jsma", "prepare_one_pixel", "prepare_pgd",
]
