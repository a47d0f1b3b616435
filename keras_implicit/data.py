"""Datasets for the paper's experiments: local IDX / CIFAR-10 files first, tensorflow-datasets otherwise.

``load_dataset("fashion_mnist")`` looks, in order, in

1. ``data_dir`` if given: the four standard IDX files (``train-images-idx3-ubyte[.gz]``,
   ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``)
   for MNIST / Fashion-MNIST, or CIFAR-10's python batches (``data_batch_1`` .. ``data_batch_5``,
   ``test_batch``, directly or under ``cifar-10-batches-py/``);
2. without ``data_dir`` only: the system directories of Debian's packages
   (``/usr/share/datasets/fashion-mnist`` from ``dataset-fashion-mnist``);
3. ``tfds.load`` (which downloads when there is a network; ``data_dir`` is passed on as its data
   directory).

A ``data_dir`` that is given is the only place the data may come from besides tensorflow-datasets (it is what a
run records): it must be an existing directory, and no system directory stands in for it. If nothing works,
:class:`DatasetUnavailableError` says where it looked and how to get the data.

Preprocessing: pixels scaled to [0, 1] (float32, images [N, H, W, C]); CIFAR-10 is then standardized
per channel with the training set's mean and standard deviation. No augmentation.

``train_subset=N`` keeps a class-balanced subset of the training set: ``N // classes`` examples of each
class (the first ``N % classes`` classes get one more), the first ones of each class in the file's order,
so the subset is the same for every seed; ``N`` must be at least the number of classes and at most what
:func:`balanced_subset_range` gives for the class counts (for the standard training sets, without loading them:
``training.TRAIN_CLASS_COUNTS``). The test set is always complete.

``validation_size=V`` first holds out a class-balanced validation split carved from the training set: the *last*
``V // classes`` examples of each class in the file's order (the first ``V % classes`` classes one more), the same
for every seed and setting (:func:`validation_indices`); training (and ``train_subset``) uses the rest, and the
test set is never touched, so that nothing is chosen on it.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import socket
from typing import Optional

import numpy as np

from keras_implicit.config import balanced_subset_range
from keras_implicit.names import DATASETS, SYSTEM_DIRS, TRAIN_CLASS_COUNTS, system_directories

__all__ = [
    "IDX_FILES",
    "Dataset",
    "DatasetUnavailableError",
    "read_idx",
    "write_idx",
    "load_idx_dir",
    "class_balanced_subset",
    "validation_indices",
    "load_dataset",
    "read_cifar_batch",
    "UnsafePickleError",
]

NUM_CLASSES = {name: len(counts) for name, counts in TRAIN_CLASS_COUNTS.items()}

# split -> (images file, labels file), without the optional ".gz".
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Directories that Debian packages install (dataset-fashion-mnist).

_HOW_TO_GET = {
    "fashion_mnist": (
        "install Debian's package (sudo apt-get install dataset-fashion-mnist, which puts the IDX files in "
        "/usr/share/datasets/fashion-mnist), or put the four IDX files (train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz from "
        "https://github.com/zalandoresearch/fashion-mnist) in a directory and pass --data-dir DIR, or run once "
        "with network access so that tensorflow-datasets downloads it"
    ),
    "mnist": (
        "put the four MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a directory and pass --data-dir DIR, or run "
        "once with network access so that tensorflow-datasets downloads it"
    ),
    "cifar10": (
        "extract CIFAR-10's python version (cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html) "
        "and pass --data-dir DIR (DIR holding data_batch_1..5 and test_batch, or cifar-10-batches-py/), or run once "
        "with network access so that tensorflow-datasets downloads it"
    ),
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetUnavailableError(RuntimeError):
    """A dataset is neither on disk nor downloadable; the message says how to get it."""


@dataclasses.dataclass
class Dataset:
    """A dataset in memory.

    Attributes:
        name: ``"fashion_mnist"``, ``"mnist"`` or ``"cifar10"``.
        x_train: float32 [N, H, W, C], preprocessed.
        y_train: int32 [N].
        x_test: float32 [M, H, W, C].
        y_test: int32 [M].
        num_classes: the number of classes.
        source: where it came from (a directory, or ``"tensorflow-datasets"``).
        x_validation, y_validation: the validation split held out of the training set (``validation_size``), or
            None.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str
    x_validation: Optional[np.ndarray] = None
    y_validation: Optional[np.ndarray] = None

    @property
    def input_shape(self):
        return tuple(self.x_train.shape[1:])


# --------------------------------------------------------------------------- #
# IDX files
# --------------------------------------------------------------------------- #
def _open(path):
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_idx(path) -> np.ndarray:
    """Reads one IDX file (gzipped or not) into a NumPy array of its stored shape and type.

    The format (yann.lecun.com/exdb/mnist): two zero bytes, a type code (0x08 unsigned byte, ...),
    the number of dimensions, each dimension as a big-endian int32, then the data in C order.
    """
    with _open(path) as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({expected} bytes of data) but the file holds "
            f"{len(data) - header} bytes"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path, array: np.ndarray, compress: Optional[bool] = None) -> None:
    """Writes an array as an IDX file (gzipped if the name ends in ``.gz`` or ``compress``)."""
    array = np.asarray(array)
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    stored = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    code = codes.get(np.dtype(stored.dtype))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    payload = header + np.ascontiguousarray(stored).tobytes()
    compress = str(path).endswith(".gz") if compress is None else compress
    with (gzip.open(path, "wb") if compress else open(path, "wb")) as handle:
        handle.write(payload)


def _find_file(directory, stem):
    for candidate in (stem + ".gz", stem):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _idx_paths(directory):
    """{split: (images path, labels path)} if all four files are there, else None."""
    paths = {}
    for split, stems in IDX_FILES.items():
        found = tuple(_find_file(directory, stem) for stem in stems)
        if None in found:
            return None
        paths[split] = found
    return paths


def load_idx_dir(directory):
    """The raw (x_train, y_train, x_test, y_test) of a directory with the four standard IDX files.

    Images come back as [N, H, W, 1] uint8, labels as int32 [N].
    """
    paths = _idx_paths(directory)
    if paths is None:
        stems = [s + "[.gz]" for pair in IDX_FILES.values() for s in pair]
        raise FileNotFoundError(f"{directory} does not hold the IDX files {', '.join(stems)}")
    arrays = []
    for split in ("train", "test"):
        images, labels = (read_idx(p) for p in paths[split])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{directory}: {split} images {images.shape} and labels {labels.shape} do not match "
                "(expected [N, H, W] and [N])"
            )
        arrays += [images[..., None], labels.astype(np.int32)]
    return tuple(arrays)


def _cifar_dir(directory):
    for candidate in (directory, os.path.join(directory, "cifar-10-batches-py")):
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        if all(os.path.isfile(os.path.join(candidate, n)) for n in names):
            return candidate
    return None


# The globals that CIFAR-10's Python batches need besides dicts, lists, bytes, str and numbers: NumPy arrays and
# scalars (numpy 1 and 2 name their reconstructors in different modules; protocol 5 rebuilds an array from its
# buffer) and, in a Python 3 pickle of protocol 2, bytes (written as _codecs.encode(text, "latin1")). None of
# them runs anything but its own conversion.
_CIFAR_PICKLE_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
})


class UnsafePickleError(ValueError):
    """A pickle names something other than what CIFAR-10's batches hold (it could run code when loaded)."""


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only NumPy's array reconstruction; any other global (a function a crafted file would call) is
    refused before it is looked up."""

    def __init__(self, handle, path):
        super().__init__(handle, encoding="bytes")
        self._path = path

    def find_class(self, module, name):
        if (module, name) in _CIFAR_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(f"{self._path} is not a CIFAR-10 batch: its pickle names {module}.{name} (only "
                                "dicts, lists, bytes, str, numbers and NumPy arrays are read)")


def read_cifar_batch(path) -> dict:
    """One of CIFAR-10's Python batches (``data_batch_1`` ... ``test_batch``) as its dict, read without running
    code: only dicts, lists, bytes, str, numbers and NumPy arrays are accepted.

    Raises:
        UnsafePickleError: the file names any other Python object (a crafted pickle), naming the file.
        ValueError: the file is not a pickle of a dict.
    """
    with open(path, "rb") as handle:
        try:
            content = _CifarUnpickler(handle, path).load()
        except UnsafePickleError:
            raise
        except Exception as error:  # truncated or not a pickle at all
            raise ValueError(f"{path} is not a CIFAR-10 batch ({type(error).__name__}: {error})") from None
    if not isinstance(content, dict) or b"data" not in content or b"labels" not in content:
        raise ValueError(f"{path} is not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
    return content


def _load_cifar_dir(directory):
    def batch(name):
        content = read_cifar_batch(os.path.join(directory, name))
        images = np.asarray(content[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return images, np.asarray(content[b"labels"], np.int32)

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = batch("test_batch")
    return np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train]), x_test, y_test


# --------------------------------------------------------------------------- #
# tensorflow-datasets
# --------------------------------------------------------------------------- #
def _network_reachable(host="storage.googleapis.com", port=443, timeout=3.0) -> bool:
    """Whether tensorflow-datasets' download host answers (offline, tfds retries for minutes)."""

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_tfds(name, data_dir):
    import tensorflow_datasets as tfds  # deferred: heavy (TensorFlow), only without the files

    try:  # already prepared in the tfds data directory: no network needed
        splits = tfds.load(name, split=["train", "test"], as_supervised=True, data_dir=data_dir, download=False)
    except Exception as not_prepared:  # tfds raises AssertionError and others for "not prepared"
        if not _network_reachable():
            raise ConnectionError(
                "no network to download it (storage.googleapis.com unreachable)") from not_prepared
        splits = tfds.load(name, split=["train", "test"], as_supervised=True, data_dir=data_dir, download=True)
    arrays = []
    for split in splits:
        # Batches of 10000, not batch_size=-1 (which asks tf.data for one batch of sys.maxsize).
        images, labels = [], []
        for x, y in tfds.as_numpy(split.batch(10000)):
            images.append(np.asarray(x, np.uint8))
            labels.append(np.asarray(y, np.int32))
        arrays += [np.concatenate(images), np.concatenate(labels)]
    return tuple(arrays)


# --------------------------------------------------------------------------- #
# Subsets and preprocessing
# --------------------------------------------------------------------------- #
def class_balanced_subset(labels: np.ndarray, size: int, num_classes: int) -> np.ndarray:
    """Indices (sorted) of a class-balanced subset: ``size // num_classes`` of each class, the first
    ``size % num_classes`` classes one more, taking each class's first examples in the given order.

    Raises ValueError unless ``size`` is within :func:`balanced_subset_range` of the labels' class counts."""
    labels = np.asarray(labels)
    size = int(size)
    counts = np.bincount(labels[(labels >= 0) & (labels < num_classes)], minlength=num_classes)
    low, high = balanced_subset_range(counts)
    limits = f"a class-balanced subset of these {len(labels)} examples holds from {low} to {high}"
    if size < num_classes:
        raise ValueError(f"train_subset {size} is smaller than the number of classes ({num_classes}): {limits}")
    if size > len(labels):
        raise ValueError(f"train_subset {size} is larger than the training set ({len(labels)} examples): {limits}")
    chosen = []
    for label in range(num_classes):
        wanted = size // num_classes + (1 if label < size % num_classes else 0)
        members = np.flatnonzero(labels == label)
        if len(members) < wanted:
            raise ValueError(
                f"train_subset {size}: class {label} has only {len(members)} examples, {wanted} needed ({limits})"
            )
        chosen.append(members[:wanted])
    return np.sort(np.concatenate(chosen))


def validation_indices(labels: np.ndarray, size: int, num_classes: int) -> np.ndarray:
    """Indices (sorted) of the validation split: ``size // num_classes`` of each class, the first
    ``size % num_classes`` classes one more, each class's *last* examples in the given order (the training set keeps
    the first ones, which ``train_subset`` takes).

    Raises ValueError (naming ``validation_size``) unless the classes hold that many."""
    labels = np.asarray(labels)
    try:
        reversed_indices = class_balanced_subset(labels[::-1], size, num_classes)
    except ValueError as error:
        raise ValueError(str(error).replace("train_subset", "validation_size")) from None
    return np.sort(len(labels) - 1 - reversed_indices)


def _preprocess(name, x_train, y_train, x_test, y_test):
    x_train = np.asarray(x_train, np.float32) / np.float32(255.0)
    x_test = np.asarray(x_test, np.float32) / np.float32(255.0)
    if name == "cifar10":
        mean = x_train.mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
        std = x_train.std(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
        x_train = (x_train - mean) / std
        x_test = (x_test - mean) / std
    return x_train, np.asarray(y_train, np.int32), x_test, np.asarray(y_test, np.int32)


def _expected_files(name) -> str:
    if name == "cifar10":
        return ("CIFAR-10's python batches data_batch_1 .. data_batch_5 and test_batch, directly or under "
                "cifar-10-batches-py/")
    return "the IDX files " + ", ".join(s + "[.gz]" for pair in IDX_FILES.values() for s in pair)


def _local_files(name, directory):
    """The raw arrays of ``name`` in ``directory`` (IDX files or CIFAR-10 batches) and where they are, or
    (None, None) when the directory does not hold them."""
    if name == "cifar10":
        found = _cifar_dir(directory)
        return (_load_cifar_dir(found), found) if found else (None, None)
    if _idx_paths(directory) is not None:
        return load_idx_dir(directory), directory
    return None, None


def _missing_idx_files(directory) -> list[str]:
    """The standard IDX files that ``directory`` lacks, when it holds some of them (else [])."""
    missing = [s for pair in IDX_FILES.values() for s in pair if _find_file(directory, s) is None]
    return missing if len(missing) < 4 else []


def load_dataset(name: str = "fashion_mnist", data_dir: Optional[str] = None,
                 train_subset: Optional[int] = None, allow_download: bool = True,
                 validation_size: Optional[int] = None) -> Dataset:
    """Loads and preprocesses one of :data:`DATASETS` (see the module docstring for the search order).

    Args:
        name: ``"fashion_mnist"``, ``"mnist"`` or ``"cifar10"``.
        data_dir: an existing directory with the standard IDX files (or CIFAR-10 python batches), or a
            tensorflow-datasets data directory; given, it replaces the system directories (nothing else on
            disk is read).
        train_subset: keep a class-balanced subset of this many training examples (of those left by the
            validation split).
        allow_download: whether to fall back to ``tfds.load``.
        validation_size: hold out a class-balanced validation split of this many training examples
            (:func:`validation_indices`; None: none).

    Returns:
        A :class:`Dataset`.

    Raises:
        ValueError: unknown name or bad subset size (:func:`class_balanced_subset`), damaged files.
        DatasetUnavailableError: ``data_dir`` does not exist or is not a directory; no local files and
            tensorflow-datasets failed. The message says where it looked and how to get the data.

    Example:
        >>> data = load_dataset("fashion_mnist", train_subset=1000)
        >>> data.x_train.shape, data.x_test.shape
        ((1000, 28, 28, 1), (10000, 28, 28, 1))
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if train_subset is not None and int(train_subset) <= 0:
        raise ValueError(f"train_subset must be a positive number of examples, got {train_subset}")
    num_classes = NUM_CLASSES[name]
    system = system_directories(name)
    if data_dir:
        if not os.path.isdir(data_dir):
            what = "is not a directory" if os.path.exists(data_dir) else "does not exist"
            elsewhere = f"leave it out to use {system[0]}" if system else "create it for tensorflow-datasets to use"
            raise DatasetUnavailableError(
                f"data_dir {data_dir} {what}: give a directory that holds {name}'s files ({_expected_files(name)}) "
                f"or a tensorflow-datasets data directory, or {elsewhere}")
        directories = [data_dir]  # given: it is what a run records, so nothing else on disk stands in for it
    else:
        directories = system
    raw, source = None, None
    for directory in directories:
        raw, source = _local_files(name, directory)
        if raw is not None:
            break
    if raw is None:
        if data_dir:
            missing = [] if name == "cifar10" else _missing_idx_files(data_dir)
            looked = (f"data_dir {data_dir} does not hold {name}'s files ("
                      + (f"it lacks {', '.join(missing)}" if missing else f"{_expected_files(name)}") + ")")
            if system:
                looked += f"; leave data_dir out to use {system[0]}"
        else:
            looked = f"looked in {', '.join(SYSTEM_DIRS[name]) or 'no local directory'}"
        if not allow_download:
            raise DatasetUnavailableError(f"{name} is not on this machine ({looked}): {_HOW_TO_GET[name]}")
        try:
            raw = _load_tfds(name, data_dir)
        except Exception as error:  # tfds raises many kinds (network, checksum, missing builder files)
            raise DatasetUnavailableError(
                f"{name} is not on this machine ({looked}) and tensorflow-datasets could not load it "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). To get it: "
                f"{_HOW_TO_GET[name]}."
            ) from error
        source = "tensorflow-datasets"
    x_train, y_train, x_test, y_test = raw
    for split, labels in (("train", y_train), ("test", y_test)):
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name} from {source}: {split} labels outside [0, {num_classes})")
    x_validation = y_validation = None
    if validation_size is not None:
        held = validation_indices(y_train, validation_size, num_classes)
        rest = np.setdiff1d(np.arange(len(y_train)), held)
        x_validation, y_validation = x_train[held], y_train[held]
        x_train, y_train = x_train[rest], y_train[rest]
    if train_subset is not None:
        keep = class_balanced_subset(y_train, train_subset, num_classes)
        x_train, y_train = x_train[keep], y_train[keep]
    if validation_size is not None:
        # Preprocessed with the test set's transform (CIFAR-10: the training examples' mean and deviation).
        _, _, x_validation, y_validation = _preprocess(name, x_train, y_train, x_validation, y_validation)
    x_train, y_train, x_test, y_test = _preprocess(name, x_train, y_train, x_test, y_test)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, source, x_validation, y_validation)
