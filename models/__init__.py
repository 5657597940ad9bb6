"""advsweep models: datasets, the Flax model zoo, training.

`advsweep.models.load(name)` returns a zoo model with `.apply_fn`, `.params` and `.meta`.
"""

from advsweep.models import datasets
from advsweep.models.zoo import ZOO, Model, available, load

__all__ = ["ZOO", "Model", "available", "datasets", "load"]
