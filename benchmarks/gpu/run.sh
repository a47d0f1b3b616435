#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and JAX (CUDA) but no TensorFlow and no network, from the repository root,
# after benchmarks/gpu/prepare.sh filled .whl/ here and .whl/ was carried along:
#     bash benchmarks/gpu/run.sh            # writes $OUT/gpu.json (or benchmarks/gpu/out/gpu.json)
# Rehearsal on a CPU: JAX_PLATFORMS=cpu bash benchmarks/gpu/run.sh --quick
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${OUT:-benchmarks/gpu/out}
mkdir -p "$OUT_DIR"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
# Only what is missing, from the carried wheels; never TensorFlow (the package is installed without its
# dependencies and without building the op: setup.py skips it where TensorFlow cannot be imported).
python3 -c "import keras, tensorboardX" 2>/dev/null || \
    python3 -m pip install -q --no-index --find-links .whl 'keras==3.15.*' tensorboardX
python3 -m pip install -q --no-deps --no-build-isolation -e .
export KERAS_BACKEND=jax
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 benchmarks/gpu/measure.py --data-dir .whl/fashion-mnist --out "$OUT_DIR/gpu.json" "$@"
