"""Building the compiled kernels on first use (keras_implicit/_build.py; the loading orders of keras_implicit/_op.py
and keras_implicit/_ffi.py).

Children run with the package's own libraries hidden (``_op._LIBRARY`` pointed elsewhere, as in
tests/test_op.py) and a temporary ``KERAS_IMPLICIT_CACHE``, so they see exactly what a package installed
without the op sees. One real build (two processes racing for it, which also tests the lock) is shared by
the module's tests; a failing compiler (``CXX=false``) fails at once. The fresh-virtualenv test is slow.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from keras_implicit import _build, _op

ROOT = Path(__file__).resolve().parents[1]
BUILDING = "building the fused panel op"
USES = "alternative-loss panel uses"

_CHILD = textwrap.dedent(
    """
    import json, logging, os, sys
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(message)s", stream=sys.stdout)
    import numpy as np
    from keras_implicit import _dispatch, _op, losses
    packaged = os.environ.get("CHILD_PACKAGED", "")
    if packaged:
        _op._LIBRARY = _op._LIBRARY_AVX2 = Path(packaged)
    path = _dispatch.active_path()
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 12)) * 3.0
    labels = rng.integers(0, 12, size=64)
    values = {}
    for which in ("keras", "op") if path == "op" else ("keras",):
        with _dispatch.force_path(which):
            values[which] = losses.panel_values(
                labels, logits, [0.0, 0.5, 1.0, 8.0], [0.5, 1.0, 4.0], [0.0, 1.0], True
            ).numpy().tolist()
    libraries = {}
    for variant in ("auto", "portable"):
        os.environ["KERAS_IMPLICIT_OP_VARIANT"] = variant
        try:
            libraries[variant] = str(_op.library_path())
        except RuntimeError as error:  # a named variant that is built nowhere
            libraries[variant] = f"RuntimeError: {error}"
    print("RESULT " + json.dumps({"path": path, "load_error": _op.load_error(), "values": values,
                                   "libraries": libraries}))
    """
)


def _env(cache: Path, hide_package: bool = True, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERAS_IMPLICIT_")}
    env.update(
        KERAS_IMPLICIT_CACHE=str(cache),
        CHILD_PACKAGED=str(cache.parent / "hidden" / "_panel_op.so") if hide_package else "",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


def _parse(stdout: str) -> tuple[dict, list[str]]:
    lines = stdout.splitlines()
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[7:])
    return result, [line for line in lines if line.startswith("LOG ")]


def _child(env: dict) -> tuple[dict, list[str]]:
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=900,
                          cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return _parse(done.stdout)


def _results(children: list[subprocess.Popen]) -> list[tuple[dict, list[str]]]:
    """Waits for child processes started together (they race for one build); their results and log lines."""
    results = []
    for child in children:
        stdout, stderr = child.communicate(timeout=900)
        assert child.returncode == 0, stdout[-3000:] + stderr[-3000:]
        results.append(_parse(stdout))
    return results


def _the_one_build(results: list[tuple[dict, list[str]]], marker: str) -> str:
    """The log line (containing ``marker``) of the one process of ``results`` that built."""
    builders = [logs for _, logs in results if any(marker in line for line in logs)]
    assert len(builders) == 1, "exactly one of the two processes builds"
    return next(line for line in builders[0] if marker in line)


def _require_tools(compiler: str = "g++") -> None:
    """Skips without make or the compiler (fails under KERAS_IMPLICIT_REQUIRE_OP=1, as CI sets)."""
    missing = [tool for tool in ("make", compiler) if shutil.which(tool) is None]
    if missing:
        if os.environ.get("KERAS_IMPLICIT_REQUIRE_OP") == "1":
            pytest.fail(f"KERAS_IMPLICIT_REQUIRE_OP=1 but {', '.join(missing)} missing")
        pytest.skip(f"{', '.join(missing)} not on PATH: the op cannot be built here")


def _expected_libraries() -> set[str]:
    if platform.machine() == "x86_64":
        return {_op.LIBRARY_NAME, _op.LIBRARY_AVX2_NAME}
    return {_op.LIBRARY_NAME}


# --------------------------------------------------------------------------- #
# The cache key and directory
# --------------------------------------------------------------------------- #
_KEY_INPUTS = dict(
    framework="tf2.21.0",
    sources={"panel_op.cc": b"// the op\n", "Makefile": b"all:\n"},
    compiler="g++\n/usr/bin/g++\ng++ (Debian 12.2.0-14) 12.2.0",
    machine="x86_64",
    flags=["-D_GLIBCXX_USE_CXX11_ABI=1", "--std=c++17", "CXXFLAGS="],
)


@pytest.mark.parametrize(
    "change",
    [
        {"framework": "tf2.22.0"},
        {"sources": {"panel_op.cc": b"// the op, edited\n", "Makefile": b"all:\n"}},
        {"sources": {"panel_op.cc": b"// the op\n", "Makefile": b"all: x\n"}},
        {"compiler": "g++\n/usr/bin/g++\ng++ (Debian 13.1.0) 13.1.0"},
        {"compiler": "clang++\n/usr/bin/clang++\nclang version 16"},
        {"machine": "aarch64"},
        {"flags": ["-D_GLIBCXX_USE_CXX11_ABI=0", "--std=c++17", "CXXFLAGS="]},
        {"flags": ["-D_GLIBCXX_USE_CXX11_ABI=1", "--std=c++17", "CXXFLAGS=-O2"]},
    ],
    ids=["framework", "source", "makefile", "compiler_version", "compiler", "machine", "abi", "cxxflags"],
)
def test_cache_key_changes_with_every_input(change):
    base = _build.cache_key(**_KEY_INPUTS)
    assert _build.cache_key(**{**_KEY_INPUTS, **change}) != base


def test_cache_key_is_stable_and_readable():
    key = _build.cache_key(**_KEY_INPUTS)
    assert key == _build.cache_key(**{**_KEY_INPUTS, "sources": dict(reversed(_KEY_INPUTS["sources"].items()))})
    assert key.startswith("tf2.21.0-x86_64-") and len(key.rsplit("-", 1)[1]) == 16
    # Boundaries between inputs matter: moving bytes from one source file to the other changes the key.
    moved = {"panel_op.cc": b"// the op\nall:\n", "Makefile": b""}
    assert _build.cache_key(**{**_KEY_INPUTS, "sources": moved}) != key
    assert "/" not in _build.cache_key(**{**_KEY_INPUTS, "framework": "tf2.21.0/../x"})


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("KERAS_IMPLICIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _build.cache_root() == tmp_path / "xdg" / "keras_implicit" / "op"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _build.cache_root() == tmp_path / "home" / ".cache" / "keras_implicit" / "op"
    monkeypatch.setenv("KERAS_IMPLICIT_CACHE", str(tmp_path / "mine"))
    assert _build.cache_root() == tmp_path / "mine"


def test_sources_come_from_the_checkout():
    # In a checkout (editable install) the key follows custom_ops/ as it is edited.
    assert _build.source_dir(_op.build_recipe().source_files) == ROOT / "custom_ops"


# --------------------------------------------------------------------------- #
# One real build, raced for by two processes
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def first_use_build(tmp_path_factory):
    """Two processes start at once on an empty cache, without the package's libraries: one builds, the other
    waits on the lock; both must then use the op."""
    _require_tools(os.environ.get("CXX") or "g++")
    cache = tmp_path_factory.mktemp("first_use") / "cache"
    env = _env(cache)
    children = [
        subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, cwd=ROOT)
        for _ in range(2)
    ]
    return cache, _results(children)


def test_first_use_build_gives_the_op_with_the_pure_path_values(first_use_build):
    cache, results = first_use_build
    building = _the_one_build(results, BUILDING)
    assert building.startswith("LOG INFO") and "TensorFlow" in building and str(cache) in building
    for result, logs in results:
        assert result["path"] == "op" and result["load_error"] is None
        uses = [line for line in logs if USES in line]
        assert len(uses) == 1 and "fused C++ op" in uses[0] and str(cache) in uses[0]
        assert not [line for line in logs if line.startswith("LOG WARNING")]
        np.testing.assert_allclose(result["values"]["op"], result["values"]["keras"], rtol=1e-11, atol=1e-300)


def test_first_use_build_is_complete_and_the_variant_rule_applies(first_use_build):
    cache, results = first_use_build
    entries = sorted(path.name for path in cache.iterdir())
    (key,) = [name for name in entries if (cache / name).is_dir()]
    assert entries == [key, f"{key}.lock"], "no temporary directory or failure log is left"
    assert {path.name for path in (cache / key).glob("*.so")} == _expected_libraries()
    assert "exit status 0" in (cache / key / "build.log").read_text()
    for result, _ in results:
        libraries = {variant: Path(path) for variant, path in result["libraries"].items()}
        assert libraries["portable"] == cache / key / _op.LIBRARY_NAME
        auto = _op.LIBRARY_AVX2_NAME if _op._cpu_has("avx2", "fma") else _op.LIBRARY_NAME
        assert libraries["auto"] == cache / key / auto


def test_this_process_computes_the_same_cache_directory(first_use_build, monkeypatch):
    cache, _ = first_use_build
    monkeypatch.setenv("KERAS_IMPLICIT_CACHE", str(cache))
    _build._plan.cache_clear()
    try:
        assert _op.build_cache_dir().parent == cache and _op.build_cache_dir().is_dir()
        assert _build.ensure_built(_op.build_recipe()) is None  # built already: nothing to do
    finally:
        _build._plan.cache_clear()


def test_unloadable_package_library_falls_back_to_the_cached_build(first_use_build, tmp_path):
    cache, _ = first_use_build
    broken = tmp_path / "_panel_op.so"
    broken.write_bytes(b"\x7fELF not a library built for this TensorFlow")
    result, logs = _child(_env(cache, CHILD_PACKAGED=str(broken)))
    assert result["path"] == "op" and result["load_error"] is None
    assert not [line for line in logs if BUILDING in line], "the cached build is reused"
    assert any("could not be loaded" in line and str(cache) in line for line in logs)
    assert str(cache) in result["libraries"]["auto"]
    np.testing.assert_allclose(result["values"]["op"], result["values"]["keras"], rtol=1e-11, atol=1e-300)


# --------------------------------------------------------------------------- #
# Failures and switches
# --------------------------------------------------------------------------- #
def test_failing_compiler_gives_the_pure_path_and_is_remembered(tmp_path):
    _require_tools("false")
    cache = tmp_path / "cache"
    env = _env(cache, CXX="false")
    first, first_logs = _child(env)
    assert first["path"] == "keras" and "op" not in first["values"]
    assert "not built" in first["load_error"] and "building it on first use failed" in first["load_error"]
    (failure,) = cache.glob("*.failed.log")
    assert str(failure) in first["load_error"] and "delete that file to retry" in first["load_error"]
    assert "false " in failure.read_text() and "exit status 2" in failure.read_text()
    assert not [path for path in cache.iterdir() if path.is_dir()], "no build directory, no temporary one"
    assert sum(BUILDING in line for line in first_logs) == 1
    warnings = [line for line in first_logs if line.startswith("LOG WARNING")]
    assert len(warnings) == 1 and str(failure) in warnings[0]

    # The next process does not try again: the remembered failure, one warning, no build.
    second, second_logs = _child(env)
    assert second["path"] == "keras" and second["load_error"] == first["load_error"]
    assert not [line for line in second_logs if BUILDING in line]
    assert len([line for line in second_logs if line.startswith("LOG WARNING")]) == 1


def test_no_build_variable_disables_building(tmp_path):
    cache = tmp_path / "cache"
    result, logs = _child(_env(cache, KERAS_IMPLICIT_NO_BUILD="1"))
    assert result["path"] == "keras"
    assert "not built" in result["load_error"] and "KERAS_IMPLICIT_NO_BUILD=1" in result["load_error"]
    assert not cache.exists()
    uses = [line for line in logs if USES in line]
    assert len(uses) == 1 and uses[0].startswith("LOG INFO") and "KERAS_IMPLICIT_NO_BUILD=1" in uses[0]


def test_pure_tf_variable_wins_over_building(tmp_path):
    cache = tmp_path / "cache"
    result, logs = _child(_env(cache, KERAS_IMPLICIT_PURE_TF="1"))
    assert result["path"] == "keras" and not cache.exists()
    assert not [line for line in logs if BUILDING in line]


# --------------------------------------------------------------------------- #
# The JAX FFI kernel: the same cache under its own key (keras_implicit/_ffi.py)
# --------------------------------------------------------------------------- #
FFI_BUILDING = "building the panel's XLA FFI kernel"
# "auto" takes the FFI kernel's AVX2 build, not the portable one (slower than XLA's fusion: tests/test_ffi.py).
FFI_AUTO = "op" if _op._cpu_has("avx2", "fma") and platform.machine() == "x86_64" else "keras"

_FFI_CHILD = textwrap.dedent(
    """
    import json, logging, os, sys
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(message)s", stream=sys.stdout)
    import jax
    import numpy as np
    from keras_implicit import _build, _dispatch, _ffi, losses
    hidden = Path(os.environ["CHILD_HIDDEN"])  # the package's own libraries, as this child sees them
    _ffi._LIBRARY, _ffi._LIBRARY_AVX2 = hidden / "_panel_ffi.so", hidden / "_panel_ffi_avx2.so"
    path = _dispatch.active_path()
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(64, 12)) * 3.0).astype(np.float32)
    labels = rng.integers(0, 12, size=64)
    values = {}
    for which in ("keras", "op"):
        try:
            with _dispatch.force_path(which):
                values[which] = np.asarray(losses.panel_values(
                    labels, logits, [0.0, 0.5, 1.0, 8.0], [0.5, 1.0, 4.0], [0.0, 1.0], True)).tolist()
        except RuntimeError:  # "op" where the kernel is not available
            pass
    recipe = _ffi.build_recipe(jax)
    library = _ffi.library_path()
    print("RESULT " + json.dumps({"path": path, "load_error": _ffi.load_error(), "values": values,
                                   "library": None if library is None else str(library),
                                   "cache_dir": str(_build.cache_dir(recipe)), "framework": recipe.framework,
                                   "sources": list(recipe.source_files)}))
    """
)


def _ffi_child(cache: Path, hidden: Path, **extra) -> subprocess.Popen:
    env = _env(cache, hide_package=False, KERAS_BACKEND="jax", CHILD_HIDDEN=str(hidden), **extra)
    return subprocess.Popen([sys.executable, "-c", _FFI_CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def ffi_first_use_build(tmp_path_factory):
    """Two JAX processes start at once on an empty cache, without the package's FFI libraries."""
    _require_tools(os.environ.get("CXX") or "g++")
    root = tmp_path_factory.mktemp("ffi_first_use")
    cache = root / "cache"
    return cache, _results([_ffi_child(cache, root / "hidden") for _ in range(2)])


def test_ffi_first_use_build_gives_the_kernel_with_the_keras_values(ffi_first_use_build):
    cache, results = ffi_first_use_build
    building = _the_one_build(results, FFI_BUILDING)
    assert building.startswith("LOG INFO") and "jaxlib" in building and str(cache) in building
    for result, logs in results:
        assert result["path"] == FFI_AUTO and result["load_error"] is None
        assert result["library"].startswith(result["cache_dir"])
        assert result["framework"].startswith("jaxlib") and Path(result["cache_dir"]).name.startswith("jaxlib")
        uses = [line for line in logs if USES in line]
        assert len(uses) == 1 and str(cache) in uses[0]
        assert ("XLA FFI" in uses[0]) == (FFI_AUTO == "op")
        assert not [line for line in logs if line.startswith("LOG WARNING")]
        np.testing.assert_allclose(result["values"]["op"], result["values"]["keras"], rtol=2e-5, atol=1e-30)


def test_ffi_first_use_build_is_complete_and_separate_from_the_op(ffi_first_use_build):
    cache, results = ffi_first_use_build
    (key,) = [path.name for path in cache.iterdir() if path.is_dir()]
    assert sorted(path.name for path in cache.iterdir()) == [key, f"{key}.lock"]
    expected = {"_panel_ffi.so", "_panel_ffi_avx2.so"} if platform.machine() == "x86_64" else {"_panel_ffi.so"}
    assert {path.name for path in (cache / key).glob("*.so")} == expected
    assert "exit status 0" in (cache / key / "build.log").read_text()
    assert results[0][0]["sources"] == ["panel_ffi.cc", "panel_ffi_shapes.h", "panel_math.h", "Makefile"]
    auto = "_panel_ffi_avx2.so" if _op._cpu_has("avx2", "fma") else "_panel_ffi.so"
    assert {result["library"] for result, _ in results} == {str(cache / key / auto)}


def test_ffi_unloadable_package_library_falls_back_to_the_cached_build(ffi_first_use_build, tmp_path):
    cache, _ = ffi_first_use_build
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for name in ("_panel_ffi.so", "_panel_ffi_avx2.so"):
        (hidden / name).write_bytes(b"\x7fELF not a shared library")
    ((result, logs),) = _results([_ffi_child(cache, hidden)])
    assert result["path"] == FFI_AUTO and str(cache) in result["library"]
    assert not [line for line in logs if FFI_BUILDING in line], "the cached build is reused"
    np.testing.assert_allclose(result["values"]["op"], result["values"]["keras"], rtol=2e-5, atol=1e-30)


def test_ffi_failing_compiler_gives_the_keras_path_with_one_warning(tmp_path):
    """One process: the shared cache code remembers the failure (test_failing_compiler_... shows a second process
    does not build again); KERAS_IMPLICIT_NO_BUILD on JAX: tests/test_ffi.py."""
    _require_tools("false")
    cache = tmp_path / "cache"
    ((result, logs),) = _results([_ffi_child(cache, tmp_path / "hidden", CXX="false")])
    assert result["path"] == "keras" and "op" not in result["values"] and result["library"] is None
    assert "is not built" in result["load_error"] and "building it on first use failed" in result["load_error"]
    assert sum(FFI_BUILDING in line for line in logs) == 1
    warnings = [line for line in logs if line.startswith("LOG WARNING")]
    (failure,) = cache.glob("jaxlib*.failed.log")
    assert len(warnings) == 1 and "keras.ops path" in warnings[0] and str(failure) in warnings[0]
    assert "false " in failure.read_text() and "exit status 2" in failure.read_text()


# --------------------------------------------------------------------------- #
# One `pip install` into a fresh virtualenv (downloads TensorFlow: minutes)
# --------------------------------------------------------------------------- #
_PROBE = textwrap.dedent(
    """
    import json, logging, sys, time
    logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(message)s", stream=sys.stdout)
    import keras, keras_implicit
    from pathlib import Path
    from keras_implicit import _dispatch
    if keras.backend.backend() == "jax":
        from keras_implicit import _ffi as seam
    else:
        from keras_implicit import _op as seam
    package = Path(keras_implicit.__file__).parent
    started = time.monotonic()
    path = _dispatch.active_path()
    print("RESULT " + json.dumps({
        "path": path, "library": str(seam.library_path()), "load_error": seam.load_error(),
        "seconds": time.monotonic() - started, "package": str(package),
        "packaged_libraries": sorted(p.name for p in package.glob("*.so")),
        "shipped_sources": sorted(p.name for p in (package / "_custom_ops").glob("*")),
    }))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_one_pip_install_in_a_fresh_virtualenv_gives_the_op(tmp_path, editable):
    """`python -m venv` without TensorFlow, one `pip install '<clone>[dev]'`, then the op is active, and the
    FFI kernel on JAX."""
    _require_tools()
    clone = tmp_path / "clone"
    unbuilt = shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".pytest_cache", "runs", "figures", "_custom_ops"
    )
    shutil.copytree(ROOT, clone, ignore=unbuilt)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KERAS_IMPLICIT_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(KERAS_IMPLICIT_CACHE=str(tmp_path / "cache"), PIP_DISABLE_PIP_VERSION_CHECK="1",
               TF_CPP_MIN_LOG_LEVEL="3")
    assert subprocess.run([python, "-c", "import tensorflow"], env=env, capture_output=True).returncode != 0
    command = [python, "-m", "pip", "install", "-q", *(["-e"] if editable else []), f"{clone}[dev]"]
    install = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=3000)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    probe = subprocess.run([python, "-c", _PROBE], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=900)
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
    result, logs = _parse(probe.stdout)
    print(json.dumps(result, indent=1), *logs, sep="\n")  # shown with -s: which way the op arrived, how fast
    assert result["path"] == "op", result["load_error"]
    if editable:
        assert Path(result["package"]) == clone / "keras_implicit"
    else:
        assert result["shipped_sources"] == ["Makefile", "panel_ffi.cc", "panel_ffi_shapes.h", "panel_math.h",
                                             "panel_op.cc", "panel_op_inputs.h"]
    if not [name for name in result["packaged_libraries"] if name.startswith("_panel_op")]:
        # the install could not build the op: it was built on first use
        assert result["library"].startswith(str(tmp_path / "cache"))
        assert sum(BUILDING in line for line in logs) == 1

    # The same install on JAX: the FFI kernel, from the install or built on first use.
    probe = subprocess.run([python, "-c", _PROBE], env={**env, "KERAS_BACKEND": "jax"}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=900)
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
    result, logs = _parse(probe.stdout)
    print(json.dumps(result, indent=1), *logs, sep="\n")
    assert result["path"] == FFI_AUTO and result["load_error"] is None, result["load_error"]
    if not [name for name in result["packaged_libraries"] if name.startswith("_panel_ffi")]:
        assert result["library"].startswith(str(tmp_path / "cache"))
        assert sum(FFI_BUILDING in line for line in logs) == 1
