"""Which kernel computes the panel: the one place where the path is decided.

Two paths compute every loss of :func:`keras_implicit.losses.panel_values`:

- ``"keras"``: the formulas written once in ``keras.ops`` (:mod:`keras_implicit.losses`); every backend.
- ``"op"``: the fused C++ kernel (``custom_ops/``): on the TensorFlow backend the TF op, loaded by
  :mod:`keras_implicit._op`, outside XLA compilation; on the JAX backend the XLA FFI handlers
  (``custom_ops/panel_ffi.cc``), loaded by :mod:`keras_implicit._ffi`, on the CPU (``jax.jit`` and
  ``jax.vmap`` included). Other backends (PyTorch) have no fused kernel.

The path is chosen, in this order, by:

1. the ``path=`` argument of :func:`keras_implicit.losses.panel_values` (one call);
2. :func:`force_path` (a ``with`` block; a ``contextvars.ContextVar``, so each thread and each asyncio task
   sees its own setting and blocks nest);
3. the environment: ``KERAS_IMPLICIT_PANEL_PATH=auto|op|keras`` (``KERAS_IMPLICIT_PURE_TF=1``, the older
   name, means ``keras``);
4. otherwise ``"auto"``: the fused kernel where it loads (the TF op on TensorFlow, the FFI kernel's AVX2 build
   on JAX), else ``"keras"``. On JAX's CPU that build computes the panel 1.9-3.6x faster than XLA's fusion of
   the ``keras.ops`` path forward and 3.4-4.8x with the gradient (``benchmarks/ffi.py``, BUILD_NOTES.md "The
   JAX binding: XLA FFI (CPU)"); where it cannot load (not built, only the portable build, which is slower
   than XLA's fusion, or JAX computes on a GPU) ``"auto"`` takes the ``keras.ops`` path.

Asking for ``"op"`` where it cannot run raises RuntimeError (with the reason), except inside an XLA
compilation, where the op has no kernel and the ``keras.ops`` path is taken. :func:`active_path` says which
path the next panel built here takes.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from typing import Callable, Optional

import keras

__all__ = ["PATHS", "force_path", "active_path", "panel_kernel"]

PATHS = ("auto", "op", "keras")
_ENV_PATH = "KERAS_IMPLICIT_PANEL_PATH"
_ENV_PURE_TF = "KERAS_IMPLICIT_PURE_TF"

_LOGGER = logging.getLogger("keras_implicit")
_logged_environment = False

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("keras_implicit_panel_path", default=None)


def _check(path: Optional[str], what: str) -> Optional[str]:
    if path is not None and path not in PATHS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, PATHS))} or None, got {path!r}")
    return path


def _environment_path() -> tuple[str, str]:
    """(path, where it came from) from the environment."""
    value = os.environ.get(_ENV_PATH, "").strip()
    if value:
        if value not in PATHS:
            raise ValueError(f"{_ENV_PATH} must be one of {', '.join(PATHS)}, got {value!r}")
        return value, f"{_ENV_PATH}={value}"
    if os.environ.get(_ENV_PURE_TF, "") not in ("", "0"):
        return "keras", f"{_ENV_PURE_TF}=1"
    return "auto", "default"


def requested_path(path: Optional[str] = None) -> tuple[str, str]:
    """The path asked for (``auto``, ``op`` or ``keras``) and who asked: argument, context, environment."""
    if _check(path, "path") is not None:
        return path, "the path= argument"
    forced = _forced.get()
    if forced is not None:
        return forced, "force_path"
    return _environment_path()


@contextlib.contextmanager
def force_path(path: Optional[str]):
    """Forces the panel path inside the block: ``"op"``, ``"keras"``, ``"auto"`` or None (no forcing).

    Thread-safe and nestable: the setting is a context variable, seen only by the thread (or asyncio
    task) that entered the block. Forcing ``"op"`` makes a panel raise RuntimeError where the op cannot
    run (another backend, not built or not loadable).

    Example:
        >>> with force_path("keras"):
        ...     values = panel_values(labels, logits, sigmas=[1.0])
    """
    token = _forced.set(_check(path, "path"))
    try:
        yield
    finally:
        _forced.reset(token)


def panel_kernel(path: Optional[str] = None) -> Optional[Callable]:
    """The fused kernel to call, or None for the ``keras.ops`` path; see the module docstring.

    Args:
        path: ``"auto"``, ``"op"``, ``"keras"`` for this call, or None (``force_path``, then the environment).

    Returns:
        ``kernel(labels, logits, feature_norm, sigmas, temperatures, margins, error)`` (the TF op on
        TensorFlow, the FFI kernel on JAX), or None.

    Raises:
        RuntimeError: ``"op"`` was asked for where no fused kernel can run (with the reason).
    """
    global _logged_environment
    wanted, source = requested_path(path)
    if wanted == "keras":
        if source.startswith("KERAS_IMPLICIT") and not _logged_environment:
            _logged_environment = True  # one line per process, as the op's own choice
            _LOGGER.info("keras_implicit: the alternative-loss panel uses the keras.ops path (%s)", source)
        return None
    backend = keras.backend.backend()
    if backend == "jax":
        from keras_implicit import _ffi  # the JAX seam: imported on the JAX backend only

        # auto: the FFI kernel's AVX2 build where it loads (faster than XLA's fusion of the keras.ops path on the
        # CPU, forward and with the gradient: docs/build.md, "The JAX binding: XLA FFI (CPU)"), else keras.ops.
        return _ffi.panel_ffi(required=wanted == "op", source=source)
    if backend != "tensorflow":
        if wanted == "op":
            raise RuntimeError(f"the fused panel kernel runs on the TensorFlow and JAX backends only; Keras uses "
                               f"{backend!r} (asked by {source})")
        return None
    from keras_implicit import _op  # the TensorFlow seam: imported on the TensorFlow backend only

    return _op.panel_op(required=wanted == "op", source=source)


def active_path(path: Optional[str] = None) -> str:
    """``"op"`` or ``"keras"``: the path the next panel built here (eagerly or in a plain graph) takes.

    Raises:
        RuntimeError, ValueError: the error the next panel raises, where it cannot run at all (``"op"`` asked for
            where no fused kernel loads, a ``KERAS_IMPLICIT_OP_VARIANT`` naming a build that is not there or
            no build): never ``"keras"`` for a panel that would fail.
    """
    return "op" if panel_kernel(path) is not None else "keras"
