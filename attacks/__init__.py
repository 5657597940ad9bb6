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

REGISTRY = {
    "fgsm": (fgsm, FGSMConfig),
    "bim": (bim, BIMConfig),
    "pgd": (pgd, PGDConfig),
    "jsma": (jsma, JSMAConfig),
}

__all__ = [
    "EXPLICIT", "LEAST_LIKELY", "RANDOM", "REGISTRY", "TARGET_MODES", "UNTARGETED",
    "AttackResult", "BIMConfig", "FGSMConfig", "JSMAConfig", "PGDConfig", "bim",
    "every_other_class", "fgsm", "jsma", "pgd",
]
