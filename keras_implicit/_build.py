"""Builds the compiled kernels on first use, into a per-user cache (no TensorFlow or JAX import here).

A one-command install into a fresh virtualenv (``pip install '.[dev]'``, or ``pip install -e '.[dev]'`` with a
pip that builds PEP 660 wheels) builds the package before pip installs TensorFlow and JAX: ``setup.py`` then
finds neither framework's headers and installs without the compiled kernels. So where the package holds no
loadable library, the first panel a process computes builds it, as PyTorch's
``torch.utils.cpp_extension.load`` does, with the one build recipe, ``custom_ops/Makefile`` (its sources travel
in the package as ``keras_implicit/_custom_ops/``). Each seam says what it builds, as a :class:`Recipe`:
``keras_implicit/_op.py`` the TensorFlow op (``make``), ``keras_implicit/_ffi.py`` the XLA FFI kernel for JAX
(``make ffi``). Both go to one cache:

    ${KERAS_IMPLICIT_CACHE:-${XDG_CACHE_HOME:-~/.cache}/keras_implicit/op}/<key>/<the recipe's libraries>
                                                                             /build.log

``<key>`` names the framework (``tf2.21.0-x86_64-...``, ``jaxlib0.10.2-x86_64-...``) and hashes everything
the libraries depend on: the framework's version and ABI flags, the bytes of every source file (the kernel,
the headers it includes, the Makefile), the compiler (path and ``--version``), ``$CXXFLAGS`` and the machine.
A build runs under a file lock (``<key>.lock``) into a temporary directory that is renamed to ``<key>/``
when complete, so parallel processes (pytest-xdist, sweeps) build once and never load a half-written
library. A failed build is remembered as ``<key>.failed.log`` (the compiler's output); later processes take
the keras.ops path at once instead of failing the same build again (delete that file to retry).
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

__all__ = [
    "ENV_CACHE",
    "ENV_NO_BUILD",
    "Recipe",
    "Unavailable",
    "cache_root",
    "cache_key",
    "cache_dir",
    "source_dir",
    "ensure_built",
]

_LOGGER = logging.getLogger("keras_implicit")
ENV_CACHE = "KERAS_IMPLICIT_CACHE"
ENV_NO_BUILD = "KERAS_IMPLICIT_NO_BUILD"
_PACKAGE_DIR = Path(__file__).resolve().parent
_BUILD_TIMEOUT_S = 1800


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One set of libraries that ``custom_ops/Makefile`` builds, and what the build depends on.

    Attributes:
        what: for the log line, e.g. ``"the fused panel op for TensorFlow 2.21.0"``.
        framework: the key's readable prefix and first hashed input, e.g. ``"tf2.21.0"``.
        source_files: the files in ``custom_ops/`` the libraries are built from (the Makefile included).
        libraries: the files make writes into ``OUT_DIR``; a build is complete when the first one exists.
        make_arguments: targets and variables for make, e.g. ``("ffi", "JAX_FFI_INCLUDE=...")``.
        key_flags: what else the libraries depend on (the framework's ABI flags), hashed into the key; paths
            that differ between virtualenvs holding the same framework are left out.
        duration: how long the build takes on a small machine, for the log line.
    """

    what: str
    framework: str
    source_files: tuple[str, ...]
    libraries: tuple[str, ...]
    make_arguments: tuple[str, ...] = ()
    key_flags: tuple[str, ...] = ()
    duration: str = "about 30-60 s"


def source_dir(files: Sequence[str]) -> Path | None:
    """The directory holding ``files`` (a recipe's sources and the Makefile), or None.

    A source checkout (editable install, or the repository on ``PYTHONPATH``) uses its own ``custom_ops/``,
    so edits to a kernel change the cache key; an installed package uses the copy that setup.py ships as
    ``keras_implicit/_custom_ops/``.
    """
    checkout = _PACKAGE_DIR.parent
    candidates = []
    if (checkout / "setup.py").is_file():
        candidates.append(checkout / "custom_ops")
    candidates.append(_PACKAGE_DIR / "_custom_ops")
    for candidate in candidates:
        if all((candidate / name).is_file() for name in files):
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
    framework: str,
    sources: Mapping[str, bytes],
    compiler: str,
    machine: str,
    flags: Sequence[str] = (),
) -> str:
    """The cache directory's name for one build: readable prefix, then a hash of every input.

    Args:
        framework: the framework and its version, e.g. ``"tf2.21.0"`` or ``"jaxlib0.10.2"``.
        sources: file name -> bytes, for every source file of the build (the Makefile included).
        compiler: the compiler's path and its ``--version`` output.
        machine: ``platform.machine()``.
        flags: the framework's compile and link flags (without include and library paths, which differ between
            virtualenvs holding the same framework) and ``$CXXFLAGS``.

    Returns:
        e.g. ``"tf2.21.0-x86_64-3f1c0e2a9b7d4c61"``.
    """
    digest = hashlib.sha256()

    def add(data: bytes) -> None:  # length-prefixed, so that no two input lists hash alike
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    for text in (framework, compiler, machine, *flags):
        add(text.encode("utf-8"))
    for name in sorted(sources):
        add(name.encode("utf-8"))
        add(sources[name])
    readable = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{framework}-{machine}")
    return f"{readable}-{digest.hexdigest()[:16]}"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How this process would build a recipe: where, with what; or why it cannot."""

    directory: Path | None = None  # <cache root>/<key>, built or not
    command: tuple[str, ...] = ()  # the make command line, less OUT_DIR
    reason: str | None = None  # why no build is possible here


@functools.lru_cache(maxsize=None)
def _plan(recipe: Recipe) -> _Plan:
    """Computed once per process and recipe (it runs ``$CXX --version``)."""
    if os.name != "posix":
        return _Plan(reason="it cannot be built on first use: that needs make and a POSIX system")
    sources = source_dir(recipe.source_files)
    if sources is None:
        return _Plan(
            reason=f"it cannot be built on first use: its sources (custom_ops/{', '.join(recipe.source_files)}) "
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
    key = cache_key(
        framework=recipe.framework,
        sources={name: (sources / name).read_bytes() for name in recipe.source_files},
        compiler=f"{cxx}\n{compiler}\n{version}",
        machine=platform.machine(),
        flags=[*recipe.key_flags, f"CXXFLAGS={os.environ.get('CXXFLAGS', '')}"],
    )
    jobs = max(1, min(2, os.cpu_count() or 1))
    command = (make, f"-j{jobs}", "-C", str(sources), f"PYTHON={sys.executable}", f"CXX={cxx}",
               *recipe.make_arguments)
    return _Plan(directory=cache_root() / key, command=command)


def cache_dir(recipe: Recipe) -> Path | None:
    """This process's cache directory for ``recipe`` (built or not), or None where it cannot be built here."""
    return _plan(recipe).directory


@dataclasses.dataclass(frozen=True)
class Unavailable:
    """Why the cache holds no build for this process: ``failed`` for a build that went wrong (worth a
    warning), not for a build that is impossible or disabled here."""

    reason: str
    failed: bool = False


def _is_built(recipe: Recipe, directory: Path) -> bool:
    # A build directory appears by an atomic rename once every library is in it.
    return (directory / recipe.libraries[0]).is_file()


def _failure_log(directory: Path) -> Path:
    return directory.with_name(directory.name + ".failed.log")


def _build_disabled() -> bool:
    return os.environ.get(ENV_NO_BUILD, "") not in ("", "0")


def ensure_built(recipe: Recipe) -> Unavailable | None:
    """Makes sure the cache directory holds ``recipe`` built for this process; None, or why it does not.

    Builds at most once per key across processes: under ``<key>.lock``, into ``<key>.tmp-*``, renamed to
    ``<key>/`` when complete. A failure is kept in ``<key>.failed.log`` and returned, not retried.
    """
    plan = _plan(recipe)
    if plan.reason is not None:
        return Unavailable(plan.reason)
    directory = plan.directory
    if _is_built(recipe, directory):
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
        if _is_built(recipe, directory):  # another process built it while this one waited
            return None
        if failure.exists():
            return _failed(failure)
        return _build(recipe, plan, directory, failure)


def _failed(failure: Path) -> Unavailable:
    return Unavailable(f"building it on first use failed (log: {failure}; delete that file to retry)", failed=True)


def _build(recipe: Recipe, plan: _Plan, directory: Path, failure: Path) -> Unavailable | None:
    root = directory.parent
    for stale in root.glob(f"{directory.name}.tmp-*"):  # left by a killed build (the lock is held)
        shutil.rmtree(stale, ignore_errors=True)
    _LOGGER.info("keras_implicit: building %s into %s (%s, once)", recipe.what, directory, recipe.duration)
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
        f"{recipe.what}, Python {sys.executable}\n{shlex.join(command)}\n\n{output}\n"
        f"exit status {returncode}, {elapsed:.1f} s\n"
    )
    if returncode == 0 and all((scratch / name).is_file() for name in recipe.libraries):
        try:
            (scratch / "build.log").write_text(log, encoding="utf-8")
            os.rename(scratch, directory)
        except OSError as error:
            shutil.rmtree(scratch, ignore_errors=True)
            return Unavailable(f"the build in {scratch} could not be moved to {directory} ({error})", failed=True)
        _LOGGER.debug("keras_implicit: built %s in %.1f s", recipe.what, elapsed)
        return None
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        pending = failure.with_name(f"{failure.name}.{os.getpid()}")
        pending.write_text(log, encoding="utf-8")
        os.replace(pending, failure)
    except OSError:
        return Unavailable(f"building it on first use failed (exit status {returncode}): {output[-2000:]}", True)
    return _failed(failure)
