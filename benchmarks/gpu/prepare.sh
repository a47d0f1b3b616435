#!/usr/bin/env bash
# Here (with the package registries): puts into .whl/ what the GPU machine lacks for benchmarks/gpu/run.sh,
# Keras and its small dependencies as wheels for that machine's Python 3.12 on manylinux x86-64, and the
# Fashion-MNIST IDX files. .whl/ is gitignored; carry it to the device run (run's carry: [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl/fashion-mnist
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .whl 'keras==3.15.*' tensorboardX
cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .whl/fashion-mnist/
du -sh .whl
