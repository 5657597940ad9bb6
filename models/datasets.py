"""Image classification datasets as uint8 arrays, from local files or TFDS.

`load(name, split, data_dir=None) -> (images uint8 [N,H,W,C], labels int32 [N])`.

Sources, tried in order (the error lists every place that was looked at):

1. A local folder: `data_dir`, else the environment variable `ADVSWEEP_DATA_DIR`. It may hold
   `mnist.npz` / `fashion_mnist.npz` / `cifar10.npz` (arrays `x_train, y_train, x_test,
   y_test`, uint8), the original idx `.gz` files in `mnist-raw/` or `fashion-mnist/`, or the
   original CIFAR-10 binary batches in `cifar-10-batches-bin/`.
2. The Debian package path `/usr/share/datasets/fashion-mnist/` (`dataset-fashion-mnist`).
3. The download cache (`models.download`): the original files, downloaded there on first
   use where the machine is online, verified by their published checksums (no TensorFlow).
4. TensorFlow Datasets: a prepared dataset read with `tfds.data_source` (array_record, needs no
   TensorFlow), or `download_and_prepare()` where the machine is online and TensorFlow is
   installed (the `[tfds-prepare]` extra).

Any other name is a user's dataset (`load_other`): an .npz file or folder, a folder of PNGs
per class, or a prepared TFDS dataset, of any image size and number of classes.

Original files are verified before use: the idx `.gz` files by the sha256 published in the
TFDS checksums, or, where a distributor recompressed them (Debian does), by the sha256 of the
decompressed idx stream; the CIFAR-10 batches by their published md5. A file that matches
neither is refused, never half-read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import logging
import os
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from advsweep.models import download

DATA_DIR_ENV = "ADVSWEEP_DATA_DIR"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about one dataset."""

  name: str
  shape: tuple[int, int, int]  # [H, W, C]
  num_classes: int
  sizes: dict[str, int]
  class_names: tuple[str, ...]
  idx_folder: str | None  # subfolder holding the original idx .gz files


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        "mnist", (28, 28, 1), 10, {"train": 60000, "test": 10000},
        tuple(str(d) for d in range(10)), "mnist-raw"),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", (28, 28, 1), 10, {"train": 60000, "test": 10000},
        ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
         "sneaker", "bag", "ankle boot"), "fashion-mnist"),
    "cifar10": DatasetInfo(
        "cifar10", (32, 32, 3), 10, {"train": 50000, "test": 10000},
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
         "truck"), None),
}

_IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}

# sha256 of the .gz files as published in TFDS's url_checksums (mnist.txt, fashion_mnist.txt).
_GZ_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}

# sha256 of the decompressed idx streams. MNIST: from the files whose .gz match the TFDS
# checksums above. Fashion-MNIST: from Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1,
# whose .gz are recompressed (23 bytes shorter: no stored file name) but whose idx streams have
# the original sizes (47040016, 60008, 7840016, 10008 bytes).
_IDX_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

# md5 of the files inside the official cifar-10-binary.tar.gz.
_CIFAR_DIR = "cifar-10-batches-bin"
_CIFAR_MD5 = {
    "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
}


# The original files' homes (the first run downloads from them, `models.download`).
REMOTES = {
    "mnist": download.Remote(
        "mnist-raw", ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                      "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        {s: (_IDX_FILES[(s, "images")], _IDX_FILES[(s, "labels")]) for s in SPLITS},
        sha256=_GZ_SHA256["mnist"]),
    "fashion_mnist": download.Remote(
        "fashion-mnist", ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {s: (_IDX_FILES[(s, "images")], _IDX_FILES[(s, "labels")]) for s in SPLITS},
        sha256=_GZ_SHA256["fashion_mnist"]),
    "cifar10": download.Remote(
        _CIFAR_DIR, ("https://www.cs.toronto.edu/~kriz/",),
        {s: ("cifar-10-binary.tar.gz",) for s in SPLITS}, members=_CIFAR_MD5),
}


class DatasetNotFoundError(FileNotFoundError):
  """No source could provide the dataset; the message lists every place looked at."""


class CorruptDataError(ValueError):
  """A data file exists but fails its checksum or format check."""


def info(name: str) -> DatasetInfo:
  """Returns the `DatasetInfo` of `name`, or raises a ValueError listing valid names."""
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}")
  return DATASETS[name]


def default_data_dir() -> Path | None:
  """The folder named by `ADVSWEEP_DATA_DIR`, if set."""
  value = os.environ.get(DATA_DIR_ENV)
  return Path(value).expanduser() if value else None


def load(name: str, split: str, data_dir: str | os.PathLike | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
  """Loads a whole split.

  Args:
    name: `mnist`, `fashion_mnist` or `cifar10`.
    split: `train` or `test`.
    data_dir: local folder to look in first; defaults to `$ADVSWEEP_DATA_DIR`.

  Returns:
    images uint8 [N,H,W,C] and labels int32 [N].

  Raises:
    ValueError: unknown name or split.
    CorruptDataError: a file was found but fails verification.
    DatasetNotFoundError: no source had the data; the message says where it looked.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; valid choices: {', '.join(SPLITS)}")
  if name not in DATASETS:
    return load_other(name, split)
  ds = DATASETS[name]
  folder = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
  looked: list[str] = []
  if folder is not None:
    result = _load_local(ds, split, folder, looked)
    if result is not None:
      return _checked(ds, split, *result)
  else:
    looked.append(f"no local folder: neither data_dir nor ${DATA_DIR_ENV} is set")
  if name == "fashion_mnist":
    result = _load_idx_folder(ds, split, DEBIAN_FASHION_MNIST, looked)
    if result is not None:
      return _checked(ds, split, *result)
  result = _load_cached(ds, split, looked)
  if result is not None:
    return _checked(ds, split, *result)
  result = _load_tfds(ds.name, ds.shape, split, looked)
  if result is not None:
    return _checked(ds, split, *result)
  hint = (f"Fix: point --data-dir or ${DATA_DIR_ENV} at a folder holding {name}.npz or the "
          "original files")
  if name == "fashion_mnist":
    hint += ", or run `apt-get install -y dataset-fashion-mnist`"
  hint += (", or prepare it with TFDS on a machine that is online "
           "(pip install 'advsweep[tfds-prepare]').")
  raise DatasetNotFoundError(
      f"dataset {name!r} split {split!r} not found (looked in: " + "; ".join(looked) + "). "
      + hint)


def _load_cached(ds: DatasetInfo, split: str, looked: list[str]):
  """The download cache, downloading the original files into it first where needed."""
  cache = download.cache_dir()
  result = _load_local(ds, split, cache, []) if cache.is_dir() else None
  if result is not None:
    return result
  if not download.enabled():
    looked.append(f"download: off (${download.DOWNLOAD_ENV}=0)")
    return None
  try:
    download.fetch(ds.name, REMOTES[ds.name], split)
  except download.DownloadError as err:
    looked.append(str(err))
    return None
  return _load_local(ds, split, cache, looked)


def load_other(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """A user's dataset: an `.npz` file (`x_<split>`, `y_<split>` uint8 arrays), a folder
  holding one, a folder of PNGs per class (`<folder>/<split>/<class>/*.png`, or
  `<folder>/<class>/*.png` for the test split), or a prepared TFDS dataset. Any image size,
  any number of classes."""
  path = Path(name).expanduser()
  if path.is_file() and path.suffix == ".npz":
    images, labels = _load_npz(path, split)
  elif path.is_dir():
    images, labels = _load_folder(path, split)
  elif "/" in name or name.endswith(".npz"):
    raise DatasetNotFoundError(f"no data file or folder {path}; name an .npz file, a folder "
                               "holding one, or a folder of PNGs per class")
  else:
    looked: list[str] = []
    result = _load_tfds(name, None, split, looked)
    if result is None:
      raise DatasetNotFoundError(
          f"dataset {name!r} is neither advsweep's ({', '.join(DATASETS)}), nor a file or "
          f"folder, nor a prepared TFDS dataset ({'; '.join(looked)}). Fix: name a folder, "
          "or prepare it with TFDS")
    images, labels = result
  return _checked_any(str(path), split, images, labels)


def _load_folder(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
  archives = sorted(folder.glob("*.npz"))
  if len(archives) == 1:
    return _load_npz(archives[0], split)
  if len(archives) > 1:
    raise CorruptDataError(f"{folder} holds {len(archives)} .npz files; name one of them")
  split_folders = [folder / s for s in SPLITS if (folder / s).is_dir()]
  root = folder / split if (folder / split).is_dir() else folder
  if root is folder and (split != "test" or split_folders):
    raise DatasetNotFoundError(f"{folder} has no {split}/ folder of classes; without split "
                               "folders its class folders are read as the test split")
  # One class list for every split (a class missing from one keeps its label), in natural
  # order (2 before 10).
  names = sorted({p.name for f in (split_folders or [folder]) for p in f.iterdir()
                  if p.is_dir()}, key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n))
  files = [(label, png) for label, name in enumerate(names)
           for png in sorted((root / name).glob("*.png"))]
  if not files:
    raise DatasetNotFoundError(f"{root}: no class folders of .png images (and no .npz)")
  images = [_png_pixels(png) for _, png in files]
  if any(image.ndim == 3 for image in images):  # a colour image: the folder is colour
    images = [image if image.ndim == 3 else np.repeat(image[..., None], 3, -1)
              for image in images]
  shapes = {image.shape for image in images}
  if len(shapes) != 1:
    raise CorruptDataError(f"{root}: the images have different shapes {sorted(shapes)}; "
                           "resize them to one size")
  return np.stack(images), np.asarray([label for label, _ in files], np.int32)


_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _png_pixels(png: Path) -> np.ndarray:
  """One PNG's pixels as uint8: [H, W] for a greyscale image, [H, W, 3] for a colour one.

  Greyscale modes stay one channel (bilevel, 8-bit, with alpha, 16-bit, and palette images
  whose palette is grey); 16-bit values are scaled to 8 bits (`round(v * 255 / 65535)`), not
  clipped; alpha is dropped, not composited. A folder mixing grey and colour images is read
  as colour (`_load_folder`).

  Raises:
    CorruptDataError: the file is no readable image (truncated, not a PNG) or holds floats.
  """
  from PIL import Image  # noqa: PLC0415  (only for PNG folders)

  try:
    with Image.open(png) as image:
      image.load()
      mode = image.mode
      if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
          raise CorruptDataError(f"{png}: {mode} pixel values outside 0..65535; save it as "
                                 "an 8- or 16-bit PNG")
        return ((values * 255 + 32767) // 65535).astype(np.uint8)
      if mode == "F":
        raise CorruptDataError(f"{png}: floating-point pixels (mode F); save it as an 8- or "
                               "16-bit PNG")
      if mode in ("1", "L", "LA"):
        return np.asarray(image.convert("L"))
      rgb = np.asarray(image.convert("RGB"))
      if mode in ("P", "PA") and np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(
          rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0].copy()  # a grey palette
      return rgb
  except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for broken files
    if isinstance(err, CorruptDataError):
      raise
    raise CorruptDataError(f"{png}: cannot be read as an image ({' '.join(str(err).split())});"
                           " replace or remove it") from err


def _checked_any(where: str, split: str, images: np.ndarray, labels: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
  """A user's data as uint8 [N,H,W,C] images and int32 [N] labels, or CorruptDataError."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.dtype != np.uint8:
    raise CorruptDataError(f"{where}/{split}: images must be uint8 [N,H,W] or [N,H,W,C]; got "
                           f"{images.dtype} {images.shape}")
  if len(images) == 0:
    raise CorruptDataError(f"{where}/{split}: holds no images (shape {images.shape}); add "
                           "images, or name the split that has them with split = ...")
  labels = np.asarray(labels).reshape(-1)
  if not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(images):
    raise CorruptDataError(f"{where}/{split}: need one integer label per image; got "
                           f"{labels.dtype} labels for {len(images)} images")
  if len(labels) and labels.min() < 0:
    raise CorruptDataError(f"{where}/{split}: labels must be >= 0")
  return images, labels.astype(np.int32)


def _checked(ds: DatasetInfo, split: str, images: np.ndarray, labels: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
  """Normalises layout and checks shape, dtype, size and label range."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.dtype != np.uint8:
    raise CorruptDataError(f"{ds.name}/{split}: images have dtype {images.dtype}, want uint8")
  if len(images) == 0:
    raise CorruptDataError(f"{ds.name}/{split}: holds no images; replace the file with the "
                           "original")
  if images.shape[1:] != ds.shape:
    raise CorruptDataError(
        f"{ds.name}/{split}: images have shape {images.shape[1:]}, want {ds.shape}")
  labels = np.asarray(labels).reshape(-1).astype(np.int32)
  if len(images) != len(labels):
    raise CorruptDataError(
        f"{ds.name}/{split}: {len(images)} images but {len(labels)} labels")
  if len(labels) and (labels.min() < 0 or labels.max() >= ds.num_classes):
    raise CorruptDataError(
        f"{ds.name}/{split}: labels outside [0, {ds.num_classes})")
  return images, labels


def _load_local(ds: DatasetInfo, split: str, folder: Path, looked: list[str]):
  if not folder.is_dir():
    looked.append(f"{folder}: not a folder")
    return None
  npz = folder / f"{ds.name}.npz"
  if npz.is_file():
    return _load_npz(npz, split)
  looked.append(f"{npz}: missing")
  if ds.idx_folder is not None:
    result = _load_idx_folder(ds, split, folder / ds.idx_folder, looked)
    if result is not None:
      return result
  if ds.name == "cifar10":
    result = _load_cifar_batches(split, folder / _CIFAR_DIR, looked)
    if result is not None:
      return result
  return None


def _load_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
  x_key, y_key = f"x_{split}", f"y_{split}"
  try:
    with np.load(path, allow_pickle=False) as data:
      missing = [k for k in (x_key, y_key) if k not in data.files]
      if missing:
        raise CorruptDataError(f"{path}: missing arrays {missing}; it has {data.files}")
      return data[x_key], data[y_key]
  except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as err:
    if isinstance(err, CorruptDataError):
      raise
    raise CorruptDataError(
        f"{path}: cannot be read as a .npz archive ({err}); replace it with a good copy"
    ) from err


def _load_idx_folder(ds: DatasetInfo, split: str, folder: Path, looked: list[str]):
  names = [_IDX_FILES[(split, "images")], _IDX_FILES[(split, "labels")]]
  paths = [folder / n for n in names]
  missing = [p.name for p in paths if not p.is_file()]
  if missing:
    looked.append(f"{folder}: missing {', '.join(missing)}")
    return None
  images = _parse_idx(_read_verified_idx(ds.name, paths[0]), paths[0])
  labels = _parse_idx(_read_verified_idx(ds.name, paths[1]), paths[1])
  return images, labels


def _read_verified_idx(dataset: str, path: Path) -> bytes:
  """Returns the decompressed idx stream of `path` after checking its checksum."""
  raw = path.read_bytes()
  if hashlib.sha256(raw).hexdigest() == _GZ_SHA256[dataset][path.name]:
    return gzip.decompress(raw)
  try:
    stream = gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as err:  # zlib.error: corrupt mid-stream
    raise CorruptDataError(
        f"{path}: not a valid gzip file ({err}); its sha256 does not match the published "
        f"{dataset} checksum either. Replace it with the original file.") from err
  if hashlib.sha256(stream).hexdigest() != _IDX_SHA256[dataset][path.name]:
    raise CorruptDataError(
        f"{path}: checksum mismatch: neither the file's sha256 nor that of its decompressed "
        f"content matches the published {dataset} checksums. The file is corrupt or not "
        "the original; replace it.")
  return stream


def _parse_idx(stream: bytes, path: Path) -> np.ndarray:
  """Parses an idx stream (LeCun's format: magic, dims, big-endian, unsigned bytes)."""
  if len(stream) < 4 or stream[0] != 0 or stream[1] != 0 or stream[2] != 0x08:
    raise CorruptDataError(f"{path}: not an unsigned-byte idx file")
  ndim = stream[3]
  header = 4 + 4 * ndim
  dims = tuple(int.from_bytes(stream[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  if len(stream) != header + int(np.prod(dims)):
    raise CorruptDataError(f"{path}: idx header says {dims} but the data length disagrees")
  return np.frombuffer(stream, np.uint8, offset=header).reshape(dims)


def _load_cifar_batches(split: str, folder: Path, looked: list[str]):
  names = ([f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train"
           else ["test_batch.bin"])
  missing = [n for n in names if not (folder / n).is_file()]
  if missing:
    looked.append(f"{folder}: missing {', '.join(missing)}")
    return None
  images, labels = [], []
  for n in names:
    raw = (folder / n).read_bytes()
    if hashlib.md5(raw).hexdigest() != _CIFAR_MD5[n]:
      raise CorruptDataError(
          f"{folder / n}: md5 does not match the published CIFAR-10 checksum; "
          "the file is corrupt or not the original. Replace it.")
    records = np.frombuffer(raw, np.uint8).reshape(-1, 1 + 3 * 32 * 32)
    labels.append(records[:, 0])
    images.append(records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  return np.concatenate(images), np.concatenate(labels)


def _load_tfds(name: str, shape: tuple[int, int, int] | None, split: str, looked: list[str]):
  """Reads a prepared TFDS dataset; prepares it only where TensorFlow is installed."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as err:
    looked.append(f"TFDS: tensorflow_datasets cannot be imported ({err})")
    return None
  tfds_dir = os.environ.get("TFDS_DATA_DIR")
  where = tfds_dir or "~/tensorflow_datasets"
  try:
    with _quiet_absl():  # TFDS warns about a dataset it has not prepared; we report it
      source = tfds.data_source(name, split=split, data_dir=tfds_dir, download=False)
  except Exception as err:  # noqa: BLE001  (tfds raises many kinds; each is reported)
    first_line = str(err).splitlines()[0] if str(err) else ""
    looked.append(f"TFDS data_source({name!r}) in {where}: not prepared as array_record "
                  f"({type(err).__name__}: {first_line})")
    if not _tensorflow_available():
      looked.append("TFDS download_and_prepare: skipped, TensorFlow is not installed "
                    "(pip install 'advsweep[tfds-prepare]' on a machine that is online)")
      return None
    try:
      source = tfds.data_source(name, split=split, data_dir=tfds_dir, download=True,
                                builder_kwargs={"file_format": "array_record"})
    except Exception as err2:  # noqa: BLE001
      looked.append(f"TFDS download_and_prepare({name!r}): {type(err2).__name__}: {err2}")
      return None
  records = [source[i] for i in range(len(source))]
  images = np.stack([np.asarray(r["image"], np.uint8) for r in records]) if records else (
      np.zeros((0, *(shape or (1, 1, 1))), np.uint8))
  labels = np.asarray([r["label"] for r in records], np.int32)
  return images, labels


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
  """Holds back absl's warnings (TFDS logs through absl) for the body."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _tensorflow_available() -> bool:
  import importlib.util
  return importlib.util.find_spec("tensorflow") is not None
