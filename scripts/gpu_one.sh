#!/usr/bin/env bash
# One GPU's measurements (docs/gpu.md, docs/benchmarks.md): the fingerprint paths against copy_, a
# fresh process's world-size-1 verify, where a load's CUDA memory goes, verify at 8 GB, and the
# benchmark at 8 GB for FSDP2 and FSDP1 (five repetitions each). Usage, from the repo root:
#   OUT=./gpu-out bash scripts/gpu_one.sh quick|fingerprint|bench2|bench1|sweep
# Each part fits one 10-minute device call; logs and JSON go under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 COLUMNS=140
step() { echo; echo "### $(date -u +%T) $*"; "$@"; echo "### exit $?"; }
{
date -u; nvidia-smi -L
python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
case "${1:-quick}" in
quick)
    # A fresh process: the kernel caches are empty, as on a fresh node.
    step python3 -m fsdpck verify --json "$OUT/verify-ws1.json"
    step python3 scripts/bench_fingerprint.py --device cuda --mib 1024 --repeat 7 --manifest --json "$OUT/fp-cuda.json"
    step python3 scripts/bench_memory.py --size 8GB --device cuda --json "$OUT/mem-fsdp1.json"
    step python3 scripts/bench_memory.py --size 8GB --device cuda --fsdp 2 --json "$OUT/mem-fsdp2.json"
    step python3 -m fsdpck verify --fsdp 2 --size 8GB --planner default --json "$OUT/verify-8gb-fsdp2.json"
    ;;
fingerprint)
    # A fresh process's first run, then the fingerprint paths against copy_ (medians of 9) twice,
    # with the Triton tile/warp sweep in the first: one run decides the defaults and the 50 % target.
    step python3 -m fsdpck verify --json "$OUT/verify-ws1.json"
    step python3 scripts/bench_fingerprint.py --device cuda --mib 1024 --repeat 9 --manifest --triton-sweep --json "$OUT/fp-cuda-1.json"
    step python3 scripts/bench_fingerprint.py --device cuda --mib 1024 --repeat 9 --json "$OUT/fp-cuda-2.json"
    ;;
bench2)
    step python3 scripts/bench.py --size 8GB --fsdp 2 --reps 5 --device cuda --max-seconds 540 --json "$OUT/bench-8gb-fsdp2.json"
    ;;
bench1)
    step python3 scripts/bench.py --size 8GB --reps 5 --device cuda --max-seconds 560 --json "$OUT/bench-8gb-fsdp1.json"
    ;;
sweep)
    # The Triton kernel's tile sizes and warp counts, and FSDP1 at 8 GB again (two repetitions).
    step python3 scripts/bench_fingerprint.py --device cuda --mib 1024 --repeat 7 --triton-sweep --json "$OUT/fp-sweep.json"
    step python3 scripts/bench.py --size 8GB --reps 2 --device cuda --max-seconds 250 --json "$OUT/bench-8gb-fsdp1-2.json"
    ;;
esac
} 2>&1 | tee "$OUT/log-${1:-quick}.txt"
