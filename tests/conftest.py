"""Shared test setup: quiet TensorFlow, and the panel paths (keras.ops everywhere, the fused op on TensorFlow)."""

import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# What TensorFlow and tensorflow-datasets leave in the system's temporary directory (autograph's
# __autograph_generated_file*.py, tfds' tmp*tfds folders) goes to one folder of this session instead, removed
# when the session ends; child processes inherit it through TMPDIR. pytest's own tmp_path stays where it was.
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
_SESSION_TMP = tempfile.mkdtemp(prefix="keras-implicit-tests-")
os.environ["TMPDIR"] = tempfile.tempdir = _SESSION_TMP

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The fused op is a TensorFlow-backend accelerator: on the other backends only the keras.ops path exists.
PANEL_PATHS = ("keras", "op") if keras.backend.backend() == "tensorflow" else ("keras",)


def _op_available() -> bool:
    from keras_implicit import _dispatch

    try:
        return _dispatch.panel_kernel("op") is not None
    except RuntimeError:
        return False


@pytest.fixture(params=PANEL_PATHS)
def panel_path(request):
    """Runs a test once on the ``keras.ops`` path and once on the fused op (TensorFlow backend only).

    The op path is skipped where the op is not built, unless KERAS_IMPLICIT_REQUIRE_OP=1 (CI sets it),
    where a missing op fails the test.
    """
    import keras_implicit as ki

    path = request.param
    if path == "op":
        if not _op_available():
            if os.environ.get("KERAS_IMPLICIT_REQUIRE_OP") == "1":
                pytest.fail("KERAS_IMPLICIT_REQUIRE_OP=1 but the fused op could not be loaded")
            pytest.skip("the fused op is not built (make -C custom_ops)")
    with ki.force_path(path):
        yield path


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    """A learnable 10-class problem in the four gzipped IDX files of (Fashion-)MNIST: 1200 + 200 images of 10 x 10
    (experiments/run.py end to end; tests/test_training.py has a smaller one of its own)."""
    from keras_implicit import data as ki_data

    directory = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    prototypes = rng.uniform(0, 255, size=(10, 10, 10))
    for split, count in (("train", 1200), ("test", 200)):
        labels = (np.arange(count) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = np.clip(prototypes[labels] + rng.normal(0, 60, (count, 10, 10)), 0, 255).astype(np.uint8)
        images_name, labels_name = ki_data.IDX_FILES[split]
        ki_data.write_idx(os.path.join(directory, images_name + ".gz"), images)
        ki_data.write_idx(os.path.join(directory, labels_name + ".gz"), labels)
    return str(directory)


@pytest.fixture
def offline_tfds(monkeypatch):
    """tensorflow-datasets as on a machine without a network: every download attempt fails."""
    from keras_implicit import data as ki_data

    def offline(*args):
        raise ConnectionError("no network to download it")

    monkeypatch.setattr(ki_data, "_load_tfds", offline)


def pytest_unconfigure(config):
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)
