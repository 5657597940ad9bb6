"""`advsweep init`: a working sweep config for a user's model, to edit rather than to write
from nothing: the model, its data, one bin of all images, and the attacks a robustness check
starts with (FGSM, PGD and APGD at the usual budget of the dataset the model names; the
one-pixel attack at a CPU-sized budget), checked by the config loader before it is written."""

from __future__ import annotations

from pathlib import Path

from advsweep.bench.driver import config
from advsweep.models import custom, files, zoo

# The usual L-inf budgets (the MNIST and CIFAR-10 challenges'; 0.1 for Fashion-MNIST), and a
# small one for data of the user's, whose scale we do not know.
EPS = {"mnist": 0.3, "fashion_mnist": 0.1, "cifar10": 8 / 255}
OTHER_EPS = 8 / 255

TEMPLATE = """# A sweep of {model}, written by `advsweep init`; run it with `advsweep run {path}`.
name = "{name}"
models = ["{model}"]
{dataset_line}seed = 0
batch_size = 50

[images]
per_bin = 100       # images drawn (correctly classified or not; rates count the correct ones)

[attacks.fgsm]
eps = [{half}, {eps}]

[attacks.pgd]       # 20 steps of eps/8 from a random start
eps = [{half}, {eps}]
step_size = [{half_step}, {step}]
zip = ["eps", "step_size"]
num_steps = 20

[attacks.apgd]      # step size adapted per image (Croce and Hein 2020)
eps = {eps}

[attacks.one_pixel]
population_size = 100
num_generations = 20
"""


def render(model: str, path: Path, dataset: str | None = None) -> str:
  """The config text for `model` (and `dataset`, where given), checked by the loader.

  Raises:
    ConfigError, ModelReferenceError: the reference or the dataset is not one advsweep takes.
  """
  custom.check_reference(model)
  eps = EPS.get(dataset or _model_dataset(model) or "", OTHER_EPS)
  name = "".join(c if c.isalnum() or c in "._-" else "_" for c in model.split(":")[-1])
  text = TEMPLATE.format(
      model=model, path=path, name=name or "mine",
      dataset_line=f'dataset = "{dataset}"\n' if dataset else "",
      eps=round(eps, 6), half=round(eps / 2, 6), step=round(eps / 8, 6),
      half_step=round(eps / 16, 6))
  import tomllib

  config.resolve(tomllib.loads(text), source=str(path))
  return text


def _model_dataset(model: str) -> str | None:
  """The dataset the model says it classifies (a zoo entry's, or a user's `dataset=`)."""
  base, _ = custom.split_defense(model)
  if base in zoo.ZOO:
    return zoo.entry(base).dataset
  return custom.resolve(base).meta.get("dataset")


def write(model: str, path: Path, *, dataset: str | None = None, force: bool = False) -> Path:
  """Writes `render(model, path, dataset)` to `path` atomically; refuses to replace a file
  unless `force`."""
  if path.exists() and not force:
    raise FileExistsError(f"{path} exists; pass --force to replace it, or --out another file")
  files.atomic_write_text(path, render(model, path, dataset))
  return path


__all__ = ["render", "write"]
