#!/usr/bin/env bash
# The main job: set-up if needed (scripts/setup.sh), then a 2-rank verify on this machine (CPU
# and gloo without GPUs, CUDA and NCCL with them). Extra arguments go to `fsdpck verify`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${FSDPCK_VENV:-.venv}/bin/python" -m fsdpck verify -n "${NPROC:-2}" "$@"
