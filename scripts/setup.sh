#!/usr/bin/env bash
# Install fsdpck and what it needs into the current Python, without ever pulling a CUDA build:
# where no torch is importable, the CPU build of torch 2.13.0 is installed first (pinned), and
# the project is then installed in editable mode with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=${FSDPCK_TORCH_PIN:-torch==2.13.0}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: no importable torch; installing $TORCH_PIN (CPU build)" >&2
    "$PY" -m pip install -q "$TORCH_PIN"
fi
if ! "$PY" -c "import fsdpck, click, rich, pytest, hypothesis" >/dev/null 2>&1 \
   || ! command -v fsdpck >/dev/null 2>&1; then
    # torch is already there: pip sees the floor satisfied and installs nothing more of it.
    "$PY" -m pip install -q -e ".[test]"
fi
