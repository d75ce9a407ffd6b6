#!/usr/bin/env bash
# The checkpoints that the older-PyTorch tests load (tests/data/): saved by the torch this Python
# has, at 3 and 4 ranks (CPU ranks, gloo), FSDP1/legacy and FSDP2/dsd, float32 and bfloat16, each
# with its manifest, packed into one tar.xz. Run it where the older torch is, e.g. on the GPU
# machine (torch 2.11) through the device tool:
#   PYTHONPATH=. bash scripts/make_fixtures.sh "$OUT/torch-2.11.tar.xz"
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: make_fixtures.sh OUT.tar.xz}
PY=${PYTHON:-python3}
version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/torch-$version"
mkdir -p "$root"
for ws in 3 4; do
    for flow in "1 legacy" "2 dsd"; do
        set -- $flow
        for dtype in float32 bfloat16; do
            name="ws$ws-fsdp$1-$2-$dtype"
            "$PY" -m fsdpck save -n "$ws" --device cpu --fsdp "$1" --api "$2" --dtype "$dtype" "$root/$name" \
                --json "$work/$name.json" > "$work/$name.log" 2>&1 || { cat "$work/$name.log"; exit 1; }
            echo "saved $name"
        done
    done
done
tar -C "$work" -cJf "$out" "torch-$version"
ls -l "$out"
