"""The fused panel op (custom_ops/, keras_implicit/_op.py): values, gradients, loading and fallbacks.

The op is compared with the keras.ops path (the one definition of the formulas) and with the
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
from keras_implicit import _dispatch, _op, losses
from tests.backend import kernel_or_skip
from tests.references import ref_error, ref_gcdf, ref_hinge

ROOT = Path(__file__).resolve().parents[1]
SIGMAS = (0.0, 0.0625, 0.5, 1.0, 8.0, 16.0)
TEMPERATURES = (0.25, 1.0, 4.0, 16.0)
MARGINS = (0.0, 0.25, 1.0, 16.0)


def _op_unavailable() -> str | None:
    """Why the op cannot be used here, or None."""
    try:
        return None if _dispatch.panel_kernel("op") is not None else "inside XLA"
    except RuntimeError as error:
        return str(error)


def _op_loaded() -> bool:
    return _op_unavailable() is None


@pytest.fixture
def fused():
    """The op's Python wrapper; skips (or fails under KERAS_IMPLICIT_REQUIRE_OP=1) when it is unavailable."""
    return kernel_or_skip(_op_unavailable(), _op.fused_panel)


def _both_paths(labels, logits, feature_norm=None, sigmas=SIGMAS, temperatures=TEMPERATURES, margins=MARGINS,
                error=True):
    values = {}
    for path in ("keras", "op"):
        with _dispatch.force_path(path):
            values[path] = losses.panel_values(
                labels, logits, sigmas, temperatures, margins, error, feature_norm=feature_norm
            ).numpy()
    return values["keras"], values["op"]


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
    logits[batch - 1, 0] = np.nan  # last: the rows above go through the op's 8-row blocks (<= 4096 classes)
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
    # A hinge of C - 1 equal terms summed one after another rounds by up to (C - 1) eps (a sequential sum's bound).
    tolerance = max({np.float32: 2e-5, np.float64: 1e-11}[dtype], (classes - 1) * float(np.finfo(dtype).eps))
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


@pytest.mark.parametrize("classes", [2, 10, 100, 4097])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_op_row_blocks_equal_single_rows(fused, classes, dtype):
    # Up to panel_math.h's kBlockMaxClasses (4096) classes the op computes 8 rows at a time (4 in float64 with
    # AVX: one vector lane per row), forward and backward; a batch of one row takes the one-row kernel, and so do
    # wider rows. Both must agree, with ties, far tails, per-sample norms, a block holding an infinite logit and a
    # NaN row (which takes the row path), and upstream columns that are 0 in every row or in some.
    labels, logits = _special_batch(classes, dtype, seed=6)
    labels, logits = labels[:24], logits[:24]
    logits[17, 1] = np.inf
    logits[23, 0] = np.nan
    norms = np.random.default_rng(6).uniform(0.5, 2.0, 24).astype(dtype)
    columns = len(SIGMAS) + len(TEMPERATURES) + len(MARGINS) + 1
    weights = np.random.default_rng(7).uniform(-1, 1, (24, columns)).astype(dtype)
    weights[:, 3] = 0.0
    weights[::2, 12] = 0.0

    def values_and_gradients(rows):
        x, n = tf.constant(logits[rows]), tf.constant(norms[rows])
        with tf.GradientTape() as tape:
            tape.watch([x, n])
            values = fused(labels[rows], x, n, SIGMAS, TEMPERATURES, MARGINS, True)
            total = tf.reduce_sum(values * weights[rows])
        return [values.numpy()] + [g.numpy() for g in tape.gradient(total, [x, n])]

    together = values_and_gradients(slice(None))
    alone = [np.concatenate(parts) for parts in zip(*(values_and_gradients(slice(b, b + 1)) for b in range(24)))]
    rtol = {np.float32: 1e-5, np.float64: 1e-13}[dtype]
    np.testing.assert_allclose(together[0], alone[0], rtol=rtol, atol=1e-37)
    finite = np.isfinite(logits).all(axis=1)
    scale = np.abs(alone[1][finite]).max()
    np.testing.assert_allclose(together[1][finite], alone[1][finite], rtol=10 * rtol, atol=10 * rtol * scale)
    np.testing.assert_allclose(together[2][finite], alone[2][finite], rtol=10 * rtol)


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


# The op validates its own inputs (both kernels), also where the Python side cannot (shapes known only when
# it runs, direct calls of _op.fused_panel or of the raw op). Before this check a feature_norm <= 0 gave a
# Gcdf of 7.76 for a 2-class row (its bound is 1), and one class under a dynamic shape gave NaN.
_VALID = {"labels": [0, 1, 1, 0, 1, 0, 1, 1, 0], "classes": 2, "feature_norm": 1.0, "sigmas": [0.5, 1.0],
          "temperatures": [1.0], "margins": [0.0, 1.0]}
_INVALID = {
    "norm_zero": ({"feature_norm": 0.0}, r"feature_norm must be finite and > 0, got 0"),
    "norm_negative": ({"feature_norm": -0.5}, r"feature_norm must be finite and > 0, got -0.5"),
    "norm_nan": ({"feature_norm": np.nan}, r"feature_norm must be finite and > 0, got nan"),
    "norm_inf": ({"feature_norm": np.inf}, r"feature_norm must be finite and > 0, got inf"),
    "norm_one_sample_zero": ({"feature_norm": [1.0, 2.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]},
                             r"feature_norm\[2\] must be finite and > 0, got 0"),
    "norm_one_sample_negative": ({"feature_norm": [1.0] * 8 + [-3.0]}, r"feature_norm\[8\] must be finite"),
    "one_class": ({"classes": 1, "labels": [0] * 9}, r"logits must have at least 2 classes, got shape \[9,1\]"),
    "label_too_large": ({"labels": [0, 1, 2, 0, 1, 0, 1, 1, 0]}, r"labels\[2\] = 2 is outside \[0, 2\)"),
    "label_negative": ({"labels": [0, 1, 1, 0, 1, 0, 1, 1, -1]}, r"labels\[8\] = -1 is outside \[0, 2\)"),
    "sigma_negative": ({"sigmas": [0.5, -1.0]}, r"sigmas\[1\] must be finite and >= 0, got -1"),
    "sigma_nan": ({"sigmas": [np.nan]}, r"sigmas\[0\] must be finite and >= 0, got nan"),
    "sigma_inf": ({"sigmas": [np.inf]}, r"sigmas\[0\] must be finite"),
    "temperature_zero": ({"temperatures": [0.0]}, r"temperatures\[0\] must be finite and > 0, got 0"),
    "temperature_negative": ({"temperatures": [1.0, -2.0]}, r"temperatures\[1\] must be finite and > 0"),
    "temperature_inf": ({"temperatures": [np.inf]}, r"temperatures\[0\] must be finite"),
    "margin_negative": ({"margins": [-0.25]}, r"margins\[0\] must be finite and >= 0, got -0.25"),
    "margin_nan": ({"margins": [1.0, np.nan]}, r"margins\[1\] must be finite and >= 0, got nan"),
}
_CALLS = ("fused_panel", "fused_panel_in_function", "raw_op_in_function", "raw_grad", "raw_grad_in_function")


def _call_op(call, dtype, labels, classes, feature_norm, sigmas, temperatures, margins):
    """The op's values (or gradient) through one of _CALLS; the functions have dynamic batch and class
    dimensions (input_signature with None) and a feature_norm of unknown rank."""
    labels = np.asarray(labels, np.int32)
    logits = np.random.default_rng(0).normal(0.0, 2.0, (len(labels), classes)).astype(dtype)
    norm = np.asarray(feature_norm, dtype)
    columns = len(sigmas) + len(temperatures) + len(margins) + 1
    parameters = [tf.constant(np.asarray(p, np.float64).reshape(-1)) for p in (sigmas, temperatures, margins)]
    module = _op._load()
    spec = [tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, None], dtype), tf.TensorSpec(None, dtype)]
    spec_parameters = [tf.TensorSpec([None], tf.float64)] * 3
    if call == "fused_panel":
        return _op.fused_panel(labels, logits, norm, sigmas, temperatures, margins, True)
    if call == "fused_panel_in_function":
        function = tf.function(lambda y, s, n: _op.fused_panel(y, s, n, sigmas, temperatures, margins, True),
                               input_signature=spec)
        assert function.get_concrete_function().structured_outputs.shape.as_list() == [None, columns]
        return function(labels, logits, norm)
    if call == "raw_op_in_function":
        function = tf.function(lambda y, s, n, *p: module.keras_implicit_panel(s, y, n, *p, error=True),
                               input_signature=spec + spec_parameters)
        return function(labels, logits, norm, *parameters)
    upstream = np.ones((len(labels), columns), dtype)
    if call == "raw_grad":
        return module.keras_implicit_panel_grad(upstream, logits, labels, norm, *parameters, error=True)[0]
    function = tf.function(
        lambda g, y, s, n, *p: module.keras_implicit_panel_grad(g, s, y, n, *p, error=True)[0],
        input_signature=[tf.TensorSpec([None, None], dtype)] + spec + spec_parameters,
    )
    return function(upstream, labels, logits, norm, *parameters)


@pytest.mark.parametrize("call", _CALLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_op_accepts_valid_inputs_in_every_call(fused, call, dtype):
    values = _call_op(call, dtype, **_VALID).numpy()
    assert values.shape == ((9, 6) if "grad" not in call else (9, 2)) and np.isfinite(values).all()
    if "grad" not in call:  # Gcdf(sigma) of a 2-class row is one Phi: within [0, 1]
        assert ((values[:, :2] >= 0) & (values[:, :2] <= 1)).all()


@pytest.mark.parametrize("call", _CALLS)
@pytest.mark.parametrize("case", sorted(_INVALID))
def test_op_validates_its_inputs_in_both_kernels(fused, case, call):
    change, message = _INVALID[case]
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        _call_op(call, np.float32, **{**_VALID, **change})


def test_op_validates_inputs_in_float64_too(fused):
    for case in ("norm_zero", "norm_one_sample_negative", "one_class"):
        change, message = _INVALID[case]
        for call in ("fused_panel", "raw_grad_in_function"):
            with pytest.raises(tf.errors.InvalidArgumentError, match=message):
                _call_op(call, np.float64, **{**_VALID, **change})


# --------------------------------------------------------------------------- #
# Gradients
# --------------------------------------------------------------------------- #
def _gradients(path, labels, logits, feature_norm, weights):
    logits = tf.constant(logits)
    norm = None if feature_norm is None else tf.constant(feature_norm)
    with _dispatch.force_path(path), tf.GradientTape() as tape:
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
    expected = _gradients("keras", labels, logits, norm, weights)
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
    with _dispatch.force_path("op"):
        model.compile(keras.optimizers.SGD(0.5), loss=ki.losses.Gcdf(sigma=1.0), jit_compile=False)
        first = model.evaluate(x, y, verbose=0)
        model.fit(x, y, epochs=5, batch_size=32, verbose=0)
        last = model.evaluate(x, y, verbose=0)
    assert last < 0.7 * first


# --------------------------------------------------------------------------- #
# XLA: the keras.ops path is taken automatically
# --------------------------------------------------------------------------- #
def test_xla_takes_the_tensorflow_path_even_when_the_op_is_forced():
    labels, logits = _special_batch(10, np.float32, seed=4)
    labels, logits = labels[:-1], logits[:-1]
    with _dispatch.force_path("keras"):
        expected = losses.panel_values(labels, logits, SIGMAS, TEMPERATURES, MARGINS, True).numpy()
    for path in [None] + (["op"] if _op_loaded() else []):

        @tf.function(jit_compile=True)
        def panel(labels, logits):
            assert _op.in_xla_context()
            return losses.panel_values(labels, logits, SIGMAS, TEMPERATURES, MARGINS, True)

        with _dispatch.force_path(path):
            np.testing.assert_allclose(panel(labels, logits).numpy(), expected, rtol=1e-5, atol=1e-30)
    assert not _op.in_xla_context()


@pytest.mark.variant_independent
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
    with _dispatch.force_path("keras"):
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
    from keras_implicit import _dispatch, _op, losses
    setup = os.environ.get("CHILD_SETUP", "")
    if setup:
        _op._LIBRARY = _op._LIBRARY_AVX2 = Path(setup)
    values = [losses.panel_values([0, 1], [[2.0, 0.0], [0.0, 1.0]], [1.0], [1.0], [1.0], True).numpy().tolist()
              for _ in range(3)]
    forced = None
    try:
        with _dispatch.force_path("op"):
            _dispatch.panel_kernel()
    except RuntimeError as error:
        forced = str(error)
    print("RESULT " + json.dumps({"path": _dispatch.active_path(), "values": values, "forced_error": forced,
                                   "load_error": _op.load_error()}))
    """
)


def _child(env_extra, setup=""):
    # The parent's KERAS_IMPLICIT_OP_VARIANT (.ci/run sets portable for a second run) is dropped: these
    # children test the default (auto), where a missing library falls back.
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_IMPLICIT_PURE_TF", "KERAS_IMPLICIT_OP_VARIANT")}
    # Only the package's libraries: no first-use build and no cached one (tests/test_build.py tests those).
    env.update(KERAS_IMPLICIT_NO_BUILD="1", KERAS_IMPLICIT_CACHE=os.devnull)
    env.update(env_extra, CHILD_SETUP=setup, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[7:])
    logs = [line for line in lines if line.startswith("LOG ") and "alternative-loss panel uses" in line]
    return result, logs


@pytest.mark.variant_independent
@pytest.mark.parametrize("variable,value", [("KERAS_IMPLICIT_PANEL_PATH", "keras"), ("KERAS_IMPLICIT_PURE_TF", "1")])
def test_environment_variable_selects_the_keras_path(variable, value, fused):
    result, logs = _child({variable: value})
    assert result["path"] == "keras"
    assert result["forced_error"] is None  # force_path("op") is explicit: it wins over the environment
    assert "keras.ops path" in logs[0] and f"{variable}={value}" in logs[0]


@pytest.mark.variant_independent
def test_missing_library_falls_back_with_one_log_line(tmp_path):
    result, logs = _child({}, setup=str(tmp_path / "missing_panel_op.so"))
    assert result["path"] == "keras"
    assert "not built" in result["forced_error"]
    assert len(logs) == 1 and logs[0].startswith("LOG INFO") and "keras.ops path" in logs[0]
    from scipy import stats

    np.testing.assert_allclose(result["values"][0][0][0], stats.norm.cdf(-2 / np.sqrt(2)), rtol=1e-6)


@pytest.mark.variant_independent
def test_library_that_does_not_load_falls_back_with_a_warning(tmp_path):
    broken = tmp_path / "_panel_op.so"
    broken.write_bytes(b"\x7fELF not a library built for this TensorFlow")
    result, logs = _child({}, setup=str(broken))
    assert result["path"] == "keras"
    assert "could not be loaded" in result["load_error"]
    assert "could not be loaded" in result["forced_error"]
    assert len(logs) == 1 and logs[0].startswith("LOG WARNING")
    assert result["values"][0] == result["values"][2]


@pytest.mark.variant_independent
def test_built_library_is_used_with_one_log_line(fused):
    result, logs = _child({})
    assert result["path"] == "op" and result["forced_error"] is None
    assert len(logs) == 1 and "fused C++ op" in logs[0]


# --------------------------------------------------------------------------- #
# KERAS_IMPLICIT_OP_VARIANT: which build is loaded
# --------------------------------------------------------------------------- #
_CPU_RUNS_AVX2 = _op._cpu_has("avx2", "fma")


@pytest.fixture
def package_builds_only(monkeypatch):
    """library_path() looks at the package's builds only (not at the first-use build cache)."""
    monkeypatch.setattr(_op, "build_cache_dir", lambda: None)


@pytest.mark.parametrize("value, variant", [(None, None), ("", None), ("auto", None), (" Portable ", "portable"),
                                            ("portable", "portable"), ("avx2", "avx2")])
def test_variant_names_the_library(monkeypatch, package_builds_only, tmp_path, value, variant):
    portable, avx2 = tmp_path / "_panel_op.so", tmp_path / "_panel_op_avx2.so"
    portable.write_bytes(b"")
    avx2.write_bytes(b"")
    monkeypatch.setattr(_op, "_LIBRARY", portable)
    monkeypatch.setattr(_op, "_LIBRARY_AVX2", avx2)
    monkeypatch.setattr(_op, "_cpu_has", lambda *flags: True)
    if value is None:
        monkeypatch.delenv("KERAS_IMPLICIT_OP_VARIANT", raising=False)
    else:
        monkeypatch.setenv("KERAS_IMPLICIT_OP_VARIANT", value)
    expected = variant or "avx2"  # auto: the AVX2 build where it is built and the CPU runs it
    assert _op.library_variant() == expected
    assert _op.library_path() == {"portable": portable, "avx2": avx2}[expected]
    if variant is None:  # auto without AVX2 on the CPU, or without the AVX2 build: the portable one
        monkeypatch.setattr(_op, "_cpu_has", lambda *flags: False)
        assert _op.library_path() == portable
        monkeypatch.setattr(_op, "_cpu_has", lambda *flags: True)
        avx2.unlink()
        assert _op.library_path() == portable


def test_variant_errors_are_clear_not_fallbacks(monkeypatch, package_builds_only, tmp_path):
    monkeypatch.setattr(_op, "_LIBRARY", tmp_path / "_panel_op.so")
    monkeypatch.setattr(_op, "_LIBRARY_AVX2", tmp_path / "_panel_op_avx2.so")
    monkeypatch.setenv("KERAS_IMPLICIT_OP_VARIANT", "avx512")
    with pytest.raises(ValueError,
                       match="KERAS_IMPLICIT_OP_VARIANT must be one of auto, portable, avx2, cuda, got 'avx512'"):
        _op.library_path()
    for variant, name in (("portable", "_panel_op.so"), ("avx2", "_panel_op_avx2.so")):
        monkeypatch.setattr(_op, "_cpu_has", lambda *flags: True)
        monkeypatch.setenv("KERAS_IMPLICIT_OP_VARIANT", variant)
        with pytest.raises(RuntimeError, match=f"KERAS_IMPLICIT_OP_VARIANT={variant}, but .*{name} is not built"):
            _op.library_path()
    (tmp_path / "_panel_op_avx2.so").write_bytes(b"")
    monkeypatch.setattr(_op, "_cpu_has", lambda *flags: False)
    with pytest.raises(RuntimeError, match="this CPU lacks AVX2 or FMA"):
        _op.library_variant()
    monkeypatch.setenv("KERAS_IMPLICIT_OP_VARIANT", "auto")  # auto: missing builds are not an error here
    assert _op.library_path() == tmp_path / "_panel_op.so"


def test_this_process_loads_the_requested_variant(fused):
    # Under .ci/run's second run (KERAS_IMPLICIT_OP_VARIANT=portable) every test above ran the portable build.
    requested = os.environ.get("KERAS_IMPLICIT_OP_VARIANT", "").strip().lower()
    variant = _op.library_variant()
    if requested in ("portable", "avx2"):
        assert variant == requested
    assert _op.library_path().name == {"portable": _op._LIBRARY.name, "avx2": _op._LIBRARY_AVX2.name}[variant]


# The values and gradients of one build, in a child (KERAS_IMPLICIT_OP_VARIANT set) or in this process.
_VARIANT_VALUES = textwrap.dedent(
    """
    def variant_values(SIGMAS, TEMPERATURES, MARGINS):
        import numpy as np
        import tensorflow as tf
        from keras_implicit import _op
        out = {"variant": _op.library_variant(), "library": _op.library_path().name, "values": {}, "grads": {}}
        rng = np.random.default_rng(3)
        for classes in (3, 10, 33, 1000):
            for dtype in ("float32", "float64"):
                labels = rng.integers(0, classes, 40).astype(np.int32)
                logits = tf.constant(rng.normal(0, 3, (40, classes)).astype(dtype))
                norm = tf.constant(rng.uniform(0.5, 2.0, 40).astype(dtype))
                with tf.GradientTape() as tape:
                    tape.watch(logits)
                    values = _op.fused_panel(labels, logits, norm, SIGMAS, TEMPERATURES, MARGINS, True)
                    total = tf.reduce_sum(values * tf.cast(tf.range(1, values.shape[1] + 1), values.dtype))
                key = f"{classes}/{dtype}"
                out["values"][key] = values.numpy().tolist()
                out["grads"][key] = tape.gradient(total, logits).numpy().tolist()
        return out
    """
)


def _variant_child(variant):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_IMPLICIT_PURE_TF"}
    env.update(KERAS_IMPLICIT_OP_VARIANT=variant, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    script = (_VARIANT_VALUES + "\nimport json\n"
              + f"print('RESULT ' + json.dumps(variant_values({SIGMAS!r}, {TEMPERATURES!r}, {MARGINS!r})))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)
    return done


def _variant_result(variant, here):
    """The build ``variant``'s values: this process's own where it uses that build (``here``), else a child's
    with KERAS_IMPLICIT_OP_VARIANT=variant."""
    if here["variant"] == variant:
        return here
    done = _variant_child(variant)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.mark.variant_independent
def test_portable_variant_loads_the_portable_build_and_matches_avx2(fused):
    if not _op._LIBRARY.exists():
        pytest.fail(f"{_op._LIBRARY} is not built (make -C custom_ops)")
    # This process uses one of the two builds (auto: AVX2 where it can; .ci/run's second run of this file:
    # portable): that one is measured here, the other in a child, instead of both in children.
    namespace = {}
    exec(_VARIANT_VALUES, namespace)
    here = json.loads(json.dumps(namespace["variant_values"](SIGMAS, TEMPERATURES, MARGINS)))
    portable = _variant_result("portable", here)
    assert portable["variant"] == "portable" and portable["library"] == "_panel_op.so"
    if not (_CPU_RUNS_AVX2 and _op._LIBRARY_AVX2.exists()):
        pytest.skip("no AVX2 build, or a CPU without AVX2 and FMA, to compare with")
    avx2 = _variant_result("avx2", here)
    assert avx2["variant"] == "avx2" and avx2["library"] == "_panel_op_avx2.so"
    for key in portable["values"]:
        tolerance = 2e-5 if key.endswith("float32") else 1e-11
        for part in ("values", "grads"):
            np.testing.assert_allclose(portable[part][key], avx2[part][key], rtol=tolerance, atol=1e-30,
                                       err_msg=f"{part} {key}")


@pytest.mark.variant_independent
def test_unknown_variant_fails_every_panel_instead_of_falling_back():
    child = textwrap.dedent(
        """
        from keras_implicit import losses
        for attempt in range(2):
            try:
                losses.panel_values([0, 1], [[2.0, 0.0], [0.0, 1.0]], [1.0], [1.0], [1.0], True)
                print("COMPUTED")
            except ValueError as error:
                print("ERROR " + str(error))
        try:  # what active_path says of it: the same error, not "keras"
            print("PATH " + losses.active_path())
        except ValueError as error:
            print("ERROR " + str(error))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_IMPLICIT_PURE_TF"}
    env.update(KERAS_IMPLICIT_OP_VARIANT="fast", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("COMPUTED", "ERROR", "PATH"))]
    assert lines == ["ERROR KERAS_IMPLICIT_OP_VARIANT must be one of auto, portable, avx2, cuda, got 'fast'"] * 3


def test_force_path_rejects_unknown_paths():
    with pytest.raises(ValueError, match="path"):
        with _dispatch.force_path("gpu"):
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
    assert results[0]["min_s"]["forward"] == min(results[0]["all_s"]["forward"])


def test_xla_context_detection():
    """_op.in_xla_context rests on tf.__internal__.get_enclosing_xla_context (no public API exists): this
    fails loudly if TensorFlow removes or changes it, instead of the op silently breaking XLA compilation."""
    assert callable(tf.__internal__.get_enclosing_xla_context)
    seen = {}

    @tf.function(jit_compile=True)
    def compiled(x):
        seen["compiled"] = _op.in_xla_context()

        @tf.function
        def nested(y):
            seen["nested in compiled"] = _op.in_xla_context()
            return y

        return nested(x)

    @tf.function
    def plain(x):
        seen["plain"] = _op.in_xla_context()
        return x

    compiled(tf.constant(1.0))
    plain(tf.constant(1.0))
    seen["eager"] = _op.in_xla_context()
    assert seen == {"compiled": True, "nested in compiled": True, "plain": False, "eager": False}


@pytest.mark.benchmark
def test_panel_benchmark_op_alone_compares_libraries(fused, tmp_path):
    out = tmp_path / "op_alone.json"
    libraries = ["portable"] + (["avx2"] if _CPU_RUNS_AVX2 and _op._LIBRARY_AVX2.exists() else [])
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "panel.py"), "--op-alone", "--libraries", *libraries,
         "--panel", "gcdf", "--sizes", "500x10", "--repeats", "2", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())["results"][0]
    assert result["columns"] == 9 and list(result["libraries"]) == libraries
    assert Path(result["libraries"]["portable"]["path"]).name == "_panel_op.so"
    assert all(len(entry["all_s"]) == 2 and entry["min_s"] > 0 for entry in result["libraries"].values())
