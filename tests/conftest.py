"""Shared fixtures: where the real data lives on this machine."""

from __future__ import annotations

import os
from pathlib import Path

# The tests run small models on few images, where XLA's compile time dominates: they compile
# with the backend's optimisation off (the suite took 9:33 with it on and 7:47 off on the
# 2-core machine). Set before any JAX backend starts; a level the caller gives wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from advsweep.models import datasets  # noqa: E402

# Many tests compile the same programs (a train step rebuilt by each run, one attack on one
# model in several files): XLA's persistent cache compiles each once. One folder per xdist
# worker, since the cache writes its entries without a lock.
jax.config.update("jax_compilation_cache_dir", str(
    Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"
    / os.environ.get("PYTEST_XDIST_WORKER", "main")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _data_dir() -> Path | None:
  env = os.environ.get(datasets.DATA_DIR_ENV)
  if env and Path(env).is_dir():
    return Path(env)
  sibling = Path(__file__).resolve().parents[2] / "shared" / "data"
  return sibling if sibling.is_dir() else None


def downloaded(names: tuple[str, ...] = ("mnist", "cifar10")) -> Path | None:
  """With no data folder given and the machine online: the datasets fetched once into
  advsweep's download cache (each file checked against its published checksum, as the loader
  does, and read from the cache after that), so a newcomer's suite runs everything; None
  offline, or with downloads off ($ADVSWEEP_DOWNLOAD=0)."""
  from advsweep.models import download

  if not download.enabled():
    return None
  try:
    for name in names:
      for split in ("train", "test"):
        datasets.load(name, split, None)
  except (datasets.DatasetNotFoundError, datasets.CorruptDataError):
    return None
  return download.cache_dir()


DATA_DIR = _data_dir() or downloaded()

requires_data = pytest.mark.skipif(
    DATA_DIR is None,
    reason=f"real data not found and not downloadable (offline?): set "
           f"${datasets.DATA_DIR_ENV} to a folder with mnist.npz, mnist-raw/ and cifar10.npz")
requires_fashion = pytest.mark.skipif(
    not datasets.DEBIAN_FASHION_MNIST.is_dir(),
    reason="Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist")


@pytest.fixture(scope="session")
def data_dir() -> Path:
  assert DATA_DIR is not None
  return DATA_DIR


@pytest.fixture(autouse=True)
def _isolated_tfds(tmp_path_factory, monkeypatch):
  """Points TFDS and the download cache at empty folders and turns downloading off, so no
  test reads a user's cache or the network (tests/test_download.py turns it on against a
  local server)."""
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path_factory.mktemp("tfds")))
  monkeypatch.setenv("ADVSWEEP_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
  monkeypatch.setenv("ADVSWEEP_DOWNLOAD", "0")
