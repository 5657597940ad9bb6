"""advsweep benchmark driver and the `advsweep` command line.

`run` and `read` run a sweep and read a run from Python (`bench.api`); `evaluate` is the
standard evaluation of a user's own model (`bench.evaluation.standard.evaluate`):
AutoAttack's protocol in JAX, per image, with its checks:

    from advsweep.bench import evaluate
    result = evaluate(apply_fn, params, images, labels, norm="linf", eps=8 / 255)
    print(result.headline())

It is imported on first use, so `import advsweep.bench` (the command line) stays light.
"""

from typing import Any


def __getattr__(name: str) -> Any:
  if name in ("run", "read"):
    from advsweep.bench import api

    return getattr(api, name)
  if name == "evaluate":
    from advsweep.bench.evaluation.standard import evaluate

    return evaluate
  raise AttributeError(f"module 'advsweep.bench' has no attribute {name!r}")


__all__ = ["evaluate", "read", "run"]
