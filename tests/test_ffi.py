"""The fused panel kernel on JAX through XLA FFI (custom_ops/panel_ffi.cc, keras_implicit/_ffi.py).

Checked against the float64 NumPy references and the keras.ops path (rtol 2e-5 in float32, 1e-11 in float64),
gradients against finite differences and the keras.ops path's, the 8-row blocks against single rows, the same
bits whatever the threads, under jax.jit and jax.vmap, bad inputs refused by the kernel with the argument's name,
and the path choice (auto takes the kernel's AVX2 build where it loads; op / keras, force_path).

The comparisons with the keras.ops path cost most of this file's time (each shape and panel compiles its XLA
program), so they are spread rather than crossed: float32 values at a few and many classes, the parameter grids
over a Latin square of class counts and batch sizes; float64 (JAX_ENABLE_X64=1, not in CI) keeps every class count.

JAX backend only (CI: KERAS_BACKEND=jax; float64 needs JAX_ENABLE_X64=1). Tests that need the library skip
when it is not built (make -C custom_ops ffi), unless KERAS_IMPLICIT_REQUIRE_OP=1, where they fail.
"""

import os

import keras
import numpy as np
import pytest

from keras_implicit import _dispatch, losses
from tests.backend import BACKEND, kernel_or_skip, needs_float64
from tests.references import ref_error, ref_gcdf, ref_hinge, ref_tce_log1p

pytestmark = pytest.mark.skipif(BACKEND != "jax", reason="the XLA FFI kernel is the JAX backend's (KERAS_BACKEND=jax)")

if BACKEND == "jax":
    import jax
    import jax.numpy as jnp

    from keras_implicit import _checks, _ffi

    # How an INVALID_ARGUMENT from the kernel surfaces: ValueError where JAX maps the status (e.g. eager calls),
    # jax.errors.JaxRuntimeError otherwise; the tuple the library tells users to catch.
    REFUSED = _checks.runtime_errors()

SIGMAS = (0.0, 0.0625, 0.5, 1.0, 8.0, 16.0)
TEMPERATURES = (0.25, 1.0, 4.0, 16.0)
MARGINS = (0.0, 0.25, 1.0, 16.0)
COLUMNS = len(SIGMAS) + len(TEMPERATURES) + len(MARGINS) + 1
TOLERANCE = {np.float32: 2e-5, np.float64: 1e-11}
DTYPES = [np.float32, pytest.param(np.float64, marks=needs_float64)]


def _kernel_unavailable() -> str | None:
    """Why the FFI kernel cannot be used here, or None."""
    try:
        _dispatch.panel_kernel("op")
        return None
    except RuntimeError as error:
        return str(error)


@pytest.fixture
def fused():
    """``_ffi.fused_panel``; skips (or fails under KERAS_IMPLICIT_REQUIRE_OP=1) when the library is unavailable."""
    return kernel_or_skip(_kernel_unavailable(), _ffi.fused_panel)


@pytest.fixture
def loaded_kernel(fused):
    """``fused`` after one call: this process's build is loaded (``_ffi.library_path()``, its platform known)."""
    fused([0], np.zeros((1, 2), np.float32), None, [1.0], [], [], False)
    return fused


@pytest.fixture
def cpu_kernel(loaded_kernel):
    """The kernel on JAX's CPU (the CPU builds, XLA's CPU thread pool); skips where JAX computes on a GPU, whose
    process runs the CUDA handlers (benchmarks/gpu/kernel.sh runs this file there)."""
    if _ffi._State.platform != "cpu":
        pytest.skip(f"a CPU build's test: JAX computes on {jax.default_backend()} here")
    return loaded_kernel


def _both_paths(labels, logits, feature_norm=None, sigmas=SIGMAS, temperatures=TEMPERATURES, margins=MARGINS,
                error=True, compiled=True):
    """(keras.ops path, FFI kernel) values of panel_values, as NumPy arrays; under jax.jit (one XLA program per path:
    op by op, the keras.ops path costs about a second per new shape and panel), or eagerly."""
    values = {}
    for path in ("keras", "op"):
        with _dispatch.force_path(path):
            def panel(y, s, n):
                return losses.panel_values(y, s, sigmas, temperatures, margins, error, feature_norm=n)

            values[path] = np.asarray((jax.jit(panel) if compiled else panel)(labels, logits, feature_norm))
    return values["keras"], values["op"]


def _reference(labels, logits, feature_norm=None, sigmas=SIGMAS, temperatures=TEMPERATURES, margins=MARGINS,
               error=True):
    columns = [ref_gcdf(labels, logits, s, feature_norm) for s in sigmas]
    columns += [ref_tce_log1p(labels, logits, t) for t in temperatures]
    columns += [ref_hinge(labels, logits, g) for g in margins]
    if error:
        columns.append(ref_error(labels, logits))
    return np.stack(columns, axis=-1)


def _special_batch(classes, dtype, batch=64, seed=0):
    """Random logits plus rows with ties, a far tail, a tiny loss, huge logits and (last) a NaN."""
    rng = np.random.default_rng(seed + classes)
    logits = rng.normal(0.0, 3.0, (batch, classes))
    labels = rng.integers(0, classes, batch)
    logits[0] = 1.5  # every class tied
    labels[0] = classes - 1
    logits[1, :] = 0.0
    logits[1, labels[1]] = 10.0 * np.sqrt(2) * 0.5  # Gcdf(0.5) = (C-1) Phi(-10)
    logits[2, :] = -40.0
    logits[2, labels[2]] = 40.0  # tempered CE ~ (C-1) e^-80 at T = 1
    logits[3] *= 1e6  # huge logits
    logits[batch - 1, 0] = np.nan
    return labels.astype(np.int32), logits.astype(dtype)


# --------------------------------------------------------------------------- #
# Values
# --------------------------------------------------------------------------- #
# float32 at a few and at many classes (both in 8-row blocks; the row path's own cases are the blocks-versus-rows
# and wide-row tests below); float64 at every class count.
_VALUE_CASES = [(np.float32, 10), (np.float32, 1000)] + [
    pytest.param(np.float64, classes, marks=needs_float64) for classes in (2, 10, 100, 1000)
]


@pytest.mark.parametrize("dtype, classes", _VALUE_CASES)
def test_ffi_equals_keras_path_and_reference(fused, classes, dtype):
    labels, logits = _special_batch(classes, dtype)
    keras_path, ffi = _both_paths(labels, logits)
    assert ffi.dtype == dtype and ffi.shape == (64, COLUMNS)
    reference = _reference(labels, logits)
    nan_rows = np.isnan(logits).any(axis=1)
    assert np.isnan(ffi[nan_rows]).all() and np.isnan(keras_path[nan_rows]).all()
    assert not np.isnan(ffi[~nan_rows]).any()
    # A hinge of C - 1 equal terms summed one after another rounds by up to (C - 1) eps: the bound of a sequential
    # sum of non-negative terms, whatever order the other side (XLA's row reduction, by the CPU's vector width) uses.
    tolerance = max(TOLERANCE[dtype], (classes - 1) * float(np.finfo(dtype).eps))
    np.testing.assert_allclose(ffi[~nan_rows], keras_path[~nan_rows], rtol=tolerance, atol=1e-35)
    np.testing.assert_allclose(ffi[~nan_rows], reference[~nan_rows], rtol=5 * tolerance, atol=1e-35)


_GRIDS = {
    "gcdf": ((0.0, 0.01, 0.25, 1.0, 4.0), (), (), False),
    "tce": ((), (0.05, 0.5, 1.0, 3.0, 100.0), (), False),
    "hinge": ((), (), (0.0, 0.5, 2.0, 64.0), False),
    "error": ((), (), (), True),
    "one_of_each": ((0.5,), (2.0,), (1.0,), True),
}


# Each grid at each class count (2, 10, 100) and each batch size (1: a single row; 9: one 8-row block and a row;
# 300: blocks on several threads' chunks), the pairs rotated from grid to grid so that the five grids cover all
# nine (classes, batch) pairs: a Latin square, 15 cases per dtype instead of 45.
_GRID_CASES = [
    (grid, classes, (1, 9, 300)[(k + g) % 3])
    for g, grid in enumerate(sorted(_GRIDS))
    for k, classes in enumerate((2, 10, 100))
]


@pytest.mark.parametrize("grid, classes, batch", _GRID_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ffi_parameter_grids_class_counts_and_batch_sizes(fused, grid, classes, batch, dtype):
    sigmas, temperatures, margins, error = _GRIDS[grid]
    rng = np.random.default_rng(batch + classes)
    labels = rng.integers(0, classes, batch).astype(np.int32)
    logits = rng.normal(0.0, 2.0, (batch, classes)).astype(dtype)
    keras_path, ffi = _both_paths(labels, logits, None, sigmas, temperatures, margins, error)
    assert ffi.shape == (batch, len(sigmas) + len(temperatures) + len(margins) + int(error))
    np.testing.assert_allclose(ffi, keras_path, rtol=TOLERANCE[dtype], atol=1e-35)
    reference = _reference(labels, logits, None, sigmas, temperatures, margins, error)
    np.testing.assert_allclose(ffi, reference, rtol=5 * TOLERANCE[dtype], atol=1e-30)


@pytest.mark.parametrize("form", ["scalar", "per_sample", "column"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ffi_feature_norm_forms(fused, form, dtype):
    labels, logits = _special_batch(10, dtype, batch=16)
    logits = logits[:-1]  # no NaN row
    labels = labels[:-1]
    norms = np.random.default_rng(3).uniform(0.5, 3.0, len(labels))
    norm = {"scalar": 1.7, "per_sample": norms, "column": norms[:, None]}[form]
    keras_path, ffi = _both_paths(labels, logits, norm)
    np.testing.assert_allclose(ffi, keras_path, rtol=TOLERANCE[dtype], atol=1e-35)
    expected_norm = 1.7 if form == "scalar" else norms
    reference = _reference(labels, logits, expected_norm)
    np.testing.assert_allclose(ffi, reference, rtol=5 * TOLERANCE[dtype], atol=1e-30)


@pytest.mark.parametrize("classes", [2, 10, 100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ffi_row_blocks_equal_single_rows(fused, classes, dtype):
    """Rows in 8-row blocks (4 in float64: one lane per row) against the same rows one at a time (a batch of one
    takes the row path), forward and gradient: ties, far tails, huge logits, per-sample norms, and a block holding
    a NaN row and an infinite logit (which takes the row path)."""
    labels, logits = _special_batch(classes, dtype, batch=24, seed=6)
    logits[17, 1] = np.inf  # rows 16-23: a block with an infinite logit and (row 23) a NaN
    norms = np.random.default_rng(6).uniform(0.5, 2.0, 24).astype(dtype)
    weights = np.random.default_rng(7).uniform(-1, 1, (24, COLUMNS)).astype(dtype)
    weights[:, 3] = 0.0  # a column with no upstream in any row (skipped) ...
    weights[::2, 12] = 0.0  # ... and one with none in some rows

    def panel(y, s, n):
        return fused(y, s, n, SIGMAS, TEMPERATURES, MARGINS, True)

    def gradient(y, s, n, w):
        return [np.asarray(g) for g in jax.grad(lambda s, n: jnp.sum(panel(y, s, n) * w), argnums=(0, 1))(s, n)]

    together = np.asarray(panel(labels, logits, norms))
    alone = np.concatenate([np.asarray(panel(labels[b:b + 1], logits[b:b + 1], norms[b:b + 1])) for b in range(24)])
    rtol = {np.float32: 1e-5, np.float64: 1e-13}[dtype]
    np.testing.assert_allclose(together, alone, rtol=rtol, atol=1e-37)
    finite = np.isfinite(logits).all(axis=1)
    grads = gradient(labels, logits, norms, weights)
    for b in np.flatnonzero(finite):
        row = gradient(labels[b:b + 1], logits[b:b + 1], norms[b:b + 1], weights[b:b + 1])
        np.testing.assert_allclose(grads[0][b], row[0][0], rtol=10 * rtol, atol=10 * rtol * np.abs(row[0]).max())
        np.testing.assert_allclose(grads[1][b], row[1][0], rtol=10 * rtol)


def test_ffi_wide_rows_take_the_row_path(fused):
    """Beyond panel_math.h's kBlockMaxClasses (4096) classes the rows run one at a time (AVX2 along the row)."""
    labels, logits = _special_batch(4100, np.float32, batch=9)
    logits, labels = logits[:-1], labels[:-1]  # no NaN row
    ffi = np.asarray(fused(labels, logits, None, SIGMAS, TEMPERATURES, MARGINS, True))
    np.testing.assert_allclose(ffi, _reference(labels, logits), rtol=5 * TOLERANCE[np.float32], atol=1e-35)


def test_ffi_infinite_logits_follow_the_keras_path(fused):
    labels = np.array([0, 1, 2, 0], np.int32)
    logits = np.array([[np.inf, 0, 1], [0, np.inf, -np.inf], [np.inf, 0, np.inf], [-np.inf, 1, 2]], np.float32)
    keras_path, ffi = _both_paths(labels, logits, compiled=False)  # eagerly: panel_values outside jax.jit
    np.testing.assert_allclose(ffi, keras_path, rtol=2e-5, atol=1e-35, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ffi_reduce_sums_over_the_batch(fused, dtype):
    labels, logits = _special_batch(10, dtype, batch=33)
    labels, logits = labels[:-1], logits[:-1]
    per_sample = np.asarray(fused(labels, logits, 1.3, SIGMAS, TEMPERATURES, MARGINS, True))
    summed = np.asarray(fused(labels, logits, 1.3, SIGMAS, TEMPERATURES, MARGINS, True, reduce=True))
    assert summed.shape == (COLUMNS,)
    np.testing.assert_allclose(summed, per_sample.astype(np.float64).sum(0), rtol=1e-6)


def test_ffi_rejects_logits_it_does_not_compute(fused):
    with pytest.raises(TypeError, match="float32 or float64"):
        fused(np.array([0]), np.zeros((1, 3), np.int32), None, [1.0], [], [], False)


# --------------------------------------------------------------------------- #
# jax.jit and jax.vmap
# --------------------------------------------------------------------------- #
def test_ffi_under_jit_equals_eager(fused):
    labels, logits = _special_batch(10, np.float32, batch=40)
    norms = np.random.default_rng(1).uniform(0.5, 2.0, 40).astype(np.float32)
    eager = np.asarray(fused(labels, logits, norms, SIGMAS, TEMPERATURES, MARGINS, True))
    compiled = jax.jit(lambda y, s, n: fused(y, s, n, SIGMAS, TEMPERATURES, MARGINS, True))
    np.testing.assert_array_equal(np.asarray(compiled(labels, logits, norms)), eager)
    # panel_values inside jit takes the kernel too (auto, and forced), same values.
    with _dispatch.force_path("op"):
        traced = jax.jit(lambda y, s: losses.panel_values(y, s, SIGMAS, TEMPERATURES, MARGINS, True))
        np.testing.assert_array_equal(np.asarray(traced(labels, logits)),
                                      np.asarray(fused(labels, logits, None, SIGMAS, TEMPERATURES, MARGINS, True)))


def test_ffi_under_vmap_equals_a_loop(fused):
    rng = np.random.default_rng(5)
    stacked_logits = rng.normal(0, 2, (3, 12, 10)).astype(np.float32)
    stacked_labels = rng.integers(0, 10, (3, 12)).astype(np.int32)
    stacked_norms = rng.uniform(0.5, 2.0, (3, 12)).astype(np.float32)

    def panel(y, s, n):
        return fused(y, s, n, SIGMAS, TEMPERATURES, MARGINS, True)

    looped = np.stack([np.asarray(panel(*args)) for args in zip(stacked_labels, stacked_logits, stacked_norms)])
    np.testing.assert_array_equal(np.asarray(jax.vmap(panel)(stacked_labels, stacked_logits, stacked_norms)), looped)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(panel))(stacked_labels, stacked_logits, stacked_norms)),
                                  looped)
    # Only the logits batched (labels and norm shared), and a scalar norm per vmapped slice.
    shared = np.stack([np.asarray(panel(stacked_labels[0], s, stacked_norms[0])) for s in stacked_logits])
    batched_logits_only = jax.vmap(panel, in_axes=(None, 0, None))(stacked_labels[0], stacked_logits, stacked_norms[0])
    np.testing.assert_array_equal(np.asarray(batched_logits_only), shared)
    scalar_norms = np.array([0.5, 1.0, 2.0], np.float32)
    per_slice = np.stack([np.asarray(panel(stacked_labels[i], stacked_logits[i], scalar_norms[i])) for i in range(3)])
    np.testing.assert_array_equal(np.asarray(jax.vmap(panel)(stacked_labels, stacked_logits, scalar_norms)), per_slice)


# --------------------------------------------------------------------------- #
# Gradients
# --------------------------------------------------------------------------- #
def _gradients(path, labels, logits, feature_norm, weights):
    """d sum(weights * panel) / d (logits, feature_norm) on one path, by jax.grad."""

    def total(s, n):
        with _dispatch.force_path(path):
            values = losses.panel_values(labels, s, SIGMAS, TEMPERATURES, MARGINS, True, feature_norm=n)
        return jnp.sum(values * weights)

    # One compiled program per path (op by op, the keras.ops path's gradient costs seconds per shape).
    gradient = jax.jit(jax.grad(total, argnums=(0, 1)))
    return [np.asarray(g) for g in gradient(jnp.asarray(logits), jnp.asarray(feature_norm))]


@pytest.mark.parametrize("classes", [2, 10, 100])
@pytest.mark.parametrize("norm_form", ["scalar", "per_sample"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ffi_gradient_equals_keras_path(fused, classes, norm_form, dtype):
    rng = np.random.default_rng(classes)
    labels = rng.integers(0, classes, 32).astype(np.int32)
    logits = rng.normal(0, 3, (32, classes)).astype(dtype)
    logits[0] = 1.0  # ties: the hinge's kink and sigma = 0 (zero gradient)
    norm = np.asarray(1.3 if norm_form == "scalar" else rng.uniform(0.5, 2.0, 32), dtype)
    weights = rng.uniform(-1, 1, (32, COLUMNS)).astype(dtype)
    expected = _gradients("keras", labels, logits, norm, weights)
    actual = _gradients("op", labels, logits, norm, weights)
    tolerance = {np.float32: (1e-4, 1e-5), np.float64: (1e-9, 1e-12)}[dtype]
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == dtype
        np.testing.assert_allclose(a, e, rtol=tolerance[0], atol=tolerance[1])


@needs_float64
@pytest.mark.parametrize("classes", [2, 5, 40])
def test_ffi_gradient_matches_finite_differences(fused, classes):
    rng = np.random.default_rng(7 + classes)
    labels = rng.integers(0, classes, 6).astype(np.int32)
    logits = rng.normal(0, 2, (6, classes))
    norm = rng.uniform(0.5, 2.0, 6)
    weights = rng.uniform(0.5, 1.5, (6, 5))

    def total(s, n):
        return jnp.sum(fused(labels, s, n, [0.5, 2.0], [0.5, 3.0], [1.0], False) * weights)

    grad_logits, grad_norm = (np.asarray(g) for g in jax.grad(total, argnums=(0, 1))(logits, norm))
    delta = 1e-6

    def numerical(array, index, other, first):
        plus, minus = array.copy(), array.copy()
        plus[index] += delta
        minus[index] -= delta
        arguments = ((plus, other), (minus, other)) if first else ((other, plus), (other, minus))
        return (float(total(*arguments[0])) - float(total(*arguments[1]))) / (2 * delta)

    for index in np.ndindex(logits.shape):
        np.testing.assert_allclose(grad_logits[index], numerical(logits, index, norm, True), rtol=1e-5, atol=1e-7)
    for index in np.ndindex(norm.shape):
        np.testing.assert_allclose(grad_norm[index], numerical(norm, index, logits, False), rtol=1e-5, atol=1e-7)


def test_ffi_gradient_with_reduce_jit_and_vmap(fused):
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 4, 8).astype(np.int32)
    logits = rng.normal(0, 2, (8, 4)).astype(np.float32)
    upstream = rng.uniform(0.5, 1.5, COLUMNS).astype(np.float32)

    def reduced(s, n):
        return jnp.sum(fused(labels, s, n, SIGMAS, TEMPERATURES, MARGINS, True, reduce=True) * upstream)

    def per_sample(s, n):
        return jnp.sum(fused(labels, s, n, SIGMAS, TEMPERATURES, MARGINS, True) * upstream)

    norm = np.float32(1.7)
    expected = jax.grad(per_sample, argnums=(0, 1))(logits, norm)
    for function in (jax.grad(reduced, argnums=(0, 1)), jax.jit(jax.grad(reduced, argnums=(0, 1)))):
        for a, e in zip(function(logits, norm), expected):
            np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6)
    stacked = np.stack([logits, 2 * logits])
    vmapped = jax.vmap(jax.grad(per_sample, argnums=(0, 1)), in_axes=(0, None))(stacked, norm)
    for i in range(2):
        for a, e in zip((vmapped[0][i], vmapped[1][i]), jax.grad(per_sample, argnums=(0, 1))(stacked[i], norm)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-6, atol=1e-7)


def test_ffi_trains_a_keras_model(fused):
    """A Keras model whose loss is a panel column takes the FFI kernel in its jit-compiled train step."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    keras.utils.set_random_seed(0)  # the initial weights, hence the loss curve, are the same on every run
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])

    def loss(labels, logits):
        return keras.ops.mean(losses.panel_values(labels, logits, temperatures=[1.0])[:, 0])

    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss, jit_compile=True)
    with _dispatch.force_path("op"):
        history = model.fit(x, y, epochs=5, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]


# --------------------------------------------------------------------------- #
# Bad inputs: refused inside the kernel, naming the argument (eagerly and under jit)
# --------------------------------------------------------------------------- #
_VALID = {"labels": [0, 1, 1, 0, 1, 0, 1, 1, 0], "classes": 2, "feature_norm": 1.0, "sigmas": [0.5, 1.0],
          "temperatures": [1.0], "margins": [0.0, 1.0]}
_INVALID = {
    "norm_zero": ({"feature_norm": 0.0}, r"feature_norm must be finite and > 0, got 0"),
    "norm_negative": ({"feature_norm": -0.5}, r"feature_norm must be finite and > 0, got -0.5"),
    "norm_nan": ({"feature_norm": np.nan}, r"feature_norm must be finite and > 0, got nan"),
    "norm_inf": ({"feature_norm": np.inf}, r"feature_norm must be finite and > 0, got inf"),
    "norm_one_sample_zero": ({"feature_norm": [1.0, 2.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]},
                             r"feature_norm\[2\] must be finite and > 0, got 0"),
    "one_class": ({"classes": 1, "labels": [0] * 9}, r"logits must have at least 2 classes, got shape \[9,1\]"),
    "label_too_large": ({"labels": [0, 1, 2, 0, 1, 0, 1, 1, 0]}, r"labels\[2\] = 2 is outside \[0, 2\)"),
    "label_negative": ({"labels": [0, 1, 1, 0, 1, 0, 1, 1, -1]}, r"labels\[8\] = -1 is outside \[0, 2\)"),
    "sigma_negative": ({"sigmas": [0.5, -1.0]}, r"sigmas\[1\] must be finite and >= 0, got -1"),
    "sigma_nan": ({"sigmas": [np.nan]}, r"sigmas\[0\] must be finite and >= 0, got nan"),
    "temperature_zero": ({"temperatures": [0.0]}, r"temperatures\[0\] must be finite and > 0, got 0"),
    "temperature_inf": ({"temperatures": [np.inf]}, r"temperatures\[0\] must be finite"),
    "margin_negative": ({"margins": [-0.25]}, r"margins\[0\] must be finite and >= 0, got -0.25"),
}
_CALLS = ("eager", "jit", "gradient", "gradient_jit")


def _call(call, labels, classes, feature_norm, sigmas, temperatures, margins):
    labels = np.asarray(labels, np.int32)
    logits = np.random.default_rng(0).normal(0.0, 2.0, (len(labels), classes)).astype(np.float32)
    norm = np.asarray(feature_norm, np.float32)

    def panel(y, s, n):
        return _ffi.fused_panel(y, s, n, sigmas, temperatures, margins, True)

    if call == "eager":
        return panel(labels, logits, norm)
    if call == "jit":
        return jax.jit(panel)(labels, logits, norm)
    gradient = jax.grad(lambda s, y, n: jnp.sum(panel(y, s, n)))
    if call == "gradient":
        return gradient(logits, labels, norm)
    return jax.jit(gradient)(logits, labels, norm)


@pytest.mark.parametrize("call", _CALLS)
def test_ffi_accepts_valid_inputs_in_every_call(fused, call):
    values = np.asarray(_call(call, **_VALID))
    assert values.shape == ((9, 6) if "gradient" not in call else (9, 2)) and np.isfinite(values).all()


@pytest.mark.parametrize("call", _CALLS)
@pytest.mark.parametrize("case", sorted(_INVALID))
def test_ffi_refuses_bad_inputs_naming_the_argument(fused, case, call):
    change, message = _INVALID[case]
    with pytest.raises(REFUSED, match="INVALID_ARGUMENT: " + message):
        np.asarray(_call(call, **{**_VALID, **change}))


def test_ffi_refuses_an_empty_panel_and_bad_shapes(fused):
    logits = np.zeros((3, 4), np.float32)
    labels = np.array([0, 1, 2], np.int32)
    with pytest.raises(ValueError, match="the panel is empty"):
        np.asarray(fused(labels, logits, None, [], [], [], False))
    with pytest.raises(REFUSED, match=r"labels must be \[batch\] = \[3\], got shape \[2\]"):
        np.asarray(fused(labels[:2], logits, None, [1.0], [], [], False))
    with pytest.raises(REFUSED, match=r"feature_norm must be a scalar or \[batch\] = \[3\]"):
        np.asarray(fused(labels, logits, np.ones(2, np.float32), [1.0], [], [], False))


def test_panel_values_under_jit_refuses_a_bad_label_on_the_kernel(fused):
    """Under jax.jit the keras.ops path can only give NaN rows; the kernel refuses the label, naming it."""
    logits = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32)
    with _dispatch.force_path("op"):
        panel = jax.jit(lambda y, s: losses.panel_values(y, s, [0, 1], [1], [0, 1], True))
        with pytest.raises(REFUSED, match=r"labels\[1\] = 3 is outside \[0, 3\)"):
            np.asarray(panel(np.array([0, 3, 1], np.int32), logits))
    with _dispatch.force_path("keras"):
        panel = jax.jit(lambda y, s: losses.panel_values(y, s, [0, 1], [1], [0, 1], True))
        assert np.isnan(np.asarray(panel(np.array([0, 3, 1], np.int32), logits))[1]).all()


# --------------------------------------------------------------------------- #
# The path choice
# --------------------------------------------------------------------------- #
@pytest.fixture
def auto_takes_kernel(cpu_kernel):
    """Skips where this process loaded the portable build, which auto does not take (see
    test_portable_build_matches_the_loaded_build), and on a GPU (test_auto_keeps_the_keras_path_on_a_gpu)."""
    if _ffi.library_path().name == _ffi._LIBRARY.name:
        pytest.skip("only the portable build loads here: auto keeps the keras.ops path")


def test_auto_keeps_the_keras_path_on_a_gpu(loaded_kernel, monkeypatch):
    """On a CUDA GPU the kernel is opt-in: auto takes the keras.ops path, op the CUDA handlers."""
    if _ffi._State.platform != "cuda":
        pytest.skip(f"JAX computes on {jax.default_backend()} here, not on a CUDA GPU")
    monkeypatch.delenv("KERAS_IMPLICIT_PANEL_PATH", raising=False)
    assert _dispatch.panel_kernel("auto") is None and _dispatch.active_path() == "keras"
    assert _dispatch.panel_kernel("op") is _ffi.fused_panel and _dispatch.active_path("op") == "op"
    assert _ffi.library_path().name == "_panel_ffi_cuda.so"


def test_paths_auto_op_and_keras(auto_takes_kernel, monkeypatch):
    # On JAX's CPU, auto takes the FFI kernel's AVX2 build (faster than XLA's fusion: BUILD_NOTES.md), as op does.
    monkeypatch.delenv("KERAS_IMPLICIT_PANEL_PATH", raising=False)
    assert _dispatch.active_path() == "op"
    assert _dispatch.panel_kernel() is _ffi.fused_panel
    assert _dispatch.panel_kernel("auto") is _ffi.fused_panel
    assert _dispatch.panel_kernel("op") is _ffi.fused_panel
    assert _dispatch.panel_kernel("keras") is None
    assert _dispatch.active_path("op") == "op"
    with _dispatch.force_path("keras"):
        assert _dispatch.active_path() == "keras"
        assert _dispatch.active_path("op") == "op"  # the argument wins over force_path
        with _dispatch.force_path("op"):
            assert _dispatch.active_path() == "op"
    with _dispatch.force_path("auto"):
        assert _dispatch.active_path() == "op"
    with _dispatch.force_path("keras"), _dispatch.force_path("auto"):
        assert _dispatch.active_path() == "op"  # the inner block wins


def test_auto_panel_values_take_the_kernel(fused, auto_takes_kernel, monkeypatch):
    """panel_values with no path asked for computes on the FFI kernel: under jax.jit it refuses a bad label itself
    (the keras.ops path could only give a NaN row)."""
    monkeypatch.delenv("KERAS_IMPLICIT_PANEL_PATH", raising=False)
    logits = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32)
    panel = jax.jit(lambda y, s: losses.panel_values(y, s, [0, 1], [1], [0, 1], True))
    np.testing.assert_array_equal(np.asarray(panel(np.array([0, 2, 1], np.int32), logits)),
                                  np.asarray(fused([0, 2, 1], logits, None, [0, 1], [1], [0, 1], True)))
    with pytest.raises(REFUSED, match=r"labels\[1\] = 3 is outside \[0, 3\)"):
        np.asarray(panel(np.array([0, 3, 1], np.int32), logits))


@pytest.mark.parametrize("value, expected", [("keras", "keras"), ("op", "op"), ("auto", "op")])
def test_environment_variable_selects_the_path(auto_takes_kernel, monkeypatch, value, expected):
    monkeypatch.setenv("KERAS_IMPLICIT_PANEL_PATH", value)
    assert _dispatch.active_path() == expected
    with _dispatch.force_path("keras"):
        assert _dispatch.active_path() == "keras"


def test_missing_library_auto_takes_keras_and_op_raises(monkeypatch, tmp_path):
    """Without the library (and no first-use build: tests/test_build.py tests that) "op" raises with the reason;
    auto takes the keras.ops path (same values)."""
    on_gpu = jax.default_backend() == "gpu"
    missing = tmp_path / ("_panel_ffi_cuda.so" if on_gpu else "_panel_ffi.so")
    monkeypatch.setattr(_ffi, "_LIBRARY", tmp_path / "_panel_ffi.so")
    monkeypatch.setattr(_ffi, "_LIBRARY_AVX2", tmp_path / "_panel_ffi_avx2.so")
    monkeypatch.setattr(_ffi, "_LIBRARY_CUDA", tmp_path / "_panel_ffi_cuda.so")
    monkeypatch.delenv("KERAS_IMPLICIT_OP_VARIANT", raising=False)
    monkeypatch.setenv("KERAS_IMPLICIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KERAS_IMPLICIT_NO_BUILD", "1")
    monkeypatch.setattr(_ffi._State, "attempted", False)
    monkeypatch.setattr(_ffi._State, "loaded", False)
    monkeypatch.setattr(_ffi._State, "error", None)
    monkeypatch.delenv("KERAS_IMPLICIT_PANEL_PATH", raising=False)
    assert _dispatch.panel_kernel("auto") is None
    assert _dispatch.active_path() == "keras"
    with pytest.raises(RuntimeError, match=r"asked for \(force_path\) but is not available: .*is not built"):
        with _dispatch.force_path("op"):
            _dispatch.panel_kernel()
    assert str(missing) in _ffi.load_error() and "is not built" in _ffi.load_error()
    if not on_gpu:  # a GPU process never builds the CPU handlers
        assert "KERAS_IMPLICIT_NO_BUILD=1" in _ffi.load_error()
    with pytest.raises(RuntimeError, match="is not built"):
        losses.panel_values([0], [[1.0, 0.0]], [1.0], path="op")
    values = np.asarray(losses.panel_values([0, 1], [[1.0, 0.0], [0.0, 2.0]], [1.0], [1.0], [1.0], True))
    with _dispatch.force_path("keras"):
        expected = np.asarray(losses.panel_values([0, 1], [[1.0, 0.0], [0.0, 2.0]], [1.0], [1.0], [1.0], True))
    np.testing.assert_array_equal(values, expected)


_VARIANT_SCRIPT = """
import json, sys
import numpy as np, jax, jax.numpy as jnp
from keras_implicit import _dispatch, _ffi
logits = np.asarray(json.loads(sys.argv[1]), np.float32)
labels = np.asarray(json.loads(sys.argv[2]), np.int32)
panel = lambda s: _ffi.fused_panel(labels, s, 1.3, {sigmas}, {temperatures}, {margins}, True)
values = np.asarray(panel(logits))
grad = np.asarray(jax.grad(lambda s: jnp.sum(panel(s)))(logits))
paths = {{"auto": _dispatch.active_path(), "op": _dispatch.active_path("op")}}
print("RESULT " + json.dumps({{"library": str(_ffi.library_path()), "values": values.tolist(), "grad": grad.tolist(),
                              "paths": paths}}))
"""


@pytest.mark.parametrize("classes", [3, 100])
def test_portable_build_matches_the_loaded_build(cpu_kernel, classes):
    """KERAS_IMPLICIT_OP_VARIANT=portable loads _panel_ffi.so (scalar erfc/exp) in a child process; its values
    and gradients equal this process's build (the AVX2 one where it is built: libmvec's erfc/exp). Slower than
    XLA's fusion, it is taken by "op" only: "auto" keeps the keras.ops path."""
    import json
    import subprocess
    import sys

    fused = cpu_kernel
    portable = _ffi._LIBRARY
    if not portable.exists():
        pytest.skip(f"{portable} is not built")
    rng = np.random.default_rng(classes)
    logits = rng.normal(0, 3, (20, classes)).astype(np.float32)
    labels = rng.integers(0, classes, 20).astype(np.int32)
    script = _VARIANT_SCRIPT.format(sigmas=SIGMAS, temperatures=TEMPERATURES, margins=MARGINS)
    env = {**os.environ, "KERAS_BACKEND": "jax", "KERAS_IMPLICIT_OP_VARIANT": "portable", "JAX_ENABLE_X64": "0"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(logits.tolist()), json.dumps(labels.tolist())],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["library"] == str(portable)
    assert result["paths"] == {"auto": "keras", "op": "op"}

    def panel(s):
        return fused(labels, s, 1.3, SIGMAS, TEMPERATURES, MARGINS, True)

    np.testing.assert_allclose(result["values"], np.asarray(panel(logits)), rtol=2e-5, atol=1e-30)
    np.testing.assert_allclose(result["grad"], np.asarray(jax.grad(lambda s: jnp.sum(panel(s)))(logits)),
                               rtol=1e-4, atol=1e-6)


# The problems of test_ffi_gives_the_same_bits_whatever_the_threads, run by this process and by a child on one
# CPU: forward (per row and reduce) and gradient (a scalar norm: its rows' sum) of problems that the kernel splits
# into chunks over the threads, in 8-row blocks (10 classes) and in single wide rows (5000 classes).
_THREADS_CODE = """
def threads_problem(fused_panel, sigmas, temperatures, margins, columns):
    import jax
    import jax.numpy as jnp
    import numpy as np

    results = {}
    for rows, classes in ((4003, 10), (203, 5000)):
        rng = np.random.default_rng(classes)
        labels = rng.integers(0, classes, rows).astype(np.int32)
        logits = rng.normal(0, 3, (rows, classes)).astype(np.float32)

        def panel(s, n, reduce=False):
            return fused_panel(labels, s, n, sigmas, temperatures, margins, True, reduce=reduce)

        results[f"values{classes}"] = np.asarray(panel(logits, 1.3))
        results[f"reduced{classes}"] = np.asarray(panel(logits, 1.3, True))
        grads = jax.grad(lambda s, n: jnp.sum(panel(s, n) * jnp.arange(columns)), argnums=(0, 1))(logits, 1.3)
        results[f"grad{classes}"], results[f"dnorm{classes}"] = (np.asarray(g) for g in grads)
    return results
"""
_THREADS_SCRIPT = """
import os, sys
os.sched_setaffinity(0, {{sorted(os.sched_getaffinity(0))[0]}})  # one CPU: XLA's CPU thread pool has one thread
import numpy as np
from keras_implicit import _ffi
exec(sys.argv[2])
np.savez(sys.argv[1], **threads_problem(_ffi.fused_panel, *eval(sys.argv[3])))
"""


def test_ffi_gives_the_same_bits_whatever_the_threads(cpu_kernel, tmp_path):
    """The kernel splits the rows over XLA's CPU thread pool; a child process on one CPU (a pool of one thread)
    gets the same bits, forward, reduce and gradient."""
    import subprocess
    import sys

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: this process runs the kernel on one thread too")
    namespace = {}
    exec(_THREADS_CODE, namespace)
    arguments = (SIGMAS, TEMPERATURES, MARGINS, COLUMNS)
    here = namespace["threads_problem"](cpu_kernel, *arguments)
    output = tmp_path / "one_thread.npz"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_ENABLE_X64": "0"}
    done = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT.format(), str(output), _THREADS_CODE,
                           repr(arguments)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    one_thread = np.load(output)
    assert sorted(one_thread.files) == sorted(here)
    for name, values in here.items():
        np.testing.assert_array_equal(one_thread[name], values, err_msg=name)
