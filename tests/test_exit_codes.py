"""Exit codes that survive torchrun: the exact code through `-n`, torchrun's 0/1, and torchrun's
failure summary naming fsdpck's verdict instead of `error_file: <N/A>`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import fsdpck, load_json, torchrun, worker_env


def report_lines(text: str) -> list[str]:
    """The report without what differs between two runs (timings, temp paths, progress lines)."""
    keep = []
    for line in text.splitlines():
        if line.startswith("fsdpck: ") or "took" in line or not line.strip():
            continue
        line = re.sub(r"/tmp/\S+", "<dir>", line)
        line = re.sub(r"\d+\.\d+\s*(s|GB/s|MB|KB|GB)\b", "<n>", line)
        keep.append(line.rstrip())
    return [ln for ln in keep if not ln.startswith(("phases", "state ", "peak RSS"))]


@pytest.fixture(scope="module")
def both_launches(tmp_path_factory):
    a = fsdpck("verify", "--planner", "none", nproc=2)
    # torchrun -m fsdpck from a directory that is not the repository: the installed package
    b = torchrun(2, "-m", "fsdpck", "verify", "--planner", "none", cwd=tmp_path_factory.mktemp("elsewhere"))
    return a, b


def test_dash_n_prints_the_same_report_as_torchrun_once(both_launches):
    a, b = both_launches
    assert a.code == 0 and b.code == 0, a.tail() + b.tail()
    assert a.out.count("fsdpck verify: VERIFIED") == 1 and b.out.count("fsdpck verify: VERIFIED") == 1
    assert report_lines(a.out) == report_lines(b.out)
    # and none of the launcher's banners
    assert "OMP_NUM_THREADS" not in a.text and "elastic" not in a.text


def test_usage_error_is_2_through_dash_n_and_named_in_torchruns_summary(tmp_path: Path):
    (tmp_path / "precious").write_text("x")
    out = tmp_path / "r.json"
    r = fsdpck("verify", "--checkpoint-dir", str(tmp_path), "--json", str(out), nproc=2)
    assert r.code == 2, r.tail()
    assert "not empty" in r.text
    assert load_json(out)["exit_code"] == 2
    t = torchrun(2, "-m", "fsdpck", "verify", "--checkpoint-dir", str(tmp_path))
    assert t.code == 1, t.tail()  # torchrun's rule
    assert "FAILED (exit 2)" in t.err and "error_file: <N/A>" not in t.err, t.tail()
    assert (tmp_path / "precious").read_text() == "x"


def test_runtime_failure_is_named_in_torchruns_summary(tmp_path: Path):
    t = torchrun(2, "-m", "fsdpck", "verify", "--planner", "none", "--timeout", "20",
                 env=worker_env(FSDPCK_FAULT="compare:1:raise"))
    assert t.code == 1, t.tail()
    # The failing rank's own record reaches torchrun's summary.
    assert "FAILED (exit 3)" in t.err and "rank 1 during compare" in t.err, t.tail()
