#!/usr/bin/env bash
# Sets everything up and runs the paper's protocol on its offline default:
# fc6 on Fashion-MNIST (Debian's IDX files), SGD lr 0.1, momentum 0.9, batch 256, 10 epochs,
# tracking the Gcdf / tempered-CE / hinge panel on the full training and test sets after every epoch.
# Writes runs/fashion_mnist-fc6-ce-sgd-lr0.1-b256-s0/; rerunning resumes (or says it is finished).
# Extra arguments go to experiments/run.py, e.g.  bash experiments/quickstart.sh --epochs 3
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
            echo "quickstart: not root and no sudo: skipping apt-get install dataset-fashion-mnist" >&2; SUDO="skip"; fi
    fi
    if [ "$SUDO" != "skip" ]; then
        echo "quickstart: installing Debian's dataset-fashion-mnist (IDX files in /usr/share/datasets/fashion-mnist)"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
    fi
fi

echo "quickstart: pip install -e '.[dev]'"
# TensorFlow and JAX first: the install builds the fused op and the JAX kernel against their headers.
python3 -m pip install -q 'tensorflow==2.21.*' jax
python3 -m pip install -q -e '.[dev]'

echo "quickstart: python3 experiments/run.py $*"
exec python3 experiments/run.py "$@"
