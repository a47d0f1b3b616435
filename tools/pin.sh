#!/usr/bin/env bash
# Refreshes a constraints file: the newest releases that setup.py's ranges admit today, every direct and transitive
# dependency pinned, from a fresh virtualenv (nothing of this machine's own site-packages).
#   bash tools/pin.sh                      # constraints.txt, for python3 (3.11, what the README's commands use)
#   bash tools/pin.sh python3.13 constraints-py3.13.txt   # the newest-Python session of .ci/run
# Then run `bash .ci/run` (it installs from the new pins) and commit the file if the suite passes.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-python3}"
out="${2:-constraints.txt}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# A copy of the tree, so that the install's builds of the op and the kernel never land in this checkout.
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$work"
mkdir -p "$work/.pin" && "$python" -m venv "$work/.pin/venv"
"$work/.pin/venv/bin/python" -m pip install -q -U pip
"$work/.pin/venv/bin/python" -m pip install -q 'tensorflow==2.21.*' jax
"$work/.pin/venv/bin/python" -m pip install -q "$work[dev,docs]"
{
    echo "# Pinned by tools/pin.sh on $(date -u +%Y-%m-%d) for $("$work/.pin/venv/bin/python" --version 2>&1)" \
        "on $(uname -m): the set .ci/run tests. Refresh: bash tools/pin.sh $python $out"
    "$work/.pin/venv/bin/python" -m pip freeze --exclude keras-implicit | grep -v '^-e '
} > "$out"
echo "pin: wrote $out ($(grep -vc '^#' "$out") packages)"
