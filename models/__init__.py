"""advsweep models: datasets, the Flax model zoo, training.

`advsweep.models.load(name)` returns a zoo model with `.apply_fn`, `.params` and `.meta`.
"""

from advsweep.attacks import xla_cpu
from advsweep.models import datasets
from advsweep.models.zoo import ZOO, Model, available, load

xla_cpu.apply_defaults()  # training and inference get the attacks' XLA:CPU settings too

__all__ = ["ZOO", "Model", "available", "datasets", "load"]
