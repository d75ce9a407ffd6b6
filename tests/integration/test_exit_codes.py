"""Exit codes that survive torchrun, and torchrun's launch forms: the exact code through `-n`,
torchrun's 0/1, the JSON's exit_code, and torchrun's failure summary naming fsdpck's verdict
instead of `error_file: <N/A>`.

The torchrun forms of DESIGN.md each run once: ``-m fsdpck`` from another directory (a pass),
``fsdpck`` from the repository root (a drill: exit 3 inside), ``--no-python fsdpck`` (a
self-test: exit 1 inside), and ``-m fsdpck`` again for a usage error (exit 2 inside).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO, check_envelope, console_script, fsdpck, load_json, torchrun, worker_env


def report_lines(text: str) -> list[str]:
    """The report without what differs between two runs (timings, temp paths, progress lines)."""
    keep = []
    for line in text.splitlines():
        if line.startswith("fsdpck: ") or "took" in line or not line.strip():
            continue
        line = re.sub(r"/tmp/\S+", "<dir>", line)
        line = re.sub(r"\d+(\.\d+)?\s*(s|GB/s|MB|KB|kB|GB|bytes)\b", "<n>", line)
        line = re.sub(r"\d+ PyTorch warning", "<n> PyTorch warning", line)
        keep.append(line.rstrip())
    return [ln for ln in keep if not ln.startswith(("phases", "fingerprint", "state ", "peak RSS"))]


@pytest.fixture(scope="module")
def both_launches(tmp_path_factory):
    a = fsdpck("verify", "--planner", "none", nproc=2)
    # torchrun -m fsdpck from a directory that is not the repository: the installed package
    b = torchrun(2, "-m", "fsdpck", "verify", "--planner", "none", cwd=tmp_path_factory.mktemp("elsewhere"))
    return a, b


def test_dash_n_prints_the_same_report_as_torchrun_once(both_launches):
    a, b = both_launches
    assert a.code == 0 and b.code == 0, a.tail() + b.tail()
    for r in (a, b):
        assert r.out.count("fsdpck verify: VERIFIED") == 1, r.tail()  # rank 0 alone reports
        assert r.last_line() == "fsdpck verify: VERIFIED (exit 0) — 1 flow(s), 36 rows, world size 2, 0 differences"
    assert report_lines(a.out) == report_lines(b.out)
    assert len(report_lines(a.out)) > 36  # the whole table was compared, not two empty lists
    # and none of the launcher's banners
    assert "OMP_NUM_THREADS" not in a.text and "elastic" not in a.text


def test_usage_error_is_2_through_dash_n_and_named_in_torchruns_summary(tmp_path: Path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "precious").write_text("x")
    out = tmp_path / "r.json"
    r = fsdpck("verify", "--checkpoint-dir", str(ck), "--json", str(out), nproc=2)
    assert r.code == 2, r.tail()
    assert "not empty" in r.text and r.text.count("not empty") <= 2, r.tail()  # rank 0 says it (error + verdict)
    check_envelope(load_json(out), "verify", 2, verdict=r.last_line())
    out_t = tmp_path / "t.json"
    t = torchrun(2, "-m", "fsdpck", "verify", "--checkpoint-dir", str(ck), "--json", str(out_t))
    assert t.code == 1, t.tail()  # torchrun's rule
    assert "FAILED (exit 2)" in t.err and "error_file: <N/A>" not in t.err, t.tail()
    assert load_json(out_t)["exit_code"] == 2  # the exact code, where a job script reads it
    assert sorted(p.name for p in ck.iterdir()) == ["precious"] and (ck / "precious").read_text() == "x"


def test_runtime_failure_from_the_repository_root_form(tmp_path: Path):
    """``torchrun ... fsdpck verify`` run from the repository root (Python runs the package dir):
    a drill on rank 1 ends the run with exit 3 inside, named in torchrun's summary and the JSON."""
    out = tmp_path / "r.json"
    t = torchrun(2, "fsdpck", "verify", "--planner", "none", "--timeout", "20", "--json", str(out), cwd=REPO,
                 env=worker_env(FSDPCK_FAULT="compare:1:raise"))
    assert t.code == 1, t.tail()
    # The failing rank's own record reaches torchrun's summary.
    assert "FAILED (exit 3)" in t.err and "rank 1 during compare" in t.err, t.tail()
    assert "error_file: <N/A>" not in t.err, t.tail()
    doc = load_json(out)
    check_envelope(doc, "verify", 3)
    assert "rank 1 during compare" in doc["error"] and "injected fault" in doc["error"], doc["error"]
    # torchrun prints its own traceback (ChildFailedError); none of it, and nothing else, comes from fsdpck.
    assert f"{REPO / 'fsdpck'}/" not in "".join(t.text.split("Traceback")[1:]), t.tail()


@pytest.mark.skipif(console_script() is None, reason="console script not installed (pip install -e .)")
def test_torchrun_no_python_console_script_and_its_summary(tmp_path: Path):
    # A difference under torchrun: exit 1 by torchrun's rule, and its failure summary shows
    # fsdpck's verdict (the error record each rank leaves) instead of `error_file: <N/A>`.
    r = torchrun(2, "--no-python", "fsdpck", "verify", "--planner", "none", "--self-test", cwd=tmp_path)
    assert r.code == 1, r.tail()
    assert r.last_line().startswith("fsdpck verify: DIFFERENCE (exit 1) — 1 of 36 rows differ"), r.tail()
    assert re.search(r"self-test: flipped bit 0 of \S+ on rank 1\b", r.out), r.tail()  # the last rank by default
    assert "error_file: <N/A>" not in r.text, r.tail()
    assert "DIFFERENCE (exit 1)" in r.err, r.tail()
