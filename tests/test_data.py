"""keras_implicit.data: IDX files, CIFAR-10 batches, tensorflow-datasets (mocked), subsets, clear errors."""

import gzip
import os
import pickle

import numpy as np
import pytest

from keras_implicit import data as ki_data
from keras_implicit import names


def _write_idx_dir(directory, n_train=50, n_test=20, shape=(6, 5), compress=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images_name, labels_name = ki_data.IDX_FILES[split]
        suffix = ".gz" if compress else ""
        ki_data.write_idx(os.path.join(directory, images_name + suffix), images)
        ki_data.write_idx(os.path.join(directory, labels_name + suffix), labels)
        arrays[split] = (images, labels)
    return arrays


def test_read_idx_parses_the_header_by_hand(tmp_path):
    # An IDX file written byte by byte from the format's description, not by write_idx.
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big")
    (tmp_path / "a").write_bytes(raw + images.tobytes())
    np.testing.assert_array_equal(ki_data.read_idx(tmp_path / "a"), images)
    with gzip.open(tmp_path / "a.gz", "wb") as handle:
        handle.write(raw + images.tobytes())
    np.testing.assert_array_equal(ki_data.read_idx(tmp_path / "a.gz"), images)
    ints = np.array([1, -2, 300000], dtype=">i4")
    (tmp_path / "b").write_bytes(bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big") + ints.tobytes())
    np.testing.assert_array_equal(ki_data.read_idx(tmp_path / "b"), [1, -2, 300000])


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    np.array([-1.5, 2.25], np.float32),
    np.array([[7, -9]], np.int32),
])
@pytest.mark.parametrize("name", ["x", "x.gz"])
def test_write_then_read_idx(tmp_path, array, name):
    ki_data.write_idx(tmp_path / name, array)
    back = ki_data.read_idx(tmp_path / name)
    np.testing.assert_array_equal(back, array)
    assert back.shape == array.shape


@pytest.mark.parametrize("content, message", [
    (b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc", "not an IDX file"),
    (b"\x00\x00\x08\x02" + (3).to_bytes(4, "big"), "truncated"),
    (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc", "holds 3 bytes"),
])
def test_read_idx_rejects_bad_files(tmp_path, content, message):
    (tmp_path / "bad").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        ki_data.read_idx(tmp_path / "bad")


@pytest.mark.parametrize("compress", [True, False])
def test_load_from_an_idx_directory(tmp_path, compress):
    arrays = _write_idx_dir(str(tmp_path), compress=compress)
    dataset = ki_data.load_dataset("mnist", data_dir=str(tmp_path))
    assert dataset.source == str(tmp_path) and dataset.num_classes == 10
    assert dataset.x_train.shape == (50, 6, 5, 1) and dataset.x_train.dtype == np.float32
    assert dataset.input_shape == (6, 5, 1)
    np.testing.assert_allclose(dataset.x_train[..., 0], arrays["train"][0] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(dataset.y_test, arrays["test"][1])
    assert dataset.y_train.dtype == np.int32
    assert 0.0 <= dataset.x_test.min() and dataset.x_test.max() <= 1.0


def test_train_subset_is_class_balanced_and_fixed(tmp_path):
    arrays = _write_idx_dir(str(tmp_path), n_train=200)
    dataset = ki_data.load_dataset("fashion_mnist", data_dir=str(tmp_path), train_subset=45)
    counts = np.bincount(dataset.y_train, minlength=10)
    assert counts.tolist() == [5] * 5 + [4] * 5
    labels = arrays["train"][1]
    expected = np.sort(np.concatenate([np.flatnonzero(labels == c)[:counts[c]] for c in range(10)]))
    np.testing.assert_allclose(dataset.x_train[..., 0], arrays["train"][0][expected] / 255.0, rtol=1e-6)
    assert len(dataset.y_test) == 20  # the test set stays complete
    with pytest.raises(ValueError, match=r"larger than the training set \(200 examples\): a class-balanced subset of "
                                         "these 200 examples holds from 10 to 200"):
        ki_data.load_dataset("mnist", data_dir=str(tmp_path), train_subset=201)
    with pytest.raises(ValueError, match="class 3 has only"):
        ki_data.class_balanced_subset(np.array([0, 1, 2] * 10 + [3]), 8, 4)
    with pytest.raises(ValueError, match="positive"):
        ki_data.load_dataset("mnist", data_dir=str(tmp_path), train_subset=0)


@pytest.mark.parametrize("validation_size, train_subset", [(20, None), (25, None), (30, 40), (10, 120)])
def test_the_validation_split_is_each_classs_last_examples_and_training_keeps_the_rest(tmp_path, validation_size,
                                                                                   train_subset):
    arrays = _write_idx_dir(str(tmp_path), n_train=200)
    images, labels = arrays["train"]
    dataset = ki_data.load_dataset("fashion_mnist", data_dir=str(tmp_path), validation_size=validation_size,
                                   train_subset=train_subset)
    # Reference: per class, its last examples in file order (the first classes one more), written as a loop.
    wanted = [validation_size // 10 + (c < validation_size % 10) for c in range(10)]
    held = np.sort(np.concatenate([np.flatnonzero(labels == c)[len(np.flatnonzero(labels == c)) - wanted[c]:]
                                   for c in range(10)]))
    rest = np.array([i for i in range(len(labels)) if i not in set(held.tolist())])
    np.testing.assert_array_equal(dataset.y_validation, labels[held])
    np.testing.assert_allclose(dataset.x_validation[..., 0], images[held] / 255.0, rtol=1e-6)
    if train_subset is None:
        np.testing.assert_array_equal(dataset.y_train, labels[rest])
    else:  # the subset is the first examples of each class among those left
        counts = [train_subset // 10 + (c < train_subset % 10) for c in range(10)]
        keep = np.sort(np.concatenate([rest[labels[rest] == c][:counts[c]] for c in range(10)]))
        np.testing.assert_array_equal(dataset.y_train, labels[keep])
        np.testing.assert_allclose(dataset.x_train[..., 0], images[keep] / 255.0, rtol=1e-6)
    assert len(dataset.y_test) == 20 and not set(held.tolist()) & set(rest.tolist())
    with pytest.raises(ValueError, match="validation_size 201 is larger than the training set"):
        ki_data.load_dataset("mnist", data_dir=str(tmp_path), validation_size=201)


def test_cifar10_python_batches_are_standardized_per_channel(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
        images[:, 1] //= 2  # channels with different statistics
        labels = list(rng.integers(0, 10, 8))
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": images.reshape(8, -1), b"labels": labels}, handle)
        batches[name] = (images.transpose(0, 2, 3, 1), labels)
    dataset = ki_data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert dataset.x_train.shape == (40, 32, 32, 3) and dataset.x_test.shape == (8, 32, 32, 3)
    train = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).astype(np.float64) / 255
    mean, std = train.mean(axis=(0, 1, 2)), train.std(axis=(0, 1, 2))
    np.testing.assert_allclose(dataset.x_train, (train - mean) / std, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dataset.x_test, (batches["test_batch"][0] / 255 - mean) / std, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(dataset.y_test, batches["test_batch"][1])


class _RunsCode:
    """Pickles as a call of ``os.mkdir`` on a marker: what loading a crafted file would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_crafted_cifar_batch_is_refused_without_running_its_code(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                         b"labels": [int(v) for v in rng.integers(0, 10, 4)], b"batch_label": b"batch",
                         b"filenames": [b"a.png"] * 4}, handle, protocol=protocol)
    assert ki_data.load_dataset("cifar10", data_dir=str(tmp_path)).x_train.shape == (20, 32, 32, 3)
    marker = tmp_path / "ran"
    with open(folder / "data_batch_3", "wb") as handle:
        pickle.dump({b"data": _RunsCode(str(marker)), b"labels": [0]}, handle, protocol=protocol)
    with pytest.raises(ki_data.UnsafePickleError, match=r"data_batch_3 is not a CIFAR-10 batch: its pickle names "
                                                        r"(os|posix)\.mkdir"):
        ki_data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert not marker.exists()
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3 is not a CIFAR-10 batch"):
        ki_data.load_dataset("cifar10", data_dir=str(tmp_path))
    with open(folder / "data_batch_3", "wb") as handle:
        pickle.dump([1, 2], handle)
    with pytest.raises(ValueError, match=r"expected a dict with b'data'"):
        ki_data.read_cifar_batch(folder / "data_batch_3")


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tensorflow_datasets_path_under_mock_data(name, shape, tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=30):
        dataset = ki_data.load_dataset(name, data_dir=str(tmp_path))  # no local files there: tfds.load
    assert dataset.source == "tensorflow-datasets"
    assert dataset.x_train.shape == (30, *shape) and dataset.x_test.shape == (30, *shape)
    assert dataset.x_train.dtype == np.float32 and dataset.y_train.dtype == np.int32
    assert dataset.y_train.min() >= 0 and dataset.y_train.max() < 10
    if name == "mnist":
        assert 0.0 <= dataset.x_train.min() and dataset.x_train.max() <= 1.0
    else:
        np.testing.assert_allclose(dataset.x_train.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
        np.testing.assert_allclose(dataset.x_train.std(axis=(0, 1, 2)), 1.0, atol=1e-3)


@pytest.mark.parametrize("name, hint", [
    ("fashion_mnist", "apt-get install dataset-fashion-mnist"),
    ("mnist", "--data-dir"),
    ("cifar10", "cifar-10-batches-py"),
])
def test_unavailable_dataset_says_how_to_get_it(name, hint, tmp_path, monkeypatch, offline_tfds):
    monkeypatch.setattr(names, "SYSTEM_DIRS", {k: () for k in ki_data.SYSTEM_DIRS})

    with pytest.raises(ki_data.DatasetUnavailableError, match="could not load it") as raised:
        ki_data.load_dataset(name, data_dir=str(tmp_path))
    assert hint in str(raised.value) and str(tmp_path) in str(raised.value)
    with pytest.raises(ki_data.DatasetUnavailableError, match="not on this machine"):
        ki_data.load_dataset(name, allow_download=False)


def test_offline_tfds_fails_fast_without_network(monkeypatch, tmp_path):
    monkeypatch.setattr(ki_data, "_network_reachable", lambda *a, **k: False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ki_data.DatasetUnavailableError, match="no network"):
        ki_data.load_dataset("mnist", data_dir=str(tmp_path / "empty"))


@pytest.mark.parametrize("what", ["missing", "file"])
def test_a_data_dir_that_is_not_a_directory_is_refused(what, tmp_path, monkeypatch):
    # Not silently replaced by a system directory (a run would record a data_dir its data did not come from).
    system = tmp_path / "system"
    system.mkdir()
    _write_idx_dir(str(system))
    monkeypatch.setattr(names, "SYSTEM_DIRS", {**ki_data.SYSTEM_DIRS, "fashion_mnist": (str(system),)})
    given = tmp_path / "given"
    if what == "file":
        given.write_text("not a directory")
    message = "does not exist" if what == "missing" else "is not a directory"
    with pytest.raises(ki_data.DatasetUnavailableError, match=f"data_dir {given} {message}: .*leave it out to use "
                                                              f"{system}"):
        ki_data.load_dataset("fashion_mnist", data_dir=str(given))
    assert ki_data.load_dataset("fashion_mnist").source == str(system)  # without data_dir, the system directory


def test_a_data_dir_without_the_files_does_not_fall_back_on_a_system_directory(tmp_path, monkeypatch, offline_tfds):
    system = tmp_path / "system"
    system.mkdir()
    _write_idx_dir(str(system))
    monkeypatch.setattr(names, "SYSTEM_DIRS", {**ki_data.SYSTEM_DIRS, "fashion_mnist": (str(system),)})
    given = tmp_path / "given"
    given.mkdir()
    ki_data.write_idx(given / "train-images-idx3-ubyte.gz", np.zeros((3, 2, 2), np.uint8))  # one of the four

    with pytest.raises(ki_data.DatasetUnavailableError) as raised:
        ki_data.load_dataset("fashion_mnist", data_dir=str(given))
    message = str(raised.value)
    assert (f"data_dir {given} does not hold fashion_mnist's files (it lacks train-labels-idx1-ubyte, "
            f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte); leave data_dir out to use {system}") in message
    assert "tensorflow-datasets could not load it (ConnectionError: no network" in message
    with pytest.raises(ki_data.DatasetUnavailableError, match=f"not on this machine \\(data_dir {given} does not"):
        ki_data.load_dataset("fashion_mnist", data_dir=str(given), allow_download=False)


def test_balanced_subset_range():
    assert ki_data.balanced_subset_range([6000] * 10) == (10, 60000)
    assert ki_data.balanced_subset_range([5, 7, 4, 4]) == (4, 4 * 4 + 2)  # classes 0 and 1 can give one more
    labels = np.repeat(np.arange(4), [5, 7, 4, 4])
    assert len(ki_data.class_balanced_subset(labels, 18, 4)) == 18
    with pytest.raises(ValueError, match=r"class 2 has only 4 examples, 5 needed \(a class-balanced subset of these "
                                          "20 examples holds from 4 to 18\\)"):
        ki_data.class_balanced_subset(labels, 19, 4)
    with pytest.raises(ValueError, match=r"smaller than the number of classes \(4\)"):
        ki_data.class_balanced_subset(labels, 3, 4)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        ki_data.load_dataset("svhn")


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist():
    from keras_implicit.training import TRAIN_CLASS_COUNTS

    _, y_train, _, _ = ki_data.load_idx_dir("/usr/share/datasets/fashion-mnist")
    assert tuple(np.bincount(y_train).tolist()) == TRAIN_CLASS_COUNTS["fashion_mnist"]  # what validation assumes
    dataset = ki_data.load_dataset("fashion_mnist", train_subset=1000)
    assert dataset.source == "/usr/share/datasets/fashion-mnist"
    assert dataset.x_train.shape == (1000, 28, 28, 1) and dataset.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(dataset.y_test).tolist() == [1000] * 10
