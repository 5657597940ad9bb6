"""advsweep models: datasets, the Flax model zoo, training.

`models.load(name)` returns a zoo model with `.apply_fn`, `.params` and `.meta`.
"""

from models import datasets
from models.zoo import ZOO, Model, available, load

__all__ = ["ZOO", "Model", "available", "datasets", "load"]
