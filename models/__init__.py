"""advsweep models: datasets, the Flax model zoo, training.

`advsweep.models.load(name)` returns a zoo model with `.apply_fn`, `.params` and `.meta`.
"""

# First: importing it sets XLA's flags before anything here can start JAX's backend.
from advsweep.attacks import xla_cpu  # noqa: F401

# isort: split
from advsweep.models import datasets
from advsweep.models.zoo import ZOO, Model, available, load

__all__ = ["ZOO", "Model", "available", "datasets", "load"]
