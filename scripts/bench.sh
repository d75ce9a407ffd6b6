#!/usr/bin/env bash
# The benchmark in one command: set-up if needed (scripts/setup.sh), then scripts/bench.py under
# torchrun in that environment, NPROC ranks (default: one per GPU, or 2 on a machine without
# one), OMP threads split evenly over the ranks unless set. Extra arguments go to
# scripts/bench.py, e.g.
#   bash scripts/bench.sh --size 1GB --reps 3 --json bench.json
#   NPROC=2 bash scripts/bench.sh --size 8GB --dir /scratch --json bench-8g.json
#   PYTHON=/opt/torch/.venv/bin/python3 bash scripts/bench.sh --size 8GB   # a GPU node's own torch
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${FSDPCK_VENV:-.venv}/bin/python"
NPROC=${NPROC:-$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")}
# torchrun would set 1 thread per rank; a GPU host's spare cores make the CPU-side model build faster.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
export PYTHONUNBUFFERED=1
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" scripts/bench.py "$@"
