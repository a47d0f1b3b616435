"""The CUDA kernels (custom_ops/panel_cuda_kernels.cuh) run on the CPU under a lane emulation, without a GPU.

tests/cuda_emulation/ provides CUDA's built-ins (one thread per lane; shuffles, votes and syncs as barriers) and a
C interface; the kernels are compiled by g++ exactly as nvcc sees their source. They are checked against the
independent float64 NumPy references (tests/references.py), against panel_math.h's CPU rows (the code of the TF
op and of the CPU FFI handlers) on rows with ties, far tails, tiny losses, huge, infinite and NaN logits, the
gradient against central finite differences and the CPU rows, the column sums against NumPy, the bad rows that
the kernels record, and the parameter limits of a call (with keras_implicit._ffi's column groups, which keep a
panel within them). What the emulation cannot show (scheduling, memory, speed) is benchmarks/gpu/kernel.sh's.

Any backend. Skips without g++, unless KERAS_IMPLICIT_REQUIRE_OP=1 (CI), where it fails.
"""

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from keras_implicit import _ffi
from tests.references import ref_error, ref_gcdf, ref_hinge, ref_tce_log1p

ROOT = Path(__file__).resolve().parent.parent
SIGMAS = (0.0, 0.0625, 0.5, 1.0, 8.0)
TEMPERATURES = (0.25, 1.0, 16.0)
MARGINS = (0.0, 1.0, 16.0)
COLUMNS = len(SIGMAS) + len(TEMPERATURES) + len(MARGINS) + 1
# 2-8 classes: 8 lanes per row; 9-16: 16; more: 32, each lane taking several classes.
CLASS_COUNTS = (2, 5, 9, 16, 17, 100, 1000)
DTYPES = (np.float32, np.float64)
RTOL = {np.float32: 3e-5, np.float64: 1e-12}


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    """The emulation library, built with g++ into a temporary directory."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        if os.environ.get("KERAS_IMPLICIT_REQUIRE_OP") == "1":
            pytest.fail(f"KERAS_IMPLICIT_REQUIRE_OP=1 but {compiler} is not installed")
        pytest.skip(f"{compiler} is not installed")
    library = tmp_path_factory.mktemp("cuda_emulation") / "emulate.so"
    command = [compiler, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
               f"-I{ROOT / 'tests' / 'cuda_emulation'}", f"-I{ROOT / 'custom_ops'}",
               str(ROOT / "tests" / "cuda_emulation" / "emulate.cc"), "-o", str(library)]
    built = subprocess.run(command, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return ctypes.CDLL(str(library))


def _suffix(dtype):
    return "f32" if dtype == np.float32 else "f64"


def _pointer(array):
    return array.ctypes.data_as(ctypes.c_void_p)


def _parameters(sigmas, temperatures, margins):
    arrays = [np.ascontiguousarray(values, np.float64) for values in (sigmas, temperatures, margins)]
    arguments = []
    for array in arrays:
        arguments += [_pointer(array), ctypes.c_int(array.size)]
    return arrays, arguments


def _columns(sigmas, temperatures, margins, error):
    return len(sigmas) + len(temperatures) + len(margins) + int(error)


def _inputs(labels, logits, norms, dtype):
    logits = np.ascontiguousarray(logits, dtype)
    labels = np.ascontiguousarray(labels, np.int32)
    per_sample = np.ndim(norms) == 1
    norms = np.ascontiguousarray(np.atleast_1d(norms), dtype)
    return labels, logits, norms, per_sample


def _call(library, kind, dtype, head, bad, cpu):
    """Calls ``cpu_<kind>_<dtype>`` (the CPU rows) or ``emulated_<kind>_<dtype>`` (the kernel, which also writes
    the bad rows into ``bad``) with ``head``; raises ValueError with the host's message."""
    message = ctypes.create_string_buffer(512)
    if cpu:
        code = getattr(library, f"cpu_{kind}_{_suffix(dtype)}")(*head, message, ctypes.c_int(512))
    else:
        code = getattr(library, f"emulated_{kind}_{_suffix(dtype)}")(*head, _pointer(bad), message,
                                                                     ctypes.c_int(512))
    if code:
        raise ValueError(message.value.decode())


def forward(library, labels, logits, norms=1.0, sigmas=SIGMAS, temperatures=TEMPERATURES, margins=MARGINS,
            error=True, dtype=np.float64, cpu=False):
    """Values [batch, K] of the emulated CUDA kernel (or, with ``cpu``, of panel_math.h's CPU rows), and the
    first bad (label, norm) rows the kernel recorded (-1: none). Raises ValueError with the host's message."""
    labels, logits, norms, per_sample = _inputs(labels, logits, norms, dtype)
    batch, classes = logits.shape
    out = np.full((batch, _columns(sigmas, temperatures, margins, error)), -7.0, dtype)
    bad = np.zeros(2, np.int64)
    keep, parameters = _parameters(sigmas, temperatures, margins)
    head = [_pointer(logits), _pointer(labels), _pointer(norms), ctypes.c_int64(batch), ctypes.c_int64(classes),
            ctypes.c_int(per_sample)] + parameters + [ctypes.c_int(error), _pointer(out)]
    _call(library, "forward", dtype, head, bad, cpu)
    del keep
    return out, tuple(bad)


def gradient(library, upstream, labels, logits, norms=1.0, sigmas=SIGMAS, temperatures=TEMPERATURES,
             margins=MARGINS, error=True, dtype=np.float64, cpu=False):
    """(d logits [batch, classes], the rows' d norm [batch], bad rows) of the emulated kernel or the CPU rows;
    ``upstream`` is [batch, K], or [K] (the same for every row: the kernel's reduce)."""
    labels, logits, norms, per_sample = _inputs(labels, logits, norms, dtype)
    upstream = np.ascontiguousarray(upstream, dtype)
    batch, classes = logits.shape
    dx = np.full((batch, classes), -7.0, dtype)
    row_dnorm = np.full(batch, -7.0, dtype)
    bad = np.zeros(2, np.int64)
    keep, parameters = _parameters(sigmas, temperatures, margins)
    head = [_pointer(upstream), ctypes.c_int(upstream.ndim == 1), _pointer(logits), _pointer(labels), _pointer(norms),
            ctypes.c_int64(batch), ctypes.c_int64(classes), ctypes.c_int(per_sample)] + parameters + [
        ctypes.c_int(error), _pointer(dx), _pointer(row_dnorm)]
    _call(library, "gradient", dtype, head, bad, cpu)
    del keep
    return dx, row_dnorm, tuple(bad)


def reference(labels, logits, norms=1.0, sigmas=SIGMAS, temperatures=TEMPERATURES, margins=MARGINS, error=True):
    columns = [ref_gcdf(labels, logits, s, np.broadcast_to(norms, (len(labels),))) for s in sigmas]
    columns += [ref_tce_log1p(labels, logits, t) for t in temperatures]
    columns += [ref_hinge(labels, logits, g) for g in margins]
    if error:
        columns.append(ref_error(labels, logits))
    return np.stack(columns, axis=-1)


def special_rows(classes, dtype, seed=0):
    """Random rows, then ties, a far tail, a tiny loss, huge logits, a NaN, +inf at the label and elsewhere,
    -inf elsewhere (the last five rows are not finite)."""
    rng = np.random.default_rng(seed + classes)
    logits = rng.normal(0.0, 3.0, (12, classes))
    labels = rng.integers(0, classes, 12)
    logits[0] = 1.5  # every class tied
    labels[0] = classes - 1
    logits[1] = 0.0
    logits[1, labels[1]] = 10.0 * np.sqrt(2) * 0.5  # Gcdf(0.5) = (C - 1) Phi(-10)
    logits[2] = -40.0
    logits[2, labels[2]] = 40.0  # tempered CE ~ (C - 1) e^-80 at T = 1
    logits[3] *= 1e6
    logits[7, 0] = np.nan
    logits[8, labels[8]] = np.inf  # inf - inf margins where another logit is +inf too
    logits[8, (labels[8] + 1) % classes] = np.inf
    logits[9, (labels[9] + 1) % classes] = np.inf
    logits[10, (labels[10] + 1) % classes] = -np.inf
    logits[11, labels[11]] = -np.inf
    return labels.astype(np.int32), logits.astype(dtype)


def assert_same(emulated, cpu, rtol):
    """NaN where the CPU rows have NaN, infinities equal, the rest to rtol."""
    assert emulated.shape == cpu.shape
    np.testing.assert_array_equal(np.isnan(emulated), np.isnan(cpu))
    np.testing.assert_allclose(emulated, cpu, rtol=rtol, atol=1e-30)


# --------------------------------------------------------------------------- #
# Values
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("classes", CLASS_COUNTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_values_match_the_numpy_references(emulation, classes, dtype):
    labels, logits = special_rows(classes, dtype)
    finite = slice(0, 7)
    norms = np.linspace(0.5, 2.0, 7)
    values, bad = forward(emulation, labels[finite], logits[finite], norms, dtype=dtype)
    assert bad == (-1, -1)
    expected = reference(labels[finite], logits[finite].astype(np.float64), norms)
    np.testing.assert_allclose(values, expected, rtol=5 * RTOL[dtype], atol=1e-35)


@pytest.mark.parametrize("classes", CLASS_COUNTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_values_match_the_cpu_rows_on_special_rows(emulation, classes, dtype):
    labels, logits = special_rows(classes, dtype)
    emulated, _ = forward(emulation, labels, logits, 1.25, dtype=dtype)
    cpu, _ = forward(emulation, labels, logits, 1.25, dtype=dtype, cpu=True)
    assert np.isnan(emulated[7]).all()  # the NaN row
    assert np.isnan(emulated[8, 1]) and not np.isnan(emulated[8, 0])  # inf - inf: NaN erfc, no sigma-0 count
    assert_same(emulated, cpu, RTOL[dtype])


@pytest.mark.parametrize("batch", [1, 3, 40])
def test_every_row_is_written_once_whatever_the_batch(emulation, batch):
    labels = np.arange(batch) % 10
    logits = np.random.default_rng(batch).normal(0, 2, (batch, 10))
    values, _ = forward(emulation, labels, logits, sigmas=(1.0,), temperatures=(), margins=(), error=False)
    assert not (values == -7.0).any()
    np.testing.assert_allclose(values[:, 0], ref_gcdf(labels, logits, 1.0), rtol=1e-12)


# --------------------------------------------------------------------------- #
# Gradients
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("classes", [2, 9, 100])
def test_gradient_matches_central_differences(emulation, classes):
    rng = np.random.default_rng(classes)
    labels = rng.integers(0, classes, 3).astype(np.int32)
    logits = rng.normal(0.0, 2.0, (3, classes))
    norms = np.array([0.7, 1.0, 1.6])
    weights = rng.uniform(0.5, 1.5, COLUMNS)
    weights[-1] = 0.0  # the error column is piecewise constant
    dx, dnorm, _ = gradient(emulation, np.tile(weights, (3, 1)), labels, logits, norms)

    def total(s, n):
        return float(np.sum(forward(emulation, labels, s, n)[0] * weights))

    step = 1e-6
    for b, j in [(0, 0), (1, classes - 1), (2, int(labels[2])), (2, (int(labels[2]) + 1) % classes)]:
        plus, minus = logits.copy(), logits.copy()
        plus[b, j] += step
        minus[b, j] -= step
        np.testing.assert_allclose(dx[b, j], (total(plus, norms) - total(minus, norms)) / (2 * step), rtol=2e-6,
                                   atol=1e-7)
    for b in range(3):
        plus, minus = norms.copy(), norms.copy()
        plus[b] += step
        minus[b] -= step
        np.testing.assert_allclose(dnorm[b], (total(logits, plus) - total(logits, minus)) / (2 * step), rtol=2e-6,
                                   atol=1e-7)


@pytest.mark.parametrize("classes", CLASS_COUNTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", [False, True])
def test_gradient_matches_the_cpu_rows_on_special_rows(emulation, classes, dtype, reduce):
    labels, logits = special_rows(classes, dtype)
    rng = np.random.default_rng(classes)
    upstream = rng.uniform(0.5, 1.5, COLUMNS if reduce else (len(labels), COLUMNS)).astype(dtype)
    upstream[..., 1] = 0.0  # a zero upstream skips its column, NaN rows included
    norms = np.linspace(0.5, 2.0, len(labels))
    emulated = gradient(emulation, upstream, labels, logits, norms, dtype=dtype)
    cpu = gradient(emulation, upstream, labels, logits, norms, dtype=dtype, cpu=True)
    assert_same(emulated[0], cpu[0], 10 * RTOL[dtype])
    assert_same(emulated[1], cpu[1], 10 * RTOL[dtype])


# --------------------------------------------------------------------------- #
# Sums, bad inputs, limits
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("rows", [0, 1, 255, 257, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_column_sums_in_double_in_a_fixed_order(emulation, rows, dtype):
    values = np.ascontiguousarray(np.random.default_rng(rows).normal(0, 1e3, (rows, 3)), dtype)
    sums = []
    for _ in range(2):
        out = np.full(3, -7.0, dtype)
        getattr(emulation, f"emulated_column_sums_{_suffix(dtype)}")(
            _pointer(values), ctypes.c_int64(rows), ctypes.c_int64(3), _pointer(out))
        sums.append(out)
    np.testing.assert_array_equal(sums[0], sums[1])
    np.testing.assert_allclose(sums[0], values.astype(np.float64).sum(axis=0), rtol=RTOL[dtype], atol=1e-9)


def test_bad_labels_and_norms_are_recorded_at_their_first_row(emulation):
    labels = np.array([0, 1, 2, 10, 1, 0, 2, -1], np.int32)
    logits = np.zeros((8, 10))
    norms = np.ones(8)
    norms[[5, 6]] = [0.0, np.nan]
    _, bad = forward(emulation, labels, logits, norms)
    assert bad == (3, 5)
    _, _, bad = gradient(emulation, np.ones(COLUMNS), labels, logits, norms)
    assert bad == (3, 5)
    _, bad = forward(emulation, np.zeros(8, np.int32), logits, -1.0)  # a scalar norm: row 0 names it
    assert bad == (-1, 0)


def test_parameters_are_checked_on_the_host(emulation):
    labels, logits = np.zeros(2, np.int32), np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"sigmas\[1\] must be finite and >= 0, got -1"):
        forward(emulation, labels, logits, sigmas=(1.0, -1.0))
    with pytest.raises(ValueError, match=r"temperatures\[0\] must be finite and > 0, got 0"):
        forward(emulation, labels, logits, temperatures=(0.0,))
    limits = _cuda_limits()
    with pytest.raises(ValueError, match="at most 384 parameters and 64 temperatures per call, got 385 and 0"):
        forward(emulation, labels, logits, sigmas=np.ones(limits[0] + 1), temperatures=(), margins=())
    with pytest.raises(ValueError, match="got 65 and 65"):
        forward(emulation, labels, logits, sigmas=(), temperatures=np.ones(limits[1] + 1), margins=())
    values, _ = forward(emulation, labels, logits, sigmas=np.ones(limits[0] - 64), temperatures=np.ones(64), margins=())
    assert values.shape == (2, limits[0] + 1)


def _cuda_limits():
    header = (ROOT / "custom_ops" / "panel_cuda.h").read_text()
    return tuple(int(re.search(rf"constexpr int {name} = (\d+);", header).group(1))
                 for name in ("kMaxParameters", "kMaxTemperatures"))


def test_python_limits_are_the_kernels():
    assert (_ffi.CUDA_MAX_PARAMETERS, _ffi.CUDA_MAX_TEMPERATURES) == _cuda_limits()


@pytest.mark.parametrize("counts", [(3, 5, 2), (0, 9, 0), (4, 0, 0), (0, 0, 7), (2, 2, 2), (10, 1, 1)])
@pytest.mark.parametrize("error", [False, True])
def test_column_groups_keep_every_column_in_order_within_the_limits(counts, error):
    sigmas, temperatures, margins = (tuple(float(10 * family + i) for i in range(count))
                                     for family, count in enumerate(counts))
    config = (sigmas, temperatures, margins, error, False)
    groups = _ffi._column_groups(config, max_parameters=4, max_temperatures=2)
    names = [(family, value) for group in groups for family in range(3) for value in group[family]]
    assert names == [(family, value) for family in range(3) for value in config[family]]
    assert all(sum(map(len, group[:3])) <= 4 and len(group[1]) <= 2 for group in groups)
    assert [group[3] for group in groups] == [False] * (len(groups) - 1) + [error]
    assert all(sum(map(len, group[:3])) + group[3] > 0 for group in groups)
    assert _ffi._column_groups(config) == [config]  # the default limits: one call
