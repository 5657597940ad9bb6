"""The benchmarks' user's CNN (`bench.user_cnn`): trained by its own loop, saved and loaded
without pickle, and evaluated pixel-locally from its function alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advsweep.bench.perf import user_cnn
from advsweep.models import custom
from tests.conftest import requires_data
from tests.test_locality import _check_splits


def test_the_users_cnn_is_pixel_local_from_its_function():
  params = user_cnn.UserCNN().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  model = custom.model("u", user_cnn.apply_fn, params, dataset="cifar10", num_classes=10)
  splicer = model.pixel_evaluator
  best = splicer.plan_for(params, (32, 32, 3), 1)
  # Past the first pool at least, and cheaper than the full pass by the cost model.
  assert best.split > 10 and best.macs < best.full_macs / 2
  splits = splicer.splits(params, (32, 32, 3))
  _check_splits(user_cnn.apply_fn, params, (32, 32, 3),
                splits=[splits[1], splits[len(splits) // 2], best.split, splits[-1]], count=10)


def test_missing_weights_say_how_to_train(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m advsweep.bench.perf.user_cnn"):
    user_cnn.load(tmp_path / "none.msgpack")


@requires_data
def test_trained_weights_load_to_the_same_logits(tmp_path, data_dir):
  out = tmp_path / "u.msgpack"
  trained, meta = user_cnn.train(str(data_dir), out, epochs=1, batch_size=64, limit=256)
  params, loaded_meta = user_cnn.load(out)
  assert loaded_meta == meta and meta["parameters"] == 140_714
  images = jax.random.uniform(jax.random.key(3), (4, 32, 32, 3))
  np.testing.assert_array_equal(user_cnn.apply_fn(params, images),
                                user_cnn.apply_fn(trained, images))
  initial = user_cnn.UserCNN().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert not np.allclose(user_cnn.apply_fn(params, images),
                         user_cnn.apply_fn(initial, images))  # it trained
