"""Multi-node on one machine: two torchrun "nodes" on 127.0.0.1 meeting in a c10d rendezvous.

Each node is a torchrun with 2 CPU workers, so the world size is 4. Covered: a verify
across both nodes started the way scripts/slurm/preflight.sbatch starts it (srun and
scontrol stand-ins run scripts/slurm/node.sh once per node, and the job's exit code is
fsdpck's, read from the JSON), whose kept checkpoint (saved at 2 nodes) is then loaded at
one node and checked against its manifest (resharded 4 -> 2); and a `save` into a dir that
one node does not share (a private tmpfs mounted over the path in a mount namespace),
refused with exit 2 naming that node's ranks. Ports are found by binding to port 0, never
fixed. Each two-node launch costs six torch imports: keep this file to two of them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO, check_envelope, fsdpck, load_json, worker_env
from reliability import record, sees

LAUNCH_TIMEOUT = 300  # seconds for a two-node launch: generous, a loaded 2-core machine is slow
FSDPCK_TIMEOUT = "60"  # --timeout for the runs: a hang fails the run long before LAUNCH_TIMEOUT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_argv(rank: int, port: int, rdzv_id: str, *fsdpck_args: str) -> list[str]:
    """One node's torchrun line: 2 workers, c10d rendezvous on loopback."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=2",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}", "--max-restarts=0",
            "-m", "fsdpck", *fsdpck_args]


class Launched:
    """A subprocess started in its own session, its output in a file (no pipe to fill)."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]):
        self.name, self.argv, self.log = name, argv, log
        self._f = open(log, "w")
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=self._f, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.code: int | None = None

    def wait(self, deadline: float) -> None:
        try:
            self.code = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session we started: torchrun and its workers
            self.code = self.proc.wait()
        finally:
            self._f.close()

    @property
    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 40) -> str:
        lines = self.text.splitlines()[-n:]
        return f"--- {self.name}: $ {' '.join(self.argv)}\nexit {self.code}\n" + "\n".join(lines)


def run_nodes(nodes: list[Launched]) -> float:
    """Wait for every node (killing all after LAUNCH_TIMEOUT); returns the wall time."""
    t0 = time.monotonic()
    deadline = t0 + LAUNCH_TIMEOUT
    for node in nodes:
        node.wait(deadline)
    return time.monotonic() - t0


def tails(nodes: list[Launched]) -> str:
    return "\n".join(n.tail() for n in nodes)


def test_two_nodes_verify_through_the_slurm_scripts_then_load_at_one_node(tmp_path: Path):
    """preflight.sbatch with srun/scontrol stand-ins: one node.sh per node, the job's exit code
    read from the JSON; then the checkpoint verify kept (saved at 2 nodes, world size 4) is
    loaded at one node with -n 2 and checked against its manifest (resharded 4 -> 2)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # scontrol: the allocation is this machine. srun: start the command once per node, as
    # `srun --ntasks-per-node=1` does, with SLURM_NODEID set, and exit non-zero if any did.
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        while [ "${1#-}" != "$1" ]; do shift; done
        pids=()
        for ((i = 0; i < SLURM_NNODES; i++)); do
            SLURM_NODEID=$i SLURM_PROCID=$i "$@" > "$FAKE_SRUN_LOGS/node$i.log" 2>&1 &
            pids+=($!)
        done
        code=0
        for p in "${pids[@]}"; do wait "$p" || code=1; done
        exit $code
        """))
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    shared = tmp_path / "shared storage ✓"  # quoting: spaces and unicode all the way down
    job = str(int(uuid.uuid4()) % 10**8)
    env = worker_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID=job, SLURM_JOB_NODELIST="node[1-2]",
                     SLURM_NNODES="2", SLURM_SUBMIT_DIR=str(REPO), FSDPCK_SHARED=str(shared), GPUS_PER_NODE="2",
                     FSDPCK_TIMEOUT=FSDPCK_TIMEOUT, PYTHON=sys.executable, FAKE_SRUN_LOGS=str(tmp_path))
    job_run = Launched("sbatch", ["bash", "scripts/slurm/preflight.sbatch", "--planner", "none", "--keep"],
                       tmp_path / "job.log", env)
    took = run_nodes([job_run])
    node_logs = [tmp_path / f"node{i}.log" for i in (0, 1)]
    out = "\n".join(p.read_text(errors="replace") for p in node_logs if p.exists())
    shown = job_run.tail() + "\n" + "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-30:])
                                              for p in node_logs if p.exists())
    assert job_run.code == 0, shown
    document = load_json(shared / f"preflight-{job}.json")
    check_envelope(document, "verify", 0)
    assert document["world_size"] == 4 and document["checkpoint_kept"] is True, shown
    assert all(f["rows_differing"] == 0 and f["rows_compared"] == 36 for f in document["flows"]), shown
    assert "fsdpck verify: VERIFIED (exit 0)" in out and "world size 4" in out, shown
    assert "VERIFIED (exit 0)" in job_run.text, shown  # the job echoes the verdict
    record("none: `verify` at 2 nodes x 2 ranks (the SLURM scripts on loopback)", sees=sees(out, "VERIFIED"),
           code=document["exit_code"], seconds=took, left="the checkpoint and its manifest (--keep)")

    (saved,) = [m.parent for m in (shared / f"ck-{job}").glob("*/fsdpck.json")]
    assert load_json(saved / "fsdpck.json")["world_size"] == 4
    t0 = time.monotonic()
    r = fsdpck("load", str(saved), nproc=2, timeout=LAUNCH_TIMEOUT)
    assert r.code == 0, r.tail()
    assert r.last_line() == "fsdpck load: VERIFIED (exit 0) — 36 keys match the manifest; saved at world size 4, loaded at 2"
    record("none: checkpoint saved at 2 nodes (world size 4), `load -n 2` at one node", sees=sees(r.text, "VERIFIED"),
           code=r.code, seconds=time.monotonic() - t0, left="the checkpoint, untouched")


def private_mount_permitted(probe: Path) -> str | None:
    """None if a mount namespace with a tmpfs can be made here, else why not."""
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    p = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs "$0"', str(probe)],
                       capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        return f"cannot mount a tmpfs in a new mount namespace here: {p.stderr.strip() or p.returncode}"
    return None


def test_dir_not_shared_by_a_node_is_refused(tmp_path: Path):
    ck = tmp_path / "ck"
    ck.mkdir()
    why = private_mount_permitted(ck)
    if why:
        pytest.skip(f"node 1 needs a private mount over the checkpoint dir: {why}")
    report = tmp_path / "report.json"  # outside the dir: every node sees it, whichever holds rank 0
    args = ("save", str(ck), "--json", str(report), "--timeout", FSDPCK_TIMEOUT)
    port, rdzv = free_port(), f"fsdpck-{uuid.uuid4().hex[:8]}"
    # Node 1 sees its own empty tmpfs at the checkpoint path: the dir is not shared.
    # (util-linux unshare makes the new namespace's mounts private: the host never sees it.)
    private = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(ck)]
    nodes = [Launched("node0", node_argv(0, port, rdzv, *args), tmp_path / "node0.log", worker_env()),
             Launched("node1", private + node_argv(1, port, rdzv, *args), tmp_path / "node1.log", worker_env())]
    took = run_nodes(nodes)
    assert all(n.code != 0 for n in nodes), tails(nodes)
    # c10d orders ranks by (host, agent pid): node 0, started first, holds ranks 0-1. Whichever
    # node holds rank 0, the ranks that cannot see its token are the other node's: 2 and 3.
    head = next((n for n in nodes if "fsdpck save: FAILED (exit 2)" in n.text), None)
    assert head is not None, tails(nodes)
    assert "not shared by all ranks" in head.text and "rank(s) 2, 3" in head.text, tails(nodes)
    # torchrun prints its own traceback (ChildFailedError) for any failed worker; fsdpck's workers print none.
    assert not [ln for n in nodes for ln in n.text.splitlines() if ln.strip().startswith("File ") and "fsdpck" in ln], \
        tails(nodes)
    document = load_json(report)  # torchrun exits 1; the exact code is in the JSON
    check_envelope(document, "save", 2)
    assert "not shared" in (document["error"] or ""), tails(nodes)
    assert list(ck.iterdir()) == [], "the token is removed and nothing is written"
    record("`save` into a dir not shared by all nodes (node 1 has a private mount over it)",
           sees=sees(head.text, "FAILED (exit 2)"), code=document["exit_code"], seconds=took,
           left="nothing (the token rank 0 wrote is removed)")
