"""What the tests need to run unchanged on every Keras backend (KERAS_BACKEND=tensorflow, jax, torch)."""

import os

import keras
import numpy as np
import pytest

from keras_implicit import _checks

BACKEND = keras.backend.backend()

tensorflow_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow-only (tf.function, tf.distribute)")


def _float64_available() -> bool:
    if BACKEND != "jax":
        return True
    import jax

    return bool(jax.config.jax_enable_x64)


needs_float64 = pytest.mark.skipif(not _float64_available(),
                                   reason="JAX computes float64 as float32 unless JAX_ENABLE_X64=1")


def to_numpy(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def dtype_of(x) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def compiled(fn):
    """``fn`` compiled the way the backend's trainer compiles a step: tf.function, jax.jit (torch: eager)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    return fn


def gradient(fn, x: np.ndarray) -> np.ndarray:
    """d sum(fn(x)) / dx by the backend's automatic differentiation, as a NumPy array."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        variable = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(variable)
            total = tf.reduce_sum(fn(variable))
        return tape.gradient(total, variable).numpy()
    if BACKEND == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: keras.ops.sum(fn(v)))(x))
    if BACKEND == "torch":
        import torch

        variable = torch.tensor(x, requires_grad=True)
        torch.sum(fn(variable)).backward()
        return variable.grad.numpy()
    raise NotImplementedError(BACKEND)


def hessian(fn, x: np.ndarray) -> np.ndarray:
    """The Hessian of the scalar ``fn(x)`` with respect to ``x`` (flattened: [x.size, x.size]) by the backend's
    automatic differentiation (second derivatives, not finite differences), as a NumPy array."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        variable = tf.constant(x)
        with tf.GradientTape() as outer:
            outer.watch(variable)
            with tf.GradientTape() as inner:
                inner.watch(variable)
                value = fn(variable)
            grad = inner.gradient(value, variable)
        return outer.jacobian(grad, variable).numpy().reshape(x.size, x.size)
    if BACKEND == "jax":
        import jax

        return np.asarray(jax.hessian(fn)(x)).reshape(x.size, x.size)
    if BACKEND == "torch":
        import torch

        return torch.autograd.functional.hessian(fn, torch.tensor(x)).numpy().reshape(x.size, x.size)
    raise NotImplementedError(BACKEND)


def kernel_or_skip(reason, kernel):
    """``kernel`` when ``reason`` (why a fused kernel is unavailable) is None; else the test is skipped, or fails
    under ``KERAS_IMPLICIT_REQUIRE_OP=1`` (CI), so that a missing build is never only a skip there."""
    if reason is not None:
        if os.environ.get("KERAS_IMPLICIT_REQUIRE_OP") == "1":
            pytest.fail(f"KERAS_IMPLICIT_REQUIRE_OP=1 but {reason}")
        pytest.skip(reason)
    return kernel


def assert_refused_when_compiled(compute, match: str, bad_rows) -> None:
    """A bad value inside a compiled function: TensorFlow raises with ``match`` in the message (an Assert op);
    under jax.jit nothing can raise (keras_implicit/_checks.py), so the rows ``bad_rows`` are NaN in every
    column and the others are finite."""
    if BACKEND == "jax":
        values = np.asarray(compute(), np.float64)
        values = values.reshape(values.shape[0], -1)
        rows = np.zeros(values.shape[0], bool)
        rows[np.asarray(bad_rows)] = True
        assert np.all(np.isnan(values[rows])) and np.all(np.isfinite(values[~rows]))
        return
    with pytest.raises(_checks.runtime_errors(), match=match):
        to_numpy(compute())
