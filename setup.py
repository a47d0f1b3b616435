"""keras-implicit: the paper's alternative loss families for Keras 3 (TensorFlow and JAX backends).

Dependencies are ranges here, for users who install the package into their own environment; the exact set CI
tests is pinned in constraints.txt (Python 3.11) and constraints-py3.13.txt, refreshed by tools/pin.sh.
"""

import os
import platform
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

# The fused panel op (custom_ops/): built by custom_ops/Makefile with TensorFlow's own flags when a C++ compiler,
# make and TensorFlow's headers are present; skipped otherwise (it is then built on first use, else the panel
# takes its keras.ops path). KERAS_IMPLICIT_REQUIRE_OP=1 makes a failed build fail the installation.
_OP_SOURCES = ["custom_ops/panel_op.cc", "custom_ops/panel_op_inputs.h", "custom_ops/panel_math.h",
               "custom_ops/Makefile"]
_OP_EXTENSIONS = ["keras_implicit._panel_op"]
if platform.machine() in ("x86_64", "AMD64"):
    _OP_EXTENSIONS.append("keras_implicit._panel_op_avx2")
# The XLA FFI handlers for JAX (custom_ops/panel_ffi.cc, `make -C custom_ops ffi`): built when jaxlib is
# importable (its FFI headers, jax.ffi.include_dir()), no TensorFlow needed; skipped with one line otherwise.
_FFI_SOURCES = ["custom_ops/panel_ffi.cc", "custom_ops/panel_ffi_shapes.h", "custom_ops/panel_math.h",
                "custom_ops/Makefile"]
_FFI_EXTENSIONS = ["keras_implicit._panel_ffi"]
if platform.machine() in ("x86_64", "AMD64"):
    _FFI_EXTENSIONS.append("keras_implicit._panel_ffi_avx2")  # -mavx2 -mfma, glibc's libmvec erfc/exp
# Shipped as keras_implicit/_custom_ops/: what keras_implicit/_build.py builds from on first use.
_SHIPPED_SOURCES = sorted(set(_OP_SOURCES) | set(_FFI_SOURCES))


def _tensorflow_environment(module: str = "tensorflow"):
    """An environment where this interpreter imports ``module`` (TensorFlow, or jax for the FFI), or None.

    Under pip's build isolation the build runs with PYTHONPATH pointing at a temporary environment that lacks
    TensorFlow; the interpreter's own site-packages (where TensorFlow is installed) come back without it.
    """
    probe = [sys.executable, "-c", f"import {module}"]
    isolated = dict(os.environ)
    plain = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    for env in (isolated, plain):
        env["TF_CPP_MIN_LOG_LEVEL"] = "3"
        if subprocess.run(probe, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
            return env
    return None


def _make(module: str, out_dir: str, what: str, *targets: str):
    """Runs ``make -C custom_ops`` (``targets``) with an interpreter that imports ``module``; returns None when it
    built, else why not (one line, or make's output)."""
    env = _tensorflow_environment(module)
    if env is None:
        return f"{sys.executable} cannot import {module}"
    if shutil.which("make") is None or shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no make or no C++ compiler (apt-get install g++ make)"
    os.makedirs(out_dir, exist_ok=True)
    command = ["make", "-C", os.path.abspath("custom_ops"), f"PYTHON={sys.executable}", f"OUT_DIR={out_dir}",
               *targets]
    print(f"keras_implicit: building {what}:", " ".join(command), flush=True)
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return None if done.returncode == 0 else f"make failed:\n{done.stdout[-4000:]}"


class BuildPanelOp(build_ext):
    """Builds the op's shared libraries with `make -C custom_ops`, or skips them with a message."""

    def get_ext_filename(self, fullname):
        if fullname in _OP_EXTENSIONS or fullname in _FFI_EXTENSIONS:
            return os.path.join(*fullname.split(".")) + ".so"  # loaded by path, not imported: no ABI tag
        return super().get_ext_filename(fullname)

    def run(self):
        self._op_built = False
        self._ffi_built = False
        super().run()

    def build_extension(self, ext):
        if ext.name in _FFI_EXTENSIONS:
            if self._ffi_built:  # one make run builds both libraries
                return None
            self._ffi_built = True
            return self._build_ffi()
        if ext.name not in _OP_EXTENSIONS:
            return super().build_extension(ext)
        if self._op_built:  # one make run builds every library
            return None
        self._op_built = True
        out_dir = os.path.abspath(os.path.dirname(self.get_ext_fullpath(_OP_EXTENSIONS[0])))
        reason = _make("tensorflow", out_dir, "the fused panel op")
        if reason is None:
            return None
        if os.environ.get("KERAS_IMPLICIT_REQUIRE_OP") == "1":
            raise RuntimeError(f"keras_implicit: the fused panel op could not be built: {reason}")
        print(f"keras_implicit: the fused panel op was not built now ({reason}); it will be built on first "
              "use (keras_implicit/_build.py, needs g++ and make then), else the panel takes its keras.ops path",
              file=sys.stderr, flush=True)
        return None

    def _build_ffi(self):
        """`make -C custom_ops ffi`: the JAX binding, optional (one printed line when it is skipped or fails)."""
        out_dir = os.path.abspath(os.path.dirname(self.get_ext_fullpath(_FFI_EXTENSIONS[0])))
        reason = _make("jax", out_dir, "the panel's XLA FFI kernel for JAX", "ffi")
        if reason is not None:
            print(f"keras_implicit: the panel's XLA FFI kernel for JAX was not built now ({reason}); it will be "
                  "built on first use on JAX (keras_implicit/_build.py, needs g++ and make then), else JAX takes "
                  "the keras.ops path", file=sys.stderr, flush=True)
        return None

    def get_outputs(self):
        # Only what was built (a skipped op is not an error).
        return [path for path in super().get_outputs() if os.path.exists(path)]


class BuildPyWithOpSources(build_py):
    """Also ships the CPU kernels' sources (custom_ops/panel_op.cc, panel_op_inputs.h, panel_ffi.cc,
    panel_ffi_shapes.h, panel_math.h and the Makefile) as keras_implicit/_custom_ops/, from which an installed
    package builds the TF op and the JAX FFI kernel on first use when this install could not
    (keras_implicit/_build.py). An editable install builds from the checkout's custom_ops/ instead."""

    _TARGET = os.path.join("keras_implicit", "_custom_ops")

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        self.mkpath(os.path.join(self.build_lib, self._TARGET))
        for source in _SHIPPED_SOURCES:
            self.copy_file(source, os.path.join(self.build_lib, self._TARGET, os.path.basename(source)))

    def get_outputs(self, include_bytecode=1):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return outputs + [os.path.join(self.build_lib, self._TARGET, os.path.basename(s)) for s in _SHIPPED_SOURCES]


setup(
    name="keras-implicit",
    version="0.1.0",
    description="Track what SGD implicitly minimizes: Gcdf, tempered cross-entropy and hinge panels for Keras",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # Tested: 3.11 (every session of .ci/run) and 3.13 (the JAX backend's session); 3.12 lies between, untested.
    python_requires=">=3.11,<3.14",
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.13",
    ],
    packages=find_packages(include=["keras_implicit", "keras_implicit.*"]),
    # optional: an in-place build (pip install -e .) copies only the libraries that were built.
    ext_modules=[Extension(name, sources=list(_OP_SOURCES), optional=True) for name in _OP_EXTENSIONS]
    + [Extension(name, sources=list(_FFI_SOURCES), optional=True) for name in _FFI_EXTENSIONS],
    cmdclass={"build_ext": BuildPanelOp, "build_py": BuildPyWithOpSources},
    install_requires=[
        "tensorflow==2.21.*",
        "keras>=3.15",  # keras.ops.erfc (Phi with its tail accuracy on every backend)
        "numpy",
        "matplotlib",
        "tensorboard",
        "tensorboardX",  # TensorBoard event files on the backends without TensorFlow
        "tensorflow-datasets",
        "importlib_resources",
    ],
    extras_require={
        "dev": [
            "pytest",
            "scipy",
            # Only for cross-checking Phi in the tests; the library never imports it.
            "tensorflow-probability==0.25.*",
            "tf-keras==2.21.*",
            # The JAX backend (CPU): the second backend the tests run on.
            "jax",
            # The layers contract (.importlinter), checked in .ci/run.
            "import-linter",
        ],
        # The sweep's engines beside local processes (keras_implicit.launchers; README, "Sweeps on a cluster").
        "engines": ["ray>=2.40", "submitit>=1.5"],
        # The documentation site (mkdocs.yml; built with --strict in .ci/run).
        "docs": [
            "mkdocs-material",
            "mkdocstrings[python]",
        ],
    },
)
