#!/usr/bin/env bash
# One node's share of an fsdpck pre-flight: the torchrun line, parameterised by environment.
#
# srun starts this once per node (scripts/slurm/preflight.sbatch); torchrun on each node
# starts GPUS_PER_NODE workers, and all nodes meet in a c10d rendezvous on FSDPCK_HEAD.
# tests/integration/test_multinode.py runs it twice on 127.0.0.1 (2 "nodes" x 2 CPU workers).
#
#   SLURM_NNODES     number of nodes                          (torchrun --nnodes)
#   SLURM_NODEID     this node's index in the allocation, 0.. (node 0 hosts the rendezvous store)
#   FSDPCK_HEAD      host of the rendezvous: the allocation's first node
#   FSDPCK_PORT      a free TCP port on FSDPCK_HEAD
#   FSDPCK_CKPT_DIR  checkpoint dir, on storage every node mounts at the same path
#   FSDPCK_JSON      where rank 0 writes the fsdpck.verify/1 document (shared storage too:
#                    rank 0 may land on any node)
#   GPUS_PER_NODE    workers per node                         (torchrun --nproc_per_node)
#   FSDPCK_RDZV_ID   rendezvous id (default: SLURM_JOB_ID), the same on every node
#   PYTHON           the Python that has fsdpck installed (default: python3)
#
# Arguments are passed on to `fsdpck verify` (e.g. --timeout 300 --planner none).
# The exit code is torchrun's (1 for any failure): read fsdpck's exact code from FSDPCK_JSON.
set -euo pipefail

: "${SLURM_NNODES:?set SLURM_NNODES (number of nodes)}"
: "${SLURM_NODEID:?set SLURM_NODEID (this node, 0..SLURM_NNODES-1)}"
: "${FSDPCK_HEAD:?set FSDPCK_HEAD (rendezvous host: the first node)}"
: "${FSDPCK_PORT:?set FSDPCK_PORT (a free port on FSDPCK_HEAD)}"
: "${FSDPCK_CKPT_DIR:?set FSDPCK_CKPT_DIR (checkpoint dir on shared storage)}"
: "${FSDPCK_JSON:?set FSDPCK_JSON (JSON report path on shared storage)}"
: "${GPUS_PER_NODE:?set GPUS_PER_NODE (workers per node)}"
RDZV_ID="${FSDPCK_RDZV_ID:-${SLURM_JOB_ID:?set FSDPCK_RDZV_ID or SLURM_JOB_ID}}"

# With the c10d backend torchrun assigns ranks itself (--node_rank is ignored, with a warning),
# so SLURM_NODEID only says who hosts the rendezvous store: node 0, which is FSDPCK_HEAD.
# Saying it explicitly beats torchrun's guess from hostnames, which fails on hosts with
# several names or interfaces.
if [ "$SLURM_NODEID" = 0 ]; then is_host=1; else is_host=0; fi

exec "${PYTHON:-python3}" -m torch.distributed.run \
    --nnodes="$SLURM_NNODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$FSDPCK_HEAD:$FSDPCK_PORT" \
    --rdzv-id="$RDZV_ID" \
    --rdzv-conf="is_host=$is_host" \
    --max-restarts=0 \
    -m fsdpck verify --checkpoint-dir "$FSDPCK_CKPT_DIR" --json "$FSDPCK_JSON" "$@"
