"""The package itself (keras_implicit/__init__.py): its public surface, and the registration of its Keras classes,
which must happen after a plain ``import keras_implicit`` in any order with ``import keras`` without the package
importing Keras (or TensorFlow) by itself."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_implicit as ki

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_every_public_name_resolves():
    for name in ki.__all__:
        assert getattr(ki, name) is not None, name
    assert set(dir(ki)) == set(ki.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        ki.nonexistent  # noqa: B018


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A model that holds one object of every registered kind: the models' layer (L2Normalization in fc6), the
    ghost-batch model, a loss, the panel and the single-family metrics; with its evaluation here."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, 64).astype(np.int32)
    model = ki.ghost_batch_model(ki.make_model("fc6", (8, 8, 1), 10, seed=0), ghost_batch_size=16)
    model.compile(keras.optimizers.SGD(0.1), ki.losses.MulticlassHinge(margin=2.0),
                  metrics=[ki.alt_loss_panel(sigmas=[0.5, 4], temperatures=[2], margins=[1]),
                           ki.metrics.Gcdf(sigma=1.0), ki.metrics.TemperedCrossentropy(temperature=3.0),
                           ki.metrics.MulticlassHinge(margin=0.5)])
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    path = tmp_path_factory.mktemp("saved") / "model.keras"
    model.save(path)
    data = tmp_path_factory.mktemp("saved") / "data.npz"
    np.savez(data, x=x, y=y)
    return path, data, model.evaluate(x, y, verbose=0, return_dict=True)


IMPORT_ORDERS = (
    "import keras; import keras_implicit",
    "import keras_implicit; import keras",
    "import keras_implicit.analysis; import keras",  # the TensorFlow-free module first
    "import keras_implicit.metrics",  # a submodule that imports Keras in the middle of its own import
)


def test_a_saved_model_loads_in_a_fresh_process_after_a_plain_import(saved_model):
    path, data, expected = saved_model
    children = {imports: _child(f"""
        {imports}
        import json, sys
        import keras, numpy as np
        assert not any(type(f).__name__ == "_KerasRegistration" for f in sys.meta_path)  # done: uninstalled
        model = keras.models.load_model({str(path)!r})
        arrays = np.load({str(data)!r})
        print("RESULT " + json.dumps([type(model).__name__,
                                      model.evaluate(arrays["x"], arrays["y"], verbose=0, return_dict=True)]))
    """) for imports in IMPORT_ORDERS}  # side by side: each is mostly TensorFlow's start
    for imports, child in children.items():
        stdout, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, f"{imports}: {stderr[-3000:]}"
        kind, values = json.loads(stdout.splitlines()[-1][len("RESULT "):])
        assert kind == "GhostBatchModel", imports
        assert set(values) == set(expected), imports
        for name, value in expected.items():
            np.testing.assert_allclose(values[name], value, rtol=1e-5, err_msg=f"{imports}: {name}")


def test_importing_the_package_alone_imports_no_keras():
    child = _child("""
        import sys
        import keras_implicit, keras_implicit.analysis, keras_implicit.plots, keras_implicit.sweep
        print(sorted(name for name in ("keras", "tensorflow", "jax") if name in sys.modules))
    """)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr[-3000:]
    assert stdout.strip().splitlines()[-1] == "[]"
