"""verify across processes, launched the ways users launch it (torchrun, -n, plain)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from conftest import REPO, console_script, fsdpck, load_json, run, torchrun


@pytest.mark.parametrize("nproc", [2, 3])
def test_default_matrix_passes(nproc: int, tmp_path: Path):
    out = tmp_path / "m.json"
    r = fsdpck("verify", "--matrix", "--json", str(out), nproc=nproc)
    assert r.code == 0, r.tail()
    doc = load_json(out)
    names = {(f["flow"]["fsdp"], f["flow"]["api"], f["flow"]["planner"], f["flow"]["save_mode"]) for f in doc["flows"]}
    assert len(names) == 12  # (fsdp1 legacy, fsdp1 dsd, fsdp2 dsd) × 2 planners × 2 save modes
    assert all(f["rows_differing"] == 0 and f["rows_compared"] == 19 and f["error"] is None for f in doc["flows"])
    shardings = {f["flow"]["fsdp"]: {row["sharding"] for row in f["rows"]} for f in doc["flows"]}
    assert "ShardedTensor" in shardings[1] and "DTensor" in shardings[2]
    for flow in doc["flows"]:
        sharded = [row for row in flow["rows"] if row["sharding"] in ("ShardedTensor", "DTensor")]
        assert len(sharded) == 12  # 6 params × (exp_avg, exp_avg_sq)
        assert all(row["fp_before"] == row["fp_after"] for row in sharded)
    assert doc["world_size"] == nproc and doc["exit_code"] == 0
    assert "12 flow(s)" in r.last_line() and "VERIFIED" in r.last_line()
    assert r.out.count("fsdpck verify: VERIFIED") == 1  # the report is printed once, by rank 0


def test_self_test_makes_every_flow_fail_on_exactly_one_row(tmp_path: Path):
    out = tmp_path / "v.json"
    r = fsdpck("verify", "--matrix", "--self-test", "--json", str(out), nproc=2)
    assert r.code == 1, r.tail()
    assert "DIFFERENCE (exit 1)" in r.last_line()
    doc = load_json(out)
    assert doc["exit_code"] == 1 and len(doc["flows"]) == 12
    for flow in doc["flows"]:
        bad = [row for row in flow["rows"] if row["status"] != "match"]
        assert len(bad) == 1, bad
        assert (bad[0]["fqn"], bad[0]["state"]) == (flow["self_test"]["fqn"], flow["self_test"]["state"])
        assert bad[0]["differing"] == 1
        assert bad[0]["fp_before"] != bad[0]["fp_after"]
    # A failed check keeps its checkpoint for inspection.
    assert doc["checkpoint_kept"] and Path(doc["checkpoint_dir"]).is_dir()
    shutil.rmtree(doc["checkpoint_dir"])


# The module form (torchrun -m fsdpck) from elsewhere is exercised in test_exit_codes.py.
def test_torchrun_from_repo_root_runs_the_package_dir(tmp_path: Path):
    r = torchrun(2, "fsdpck", "verify", "--planner", "none", cwd=REPO)
    assert r.code == 0, r.tail()
    assert r.last_line().startswith("fsdpck verify: VERIFIED"), r.tail()


@pytest.mark.skipif(console_script() is None, reason="console script not installed (pip install -e .)")
def test_torchrun_no_python_console_script_and_its_summary(tmp_path: Path):
    # A difference under torchrun: exit 1 by torchrun's rule, and its failure summary shows
    # fsdpck's verdict (the error record each rank leaves) instead of `error_file: <N/A>`.
    r = torchrun(2, "--no-python", "fsdpck", "verify", "--planner", "none", "--self-test", cwd=tmp_path)
    assert r.code == 1, r.tail()
    assert "DIFFERENCE (exit 1)" in r.last_line(), r.tail()
    assert "error_file: <N/A>" not in r.text, r.tail()
    assert "DIFFERENCE (exit 1)" in r.err, r.tail()


@pytest.mark.skipif(console_script() is None, reason="console script not installed (pip install -e .)")
def test_plain_console_script_is_world_of_one(tmp_path: Path):
    r = run([console_script(), "verify", "--planner", "none"], cwd=tmp_path)
    assert r.code == 0, r.tail()
    assert "world size 1" in r.last_line()


def test_python_dash_m_is_world_of_one(tmp_path: Path):
    r = run([sys.executable, "-m", "fsdpck", "verify", "--planner", "none"], cwd=REPO)
    assert r.code == 0, r.tail()
    assert "world size 1" in r.last_line()
