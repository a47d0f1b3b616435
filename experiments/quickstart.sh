#!/usr/bin/env bash
# Sets everything up and runs the paper's protocol on its offline default:
# fc6 on Fashion-MNIST (Debian's IDX files), SGD lr 0.1, momentum 0.9, batch 256, 10 epochs,
# tracking the Gcdf / tempered-CE / hinge panel on the full training and test sets after every epoch.
# Writes runs/fashion_mnist-fc6-ce-sgd-lr0.1-b256-s0/; rerunning resumes (or says it is finished).
# Extra arguments go to experiments/run.py, e.g.  bash experiments/quickstart.sh --epochs 3, or --backend jax
# (the faster backend on a CPU). Installs into .venv in the checkout: the tests then run with .venv/bin/python.
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

# A virtualenv in the checkout (.venv; KERAS_IMPLICIT_VENV names another), with the versions CI tested
# (constraints.txt; KERAS_IMPLICIT_LATEST=1: the newest releases setup.py admits instead).
venv="${KERAS_IMPLICIT_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    echo "quickstart: python3 -m venv $venv"
    python3 -m venv "$venv"
fi
pins=(-c constraints.txt)
[ "${KERAS_IMPLICIT_LATEST:-0}" = "1" ] && pins=()
echo "quickstart: pip install -e '.[dev,docs]' into $venv ${pins[*]:+(pinned: constraints.txt)}"
# TensorFlow and JAX first: the install builds the fused op and the JAX kernel against their headers.
"$venv/bin/python" -m pip install -q "${pins[@]}" 'tensorflow==2.21.*' jax
"$venv/bin/python" -m pip install -q "${pins[@]}" -e '.[dev,docs]'

echo "quickstart: $venv/bin/python experiments/run.py $*"
exec "$venv/bin/python" experiments/run.py "$@"
