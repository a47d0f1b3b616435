"""Checks of input *values* (labels in range, positive feature norms) on every Keras backend.

Shapes and parameters are checked in Python when a loss is built. Values are only known when it runs:

- on concrete arrays (eager TensorFlow, JAX outside ``jit``, PyTorch, NumPy) they are checked at once
  and a bad value raises ``ValueError``, on every backend;
- inside a ``tf.function`` the check runs with the computation and fails it with
  ``tf.errors.InvalidArgumentError`` carrying the same message (an ``Assert`` op);
- in compiled XLA code the ``keras.ops`` path cannot raise without a round trip to the host on every batch
  (a ``jax.debug.callback`` in a ``lax.cond`` cost 0.22 ms per call here, 45 % of the whole 24-loss panel
  on 1024 x 10 logits; TensorFlow's XLA, ``jit_compile=True``, drops ``Assert`` ops), so the rows with a bad
  value come out NaN in every column, as rows of NaN logits do (``keras_implicit.losses.Margins``): never a
  silent number. JAX's compiled kernel (``keras_implicit._ffi``) checks inside the kernel and fails the
  call with ``jax.errors.JaxRuntimeError`` carrying the message, under ``jax.jit`` too.

:func:`runtime_errors` is the tuple of exception types a caller can catch.
"""

from __future__ import annotations

import keras
import numpy as np

__all__ = ["is_concrete", "check_labels", "check_positive", "check_batch", "runtime_errors"]


def is_concrete(*tensors) -> bool:
    """Whether the values of every tensor are known now (not symbolic, not traced)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # deferred: this backend only

        return tf.executing_eagerly() and not any(isinstance(t, keras.KerasTensor) for t in tensors)
    if backend == "jax":
        import jax  # deferred: this backend only

        return not any(isinstance(t, jax.core.Tracer) for t in tensors)
    return not any(isinstance(t, keras.KerasTensor) for t in tensors)


def runtime_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a failed value check raises on the current backend (ValueError everywhere; the compiled
    function's error inside a ``tf.function`` and from JAX's kernel)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # deferred: this backend only

        return (ValueError, tf.errors.InvalidArgumentError)
    if backend == "jax":
        import jax  # deferred: this backend only

        return (ValueError, jax.errors.JaxRuntimeError)
    return (ValueError,)


def check_labels(labels, classes):
    """Returns ``labels`` (int32 [batch]) once every one lies in ``[0, classes)``."""
    if is_concrete(labels, classes):
        values, classes = np.asarray(labels), int(classes)
        bad = (values < 0) | (values >= classes)
        if bad.any():
            raise ValueError(f"y_true: label outside [0, classes): {values[bad][:5].tolist()} with {classes} "
                             f"classes ({int(bad.sum())} of {values.size})")
        return labels
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # deferred: this backend only

        # One Assert op (assert_non_negative and assert_less would build two, with their own reductions).
        inside = tf.reduce_all(tf.logical_and(labels >= 0, labels < tf.cast(classes, labels.dtype)))
        with tf.control_dependencies([tf.debugging.Assert(inside, ["y_true: label outside [0, classes)"])]):
            return tf.identity(labels)
    return labels  # jax.jit: the panel makes the row NaN


def check_positive(values, message: str):
    """Returns ``values`` once every element is finite and > 0 (``message`` names the argument)."""
    if is_concrete(values):
        array = np.atleast_1d(np.asarray(values))
        good = np.isfinite(array) & (array > 0)
        if not good.all():
            raise ValueError(f"{message}, got {array[~good][:5].tolist()}")
        return values
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # deferred: this backend only

        good = tf.reduce_all(tf.logical_and(tf.math.is_finite(values), values > 0))
        with tf.control_dependencies([tf.debugging.Assert(good, [message])]):
            return tf.identity(values)
    return values  # jax.jit: the panel makes the row NaN


def check_batch(labels, logits, name: str = "y_true"):
    """Returns ``labels`` (or any per-sample tensor, ``name`` in the message) once its batch size is that of
    the logits (checked statically now, dynamically when run)."""
    static = (labels.shape[0], logits.shape[0])
    if None not in static:
        if static[0] != static[1]:
            raise ValueError(f"{name} and y_pred have different batch sizes: {static[0]} and {static[1]}")
        return labels
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # deferred: this backend only

        check = tf.debugging.assert_equal(tf.shape(labels)[0], tf.shape(logits)[0],
                                          message=f"{name} and y_pred have different batch sizes")
        with tf.control_dependencies([check]):
            return tf.identity(labels)
    return labels  # JAX and PyTorch shapes are always static
