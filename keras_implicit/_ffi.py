"""The JAX seam: the fused panel kernel as XLA FFI handlers (``custom_ops/panel_ffi.cc``), JAX's CPU fast path.

Imported only on the JAX backend, by :func:`keras_implicit._dispatch.panel_kernel`, which decides whether the
kernel is wanted (``force_path``, ``path=``, ``KERAS_IMPLICIT_PANEL_PATH``); this module says whether it can run:
    panel_ffi(required, source) -> callable(labels, logits, feature_norm, sigmas, temperatures, margins, error)
                                   or None (take the keras.ops path)
It imports JAX, NumPy and ctypes only (never TensorFlow).

The handlers live in ``keras_implicit/_panel_ffi.so`` (portable: scalar ``std::erfc``/``std::exp``) and, on
x86-64, ``_panel_ffi_avx2.so`` (``-mavx2 -mfma``: glibc's libmvec AVX2 ``erfc``/``exp``/``log``/``log1p`` in
``custom_ops/panel_math.h``'s 8-row blocks), both built by ``pip install -e .`` (setup.py, where
jax is installed before it) or ``make -C custom_ops ffi`` against ``jax.ffi.include_dir()``. Where the package
holds neither, or none that loads, the first panel computed on JAX's CPU builds them into the first-use cache
(``keras_implicit/_build.py`` with :func:`build_recipe`: ``~/.cache/keras_implicit/op/jaxlib<version>-...``,
once, one INFO line; ``KERAS_IMPLICIT_NO_BUILD=1`` disables it, a failed build is remembered and logged as a
WARNING), as the TensorFlow op does. The AVX2 build is loaded where it is built and
``/proc/cpuinfo`` lists ``avx2`` and ``fma``, unless ``KERAS_IMPLICIT_OP_VARIANT=portable`` (the TF op's switch;
``avx2`` insists on it); if it fails to load (e.g. a glibc older than 2.35, without libmvec's erfc and log1p)
the portable one is tried. Loading registers four targets for the ``"cpu"`` platform
(``jax.ffi.register_ffi_target``): ``KerasImplicitPanel{F32,F64}`` (values) and
``KerasImplicitPanelGrad{F32,F64}`` (d logits, d feature_norm). The row mathematics is
``custom_ops/panel_math.h``, shared with the TensorFlow op. Both builds split the rows over XLA's CPU thread
pool, with the same bits whatever the threads. On the CPU, ``"auto"`` takes the AVX2 build wherever it loads: it
is 1.9-4.8x faster than XLA's fusion of the keras.ops path; the portable build (scalar ``erfc``/``exp``) is 2-4x
slower than that fusion, so ``"auto"`` keeps the keras.ops path where only it loads (an aarch64 machine, a CPU
without AVX2, ``KERAS_IMPLICIT_OP_VARIANT=portable``) and ``"op"`` takes it (BUILD_NOTES.md).

The call:

- ``logits`` float32 or float64 [batch, classes], ``labels`` int32 [batch], ``feature_norm`` None (1), a scalar
  or [batch] (or [batch, 1]) in the dtype of the logits; result [batch, K] (``reduce=True``: [K]).
- The parameters (sigmas, temperatures, margins, error, reduce) are **static attributes** of the call
  (float64 arrays, booleans), not operands: they are known in Python when a panel is built, they keep float64
  even without ``JAX_ENABLE_X64``, and each new panel compiles its own call (as ``jax.jit`` does for static
  arguments).
- Differentiable with respect to ``logits`` and ``feature_norm`` through a ``jax.custom_vjp`` whose backward
  pass calls the gradient handler (first derivatives only: the gradient is not itself differentiable).
- ``jax.jit``: the handlers are compiled into the computation as custom calls. ``jax.vmap``:
  ``vmap_method="sequential"``, i.e. a batched call runs the kernel once per vmapped slice (a ``lax.map``);
  the kernel itself takes one [batch, classes] problem at a time.
- Bad values are refused inside the kernel, also under ``jax.jit``: an ``INVALID_ARGUMENT`` error naming the
  argument (``labels[1] = 3 is outside [0, 3)``, ``feature_norm[0] must be finite and > 0, got -1``,
  ``sigmas[0] must be finite and >= 0, got nan``), as the TensorFlow op does; JAX raises it as ``ValueError``
  or ``jax.errors.JaxRuntimeError``, depending on the call. The keras.ops path under ``jax.jit`` cannot raise
  and gives NaN rows instead (``keras_implicit/_checks.py``).
- NVIDIA GPUs: ``keras_implicit/_panel_ffi_cuda.so`` (``custom_ops/panel_ffi_cuda.cc``, ``panel_cuda.cu`` and
  ``panel_cuda_kernels.cuh``, built by ``make -C custom_ops cuda`` with nvcc, never by ``pip install``) holds
  CUDA handlers under the same four names; where JAX's default backend is a CUDA GPU and the library is built,
  they are registered for the ``"CUDA"`` platform (and the CPU ones, where built, for ``"cpu"``). They have not
  yet been run on a GPU by this project (docs/build.md, "The CUDA kernel"), so on a GPU the kernel is taken only
  where ``"op"`` asks for it; ``"auto"`` keeps the ``keras.ops`` path there. A CUDA call takes at most
  ``CUDA_MAX_PARAMETERS`` parameters and ``CUDA_MAX_TEMPERATURES`` temperatures (kernel arguments and shared
  memory); a larger panel is computed in several calls, column groups concatenated in order.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import threading
from pathlib import Path

import numpy as np

from keras_implicit import _build

__all__ = ["panel_ffi", "fused_panel", "library_path", "load_error", "build_recipe", "TARGETS",
           "CUDA_MAX_PARAMETERS", "CUDA_MAX_TEMPERATURES"]

_LOGGER = logging.getLogger("keras_implicit")
_LIBRARY = Path(__file__).with_name("_panel_ffi.so")
_LIBRARY_AVX2 = Path(__file__).with_name("_panel_ffi_avx2.so")
_LIBRARY_CUDA = Path(__file__).with_name("_panel_ffi_cuda.so")
_ENV_VARIANT = "KERAS_IMPLICIT_OP_VARIANT"
# What `make -C custom_ops ffi` builds the CPU handlers from (keras_implicit/_build.py, on first use).
_SOURCE_FILES = ("panel_ffi.cc", "panel_ffi_shapes.h", "panel_math.h", "Makefile")

# dtype -> (forward target, gradient target): the handler symbols exported by _panel_ffi.so.
TARGETS = {
    "float32": ("KerasImplicitPanelF32", "KerasImplicitPanelGradF32"),
    "float64": ("KerasImplicitPanelF64", "KerasImplicitPanelGradF64"),
}
# custom_ops/panel_cuda.h: kMaxParameters, kMaxTemperatures.
CUDA_MAX_PARAMETERS = 384
CUDA_MAX_TEMPERATURES = 64


class _State:
    """What was learned about the library: loaded and registered once per process, logged once."""

    lock = threading.Lock()
    attempted = False
    loaded = False
    library: Path | None = None
    platform: str | None = None  # "cpu" or "cuda": where the default backend's handlers run
    error: str | None = None
    build_failed = False  # a first-use build went wrong: logged as a WARNING
    logged = False


def _cpu_has_avx2_and_fma() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


def _candidates(directory: Path | None = None) -> list[Path]:
    """The builds to try, in order (KERAS_IMPLICIT_OP_VARIANT: auto, portable or avx2), in ``directory``
    (default: the package's own)."""
    portable, avx2 = (_LIBRARY, _LIBRARY_AVX2) if directory is None else (
        directory / _LIBRARY.name, directory / _LIBRARY_AVX2.name)
    variant = os.environ.get(_ENV_VARIANT, "").strip() or "auto"
    if variant not in ("auto", "portable", "avx2"):
        raise ValueError(f"{_ENV_VARIANT} must be one of auto, portable, avx2, got {variant!r}")
    if variant == "portable":
        return [portable]
    if variant == "avx2":
        if not _cpu_has_avx2_and_fma():
            raise RuntimeError(f"{_ENV_VARIANT}=avx2, but this CPU lacks AVX2 or FMA")
        return [avx2]
    return ([avx2] if _cpu_has_avx2_and_fma() and avx2.exists() else []) + [portable]


def build_recipe(jax) -> _build.Recipe:
    """How ``make -C custom_ops ffi`` builds the CPU handlers for this jaxlib (``keras_implicit/_build.py``):
    its FFI headers (``jax.ffi.include_dir()``) go to make, its version into the cache key."""
    import jaxlib  # deferred: only to name its version in an error

    libraries = (_LIBRARY.name, _LIBRARY_AVX2.name) if platform.machine() == "x86_64" else (_LIBRARY.name,)
    return _build.Recipe(
        what=f"the panel's XLA FFI kernel for jaxlib {jaxlib.__version__}",
        framework=f"jaxlib{jaxlib.__version__}",
        source_files=_SOURCE_FILES,
        libraries=libraries,
        make_arguments=("ffi", f"JAX_FFI_INCLUDE={jax.ffi.include_dir()}"),
        duration="about 10-20 s",
    )


def _register_first(jax, candidates: list[Path], problems: list[str]) -> Path | None:
    """Registers the first of ``candidates`` that loads for the CPU; appends why each other failed."""
    for path in candidates:
        problem = _register(jax, path, "cpu")
        if problem is None:
            return path
        problems.append(problem)
    return None


def library_path() -> Path | None:
    """The FFI library loaded in this process (after the first panel), else None."""
    return _State.library


def load_error() -> str | None:
    """Why the FFI kernel could not be loaded (None when it is loaded, or not tried yet)."""
    return _State.error


def _cpu_platform_available(jax) -> bool:
    try:
        return bool(jax.devices("cpu"))
    except RuntimeError:
        return False


def _register(jax, path: Path, platform: str) -> str | None:
    """Loads ``path`` and registers its four targets for ``platform``; returns why it failed, or None."""
    if not path.exists():
        how = "make -C custom_ops cuda, with nvcc" if platform == "CUDA" else \
            "pip install -e . or make -C custom_ops ffi, with jaxlib installed"
        return f"{path} is not built ({how})"
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
        capsules = {name: jax.ffi.pycapsule(getattr(library, name)) for names in TARGETS.values() for name in names}
    except (OSError, AttributeError) as exc:
        return f"{path} could not be loaded ({type(exc).__name__}: {exc})"
    for name, capsule in capsules.items():
        jax.ffi.register_ffi_target(name, capsule, platform=platform)
    return None


def _gpu_is_cuda(jax) -> bool:
    try:
        return "rocm" not in str(jax.devices()[0].client.platform_version).lower()
    except (AttributeError, IndexError, RuntimeError):
        return False


def _load() -> bool:
    """Loads the libraries and registers their targets, once per process. Returns whether the kernel can run on
    JAX's default backend (the CPU handlers, or the CUDA ones on a CUDA GPU).

    Raises:
        ValueError: an unknown ``KERAS_IMPLICIT_OP_VARIANT``.
        RuntimeError: ``KERAS_IMPLICIT_OP_VARIANT=avx2`` on a CPU without AVX2 and FMA.
    """
    with _State.lock:
        if _State.attempted:
            return _State.loaded
        candidates = _candidates()  # a bad KERAS_IMPLICIT_OP_VARIANT raises from every panel, as on TensorFlow
        _State.attempted = True
        try:
            import jax  # deferred: this backend only
        except ImportError as exc:  # the backend is JAX, so this only happens in a broken environment
            _State.error = f"jax cannot be imported ({exc})"
            return False
        backend = jax.default_backend()
        problems = []
        cpu_library = None
        if _cpu_platform_available(jax):
            cpu_library = _register_first(jax, candidates, problems)
            if cpu_library is None and backend == "cpu":
                cpu_library = _build_on_first_use(jax, problems)
        elif backend == "cpu":
            problems.append("JAX has no CPU device")
        if backend == "cpu":
            if cpu_library is None:
                _State.error = "; ".join(problems)
                return False
            _State.loaded, _State.library, _State.platform, _State.error = True, cpu_library, "cpu", None
            return True
        if backend != "gpu" or not _gpu_is_cuda(jax):
            _State.error = f"the FFI kernel has CPU and CUDA handlers only, and JAX computes on {backend!r}"
            return False
        problem = _register(jax, _LIBRARY_CUDA, "CUDA")
        if problem is not None:
            _State.error = problem
            return False
        _State.loaded, _State.library, _State.platform, _State.error = True, _LIBRARY_CUDA, "cuda", None
        return True


def _build_on_first_use(jax, problems: list[str]) -> Path | None:
    """Builds the CPU handlers into the first-use cache where the package holds none that loads, and registers
    them; None (with the reasons appended to ``problems``) where that cannot be done."""
    recipe = build_recipe(jax)
    unavailable = _build.ensure_built(recipe)
    if unavailable is not None:
        problems.append(unavailable.reason)
        _State.build_failed = unavailable.failed
        return None
    return _register_first(jax, _candidates(_build.cache_dir(recipe)), problems)


def _log_once(path: str, detail: str, level=logging.INFO) -> None:
    if not _State.logged:
        _State.logged = True
        _LOGGER.log(level, "keras_implicit: the alternative-loss panel uses %s (%s)", path, detail)


def _parameters(values) -> tuple[float, ...]:
    return tuple(float(value) for value in np.asarray(values, np.float64).reshape(-1))


@functools.lru_cache(maxsize=None)
def _differentiable_panel():
    """The custom_vjp panel ``panel(config, logits, labels, feature_norm)``, built once (it needs jax)."""
    import jax  # deferred: this backend only

    def attributes(config):
        sigmas, temperatures, margins, error, reduce = config
        return dict(sigmas=np.asarray(sigmas, np.float64), temperatures=np.asarray(temperatures, np.float64),
                    margins=np.asarray(margins, np.float64), error=bool(error), reduce=bool(reduce))

    def columns(config):
        sigmas, temperatures, margins, error, _ = config
        return len(sigmas) + len(temperatures) + len(margins) + int(bool(error))

    def forward_call(config, logits, labels, feature_norm):
        dtype = np.dtype(logits.dtype)
        shape = (columns(config),) if config[4] else (logits.shape[0], columns(config))
        call = jax.ffi.ffi_call(TARGETS[dtype.name][0], jax.ShapeDtypeStruct(shape, dtype),
                                vmap_method="sequential")
        return call(logits, labels, feature_norm, **attributes(config))

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def panel(config, logits, labels, feature_norm):
        return forward_call(config, logits, labels, feature_norm)

    def panel_forward(config, logits, labels, feature_norm):
        return forward_call(config, logits, labels, feature_norm), (logits, labels, feature_norm)

    def panel_backward(config, residuals, upstream):
        logits, labels, feature_norm = residuals
        dtype = np.dtype(logits.dtype)
        call = jax.ffi.ffi_call(
            TARGETS[dtype.name][1],
            (jax.ShapeDtypeStruct(logits.shape, dtype), jax.ShapeDtypeStruct(feature_norm.shape, dtype)),
            vmap_method="sequential",
        )
        grad_logits, grad_norm = call(upstream.astype(dtype), logits, labels, feature_norm, **attributes(config))
        return grad_logits, None, grad_norm  # labels are integers: no cotangent

    panel.defvjp(panel_forward, panel_backward)
    return panel


def fused_panel(labels, logits, feature_norm, sigmas, temperatures, margins, error, reduce=False):
    """The FFI kernel: [batch, K] (or [K] summed over the batch with ``reduce=True``).

    Args:
        labels: integer [batch], each in [0, classes) (cast to int32).
        logits: float32 or float64 [batch, classes] (a JAX array or anything ``jnp.asarray`` takes).
        feature_norm: None (1), a scalar, [batch] or [batch, 1]; cast to the dtype of the logits.
        sigmas: Gcdf noise levels, each finite and >= 0.
        temperatures: tempered cross-entropy temperatures, each finite and > 0.
        margins: hinge margins, each finite and >= 0.
        error: whether to append the zero-one error column.
        reduce: sum over the batch inside the kernel.

    Returns:
        A JAX array [batch, K] (or [K]) in the dtype of the logits. The kernel refuses bad values itself
        (INVALID_ARGUMENT naming the argument: ``ValueError`` or ``jax.errors.JaxRuntimeError``).

    Raises:
        RuntimeError: the library is not available (``load_error()`` says why).
        TypeError: logits that are not float32 or float64.
        ValueError: an empty panel (no parameter and no error column).
    """
    if not _load():
        raise RuntimeError(f"the fused panel FFI kernel is not available: {_State.error}")
    import jax.numpy as jnp  # deferred: this backend only

    logits = jnp.asarray(logits)
    dtype = np.dtype(logits.dtype)
    if dtype.name not in TARGETS:
        raise TypeError(f"the FFI kernel computes float32 or float64 logits, got {dtype.name}")
    if feature_norm is None:
        feature_norm = jnp.ones((), dtype)
    else:
        feature_norm = jnp.asarray(feature_norm).astype(dtype)
        if feature_norm.ndim == 2:
            feature_norm = jnp.squeeze(feature_norm, axis=-1)
    labels = jnp.asarray(labels).astype(jnp.int32)
    config = (_parameters(sigmas), _parameters(temperatures), _parameters(margins), bool(error), bool(reduce))
    if not (config[0] or config[1] or config[2] or config[3]):
        # An empty result: XLA would not even call the kernel (which refuses an empty panel too).
        raise ValueError("the panel is empty: give sigmas, temperatures, margins or error=True")
    panel = _differentiable_panel()
    if _State.platform != "cuda":
        return panel(config, logits, labels, feature_norm)
    groups = _column_groups(config, CUDA_MAX_PARAMETERS, CUDA_MAX_TEMPERATURES)
    if len(groups) == 1:
        return panel(config, logits, labels, feature_norm)
    return jnp.concatenate([panel(group, logits, labels, feature_norm) for group in groups], axis=-1)


def _column_groups(config, max_parameters: int = CUDA_MAX_PARAMETERS,
                   max_temperatures: int = CUDA_MAX_TEMPERATURES) -> list[tuple]:
    """``config`` cut into configs of at most ``max_parameters`` parameters and ``max_temperatures``
    temperatures each, whose columns, concatenated in order, are those of ``config`` (the error column last)."""
    sigmas, temperatures, margins, error, reduce = config
    groups, current = [], ([], [], [])
    for family, values in enumerate((sigmas, temperatures, margins)):
        for value in values:
            if sum(map(len, current)) == max_parameters or (family == 1 and len(current[1]) == max_temperatures):
                groups.append((tuple(current[0]), tuple(current[1]), tuple(current[2]), False, reduce))
                current = ([], [], [])
            current[family].append(value)
    groups.append((tuple(current[0]), tuple(current[1]), tuple(current[2]), error, reduce))
    return groups


def panel_ffi(required: bool = False, source: str = "default"):
    """The FFI kernel as ``kernel(labels, logits, feature_norm, sigmas, temperatures, margins, error)``, or None.

    Args:
        required: the kernel was asked for (``"op"``): raise instead of returning None where it cannot run.
        source: who asked (for the messages), e.g. ``"force_path"``.

    Returns:
        :func:`fused_panel` where the library loads, else None (take the ``keras.ops`` path). Only where
        ``required``: on a CUDA GPU (the CUDA handlers are opt-in until they have been checked on a GPU), and
        where the CPU build loaded is the portable one (slower than XLA's fusion).

    Raises:
        RuntimeError: ``required`` and the kernel cannot run (the reason is in the message).
    """
    if not _load():
        if required:
            raise RuntimeError(f"the fused panel FFI kernel was asked for ({source}) but is not available: "
                               f"{_State.error}")
        level = logging.WARNING if _State.build_failed else logging.INFO
        _log_once("the keras.ops path", _State.error or "the FFI kernel is not available", level)
        return None
    if _State.platform == "cuda" and not required:
        _log_once("the keras.ops path", f"the CUDA kernel {_State.library} is opt-in (force_path('op'))")
        return None
    if _State.library.name == _LIBRARY.name and not required:
        # Scalar erfc/exp: 0.2-0.3x XLA's vectorized fusion forward, 0.4-0.6x with the gradient (BUILD_NOTES.md).
        _log_once("the keras.ops path", f"the FFI kernel's portable build {_State.library} is slower than XLA's "
                  "fusion; force_path('op') takes it")
        return None
    _log_once("the fused C++ kernel through XLA FFI", str(_State.library))
    return fused_panel
