"""advsweep attacks: pure, jitted functions with one signature.

    attack(apply_fn, params, images, labels, key, config=None, *, targets=None) -> AttackResult

`config=None` is the paper's setting. `REGISTRY` maps names to (function, config class).
"""

from attacks.common import (
    EXPLICIT,
    LEAST_LIKELY,
    RANDOM,
    TARGET_MODES,
    UNTARGETED,
    AttackResult,
    every_other_class,
)
from attacks.gradient import BIMConfig, FGSMConfig, PGDConfig, bim, fgsm, pgd
from attacks.jsma import JSMAConfig, jsma
from attacks.one_pixel import AT_LEAST_ONE_TARGET, OnePixelConfig, one_pixel

REGISTRY = {
    "one_pixel": (one_pixel, OnePixelConfig),
    "fgsm": (fgsm, FGSMConfig),
    "bim": (bim, BIMConfig),
    "pgd": (pgd, PGDConfig),
    "jsma": (jsma, JSMAConfig),
}

__all__ = [
    "AT_LEAST_ONE_TARGET", "EXPLICIT", "LEAST_LIKELY", "RANDOM", "REGISTRY", "TARGET_MODES",
    "UNTARGETED",
    "AttackResult", "BIMConfig", "FGSMConfig", "JSMAConfig", "OnePixelConfig", "PGDConfig",
    "bim", "every_other_class", "fgsm", "jsma", "one_pixel", "pgd",
]
