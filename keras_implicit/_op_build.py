"""Builds the fused panel op on first use, into a per-user cache (imported only by ``keras_implicit/_op.py``).

A one-command install into a fresh virtualenv (``pip install '.[dev]'``, or ``pip install -e '.[dev]'`` with a
pip that builds PEP 660 wheels) builds the package before pip installs TensorFlow: ``setup.py`` then finds no
TensorFlow headers and installs without the op. So where the package holds no loadable library, the first
panel a process computes builds it, as PyTorch's ``torch.utils.cpp_extension.load`` does, with the one build
recipe, ``custom_ops/Makefile`` (its sources travel in the package as ``keras_implicit/_custom_ops/``):

    ${KERAS_IMPLICIT_CACHE:-${XDG_CACHE_HOME:-~/.cache}/keras_implicit/op}/<key>/_panel_op.so
                                                                             /_panel_op_avx2.so (x86-64)
                                                                             /build.log

``<key>`` hashes everything the libraries depend on: the TensorFlow version and its ABI flags, the bytes of
``panel_op.cc``, of ``panel_op_inputs.h`` and ``panel_math.h`` (the headers it includes) and of the Makefile,
the compiler (path and ``--version``), ``$CXXFLAGS`` and the machine.
A build runs under a file lock (``<key>.lock``) into a temporary directory that is renamed to ``<key>/``
when complete, so parallel processes (pytest-xdist, sweeps) build once and never load a half-written
library. A failed build is remembered as ``<key>.failed.log`` (the compiler's output); later processes take
the pure-TensorFlow path at once instead of failing the same build again (delete that file to retry).
``KERAS_IMPLICIT_NO_BUILD=1`` disables building (an existing cached build is still used).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import tensorflow as tf

__all__ = [
    "ENV_CACHE",
    "ENV_NO_BUILD",
    "LIBRARY_NAME",
    "LIBRARY_AVX2_NAME",
    "cache_root",
    "cache_key",
    "cache_dir",
    "source_dir",
    "ensure_built",
    "Unavailable",
]

_LOGGER = logging.getLogger("keras_implicit")
ENV_CACHE = "KERAS_IMPLICIT_CACHE"
ENV_NO_BUILD = "KERAS_IMPLICIT_NO_BUILD"
# The files custom_ops/Makefile writes into OUT_DIR (the AVX2 one on x86-64 only).
LIBRARY_NAME = "_panel_op.so"
LIBRARY_AVX2_NAME = "_panel_op_avx2.so"
_SOURCE_FILES = ("panel_op.cc", "panel_op_inputs.h", "panel_math.h", "Makefile")
_PACKAGE_DIR = Path(__file__).resolve().parent
_BUILD_TIMEOUT_S = 1800


def source_dir() -> Path | None:
    """The directory holding ``panel_op.cc``, its headers and the Makefile, or None.

    A source checkout (editable install, or the repository on ``PYTHONPATH``) uses its own ``custom_ops/``,
    so edits to the op change the cache key; an installed package uses the copy that setup.py ships as
    ``keras_implicit/_custom_ops/``.
    """
    checkout = _PACKAGE_DIR.parent
    candidates = []
    if (checkout / "setup.py").is_file():
        candidates.append(checkout / "custom_ops")
    candidates.append(_PACKAGE_DIR / "_custom_ops")
    for candidate in candidates:
        if all((candidate / name).is_file() for name in _SOURCE_FILES):
            return candidate
    return None


def cache_root() -> Path:
    """``$KERAS_IMPLICIT_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/keras_implicit/op``."""
    explicit = os.environ.get(ENV_CACHE, "")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "keras_implicit" / "op"


def cache_key(
    *,
    tf_version: str,
    sources: Mapping[str, bytes],
    compiler: str,
    machine: str,
    flags: Sequence[str] = (),
) -> str:
    """The cache directory's name for one build: readable prefix, then a hash of every input.

    Args:
        tf_version: ``tf.__version__``.
        sources: file name -> bytes, for ``panel_op.cc``, its two headers and the Makefile.
        compiler: the compiler's path and its ``--version`` output.
        machine: ``platform.machine()``.
        flags: TensorFlow's compile and link flags (without include and library paths, which differ between
            virtualenvs holding the same TensorFlow) and ``$CXXFLAGS``.

    Returns:
        e.g. ``"tf2.21.0-x86_64-3f1c0e2a9b7d4c61"``.
    """
    digest = hashlib.sha256()

    def add(data: bytes) -> None:  # length-prefixed, so that no two input lists hash alike
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    for text in (tf_version, compiler, machine, *flags):
        add(text.encode("utf-8"))
    for name in sorted(sources):
        add(name.encode("utf-8"))
        add(sources[name])
    readable = re.sub(r"[^A-Za-z0-9._+-]", "_", f"tf{tf_version}-{machine}")
    return f"{readable}-{digest.hexdigest()[:16]}"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How this process would build the op: where, with what; or why it cannot."""

    directory: Path | None = None  # <cache root>/<key>, built or not
    command: tuple[str, ...] = ()  # the make command line, less OUT_DIR
    reason: str | None = None  # why no build is possible here


def _tf_flags() -> tuple[list[str], list[str]]:
    return list(tf.sysconfig.get_compile_flags()), list(tf.sysconfig.get_link_flags())


@functools.lru_cache(maxsize=1)
def _plan() -> _Plan:
    """Computed once per process (it runs ``$CXX --version``)."""
    if os.name != "posix":
        return _Plan(reason="it cannot be built on first use: that needs make and a POSIX system")
    sources = source_dir()
    if sources is None:
        return _Plan(
            reason=f"it cannot be built on first use: the op's sources (custom_ops/{', '.join(_SOURCE_FILES)}) "
            "are not in the package"
        )
    cxx = os.environ.get("CXX", "") or "g++"
    cxx_argv = shlex.split(cxx)
    compiler = shutil.which(cxx_argv[0]) if cxx_argv else None
    make = shutil.which("make")
    if compiler is None or make is None:
        missing = f"no C++ compiler ({cxx!r} is not on PATH)" if compiler is None else "no make on PATH"
        return _Plan(reason=f"it cannot be built on first use: {missing} (apt-get install g++ make)")
    try:
        probe = subprocess.run([compiler, *cxx_argv[1:], "--version"], capture_output=True, text=True, timeout=60)
        version = probe.stdout.strip() or f"(--version exited with {probe.returncode})"
    except (OSError, subprocess.SubprocessError) as error:
        version = f"(--version failed: {error})"
    compile_flags, link_flags = _tf_flags()
    key = cache_key(
        tf_version=tf.__version__,
        sources={name: (sources / name).read_bytes() for name in _SOURCE_FILES},
        compiler=f"{cxx}\n{compiler}\n{version}",
        machine=platform.machine(),
        flags=[flag for flag in compile_flags if not flag.startswith("-I")]
        + [flag for flag in link_flags if not flag.startswith("-L")]
        + [f"CXXFLAGS={os.environ.get('CXXFLAGS', '')}"],
    )
    jobs = max(1, min(2, os.cpu_count() or 1))
    command = (
        make,
        f"-j{jobs}",
        "-C",
        str(sources),
        f"PYTHON={sys.executable}",
        f"CXX={cxx}",
        # TensorFlow is imported already: its flags spare make two interpreter starts.
        f"TF_CFLAGS={' '.join(compile_flags)}",
        f"TF_LFLAGS={' '.join(link_flags)}",
    )
    return _Plan(directory=cache_root() / key, command=command)


def cache_dir() -> Path | None:
    """This process's cache directory (built or not), or None where the op cannot be built here."""
    return _plan().directory


@dataclasses.dataclass(frozen=True)
class Unavailable:
    """Why the cache holds no build for this process: ``failed`` for a build that went wrong (worth a
    warning), not for a build that is impossible or disabled here."""

    reason: str
    failed: bool = False


def _is_built(directory: Path) -> bool:
    # A build directory appears by an atomic rename once every library is in it.
    return (directory / LIBRARY_NAME).is_file()


def _failure_log(directory: Path) -> Path:
    return directory.with_name(directory.name + ".failed.log")


def _build_disabled() -> bool:
    return os.environ.get(ENV_NO_BUILD, "") not in ("", "0")


def ensure_built() -> Unavailable | None:
    """Makes sure the cache directory holds the op built for this process; None, or why it does not.

    Builds at most once per key across processes: under ``<key>.lock``, into ``<key>.tmp-*``, renamed to
    ``<key>/`` when complete. A failure is kept in ``<key>.failed.log`` and returned, not retried.
    """
    plan = _plan()
    if plan.reason is not None:
        return Unavailable(plan.reason)
    directory = plan.directory
    if _is_built(directory):
        return None
    if _build_disabled():
        return Unavailable(f"building it on first use is disabled ({ENV_NO_BUILD}=1)")
    failure = _failure_log(directory)
    if failure.exists():
        return _failed(failure)
    root = directory.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f"{directory.name}.lock", "a+b")  # held for the whole build
    except OSError as error:
        return Unavailable(f"the build cache {root} is not writable ({error})", failed=True)
    import fcntl  # POSIX only, as is make (_plan() checked)

    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes, or when a process dies
        if _is_built(directory):  # another process built it while this one waited
            return None
        if failure.exists():
            return _failed(failure)
        return _build(plan, directory, failure)


def _failed(failure: Path) -> Unavailable:
    return Unavailable(f"building it on first use failed (log: {failure}; delete that file to retry)", failed=True)


def _build(plan: _Plan, directory: Path, failure: Path) -> Unavailable | None:
    root = directory.parent
    for stale in root.glob(f"{directory.name}.tmp-*"):  # left by a killed build (the lock is held)
        shutil.rmtree(stale, ignore_errors=True)
    _LOGGER.info(
        "keras_implicit: building the fused panel op for TensorFlow %s into %s (about 30-60 s, once)",
        tf.__version__,
        directory,
    )
    scratch = Path(tempfile.mkdtemp(prefix=f"{directory.name}.tmp-", dir=root))
    scratch.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    command = [*plan.command, f"OUT_DIR={scratch}"]
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=_BUILD_TIMEOUT_S
        )
        output, returncode = done.stdout, done.returncode
    except subprocess.TimeoutExpired as error:
        output, returncode = f"{error.output or ''}\ntimed out after {_BUILD_TIMEOUT_S} s", None
    except OSError as error:
        output, returncode = str(error), None
    elapsed = time.monotonic() - started
    log = (
        f"TensorFlow {tf.__version__}, Python {sys.executable}\n{shlex.join(command)}\n\n{output}\n"
        f"exit status {returncode}, {elapsed:.1f} s\n"
    )
    if returncode == 0 and (scratch / LIBRARY_NAME).is_file():
        try:
            (scratch / "build.log").write_text(log, encoding="utf-8")
            os.rename(scratch, directory)
        except OSError as error:
            shutil.rmtree(scratch, ignore_errors=True)
            return Unavailable(f"the build in {scratch} could not be moved to {directory} ({error})", failed=True)
        _LOGGER.debug("keras_implicit: built the fused panel op in %.1f s", elapsed)
        return None
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        pending = failure.with_name(f"{failure.name}.{os.getpid()}")
        pending.write_text(log, encoding="utf-8")
        os.replace(pending, failure)
    except OSError:
        return Unavailable(f"building it on first use failed (exit status {returncode}): {output[-2000:]}", True)
    return _failed(failure)
