#!/usr/bin/env bash
# The whole failure-drill table: every phase x kind at each world size, through
# `fsdpck verify -n N` with FSDPCK_FAULT set. Each drill must end with exit 3 within
# --timeout + 30 s; the line per drill also says whether the failed rank was named.
# (CI runs a representative subset: tests/integration/test_drills.py.)
#
#   bash scripts/drills.sh                                  # 5 phases x 4 kinds x 2 world sizes = 40 drills
#   DRILL_KINDS="hang kill" DRILL_WORLD_SIZES=3 bash scripts/drills.sh
#
# Environment: DRILL_PHASES (init step save load compare), DRILL_KINDS (raise exit hang kill),
# DRILL_WORLD_SIZES (2 3), DRILL_RANK (the rank that fails; default the last one, N-1),
# DRILL_TIMEOUT (fsdpck's --timeout, 10), DRILL_SLACK (seconds allowed past it, 30),
# PYTHON (python3). Exit 0 when every drill passed, 1 otherwise.
set -uo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PHASES=(${DRILL_PHASES:-init step save load compare})
KINDS=(${DRILL_KINDS:-raise exit hang kill})
WORLD_SIZES=(${DRILL_WORLD_SIZES:-2 3})
TIMEOUT="${DRILL_TIMEOUT:-10}"
SLACK="${DRILL_SLACK:-30}"
LIMIT=$((TIMEOUT + SLACK))
GUARD=$((LIMIT + 60))  # a drill still running then is a hang of fsdpck's own: killed, and failed

work="$(mktemp -d "${TMPDIR:-/tmp}/fsdpck-drills.XXXXXX")"
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

total=0
passed=0
named_count=0
failures=()
baselines=()
printf '%-24s %4s %6s %8s  %-6s %s\n' "FSDPCK_FAULT" "ws" "exit" "seconds" "named" "result"
for ws in "${WORLD_SIZES[@]}"; do
    rank="${DRILL_RANK:-$((ws - 1))}"
    # What a launch costs here without a fault: the seconds below include it (not part of the verdict).
    t0=$(date +%s.%N)
    timeout -k 5 "$GUARD" "$PY" -m fsdpck verify -n "$ws" --timeout "$TIMEOUT" --planner none \
        --checkpoint-dir "$work/ck-baseline-$ws" >"$work/baseline-$ws.log" 2>&1
    code=$?
    took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    baselines+=("no fault at $ws ranks: exit $code in ${took}s")
    printf '%-24s %4s %6s %8s  %-6s %s\n' "(none)" "$ws" "$code" "$took" "-" "baseline"
    rm -rf "$work/ck-baseline-$ws"
    for phase in "${PHASES[@]}"; do
        for kind in "${KINDS[@]}"; do
            fault="$phase:$rank:$kind"
            total=$((total + 1))
            log="$work/drill-$ws-$phase-$kind.log"
            ck="$work/ck-$ws-$phase-$kind"
            t0=$(date +%s.%N)
            # Its own session, so that whatever it leaves behind can be ended by its id.
            setsid -w timeout -k 5 "$GUARD" env FSDPCK_FAULT="$fault" \
                "$PY" -m fsdpck verify -n "$ws" --timeout "$TIMEOUT" --planner none --checkpoint-dir "$ck" \
                >"$log" 2>&1 &
            pid=$!
            wait "$pid"
            code=$?
            kill -KILL -- "-$pid" 2>/dev/null
            took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
            if grep -Eq "rank $rank([^0-9]|$)" "$log"; then named=yes; named_count=$((named_count + 1)); else named=no; fi
            if [ "$code" = 3 ] && awk -v t="$took" -v l="$LIMIT" 'BEGIN { exit !(t <= l) }'; then
                result=ok
                passed=$((passed + 1))
            else
                result=FAIL
                why="exit $code"
                [ "$code" = 124 ] || [ "$code" = 137 ] && why="killed after ${GUARD}s"
                failures+=("$fault at $ws ranks: $why in ${took}s — $(grep -m1 -E 'error|FAILED' "$log" | cut -c1-160)")
            fi
            printf '%-24s %4s %6s %8s  %-6s %s\n' "$fault" "$ws" "$code" "$took" "$named" "$result"
            rm -rf "$ck"
        done
    done
done

echo
echo "fsdpck drills: $passed of $total ended with exit 3 within --timeout $TIMEOUT + ${SLACK}s; the failed rank was named in $named_count of $total"
echo "  (seconds count from launch; for comparison, $(IFS=';'; echo "${baselines[*]}" | sed 's/;/; /g'))"
for f in "${failures[@]}"; do
    echo "  FAIL $f"
done
[ "$passed" = "$total" ]
