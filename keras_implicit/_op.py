"""Loads the fused panel op (custom_ops/) or falls back to the pure-TensorFlow path.

Interface used by keras_implicit.losses:
    panel_op() -> callable(labels, logits, feature_norm, sigmas, temperatures, margins, error) or None
    force_path("op" | "tf" | None): context manager for tests and benchmarks
    active_path() -> "op" or "tf"
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["panel_op", "force_path", "active_path"]

_forced: str | None = None


def panel_op():
    """The fused op, or None: not built yet (see issue 5), or KERAS_IMPLICIT_PURE_TF=1."""
    if _forced == "tf" or os.environ.get("KERAS_IMPLICIT_PURE_TF") == "1":
        return None
    return None


def active_path() -> str:
    return "op" if panel_op() is not None else "tf"


@contextlib.contextmanager
def force_path(path: str | None):
    global _forced
    if path not in ("op", "tf", None):
        raise ValueError(f"path must be 'op', 'tf' or None, got {path!r}")
    previous, _forced = _forced, path
    try:
        yield
    finally:
        _forced = previous
