"""Shared helpers: run fsdpck the ways users do, and show the output tail when a run fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


class Run:
    def __init__(self, proc: subprocess.CompletedProcess, argv: list[str]):
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr
        self.argv = argv

    @property
    def text(self) -> str:
        return self.out + self.err

    def tail(self, n: int = 60) -> str:
        lines = self.text.splitlines()[-n:]
        return f"$ {' '.join(self.argv)}\nexit {self.code}\n" + "\n".join(lines)

    def last_line(self) -> str:
        lines = [ln for ln in self.out.splitlines() if ln.strip()]
        return lines[-1] if lines else ""


SCRIPTS_DIR = sysconfig.get_path("scripts")  # where pip put the `fsdpck` console script


def console_script() -> str | None:
    """The installed `fsdpck` command, found where this Python installs scripts (or on PATH)."""
    candidate = Path(SCRIPTS_DIR) / "fsdpck"
    return str(candidate) if candidate.exists() else shutil.which("fsdpck")


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    # The console script lives beside this Python; a shim manager (pyenv) may not have linked it yet.
    env["PATH"] = SCRIPTS_DIR + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["COLUMNS"] = "160"
    env.update(extra)
    return env


def run(argv: list[str], *, cwd: Path | None = None, timeout: float = 240, env: dict[str, str] | None = None) -> Run:
    proc = subprocess.run(argv, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
                          env=env or worker_env(), stdin=subprocess.DEVNULL)
    return Run(proc, argv)


def fsdpck(*args: str, nproc: int | None = None, **kw) -> Run:
    """``python -m fsdpck ARGS`` (with ``-n N`` when nproc is given)."""
    argv = [sys.executable, "-m", "fsdpck", *args]
    if nproc is not None:
        argv[4:4] = ["-n", str(nproc)]
    return run(argv, **kw)


def torchrun(nproc: int, *args: str, **kw) -> Run:
    """``torchrun --standalone --nproc_per_node=N ARGS`` (ARGS start with the program)."""
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args], **kw)


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture
def repo() -> Path:
    return REPO
