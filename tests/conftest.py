"""Shared helpers: run fsdpck the ways users do, and show the output tail when a run fails.

``tests/unit`` and ``tests/integration`` import these as ``from conftest import ...`` (pytest
puts this directory on ``sys.path`` when it loads this file; keep it the only conftest.py, a
second one would shadow the name). Subprocess helpers: :func:`run`, :func:`fsdpck` (``python -m
fsdpck``, with ``-n N``), :func:`torchrun`; in-process: :func:`invoke` (click's CliRunner, world
size 1); :func:`fresh_python` (what a fresh interpreter imports). :func:`check_envelope` holds
every JSON document to the common head.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent  # the repository root (tests/ is one below it)
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
              "FSDPCK_N_WORKER", "FSDPCK_FAULT", "TORCHELASTIC_ERROR_FILE")


class Run:
    def __init__(self, proc: subprocess.CompletedProcess, argv: list[str], seconds: float):
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr
        self.argv = argv
        self.seconds = seconds

    @property
    def text(self) -> str:
        return self.out + self.err

    def tail(self, n: int = 60) -> str:
        lines = self.text.splitlines()[-n:]
        return f"$ {' '.join(self.argv)}\nexit {self.code} after {self.seconds:.1f}s\n" + "\n".join(lines)

    def last_line(self) -> str:
        lines = [ln for ln in self.out.splitlines() if ln.strip()]
        return lines[-1] if lines else ""


SCRIPTS_DIR = sysconfig.get_path("scripts")  # where pip put the `fsdpck` console script


def console_script() -> str | None:
    """The installed `fsdpck` command, found where this Python installs scripts (or on PATH)."""
    candidate = Path(SCRIPTS_DIR) / "fsdpck"
    return str(candidate) if candidate.exists() else shutil.which("fsdpck")


def worker_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would make a child think it is a launched rank."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    # The console script lives beside this Python; a shim manager (pyenv) may not have linked it yet.
    env["PATH"] = SCRIPTS_DIR + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["COLUMNS"] = "160"
    env.update(extra)
    return env


def run(argv: list[str], *, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None) -> Run:
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
                          env=env or worker_env(), stdin=subprocess.DEVNULL)
    return Run(proc, argv, time.monotonic() - t0)


def fsdpck(*args: str, nproc: int | None = None, **kw) -> Run:
    """``python -m fsdpck ARGS``, with ``-n N`` right after the command when nproc is given."""
    argv = [sys.executable, "-m", "fsdpck", *args]
    if nproc is not None:
        argv[4:4] = ["-n", str(nproc)]
    return run(argv, **kw)


def torchrun(nproc: int, *args: str, **kw) -> Run:
    """``torchrun --standalone --nproc_per_node=N ARGS`` (ARGS start with the program)."""
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args], **kw)


def invoke(*args: str):
    """``fsdpck ARGS`` in this process through click's CliRunner (world size 1: no launcher).

    An exception that escapes fsdpck's error boundary fails the test. ``result.took`` is the
    wall time in seconds.
    """
    from click.testing import CliRunner

    from fsdpck.cli import cli

    t0 = time.monotonic()
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    result.took = time.monotonic() - t0
    return result


# For a fresh interpreter (what one process imports): ``run(*args)`` there is the CLI with
# standalone mode off, asserting a zero exit; ``TORCH_MODULES`` lists the torch modules loaded.
CLI_IN_SCRIPT = ("import sys\nfrom fsdpck.cli import cli\n"
                 "def run(*args):\n    try:\n        cli.main(list(args), standalone_mode=False)\n"
                 "    except SystemExit as e:\n        assert not e.code, (args, e.code)\n")
TORCH_MODULES = "sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))"


def fresh_python(code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """The output of ``python -c code args`` in a fresh interpreter; a non-zero exit fails the test."""
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# What every row of a verify or load document holds (README, "JSON output"), in this order.
ROW_FIELDS = ["key", "group", "fqn", "state", "kind", "sharding", "shape", "dtype", "numel", "differing", "max_abs_diff",
              "status", "saved", "loaded", "fp_before", "fp_after", "replica_ranks", "note"]
STATUSES = {"match", "differs", "missing", "unexpected", "replica-differs"}


def bad_rows(rows: list[dict]) -> list[dict]:
    """The rows of a flow or checkpoint that are not "match"."""
    return [row for row in rows if row["status"] != "match"]


ENVELOPE = ("schema", "versions", "exit_code", "outcome", "verdict", "error")
OUTCOMES = {0: "verified", 1: "difference found", 2: "usage or set-up error", 3: "runtime failure"}


def check_envelope(doc: dict, command: str, code: int, *, verdict: str | None = None) -> None:
    """Every document starts with the common envelope, in order, and agrees with the printed verdict."""
    assert list(doc)[: len(ENVELOPE)] == list(ENVELOPE), list(doc)
    assert doc["schema"] == f"fsdpck.{command}/1"
    assert doc["versions"]["fsdpck"] and doc["versions"]["torch"] and doc["versions"]["python"]
    assert doc["exit_code"] == code and doc["outcome"] == OUTCOMES[code], (doc["exit_code"], doc["outcome"])
    assert doc["verdict"].startswith(f"fsdpck {command}: ") and f"(exit {code})" in doc["verdict"], doc["verdict"]
    if code in (0, 1):
        assert doc["error"] is None, doc["error"]  # a difference is a finding, not an error
    elif code == 2:
        assert isinstance(doc["error"], str) and doc["error"] in doc["verdict"], doc
    if verdict is not None:
        assert doc["verdict"] == verdict


@pytest.fixture
def repo() -> Path:
    return REPO
