#!/usr/bin/env bash
# One launch of the default --matrix against a single-flow verify at the same world size:
# most of a launch is imports and process-group start, which the matrix shares. Prints the
# median wall time of each over REPS runs and their ratio (target: at most 2x). Set-up first
# (scripts/setup.sh); both run in that environment.
#   bash scripts/bench_matrix.sh                 # NPROC=2 ranks, REPS=3 runs each
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
NPROC=${NPROC:-2}
REPS=${REPS:-3}
"${FSDPCK_VENV:-.venv}/bin/python" - "$NPROC" "$REPS" <<'PY'
import statistics, subprocess, sys, time

from fsdpck.state import flows

nproc, reps = sys.argv[1], int(sys.argv[2])
# The matrix's flows as verify selects them (CPU: the modes that need CUDA are left out).
matrix_flows = len(flows.select(matrix=True, world_size=int(nproc), cuda=False))


def wall(*extra):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fsdpck", "verify", "-n", nproc, *extra], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


single = wall("--planner", "default")
matrix = wall("--matrix")
print(f"world size {nproc}, {reps} runs each (median, min-max seconds)")
print(f"single flow (fsdp1 legacy, default planner, sync): {single[0]:.2f}  ({single[1]:.2f}-{single[2]:.2f})")
print(f"{f'default matrix ({matrix_flows} flows):':50} {matrix[0]:.2f}  ({matrix[1]:.2f}-{matrix[2]:.2f})")
print(f"ratio matrix / single: {matrix[0] / single[0]:.2f}  (target <= 2.00)")
PY
