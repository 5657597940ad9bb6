"""Data loaders against the real files, corrupt copies, and TFDS's mock data."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from advsweep.models import datasets
from tests.conftest import requires_data, requires_fashion

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def _write_cifar_batch(path, images, labels):
  """Writes the original CIFAR-10 binary format: label byte, then R, G, B planes."""
  planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  path.write_bytes(np.concatenate([labels[:, None].astype(np.uint8), planes], 1).tobytes())


@requires_data
def test_mnist_npz_matches_published_facts(data_dir):
  x, y = datasets.load("mnist", "train", data_dir)
  assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8
  assert y.dtype == np.int32
  assert np.bincount(y).tolist() == MNIST_TRAIN_COUNTS
  assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
  assert x.mean() / 255 == pytest.approx(0.1306604762738429, abs=1e-12)


@requires_data
def test_mnist_raw_idx_equals_npz(data_dir, tmp_path):
  (tmp_path / "mnist-raw").symlink_to(data_dir / "mnist-raw")  # no mnist.npz beside it
  x_raw, y_raw = datasets.load("mnist", "test", tmp_path)
  x_npz, y_npz = datasets.load("mnist", "test", data_dir)
  assert y_raw[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
  np.testing.assert_array_equal(x_raw, x_npz)
  np.testing.assert_array_equal(y_raw, y_npz)


@requires_data
def test_corrupt_idx_file_is_refused(data_dir, tmp_path):
  raw = tmp_path / "mnist-raw"
  shutil.copytree(data_dir / "mnist-raw", raw)
  target = raw / "t10k-labels-idx1-ubyte.gz"
  blob = bytearray(target.read_bytes())
  blob[len(blob) // 2] ^= 0xFF
  target.write_bytes(bytes(blob))
  with pytest.raises(datasets.CorruptDataError, match="t10k-labels-idx1-ubyte.gz"):
    datasets.load("mnist", "test", tmp_path)


def test_truncated_npz_is_refused(tmp_path):
  np.savez(tmp_path / "mnist.npz", x_test=np.zeros((4, 28, 28), np.uint8),
           y_test=np.zeros(4, np.uint8))
  blob = (tmp_path / "mnist.npz").read_bytes()
  (tmp_path / "mnist.npz").write_bytes(blob[: len(blob) // 2])
  with pytest.raises(datasets.CorruptDataError, match="mnist.npz"):
    datasets.load("mnist", "test", tmp_path)


def test_npz_with_wrong_shape_is_refused(tmp_path):
  np.savez(tmp_path / "cifar10.npz", x_test=np.zeros((4, 28, 28), np.uint8),
           y_test=np.zeros(4, np.uint8))
  with pytest.raises(datasets.CorruptDataError, match="shape"):
    datasets.load("cifar10", "test", tmp_path)


@requires_data
def test_cifar10_npz_and_original_batches_agree(data_dir, tmp_path):
  x, y = datasets.load("cifar10", "test", data_dir)
  assert x.shape == (10000, 32, 32, 3) and x.dtype == np.uint8
  assert np.bincount(y).tolist() == [1000] * 10
  assert y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
  # Written back in the original binary format, the split must have the published md5,
  # and the batch reader must give back the same arrays.
  folder = tmp_path / "cifar-10-batches-bin"
  folder.mkdir()
  _write_cifar_batch(folder / "test_batch.bin", x, y)
  x_bin, y_bin = datasets.load("cifar10", "test", tmp_path)
  np.testing.assert_array_equal(x_bin, x)
  np.testing.assert_array_equal(y_bin, y)
  # One flipped pixel and the md5 check refuses the file.
  blob = bytearray((folder / "test_batch.bin").read_bytes())
  blob[12345] ^= 1
  (folder / "test_batch.bin").write_bytes(bytes(blob))
  with pytest.raises(datasets.CorruptDataError, match="md5"):
    datasets.load("cifar10", "test", tmp_path)


@requires_fashion
def test_fashion_mnist_from_debian_package(tmp_path):
  x, y = datasets.load("fashion_mnist", "test", tmp_path)  # empty folder: falls through
  assert x.shape == (10000, 28, 28, 1) and x.dtype == np.uint8
  assert np.bincount(y).tolist() == [1000] * 10
  x_train, y_train = datasets.load("fashion_mnist", "train", tmp_path)
  assert x_train.shape == (60000, 28, 28, 1)
  assert np.bincount(y_train).tolist() == [6000] * 10


def test_missing_data_error_names_every_place(tmp_path):
  with pytest.raises(datasets.DatasetNotFoundError) as err:
    datasets.load("cifar10", "test", tmp_path)
  message = str(err.value)
  assert str(tmp_path / "cifar10.npz") in message
  assert "cifar-10-batches-bin" in message
  assert "TFDS" in message
  assert "ADVSWEEP_DATA_DIR" in message


def test_unknown_name_and_split_list_the_choices():
  # Another name may be a user's TFDS dataset; unprepared, the message lists ours too.
  with pytest.raises(datasets.DatasetNotFoundError, match="mnist, fashion_mnist, cifar10"):
    datasets.load("imagenet", "test")
  with pytest.raises(ValueError, match="train, test"):
    datasets.load("mnist", "validation")


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_tfds_data_source_path_with_mock_data(name, tmp_path):
  with tfds.testing.mock_data(num_examples=8):
    x, y = datasets.load(name, "test", tmp_path)
  assert x.shape == (8, *datasets.info(name).shape)
  assert x.dtype == np.uint8 and y.dtype == np.int32
  assert ((0 <= y) & (y < 10)).all()
