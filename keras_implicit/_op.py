"""Loads the fused panel op (custom_ops/) or falls back to the pure-TensorFlow path.

Interface used by keras_implicit.losses:
    panel_op() -> callable(labels, logits, feature_norm, sigmas, temperatures, margins, error) or None
    force_path("op" | "tf" | None): context manager for tests and benchmarks
    active_path() -> "op" or "tf"

The op lives in ``keras_implicit/_panel_op.so``, built by ``pip install -e .`` (setup.py) or
``make -C custom_ops``. It is loaded lazily, on the first panel computed, and the pure-TensorFlow path
(``losses._panel_pure_tf``) is used instead when:

- ``KERAS_IMPLICIT_PURE_TF=1`` is set;
- the library is missing (not built) or cannot be loaded (built for another TensorFlow version, another
  ABI or another machine): the load error is logged;
- the computation is being compiled by XLA (``tf.function(jit_compile=True)``, Keras' ``jit_compile``,
  the default on GPUs): the op has no XLA kernel.

One log line (logger ``keras_implicit``, INFO; WARNING when a built library fails to load) says which
path is in use, the first time it is decided. ``active_path()`` says it at any time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

import numpy as np
import tensorflow as tf

__all__ = ["panel_op", "force_path", "active_path", "library_path", "load_error", "in_xla_context", "fused_panel"]

_LOGGER = logging.getLogger("keras_implicit")
_LIBRARY = Path(__file__).with_name("_panel_op.so")
# The same op compiled with -mavx2 -mfma (x86-64 only): Eigen's vectorized erfc and exp are ~10x faster
# than in the portable build. Loaded only on CPUs with both (it would crash, not fail to load, elsewhere).
_LIBRARY_AVX2 = Path(__file__).with_name("_panel_op_avx2.so")
_ENV_PURE_TF = "KERAS_IMPLICIT_PURE_TF"

_forced: str | None = None


class _State:
    """What was learned about the library: loaded once per process, logged once."""

    lock = threading.Lock()
    module = None  # the loaded op library
    error: str | None = None  # why it could not be loaded
    attempted = False
    logged = False


def library_path() -> Path:
    """The compiled op this process loads (or would load): the AVX2 build where the CPU has AVX2 and FMA
    and it is built, else ``keras_implicit/_panel_op.so``."""
    if _LIBRARY_AVX2.exists() and _cpu_has("avx2", "fma"):
        return _LIBRARY_AVX2
    return _LIBRARY


def _cpu_has(*flags: str) -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return all(flag in present for flag in flags)
    except OSError:
        pass
    return False


def _pure_tf_requested() -> bool:
    return os.environ.get(_ENV_PURE_TF, "") not in ("", "0")


def _log_once(path: str, detail: str, level=logging.INFO) -> None:
    if not _State.logged:
        _State.logged = True
        _LOGGER.log(level, "keras_implicit: the alternative-loss panel uses %s", f"{path} ({detail})")


# These functions run while tf.function traces; autograph must not rewrite them (it mishandles the
# module state they keep).
@tf.autograph.experimental.do_not_convert
def _load():
    """The op library, or None with the reason in `_State.error`. Tried once per process."""
    with _State.lock:
        if _State.attempted:
            return _State.module
        _State.attempted = True
        library = library_path()
        if not library.exists():
            _State.error = f"{library} is not built (pip install -e . or make -C custom_ops)"
            return None
        try:
            module = tf.load_op_library(str(library))
            if not hasattr(module, "keras_implicit_panel") or not hasattr(module, "keras_implicit_panel_grad"):
                raise RuntimeError("the library does not define KerasImplicitPanel and KerasImplicitPanelGrad")
        except (tf.errors.OpError, OSError, RuntimeError, ValueError) as error:
            # NotFoundError: an undefined symbol, e.g. built against another TensorFlow version.
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            _State.error = (
                f"{library} could not be loaded (built for another TensorFlow?): {type(error).__name__}: {message}"
            )
            _log_once("the pure-TensorFlow path", _State.error, logging.WARNING)
            return None
        _State.module = module
        _register_gradient(module)
        return module


def load_error() -> str | None:
    """Why the op is not available (None if it is loaded or was never tried)."""
    return _State.error


def in_xla_context() -> bool:
    """Whether the graph being built is compiled by XLA (the op has no XLA kernel)."""
    from tensorflow.python.ops import control_flow_util

    if tf.executing_eagerly():
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def _register_gradient(module) -> None:
    @tf.RegisterGradient("KerasImplicitPanel")
    def _panel_gradient(op, grad):
        logits, labels, feature_norm, sigmas, temperatures, margins = op.inputs
        grad_logits, grad_norm = module.keras_implicit_panel_grad(
            grad,
            logits,
            labels,
            feature_norm,
            sigmas,
            temperatures,
            margins,
            error=op.get_attr("error"),
            reduce=op.get_attr("reduce"),
        )
        return [grad_logits, None, grad_norm, None, None, None]


def _as_parameters(values):
    return tf.constant(np.asarray(values, dtype=np.float64).reshape(-1), dtype=tf.float64)


@tf.autograph.experimental.do_not_convert
def fused_panel(labels, logits, feature_norm, sigmas, temperatures, margins, error, reduce=False):
    """The fused op: [batch, K] (or [K] summed over the batch with ``reduce=True``).

    Args:
        labels: int32 [batch], each in [0, classes).
        logits: float32 or float64 [batch, classes].
        feature_norm: None (1), a scalar, [batch] or [batch, 1], in the dtype of the logits.
        sigmas, temperatures, margins: sequences of numbers (validated by the caller).
        error: whether to append the zero-one error column.
        reduce: sum over the batch inside the op.
    """
    module = _load()
    if module is None:
        raise RuntimeError(f"the fused panel op is not available: {_State.error}")
    logits = tf.convert_to_tensor(logits)
    if feature_norm is None:
        feature_norm = tf.ones([], logits.dtype)
    else:
        feature_norm = tf.cast(feature_norm, logits.dtype)
        if feature_norm.shape.rank == 2:
            feature_norm = tf.squeeze(feature_norm, axis=-1)
    return module.keras_implicit_panel(
        logits,
        tf.cast(labels, tf.int32),
        feature_norm,
        _as_parameters(sigmas),
        _as_parameters(temperatures),
        _as_parameters(margins),
        error=bool(error),
        reduce=bool(reduce),
    )


@tf.autograph.experimental.do_not_convert
def panel_op():
    """The fused op as ``op(labels, logits, feature_norm, sigmas, temperatures, margins, error)``, or None.

    None means: use the pure-TensorFlow path (forced with ``force_path("tf")``, disabled with
    ``KERAS_IMPLICIT_PURE_TF=1``, not built or not loadable, or inside an XLA compilation).
    Under ``force_path("op")`` a missing op raises RuntimeError instead of returning None (except under
    XLA, where the op cannot run at all).
    """
    if _forced == "tf":
        return None
    if _pure_tf_requested():
        if _forced == "op":
            raise RuntimeError(f"the fused panel op is disabled by {_ENV_PURE_TF}=1")
        _log_once("the pure-TensorFlow path", f"{_ENV_PURE_TF}=1")
        return None
    module = _load()
    if module is None:
        if _forced == "op":
            raise RuntimeError(f"the fused panel op is not available: {_State.error}")
        _log_once("the pure-TensorFlow path", _State.error or "the op is not available")
        return None
    if in_xla_context():
        return None
    _log_once("the fused C++ op", str(library_path()))
    return fused_panel


def active_path() -> str:
    """``"op"`` or ``"tf"``: the path the next panel built here (eagerly or in a plain graph) takes."""
    try:
        return "op" if panel_op() is not None else "tf"
    except RuntimeError:
        return "tf"


@contextlib.contextmanager
def force_path(path: str | None):
    """Forces the panel path within the block: ``"op"``, ``"tf"``, or None for the default.

    Forcing ``"op"`` makes :func:`panel_op` raise RuntimeError when the op cannot be loaded.
    """
    global _forced
    if path not in ("op", "tf", None):
        raise ValueError(f"path must be 'op', 'tf' or None, got {path!r}")
    previous, _forced = _forced, path
    try:
        yield
    finally:
        _forced = previous
