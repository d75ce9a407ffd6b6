#!/usr/bin/env bash
# The GPU check: the runs that belong together on a machine with 2+ GPUs (NCCL), in one go.
# Writes logs and JSON under ${OUT:-./gpu-out}. Usage: bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 COLUMNS=140
CK=$(mktemp -d /tmp/fsdpck-gpu.XXXXXX)
step() { echo; echo "### $*"; timeout 240 "$@"; echo "### exit $?"; }
{
date -u; nvidia-smi -L
python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), 'python', sys.version.split()[0])"
step python3 -m fsdpck verify -n 2 --json "$OUT/verify.json"
step python3 -m torch.distributed.run --standalone --nproc_per_node=2 -m fsdpck verify --planner none
step python3 -m fsdpck verify -n 2 --matrix --json "$OUT/matrix.json"
step python3 -m fsdpck verify -n 2 --matrix --self-test --json "$OUT/selftest.json"
step python3 -m fsdpck save -n 2 "$CK/fsdp1"
step python3 -m fsdpck save -n 2 "$CK/fsdp2" --fsdp 2
step python3 -m fsdpck load -n 1 "$CK/fsdp1" "$CK/fsdp2"
step python3 -m fsdpck load -n 2 "$CK/fsdp1" "$CK/fsdp2" --json "$OUT/load2.json"
step python3 -m fsdpck load -n 2 "$CK/fsdp1" --fsdp 2
step python3 -m fsdpck inspect "$CK/fsdp2" --verify-data
step python3 -m pytest -q tests/unit/test_fingerprint.py -k "cuda or device" -p no:cacheprovider
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 4 ]; then
    # A node's worth of GPUs: the matrix at N ranks, and resharding N -> 2 and N -> N with both flows.
    step python3 -m fsdpck verify -n "$NGPU" --matrix --json "$OUT/matrix$NGPU.json"
    step python3 -m fsdpck save -n "$NGPU" "$CK/fsdp1-$NGPU"
    step python3 -m fsdpck save -n "$NGPU" "$CK/fsdp2-$NGPU" --fsdp 2
    step python3 -m fsdpck load -n 2 "$CK/fsdp1-$NGPU" "$CK/fsdp2-$NGPU" --json "$OUT/load${NGPU}to2.json"
    step python3 -m fsdpck load -n "$NGPU" "$CK/fsdp1-$NGPU" "$CK/fsdp2-$NGPU"
    step python3 -m fsdpck load -n 2 "$CK/fsdp1-$NGPU" --fsdp 2
    step python3 -m fsdpck load -n "$NGPU" "$CK/fsdp2-$NGPU" --fsdp 1 --api legacy
fi
} 2>&1 | tee "$OUT/gpu_check.log"
rm -rf "$CK"
