"""Zoo weights handed over as a user hands advsweep a model, for `advsweep perf` and
`advsweep perf peers` (`--models advsweep.bench.perf.user_models:cifar10_allconv`).

A user's model reaches the attacks as a plain function and its params
(`models.custom.model`): no module advsweep knows, an `apply_fn` compared by identity, the
pixel-local evaluator derived from the function's own computation. These wrap the zoo's
trained weights that way (the function is flax's `module.apply`, as a user of flax would
pass it), so the benchmarks measure the user's path on a model with real accuracy, and the
figures can be set beside the same weights run as a zoo model.
"""

from __future__ import annotations

from advsweep.models import custom, zoo


def _as_user(name: str) -> zoo.Model:
  model = zoo.load(name)
  module = model.module

  def apply_fn(params, images):
    return module.apply(params, images, train=False)

  return custom.model(f"{name} (user's function)", apply_fn, model.params,
                      dataset=model.meta["dataset"],
                      num_classes=model.meta.get("num_classes", 10),
                      architecture=model.meta["architecture"])


def mnist_lenet():
  """The zoo's `mnist_lenet` as a user's function."""
  return _as_user("mnist_lenet")


def cifar10_allconv():
  """The zoo's `cifar10_allconv` (All-CNN-C) as a user's function."""
  return _as_user("cifar10_allconv")


def cifar10_resnet20():
  """The zoo's `cifar10_resnet20` as a user's function."""
  return _as_user("cifar10_resnet20")


def cifar10_user_cnn():
  """A CIFAR-10 CNN outside the zoo with its own trained weights (`bench.user_cnn`)."""
  from advsweep.bench.perf import user_cnn

  params, meta = user_cnn.load()
  return custom.model("cifar10_user_cnn", user_cnn.apply_fn, params, dataset="cifar10",
                      num_classes=10, architecture="UserCNN",
                      test_accuracy=meta["test_accuracy"])
