#!/usr/bin/env bash
# The CUDA kernel of the panel (custom_ops/panel_ffi_cuda.cc over panel_cuda.cu) on a machine with an NVIDIA GPU,
# JAX (CUDA), nvcc and no TensorFlow, from the repository root, after benchmarks/gpu/prepare.sh filled .whl/ here
# and .whl/ was carried along (BUILD_NOTES.md, "The CUDA kernel"):
#     bash benchmarks/gpu/kernel.sh            # logs under $OUT (or benchmarks/gpu/out)
# 1. builds the CUDA handlers with nvcc for the GPU found (CUDA_ARCH, default sm_<compute capability>) and the
#    CPU ones with g++;
# 2. runs tests/test_ffi.py on the GPU (the kernel against the float64 NumPy references and the keras.ops path
#    on the same GPU, gradients, jit, vmap, bad inputs), float32 and then float64 (JAX_ENABLE_X64=1);
# 3. runs compute-sanitizer (memcheck, racecheck, synccheck, initcheck) on one call of each kernel
#    (benchmarks/gpu/one_call.py), instrumenting the panel's kernels only;
# 4. times the 24-loss panel at 60k x 10, 60k x 100 and 10k x 1000 against the XLA-compiled keras.ops path
#    (benchmarks/ffi.py: minimum of repeats, XLA's temporary buffers of each compiled variant).
# Every step runs even if one before it failed; the exit status is the first failure's.
# Rehearsal on a CPU (the CUDA build needs only nvcc; the tests and the benchmark then run the CPU kernel):
#     PATH=/path/to/cuda/bin:$PATH CUDA_ARCH=sm_90 JAX_PLATFORMS=cpu bash benchmarks/gpu/kernel.sh --quick
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${OUT:-benchmarks/gpu/out}
mkdir -p "$OUT_DIR"
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
status=0
step() {  # step NAME COMMAND...: runs it, logs to $OUT_DIR/NAME.log, remembers the first failure
    local name=$1
    shift
    echo "== $name: $*"
    "$@" >"$OUT_DIR/$name.log" 2>&1
    local code=$?
    tail -n 25 "$OUT_DIR/$name.log"
    echo "== $name: exit $code"
    [ "$code" -ne 0 ] && [ "$status" -eq 0 ] && status=$code
    return 0
}

python3 -c "import keras, tensorboardX" 2>/dev/null || \
    python3 -m pip install -q --no-index --find-links .whl 'keras==3.15.*' tensorboardX
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
export KERAS_BACKEND=jax KERAS_IMPLICIT_REQUIRE_OP=1 PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
    CUDA_ARCH=${CUDA_ARCH:-sm_$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')}
fi
nvcc --version | tail -n 2
step build make -C custom_ops ffi cuda CUDA_ARCH="${CUDA_ARCH:-native}"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT_DIR/gpu.txt"

step tests_float32 python3 -m pytest tests/test_ffi.py -q -m "not slow and not benchmark" -p no:cacheprovider
step tests_float64 env JAX_ENABLE_X64=1 python3 -m pytest tests/test_ffi.py -q -m "not slow and not benchmark" \
    -p no:cacheprovider

if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck synccheck initcheck; do
        step "sanitizer_$tool" env XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_ENABLE_X64=1 \
            compute-sanitizer --tool "$tool" --error-exitcode 99 --kernel-name kns=keras_implicit \
            python3 benchmarks/gpu/one_call.py
    done
else
    echo "compute-sanitizer not found: skipped" | tee "$OUT_DIR/sanitizer.log"
fi

if [ "$QUICK" -eq 1 ]; then
    step benchmark python3 benchmarks/ffi.py --rows 2000 --repeats 3
else
    step benchmark python3 benchmarks/ffi.py
fi
echo "kernel.sh: exit $status"
exit "$status"
