"""verify across processes: the matrix (wrapper × API × planner × save mode) at an uneven world
size, and the launch forms of a world of one (the console script, ``python -m fsdpck``) run as
real processes. torchrun's forms are in test_exit_codes.py; the mesh layouts the matrix adds at
world size 4 (HSDP, TP), and their self-tests, are test_layouts.py's.

Each matrix launch runs with ``--self-test``: every flow must then fail on exactly the one row
the flipped bit is in, so one launch shows both that every other row of every flow survives the
round trip and that each flow's check can fail.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import REPO, ROW_FIELDS, bad_rows, check_envelope, console_script, fsdpck, load_json, run
from fsdpck.state import registry

CPU_MODES = {1: {"sync", "async", "async-process", "async-blocking"},
             2: {"sync", "async", "async-process", "async-shm", "async-blocking"}}


def test_matrix_at_3_every_flow_fails_on_exactly_its_flipped_row(tmp_path: Path):
    out = tmp_path / "m.json"
    r = fsdpck("verify", "--matrix", "--self-test", "--self-test-rank", "1", "--json", str(out), nproc=3, timeout=400)
    assert r.code == 1, r.tail()
    doc = load_json(out)
    check_envelope(doc, "verify", 1, verdict=r.last_line())
    assert doc["world_size"] == 3 and doc["model_dims"] == [8, 3, 6, 9]
    flows = doc["flows"]
    combos = {(f["flow"]["fsdp"], f["flow"]["api"], f["flow"]["planner"], f["flow"]["save_mode"]) for f in flows}
    expected = {(fsdp, api, planner, mode) for fsdp, api in ((1, "legacy"), (1, "dsd"), (2, "dsd"))
                for planner in registry.PLANNERS for mode in CPU_MODES[fsdp]}
    assert combos == expected and len(flows) == len(expected) == 26
    assert r.last_line().startswith("fsdpck verify: DIFFERENCE (exit 1) — 26 of 26 flow(s) differ, 26 of 936 rows")
    for flow in flows:
        rows = flow["rows"]
        assert flow["error"] is None and flow["rows_compared"] == len(rows) == 36, flow["name"]
        assert all(list(row) == ROW_FIELDS for row in rows)
        (bad,) = bad_rows(rows)
        assert flow["self_test"] == {"rank": 1, "key": bad["key"], "bit": 0}, flow["name"]
        assert bad["status"] == "differs" and bad["fp_before"] != bad["fp_after"], flow["name"]
        assert bad["replica_ranks"] == [1], flow["name"]  # the row names the rank whose values changed
        asynchronous = flow["flow"]["save_mode"] != "sync"
        # An async save is held to the fingerprints taken when it was called; a sync one element by element too.
        assert flow["compared"] == ("fingerprints" if asynchronous else "values"), flow["name"]
        assert bad["differing"] == (None if asynchronous else 1), flow["name"]
        assert flow["flow"]["steps_during_save"] == (1 if asynchronous else 0)
        sharded = [row for row in rows if row["key"].endswith((".exp_avg", ".exp_avg_sq"))]
        assert len(sharded) == 12  # 6 parameters × (exp_avg, exp_avg_sq)
        wrapper = "ShardedTensor" if flow["flow"]["fsdp"] == 1 else "DTensor"
        assert {row["sharding"].split(" ")[0] for row in sharded} == {wrapper}, flow["name"]
        assert all(row["fp_before"] == row["fp_after"] for row in sharded)
    assert r.out.count("fsdpck verify: DIFFERENCE") == 1  # the report is printed once, by rank 0
    assert r.out.count("self-test: flipped bit 0 of model.net1.0.bias on rank 1") == 26  # each failed flow's table
    # A failed check keeps its checkpoint for inspection.
    assert doc["checkpoint_kept"] is True and Path(doc["checkpoint_dir"]).is_dir()
    assert {p.name for p in Path(doc["checkpoint_dir"]).iterdir()} == {f["name"] for f in flows}
    shutil.rmtree(doc["checkpoint_dir"])


@pytest.mark.skipif(console_script() is None, reason="console script not installed (pip install -e .)")
def test_plain_console_script_is_a_world_of_one_with_json_on_stdout(tmp_path: Path):
    r = run([console_script(), "verify", "--planner", "none", "--json", "-"], cwd=tmp_path)
    assert r.code == 0, r.tail()
    doc = json.loads(r.out)  # stdout is the document alone; the report went to stderr
    check_envelope(doc, "verify", 0)
    assert doc["world_size"] == 1 and doc["verdict"] in r.err and "world size 1" in doc["verdict"]


def test_python_dash_m_is_a_world_of_one_with_the_exact_exit_code(tmp_path: Path):
    r = run([sys.executable, "-m", "fsdpck", "verify", "--planner", "none", "--self-test"], cwd=REPO)
    assert r.code == 1, r.tail()  # no launcher in between: fsdpck's own code
    assert r.last_line().startswith("fsdpck verify: DIFFERENCE (exit 1) — 1 of 36 rows differ: model.net1.0.bias")
    assert "world size 1" in r.last_line()
