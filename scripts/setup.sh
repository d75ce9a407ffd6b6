#!/usr/bin/env bash
# Set-up for this checkout: a project-local virtual environment with fsdpck, what it needs to run
# and its test tools. scripts/verify.sh and scripts/test.sh run it first; a repeat is a no-op until
# pyproject.toml (or the choice below) changes.
#
#   bash scripts/setup.sh                      # .venv from python3, with the CPU build torch==2.13.0
#   PYTHON=/opt/torch/bin/python3 bash scripts/setup.sh
#                                              # a Python that already has torch (a GPU node): .venv
#                                              # sees its packages and nothing is installed into it
#
# Environment: PYTHON (the base interpreter; default python3), FSDPCK_VENV (where the environment
# lives; default .venv in the checkout), FSDPCK_TORCH (the torch to install where the base Python
# has none; default torch==2.13.0, pinned so that pip never resolves a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FSDPCK_VENV:-.venv}
BASE=${PYTHON:-python3}
TORCH_SPEC=${FSDPCK_TORCH:-torch==2.13.0}

if ! command -v "$BASE" >/dev/null 2>&1; then
    echo "setup: no Python found as '$BASE' (set PYTHON=/path/to/python3)" >&2
    exit 2
fi
# The environment is rebuilt when what it was built from changes: the project's dependencies,
# the base Python, the torch asked for, or where this checkout is (the install is editable).
want="$(cksum pyproject.toml | cut -d' ' -f1) $(command -v "$BASE") ${PYTHON:+system-torch} $TORCH_SPEC $(pwd -P)"
stamp="$VENV/.fsdpck-setup"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ] && [ -n "$(ls -A "$VENV" 2>/dev/null)" ]; then
    echo "setup: $VENV exists and is not a virtual environment; it is left alone (set FSDPCK_VENV)" >&2
    exit 2
fi
rm -rf "$VENV"
if [ -n "${PYTHON:-}" ]; then
    # A Python that brings its own torch (and CUDA): use it, install nothing into it.
    if ! (cd / && "$BASE" -c "import torch") >/dev/null 2>&1; then
        echo "setup: PYTHON=$PYTHON cannot import torch; unset PYTHON to get the CPU build in $VENV" >&2
        exit 2
    fi
    echo "setup: $VENV from $PYTHON (its torch is used)" >&2
    "$BASE" -m venv --system-site-packages "$VENV" || {
        echo "setup: '$BASE -m venv' failed: install the venv module (Debian: apt install python3-venv)" >&2
        exit 2
    }
else
    echo "setup: $VENV from $(command -v "$BASE") with $TORCH_SPEC" >&2
    "$BASE" -m venv "$VENV" || {
        echo "setup: '$BASE -m venv' failed: install the venv module (Debian: apt install python3-venv)" >&2
        exit 2
    }
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"
echo "$want" > "$stamp"
