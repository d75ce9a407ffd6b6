#!/usr/bin/env bash
# Install fsdpck and what it needs into the current Python, without ever pulling a CUDA build:
# where no torch is importable, the CPU build of torch 2.13.0 is installed first (pinned), and
# this checkout is then installed in editable mode with its test extra (torch is already there,
# so pip sees the floor satisfied and installs nothing more of it).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd -P)
PY=${PYTHON:-python3}
TORCH_PIN=${FSDPCK_TORCH_PIN:-torch==2.13.0}

if ! (cd / && "$PY" -c "import torch") >/dev/null 2>&1; then
    echo "setup: no importable torch; installing $TORCH_PIN (CPU build)" >&2
    "$PY" -m pip install -q "$TORCH_PIN"
fi
# Installed, with its test tools, and installed from *this* checkout (checked from outside it,
# so that the checkout's own fsdpck/ directory cannot answer for an install elsewhere)?
if ! (cd / && "$PY" - "$REPO" <<'PY'
import pathlib, sys
import click, hypothesis, pytest, rich  # noqa: F401
import fsdpck
sys.exit(pathlib.Path(fsdpck.__file__).resolve().parent.parent != pathlib.Path(sys.argv[1]))
PY
) >/dev/null 2>&1; then
    "$PY" -m pip install -q -e ".[test]"
    # pyenv puts new console scripts on PATH only through its shims, made by a rehash.
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
fi
