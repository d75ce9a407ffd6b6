#!/usr/bin/env bash
# One GPU's measurements (docs/gpu.md, docs/benchmarks.md): the fingerprint paths against copy_, a
# fresh process's world-size-1 verify, where a load's CUDA memory goes, verify at 8 GB, and the
# benchmark at 8 GB for FSDP2 and FSDP1 (five repetitions each). Usage, from the repo root:
#   OUT=./gpu-out bash scripts/gpu_one.sh quick|fingerprint|bench2|bench1|sweep|offline
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
offline)
    # The offline commands on checkpoints saved here (torch 2.11's archives): read without importing
    # torch (the count of torch modules each run left loaded), and the tests of that path.
    D=$(mktemp -d)
    step python3 -m fsdpck save "$D/ck"
    step python3 -m fsdpck save --fsdp 2 --size 256MB "$D/big"
    step python3 -m fsdpck save --fsdp 2 --size 256MB --seed 7 "$D/big2"
    counted() {
        python3 -c "import sys, time
from fsdpck.cli import cli
t = time.perf_counter()
try:
    code = cli.main(sys.argv[1:], standalone_mode=False) or 0  # the exit code, returned without standalone mode
except SystemExit as e:
    code = e.code
n = sum(1 for m in sys.modules if m == 'torch' or m.startswith('torch.'))
print(f'exit {code}, {time.perf_counter() - t:.2f} s, torch modules loaded: {n}')" "$@"
    }
    step counted inspect "$D/big" --verify-data
    step counted inspect "$D/big" --stats
    step counted diff "$D/big" "$D/big2"
    step counted diff "$D/big" "$D/big"
    step python3 -m fsdpck show "$D/ck" model.net1.0.weight --slice 0:1
    step python3 -m pytest -q -p no:cacheprovider tests/unit/test_torchsave.py tests/unit/test_fingerprint.py \
        tests/unit/test_stats.py tests/unit/test_unpickler.py tests/unit/test_show.py tests/unit/test_inspect_diff.py
    ;;
esac
} 2>&1 | tee "$OUT/log-${1:-quick}.txt"
