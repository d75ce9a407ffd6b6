"""Where an offline command's words go when the streams are not what a terminal gives: a reader that
stops early, closed streams, ``--json`` through a pipe or a device, progress of every read, a
progress bar interrupted as it starts. The exit code is always the command's own (README)."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from rich.console import Console

import ckpt_factory as cf
from conftest import REPO, fsdpck, worker_env
from fsdpck.cli.options import _StderrView
from fsdpck.report.progress import BarView, LogView
from fsdpck.runtime.progress import Progress


@pytest.fixture(scope="module")
def many_keys(tmp_path_factory) -> Path:
    """A checkpoint whose report (2,000 rows) is far larger than a pipe's buffer."""
    path = tmp_path_factory.mktemp("many") / "ck"
    cf.synthetic_ckpt(path, 2000)
    return path


def first_line_then_hang_up(*args: str) -> tuple[int, str, str]:
    """Run ``python -m fsdpck ARGS``, read one line of its stdout, close the pipe; (exit code, line, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "fsdpck", *args], cwd=REPO, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    line = proc.stdout.readline().decode()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return proc.wait(timeout=120), line, err


@pytest.mark.parametrize("command", ["inspect", "diff"])
def test_a_reader_that_stops_early_leaves_the_exit_code_alone(many_keys, command):
    # `fsdpck diff A A | head`: rich would exit 1 on the broken pipe, which says "difference found".
    args = ["inspect", str(many_keys)] if command == "inspect" else ["diff", str(many_keys), str(many_keys)]
    code, line, err = first_line_then_hang_up(*args)
    assert line.strip() and code == 0 and err == "", (code, line, err)


@pytest.mark.parametrize("redirect, target, code", [
    (">&-", "{ck}", 0), ("2>&-", "{ck}", 0), ("2>&-", "{missing}", 2), (">&-", "{missing}", 2),
])
def test_a_closed_stream_leaves_the_exit_code_alone(many_keys, tmp_path, redirect, target, code):
    where = target.format(ck=many_keys, missing=tmp_path / "missing")
    p = subprocess.run(f"{sys.executable} -m fsdpck inspect '{where}' {redirect}", shell=True, cwd=REPO,
                       env=worker_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == code and "Traceback" not in p.stdout + p.stderr, (p.returncode, p.stderr[-2000:])


def test_json_goes_through_a_pipe_and_leaves_it_a_pipe(tmp_path):
    ck = cf.plain_ckpt()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    r = fsdpck("inspect", str(ck), "--json", str(fifo))
    reader.join(timeout=60)
    assert r.code == 0, r.tail()
    assert json.loads(got[0])["schema"] == "fsdpck.inspect/1"
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # written through, not replaced by a file


@pytest.mark.skipif(os.geteuid() != 0, reason="making device nodes needs root")
def test_json_goes_through_a_device_and_leaves_it_a_device(tmp_path):
    # As root, an atomic write (a temporary file renamed over the name) would replace /dev/null itself.
    null, full = tmp_path / "null", tmp_path / "full"
    try:
        os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    except PermissionError:  # a container without CAP_MKNOD
        pytest.skip("cannot make device nodes here")
    ck = cf.plain_ckpt()
    r = fsdpck("inspect", str(ck), "--json", str(null))
    assert r.code == 0 and stat.S_ISCHR(null.lstat().st_mode), r.tail()
    r = fsdpck("inspect", str(ck), "--json", str(full))  # a device that is full: said, exit 2
    assert r.code == 2 and "cannot write" in r.err and stat.S_ISCHR(full.lstat().st_mode), r.tail()


def log_lines(view: LogView, out: io.StringIO) -> list[str]:
    return [ln for ln in out.getvalue().splitlines() if ln]


def test_each_read_in_a_log_has_its_own_lines():
    # diff reads A, then B, through one view: B's lines are not held back by A's clock.
    out = io.StringIO()
    view = LogView(Console(file=out, width=120), every_s=10)
    view.start("reading A", 100)
    view.update(0, 0.0)
    view.update(50, 60.0)
    view.finish(100, 100.0)
    view.start("reading B", 100)
    view.update(0, 0.0)
    lines = log_lines(view, out)
    assert [ln.split(":")[1].strip() for ln in lines] == ["reading A"] * 3 + ["reading B"], lines


class Interrupted:
    """A view whose start is interrupted (Ctrl-C) after it began drawing; it records what was called."""

    def __init__(self, fail_in: str):
        self.fail_in, self.calls = fail_in, []

    def start(self, label: str, total: int) -> None:
        self.calls.append("start")
        if self.fail_in == "start":
            raise KeyboardInterrupt

    def update(self, done: int, elapsed: float) -> None:
        self.calls.append("update")
        if self.fail_in == "update":
            raise OSError("stderr is gone")

    def finish(self, done: int, elapsed: float) -> None:
        self.calls.append("finish")


def test_a_view_interrupted_as_it_starts_is_still_finished():
    view = Interrupted("start")
    with pytest.raises(KeyboardInterrupt):
        with Progress(view, after_s=0).reading("reading", 10):
            pass
    assert view.calls == ["start", "finish"]  # finish puts the terminal's cursor back
    bar = BarView(Console(file=io.StringIO()))
    bar.finish(0, 0.0)  # interrupted before the bar existed: nothing to stop, no error
    stderr_view = _StderrView(every_s=1)
    stderr_view.finish(0, 0.0)  # nor before the view was made (rich failed to import): the error goes on


def test_a_view_that_fails_on_the_ticker_thread_stops_showing_and_the_read_goes_on(monkeypatch):
    seen: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    view = Interrupted("update")
    with Progress(view, after_s=0.01).reading("reading", 10) as advance:
        for _ in range(50):
            advance(1)
            threading.Event().wait(0.01)
    assert seen == [] and view.calls == ["start", "update", "finish"], (seen, view.calls)  # finish: the clean-up
