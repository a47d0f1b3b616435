"""The TensorFlow seam: loads the fused panel op (custom_ops/), the TensorFlow backend's fast path.

Imported only on the TensorFlow backend, by :func:`keras_implicit._dispatch.panel_kernel`, which decides
whether the op is wanted (``force_path``, ``path=``, ``KERAS_IMPLICIT_PANEL_PATH``); this module says
whether it can run:
    panel_op(required, source) -> callable(labels, logits, feature_norm, sigmas, temperatures, margins, error)
                                  or None (take the keras.ops path)

The op lives in ``keras_implicit/_panel_op.so`` (portable) and, on x86-64, ``_panel_op_avx2.so`` (built with
``-mavx2 -mfma``, 3.4-5x faster), both built by ``pip install -e .`` (setup.py) or ``make -C custom_ops``.
``KERAS_IMPLICIT_OP_VARIANT`` picks the build (``library_variant()``, ``library_path()``):

- ``auto`` (the default, also when unset or empty): the AVX2 build where it is built and the CPU has AVX2 and
  FMA, else the portable one;
- ``portable`` or ``avx2``: that build and no other. An unknown value (ValueError), ``avx2`` on a CPU
  without AVX2 and FMA, or a named build that is missing (RuntimeError) is an error wherever the op would
  be loaded, never a silent fallback to another build or to the keras.ops path.
- ``cuda``: ``keras_implicit/_panel_op_cuda.so``, the op with GPU kernels as well (``make -C custom_ops
  tf-gpu``: nvcc and a CUDA-enabled TensorFlow; never built by ``pip install``). ``auto`` takes it where it is
  built and TensorFlow sees a GPU, and falls back to the CPU builds if it fails to load. Its GPU kernels have
  been compiled, never run (docs/build.md, "The CUDA kernel").

The op is loaded lazily, on the first panel computed, and the ``keras.ops`` path
(``losses.panel_keras``) is used instead when:

- the path is forced to ``"keras"`` (``keras_implicit.force_path``, ``KERAS_IMPLICIT_PANEL_PATH=keras`` or
  its older name ``KERAS_IMPLICIT_PURE_TF=1``: see ``keras_implicit/_dispatch.py``);
- the library is missing (not built) or cannot be loaded (built for another TensorFlow version, another
  ABI or another machine), and it cannot be built on first use either (below): the reason is logged;
- the computation is being compiled by XLA (``tf.function(jit_compile=True)``, Keras' ``jit_compile``,
  the default on GPUs): the op has no XLA kernel.

Building on first use (``keras_implicit/_build.py``, with :func:`build_recipe`): where the package holds no
loadable build (a one-command install into a fresh virtualenv builds the package before pip installs
TensorFlow), the first panel builds the op with ``custom_ops/Makefile`` into a cache keyed by TensorFlow, the
sources and the compiler (``$KERAS_IMPLICIT_CACHE``, else ``~/.cache/keras_implicit/op/<key>/``), once, with
one INFO line; ``library_path()`` looks there after the package, with the same variant rule.
``KERAS_IMPLICIT_NO_BUILD=1`` disables building; a failed build is remembered there with its log. Forcing the
``keras`` path wins over all of it (nothing is loaded or built).

One log line (logger ``keras_implicit``, INFO; WARNING when a built library fails to load or a build fails)
says which path is in use, the first time it is decided. ``keras_implicit.active_path()`` says it at any time.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import threading
from pathlib import Path

import numpy as np
import tensorflow as tf

from keras_implicit import _build

__all__ = [
    "panel_op", "library_path", "library_variant", "load_error", "in_xla_context",
    "fused_panel", "build_recipe", "LIBRARY_NAME", "LIBRARY_AVX2_NAME",
]

_LOGGER = logging.getLogger("keras_implicit")
_LIBRARY = Path(__file__).with_name("_panel_op.so")
# The same op compiled with -mavx2 -mfma (x86-64 only): with Eigen's vectorized erfc and exp the op is
# 3.4-5x faster than the portable build (docs/build.md, "Timings"). Loaded only on CPUs with both (it would
# crash, not fail to load, elsewhere).
_LIBRARY_AVX2 = Path(__file__).with_name("_panel_op_avx2.so")
# The op with GPU kernels too (custom_ops/panel_op_gpu.cc, `make -C custom_ops tf-gpu`): the package's only.
_LIBRARY_CUDA = Path(__file__).with_name("_panel_op_cuda.so")
_ENV_VARIANT = "KERAS_IMPLICIT_OP_VARIANT"
_VARIANTS = ("auto", "portable", "avx2", "cuda")
# What custom_ops/Makefile's default target builds from (and writes into OUT_DIR, the AVX2 one on x86-64 only).
_SOURCE_FILES = ("panel_op.cc", "panel_op_inputs.h", "panel_math.h", "Makefile")
LIBRARY_NAME = _LIBRARY.name
LIBRARY_AVX2_NAME = _LIBRARY_AVX2.name



class _State:
    """What was learned about the library: loaded once per process, logged once."""

    lock = threading.Lock()
    module = None  # the loaded op library
    error: str | None = None  # why it could not be loaded
    attempted = False
    logged = False
    package_unloadable = False  # the package's own build failed to load: library_path() skips it
    cuda_unloadable = False  # _panel_op_cuda.so failed to load: auto takes the CPU builds
    build_tried = False  # _build.ensure_built() ran (once per process)
    build_problem: _build.Unavailable | None = None  # why the first-use build cache holds no build


def library_variant() -> str:
    """The op build this process uses, ``"portable"``, ``"avx2"`` or ``"cuda"``, from
    ``KERAS_IMPLICIT_OP_VARIANT``.

    ``auto`` (or unset, or empty): ``"cuda"`` where that build exists (and has not failed to load) and
    TensorFlow sees a GPU, else ``"avx2"`` where that build exists and the CPU has AVX2 and FMA, else
    ``"portable"``. ``portable``, ``avx2`` or ``cuda``: that build, or an error, never another build.

    Raises:
        ValueError: the variable holds another value.
        RuntimeError: ``avx2`` is named on a CPU without AVX2 and FMA (the library would crash the process).
    """
    requested = os.environ.get(_ENV_VARIANT, "").strip().lower() or "auto"
    if requested not in _VARIANTS:
        raise ValueError(
            f"{_ENV_VARIANT} must be one of {', '.join(_VARIANTS)}, got {os.environ[_ENV_VARIANT]!r}"
        )
    if requested == "auto":
        if _LIBRARY_CUDA.exists() and not _State.cuda_unloadable and _tensorflow_sees_a_gpu():
            return "cuda"
        return "avx2" if _library_place()[1].exists() and _cpu_has("avx2", "fma") else "portable"
    if requested == "avx2" and not _cpu_has("avx2", "fma"):
        raise RuntimeError(
            f"{_ENV_VARIANT}=avx2, but this CPU lacks AVX2 or FMA (/proc/cpuinfo): it cannot run "
            f"{_LIBRARY_AVX2.name}; use {_ENV_VARIANT}=portable or auto"
        )
    return requested


def library_path() -> Path:
    """The compiled op this process loads (or would load), chosen by :func:`library_variant`:
    ``keras_implicit/_panel_op_cuda.so``, ``_panel_op_avx2.so`` or ``_panel_op.so``, or the last two in the
    first-use build cache (``build_cache_dir()``) where the package holds no build, or one that failed to load.

    With ``auto`` the path may not exist (the op is then not built, and the keras.ops path is used).

    Raises:
        ValueError, RuntimeError: see :func:`library_variant`.
        RuntimeError: a variant named in ``KERAS_IMPLICIT_OP_VARIANT`` is not built.
    """
    variant = library_variant()
    portable, avx2 = _library_place()
    library = {"avx2": avx2, "cuda": _LIBRARY_CUDA}.get(variant, portable)
    if not _is_auto() and not library.exists():
        how = "make -C custom_ops tf-gpu" if variant == "cuda" else "pip install -e . or make -C custom_ops"
        raise RuntimeError(f"{_ENV_VARIANT}={variant}, but {library} is not built ({how})")
    return library


def _library_places():
    """Where builds are looked for, as (portable, avx2) pairs, in order: the package's own (setup.py or
    ``make -C custom_ops``), unless it failed to load, then the first-use build cache (its key is computed only
    when the package holds no build)."""
    if not _State.package_unloadable:
        yield _LIBRARY, _LIBRARY_AVX2
    cache = build_cache_dir()
    if cache is not None:
        yield cache / LIBRARY_NAME, cache / LIBRARY_AVX2_NAME


@functools.lru_cache(maxsize=1)
def build_recipe() -> _build.Recipe:
    """How ``custom_ops/Makefile`` builds the op for this TensorFlow (``keras_implicit/_build.py``).

    TensorFlow's compile and link flags go to make (it would otherwise start two interpreters to import
    TensorFlow again) and, less include and library paths, into the cache key.
    """
    compile_flags = list(tf.sysconfig.get_compile_flags())
    link_flags = list(tf.sysconfig.get_link_flags())
    machine_libraries = (LIBRARY_NAME, LIBRARY_AVX2_NAME) if platform.machine() == "x86_64" else (LIBRARY_NAME,)
    return _build.Recipe(
        what=f"the fused panel op for TensorFlow {tf.__version__}",
        framework=f"tf{tf.__version__}",
        source_files=_SOURCE_FILES,
        libraries=machine_libraries,
        make_arguments=(f"TF_CFLAGS={' '.join(compile_flags)}", f"TF_LFLAGS={' '.join(link_flags)}"),
        key_flags=tuple([flag for flag in compile_flags if not flag.startswith("-I")]
                        + [flag for flag in link_flags if not flag.startswith("-L")]),
    )


def build_cache_dir() -> Path | None:
    """The first-use build cache's directory for this TensorFlow (built or not), or None where the op cannot
    be built here."""
    return _build.cache_dir(build_recipe())


def _library_place() -> tuple[Path, Path]:
    """The first place holding a build (either variant); the package's where none does."""
    for portable, avx2 in _library_places():
        if portable.exists() or avx2.exists():
            return portable, avx2
    return _LIBRARY, _LIBRARY_AVX2


def _tensorflow_sees_a_gpu() -> bool:
    try:
        return bool(tf.config.list_physical_devices("GPU"))
    except (RuntimeError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
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


def _log_once(path: str, detail: str, level=logging.INFO) -> None:
    if not _State.logged:
        _State.logged = True
        _LOGGER.log(level, "keras_implicit: the alternative-loss panel uses %s", f"{path} ({detail})")


# These functions run while tf.function traces; autograph must not rewrite them (it mishandles the
# module state they keep).
@tf.autograph.experimental.do_not_convert
def _load():
    """The op library, or None with the reason in `_State.error`. Tried once per process.

    Order: the package's own build if it loads; else the first-use build cache, built now where it holds
    nothing (``_build.ensure_built``, once per process); else None.
    """
    with _State.lock:
        if _State.attempted:
            return _State.module
        library_variant()  # a bad KERAS_IMPLICIT_OP_VARIANT raises here, on every call
        if not _State.build_tried and not _has_build():
            _build_on_first_use()
        try:
            library = library_path()  # a named variant that is built nowhere raises here, on every call
        except RuntimeError as error:
            if _State.build_problem is None:
                raise
            raise RuntimeError(f"{error}; {_State.build_problem.reason}") from error
        _State.attempted = True
        problems, warn, tried = [], False, set()
        while True:
            if library in tried:
                pass
            elif library.exists():
                tried.add(library)
                module, problem = _open(library)
                if module is not None:
                    if problems:
                        _LOGGER.info("keras_implicit: %s; loaded %s instead", "; ".join(problems), library)
                    _State.module = module
                    _register_gradient(module)
                    return module
                problems.append(problem)
                warn = True
                if library == _LIBRARY_CUDA and _is_auto():
                    _State.cuda_unloadable = True  # auto now takes a CPU build, without building one
                    library = library_path()
                    continue
                if library in (_LIBRARY, _LIBRARY_AVX2):
                    _State.package_unloadable = True  # library_path() now looks in the build cache only
            else:
                problems.append(f"{library} is not built (pip install -e . or make -C custom_ops)")
            if _State.build_tried:
                break
            _build_on_first_use()
            try:
                library = library_path()
            except RuntimeError as error:  # a named variant that the first-use build does not provide
                problems.append(str(error))
                break
        if _State.build_problem is not None:
            problems.append(_State.build_problem.reason)
            warn = warn or _State.build_problem.failed
        _State.error = "; ".join(problems)
        if warn:
            _log_once("the keras.ops path", _State.error, logging.WARNING)
        return None


def _is_auto() -> bool:
    return os.environ.get(_ENV_VARIANT, "").strip().lower() in ("", "auto")


def _has_build() -> bool:
    try:
        return library_path().exists()
    except RuntimeError:
        return False


def _build_on_first_use() -> None:
    _State.build_tried = True
    _State.build_problem = _build.ensure_built(build_recipe())


def _open(library: Path):
    """``(module, None)``, or ``(None, why it could not be loaded)``."""
    try:
        module = tf.load_op_library(str(library))
        if not hasattr(module, "keras_implicit_panel") or not hasattr(module, "keras_implicit_panel_grad"):
            raise RuntimeError("the library does not define KerasImplicitPanel and KerasImplicitPanelGrad")
    except (tf.errors.OpError, OSError, RuntimeError, ValueError) as error:
        # NotFoundError: an undefined symbol, e.g. built against another TensorFlow version.
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        kind = type(error).__name__
        return None, f"{library} could not be loaded (built for another TensorFlow?): {kind}: {message}"
    return module, None


def load_error() -> str | None:
    """Why the op is not available (None if it is loaded or was never tried)."""
    return _State.error


def in_xla_context() -> bool:
    """Whether the graph being built is compiled by XLA (the op has no XLA kernel).

    TensorFlow has no public API for this. ``tf.__internal__.get_enclosing_xla_context`` is the exported
    (``tf_export``) symbol that Keras itself was given for it: it returns the ``XLAControlFlowContext`` of
    an enclosing ``tf.function(jit_compile=True)``, nested functions included, and None otherwise. This is
    the only place the library relies on it; ``tests/test_op.py::test_xla_context_detection`` fails loudly
    if TensorFlow removes or changes it.
    """
    if tf.executing_eagerly():
        return False
    return tf.__internal__.get_enclosing_xla_context() is not None


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
        sigmas, temperatures, margins: sequences of numbers. The op refuses bad values itself, as it
            refuses a feature_norm that is not finite and > 0, fewer than 2 classes or a label out of range.
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
def panel_op(required: bool = False, source: str = "default"):
    """The fused op as ``op(labels, logits, feature_norm, sigmas, temperatures, margins, error)``, or None.

    None means: take the ``keras.ops`` path (the op is not built, not loadable and cannot be built, or the
    graph is being compiled by XLA, where the op has no kernel). With ``required`` (``source`` asked for the
    op) a missing op raises RuntimeError instead, except under XLA.
    """
    module = _load()
    if module is None:
        if required:
            raise RuntimeError(f"the fused panel op was asked for ({source}) but is not available: {_State.error}")
        _log_once("the keras.ops path", _State.error or "the op is not available")
        return None
    if in_xla_context():
        return None
    _log_once("the fused C++ op", str(library_path()))
    return fused_panel
