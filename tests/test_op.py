"""The fused panel op (custom_ops/, keras_implicit/_op.py): values, gradients, loading and fallbacks.

The op is compared with the pure-TensorFlow path (the one TF definition of the formulas) and with the
independent float64 references of tests/references.py. Tests that need the compiled op skip when it is not
built, unless KERAS_IMPLICIT_REQUIRE_OP=1 (CI), where they fail. Loading and fallback tests run in child
processes: a process loads the library (and registers its gradient) once.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_implicit as ki
from keras_implicit import _op, losses
from tests.references import ref_error, ref_gcdf, ref_hinge

ROOT = Path(__file__).resolve().parents[1]
SIGMAS = (0.0, 0.0625, 0.5, 1.0, 8.0, 16.0)
TEMPERATURES = (0.25, 1.0, 4.0, 16.0)
MARGINS = (0.0, 0.25, 1.0, 16.0)


def _op_unavailable() -> str | None:
    """Why the op cannot be used here, or None."""
    with _op.force_path("op"):
        try:
            return None if _op.panel_op() is not None else "inside XLA"
        except RuntimeError as error:
            return str(error)


def _op_loaded() -> bool:
    return _op_unavailable() is None


@pytest.fixture
def fused():
    """The op's Python wrapper; skips (or fails under KERAS_IMPLICIT_REQUIRE_OP=1) when it is unavailable."""
    reason = _op_unavailable()
    if reason is not None:
        if os.environ.get("KERAS_IMPLICIT_REQUIRE_OP") == "1":
            pytest.fail(f"KERAS_IMPLICIT_REQUIRE_OP=1 but {reason}")
        pytest.skip(reason)
    return _op.fused_panel


def _both_paths(labels, logits, feature_norm=None, sigmas=SIGMAS, temperatures=TEMPERATURES, margins=MARGINS,
                error=True):
    values = {}
    for path in ("tf", "op"):
        with _op.force_path(path):
            values[path] = losses.panel_values(
                labels, logits, sigmas, temperatures, margins, error, feature_norm=feature_norm
            ).numpy()
    return values["tf"], values["op"]


def ref_tce(labels, logits, temperature):
    """-log softmax(s / T)_y = log(1 + sum_{j != y} exp(d_j / T)) in float64, accurate for tiny losses too
    (scipy's log_softmax subtracts two nearly equal numbers there)."""
    out = np.zeros(len(labels))
    for b, y in enumerate(labels):
        row = np.asarray(logits[b], np.float64)
        scaled = np.delete(row - row[y], y) / temperature
        top = scaled.max()
        if top > 0:
            out[b] = top + np.log(np.exp(-top) + np.exp(scaled - top).sum())
        else:
            out[b] = np.log1p(np.exp(scaled).sum())
    return out


def _reference(labels, logits, feature_norm=None, sigmas=SIGMAS, temperatures=TEMPERATURES, margins=MARGINS):
    columns = [ref_gcdf(labels, logits, s, feature_norm) for s in sigmas]
    columns += [ref_tce(labels, logits, t) for t in temperatures]
    columns += [ref_hinge(labels, logits, g) for g in margins]
    columns.append(ref_error(labels, logits))
    return np.stack(columns, axis=-1)


def _special_batch(classes, dtype, seed=0):
    """Random logits plus rows with ties, a far tail, a tiny loss, huge logits and a NaN."""
    rng = np.random.default_rng(seed + classes)
    batch = 64
    logits = rng.normal(0.0, 3.0, (batch, classes))
    labels = rng.integers(0, classes, batch)
    logits[0] = 1.5  # every class tied
    labels[0] = classes - 1
    logits[1, :] = 0.0
    logits[1, labels[1]] = 10.0 * np.sqrt(2) * 0.5  # Gcdf(0.5) = (C-1) Phi(-10)
    logits[2, :] = -40.0
    logits[2, labels[2]] = 40.0  # tempered CE ~ (C-1) e^-80 at T = 1
    logits[3] *= 1e6  # huge logits
    logits[batch - 1, 0] = np.nan  # last: the rows above go through the op's 8-row blocks (<= 32 classes)
    return labels.astype(np.int32), logits.astype(dtype)


# --------------------------------------------------------------------------- #
# Values
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("classes", [2, 3, 10, 100, 1000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_op_equals_tensorflow_path_and_reference(fused, classes, dtype):
    labels, logits = _special_batch(classes, dtype)
    pure_tf, op = _both_paths(labels, logits)
    reference = _reference(labels, logits)
    nan_rows = np.isnan(logits).any(axis=1)
    assert np.isnan(op[nan_rows]).all() and np.isnan(pure_tf[nan_rows]).all()
    assert not np.isnan(op[~nan_rows]).any()
    tolerance = {np.float32: 2e-5, np.float64: 1e-11}[dtype]
    np.testing.assert_allclose(op[~nan_rows], pure_tf[~nan_rows], rtol=tolerance, atol=1e-35)
    np.testing.assert_allclose(op[~nan_rows], reference[~nan_rows], rtol=5 * tolerance, atol=1e-35)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_op_keeps_relative_accuracy_in_the_tails(fused, dtype):
    from scipy import stats

    labels, logits = _special_batch(10, dtype)
    _, op = _both_paths(labels, logits, sigmas=[0.5], temperatures=[1.0], margins=[])
    # Row 1: nine classes at z = -10 (Phi(-10) = 7.6e-24, relative accuracy 1e-4 in float32).
    np.testing.assert_allclose(op[1, 0], 9 * stats.norm.cdf(-10.0), rtol=1e-4)
    # Row 2: tempered CE = log(1 + 9 e^-80), relative.
    np.testing.assert_allclose(op[2, 1], 9 * np.exp(-80.0), rtol=1e-4)
    # Row 0: all tied: sigma -> anything gives (C-1)/2, the error counts the tie (label last).
    np.testing.assert_allclose(op[0, 0], 4.5, rtol=1e-6)
    assert op[0, 2] == 1.0


def test_op_sigma_zero_counts_winners_and_half_ties(fused):
    logits = np.array([[1.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 2.0, -1.0]], np.float32)
    labels = np.array([0, 2, 0], np.int32)
    values = fused(labels, logits, None, [0.0], [], [], True).numpy()
    np.testing.assert_array_equal(values, [[1.5, 1.0], [1.5, 1.0], [0.0, 0.0]])


@pytest.mark.parametrize("form", ["scalar", "per_sample", "column"])
def test_op_feature_norm_forms(fused, form):
    labels, logits = _special_batch(10, np.float32, seed=3)
    labels, logits = labels[:-1], logits[:-1]  # no NaN row
    rng = np.random.default_rng(1)
    norms = rng.uniform(0.2, 5.0, len(labels)).astype(np.float32)
    feature_norm = {"scalar": 2.5, "per_sample": norms, "column": norms[:, None]}[form]
    pure_tf, op = _both_paths(labels, logits, feature_norm=feature_norm, temperatures=[], margins=[])
    np.testing.assert_allclose(op, pure_tf, rtol=2e-5)
    reference_norm = 2.5 if form == "scalar" else norms
    reference = np.stack([ref_gcdf(labels, logits, s, reference_norm) for s in SIGMAS], -1)
    np.testing.assert_allclose(op[:, :-1], reference, rtol=1e-4, atol=1e-30)


@pytest.mark.parametrize("classes", [2, 10, 32, 33])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_op_row_blocks_equal_single_rows(fused, classes, dtype):
    # Up to 32 classes the op computes eight rows at a time (one vector lane per row); a batch of one row
    # takes the one-row kernel. Both must agree, with ties, far tails and per-sample norms.
    labels, logits = _special_batch(classes, dtype, seed=6)
    labels, logits = labels[:16], logits[:16]
    norms = np.random.default_rng(6).uniform(0.5, 2.0, 16).astype(dtype)
    together = fused(labels, logits, norms, SIGMAS, TEMPERATURES, MARGINS, True).numpy()
    alone = np.concatenate([
        fused(labels[b:b + 1], logits[b:b + 1], norms[b:b + 1], SIGMAS, TEMPERATURES, MARGINS, True).numpy()
        for b in range(16)
    ])
    np.testing.assert_allclose(together, alone, rtol={np.float32: 1e-5, np.float64: 1e-13}[dtype], atol=1e-37)


def test_op_infinite_logits_follow_the_tensorflow_path(fused):
    inf = np.inf
    logits = np.array([[inf, 0.0, 1.0], [0.0, -inf, 1.0], [inf, inf, 0.0], [-inf, 0.0, 1.0]] * 4, np.float32)
    logits[8:] = np.random.default_rng(0).normal(size=(8, 3))  # a block of finite rows beside them
    labels = np.zeros(16, np.int32)
    pure_tf, op = _both_paths(labels, logits)
    np.testing.assert_array_equal(np.isnan(op), np.isnan(pure_tf))
    np.testing.assert_allclose(op, pure_tf, rtol=2e-5, atol=1e-35, equal_nan=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_op_reduce_sums_over_the_batch(fused, dtype):
    labels, logits = _special_batch(10, dtype, seed=5)
    labels, logits = labels[:-1], logits[:-1]
    per_sample = fused(labels, logits, None, SIGMAS, TEMPERATURES, MARGINS, True).numpy()
    summed = fused(labels, logits, None, SIGMAS, TEMPERATURES, MARGINS, True, reduce=True)
    assert summed.shape == (per_sample.shape[1],)
    assert summed.dtype == dtype
    np.testing.assert_allclose(summed.numpy(), per_sample.astype(np.float64).sum(0), rtol=1e-6)


def test_op_static_shapes_and_tf_function(fused):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, 7], tf.float32)])
    def panel(labels, logits):
        return fused(labels, logits, None, SIGMAS, TEMPERATURES, MARGINS, True)

    concrete = panel.get_concrete_function()
    assert concrete.output_shapes.as_list() == [None, len(SIGMAS) + len(TEMPERATURES) + len(MARGINS) + 1]
    labels, logits = _special_batch(7, np.float32, seed=2)
    np.testing.assert_allclose(panel(labels[:-1], logits[:-1]).numpy(), _both_paths(labels[:-1], logits[:-1])[0],
                               rtol=2e-5)


def test_op_rejects_bad_inputs(fused):
    logits = np.zeros((3, 4), np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside"):
        fused(np.array([0, 4, 1], np.int32), logits, None, [1.0], [], [], False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside"):
        fused(np.array([0, -1, 1], np.int32), logits, None, [1.0], [], [], False)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="labels"):
        fused(np.array([0, 1], np.int32), logits, None, [1.0], [], [], False)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="feature_norm|rank"):
        fused(np.array([0, 1, 2], np.int32), logits, tf.ones([2], tf.float32), [1.0], [], [], False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="sigma"):
        fused(np.array([0, 1, 2], np.int32), logits, None, [-1.0], [], [], False)


# --------------------------------------------------------------------------- #
# Gradients
# --------------------------------------------------------------------------- #
def _gradients(path, labels, logits, feature_norm, weights):
    logits = tf.constant(logits)
    norm = None if feature_norm is None else tf.constant(feature_norm)
    with _op.force_path(path), tf.GradientTape() as tape:
        tape.watch(logits)
        if norm is not None:
            tape.watch(norm)
        values = losses.panel_values(labels, logits, SIGMAS, TEMPERATURES, MARGINS, True, feature_norm=norm)
        total = tf.reduce_sum(values * weights)
    sources = [logits] if norm is None else [logits, norm]
    return [g.numpy() for g in tape.gradient(total, sources)]


@pytest.mark.parametrize("classes", [2, 10, 100])
@pytest.mark.parametrize("norm_form", [None, "per_sample"])
def test_op_gradient_equals_tensorflow_path(fused, classes, norm_form):
    rng = np.random.default_rng(classes)
    labels = rng.integers(0, classes, 32).astype(np.int32)
    logits = rng.normal(0, 3, (32, classes))
    logits[0] = 1.0  # ties: the hinge's kink and sigma = 0 (zero gradient)
    norm = None if norm_form is None else rng.uniform(0.5, 2.0, 32)
    columns = len(SIGMAS) + len(TEMPERATURES) + len(MARGINS) + 1
    weights = tf.constant(rng.uniform(-1, 1, (32, columns)))
    expected = _gradients("tf", labels, logits, norm, weights)
    actual = _gradients("op", labels, logits, norm, weights)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-9, atol=1e-12)


def test_op_gradient_matches_finite_differences(fused):
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 5, 6).astype(np.int32)
    logits = rng.normal(0, 2, (6, 5))
    norm = rng.uniform(0.5, 2.0, 6)

    weights = tf.constant(rng.uniform(0.5, 1.5, (6, 5)))

    def panel(logits, norm):
        values = fused(labels, logits, norm, [0.5, 2.0], [0.5, 3.0], [1.0], False)
        return tf.reduce_sum(values * weights, -1)

    theoretical, numerical = tf.test.compute_gradient(panel, [tf.constant(logits), tf.constant(norm)], delta=1e-6)
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-5, atol=1e-7)


def test_op_gradient_with_reduce_and_scalar_norm(fused):
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 4, 8).astype(np.int32)
    logits = tf.constant(rng.normal(0, 2, (8, 4)))
    norm = tf.constant(1.7, tf.float64)
    upstream = tf.constant(rng.uniform(0.5, 1.5, 6))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([logits, norm])
        summed = tf.reduce_sum(fused(labels, logits, norm, [0.5, 1.0], [2.0], [1.0, 2.0], True, reduce=True) * upstream)
        per_sample = tf.reduce_sum(fused(labels, logits, norm, [0.5, 1.0], [2.0], [1.0, 2.0], True) * upstream)
    for source in (logits, norm):
        np.testing.assert_allclose(tape.gradient(summed, source).numpy(), tape.gradient(per_sample, source).numpy(),
                                   rtol=1e-10)


def test_losses_train_on_the_op(fused):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    y = (x[:, :3].argmax(-1)).astype(np.int32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    with _op.force_path("op"):
        model.compile(keras.optimizers.SGD(0.5), loss=ki.losses.Gcdf(sigma=1.0), jit_compile=False)
        first = model.evaluate(x, y, verbose=0)
        model.fit(x, y, epochs=5, batch_size=32, verbose=0)
        last = model.evaluate(x, y, verbose=0)
    assert last < 0.7 * first


# --------------------------------------------------------------------------- #
# XLA: the pure-TensorFlow path is taken automatically
# --------------------------------------------------------------------------- #
def test_xla_takes_the_tensorflow_path_even_when_the_op_is_forced():
    labels, logits = _special_batch(10, np.float32, seed=4)
    labels, logits = labels[:-1], logits[:-1]
    with _op.force_path("tf"):
        expected = losses.panel_values(labels, logits, SIGMAS, TEMPERATURES, MARGINS, True).numpy()
    for path in [None] + (["op"] if _op_loaded() else []):

        @tf.function(jit_compile=True)
        def panel(labels, logits):
            assert _op.in_xla_context()
            return losses.panel_values(labels, logits, SIGMAS, TEMPERATURES, MARGINS, True)

        with _op.force_path(path):
            np.testing.assert_allclose(panel(labels, logits).numpy(), expected, rtol=1e-5, atol=1e-30)
    assert not _op.in_xla_context()


def test_keras_jit_compile_trains_with_the_panel():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(512, 12)).astype(np.float32)
    y = (x[:, :4].argmax(-1)).astype(np.int32)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(4)])
    model.compile(
        keras.optimizers.SGD(0.1, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=ki.alt_loss_panel(),
        jit_compile=True,
    )
    history = model.fit(x, y, epochs=3, batch_size=64, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    with _op.force_path("tf"):
        expected = losses.panel_values(y, model.predict(x, verbose=0), *_default_grid(), error=True).numpy().mean(0)
    names = losses.panel_names(*_default_grid(), error=True)
    np.testing.assert_allclose([logs[name] for name in names], expected, rtol=1e-4, atol=1e-6)


def _default_grid():
    from keras_implicit import metrics

    return metrics.DEFAULT_SIGMAS, metrics.DEFAULT_TEMPERATURES, metrics.DEFAULT_MARGINS


# --------------------------------------------------------------------------- #
# Loading and fallbacks (child processes)
# --------------------------------------------------------------------------- #
_CHILD = textwrap.dedent(
    """
    import json, logging, os, sys
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(message)s", stream=sys.stdout)
    from keras_implicit import _op, losses
    setup = os.environ.get("CHILD_SETUP", "")
    if setup:
        _op._LIBRARY = _op._LIBRARY_AVX2 = Path(setup)
    values = [losses.panel_values([0, 1], [[2.0, 0.0], [0.0, 1.0]], [1.0], [1.0], [1.0], True).numpy().tolist()
              for _ in range(3)]
    forced = None
    try:
        with _op.force_path("op"):
            _op.panel_op()
    except RuntimeError as error:
        forced = str(error)
    print("RESULT " + json.dumps({"path": _op.active_path(), "values": values, "forced_error": forced,
                                   "load_error": _op.load_error()}))
    """
)


def _child(env_extra, setup=""):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_IMPLICIT_PURE_TF"}
    env.update(env_extra, CHILD_SETUP=setup, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[7:])
    logs = [line for line in lines if line.startswith("LOG ") and "alternative-loss panel uses" in line]
    return result, logs


def test_pure_tf_environment_variable_selects_the_tensorflow_path():
    result, logs = _child({"KERAS_IMPLICIT_PURE_TF": "1"})
    assert result["path"] == "tf"
    assert "KERAS_IMPLICIT_PURE_TF" in result["forced_error"]
    assert len(logs) == 1 and "pure-TensorFlow" in logs[0] and "KERAS_IMPLICIT_PURE_TF=1" in logs[0]


def test_missing_library_falls_back_with_one_log_line(tmp_path):
    result, logs = _child({}, setup=str(tmp_path / "missing_panel_op.so"))
    assert result["path"] == "tf"
    assert "not built" in result["forced_error"]
    assert len(logs) == 1 and logs[0].startswith("LOG INFO") and "pure-TensorFlow" in logs[0]
    from scipy import stats

    np.testing.assert_allclose(result["values"][0][0][0], stats.norm.cdf(-2 / np.sqrt(2)), rtol=1e-6)


def test_library_that_does_not_load_falls_back_with_a_warning(tmp_path):
    broken = tmp_path / "_panel_op.so"
    broken.write_bytes(b"\x7fELF not a library built for this TensorFlow")
    result, logs = _child({}, setup=str(broken))
    assert result["path"] == "tf"
    assert "could not be loaded" in result["load_error"]
    assert "could not be loaded" in result["forced_error"]
    assert len(logs) == 1 and logs[0].startswith("LOG WARNING")
    assert result["values"][0] == result["values"][2]


def test_built_library_is_used_with_one_log_line(fused):
    result, logs = _child({})
    assert result["path"] == "op" and result["forced_error"] is None
    assert len(logs) == 1 and "fused C++ op" in logs[0]


def test_force_path_rejects_unknown_paths():
    with pytest.raises(ValueError, match="path"):
        with _op.force_path("gpu"):
            pass


# --------------------------------------------------------------------------- #
# Benchmark smoke test (timing is in benchmarks/, never asserted here)
# --------------------------------------------------------------------------- #
@pytest.mark.benchmark
def test_panel_benchmark_runs(tmp_path):
    out = tmp_path / "panel.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "panel.py"), "--sizes", "2000x10", "--repeats", "1",
         "--batch-size", "1000", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert results[0]["rows"] == 2000 and {"separate", "vectorized", "forward"} <= set(results[0]["median_s"])
