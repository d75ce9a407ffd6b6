"""The command line through CliRunner: help, usage errors, exit codes, and a world-of-one verify."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from fsdpck.cli import cli


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_shows_examples():
    r = invoke("--help")
    assert r.exit_code == 0
    assert "Examples:" in r.output and "torchrun --nproc_per_node=2 fsdpck verify" in r.output
    r = invoke("verify", "--help")
    assert r.exit_code == 0
    assert "Examples:" in r.output and "--self-test" in r.output


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and "fsdpck" in r.output


def test_unknown_option_is_a_usage_error():
    r = invoke("verify", "--no-such-option")
    assert r.exit_code == 2
    assert "--no-such-option" in r.output
    assert "Traceback" not in r.output


def test_impossible_flow_is_refused_in_one_line():
    r = invoke("verify", "--fsdp", "2", "--api", "legacy")
    assert r.exit_code == 2
    assert "only for FSDP1" in r.output
    assert "Traceback" not in r.output


def test_non_empty_dir_is_refused_and_left_alone(tmp_path: Path):
    (tmp_path / "precious.txt").write_text("do not touch")
    r = invoke("verify", "--checkpoint-dir", str(tmp_path))
    assert r.exit_code == 2
    assert "not empty" in r.output and "--overwrite" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]
    assert (tmp_path / "precious.txt").read_text() == "do not touch"


def test_checkpoint_dir_that_is_a_file(tmp_path: Path):
    f = tmp_path / "file"
    f.write_text("x")
    r = invoke("verify", "--checkpoint-dir", str(f))
    assert r.exit_code == 2 and "not a directory" in r.output
    assert f.read_text() == "x"


def test_world_of_one_verifies_and_writes_json(tmp_path: Path):
    out = tmp_path / "report.json"
    ck = tmp_path / "ck"
    r = invoke("verify", "--checkpoint-dir", str(ck), "--json", str(out))
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1].startswith("fsdpck verify: VERIFIED (exit 0)")
    doc = json.loads(out.read_text())
    assert doc["schema"] == "fsdpck.verify/1"
    assert doc["exit_code"] == 0 and doc["world_size"] == 1
    assert [f["flow"]["planner"] for f in doc["flows"]] == ["default", "none"]
    assert all(f["rows_differing"] == 0 and f["rows_compared"] > 0 for f in doc["flows"])
    # verified and not --keep: what fsdpck created is gone, the dir it was given too (it made it)
    assert not ck.exists()


def test_overwrite_replaces_only_fsdpcks_own(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    r = invoke("verify", "--checkpoint-dir", str(tmp_path), "--overwrite", "--keep", "--planner", "none")
    assert r.exit_code == 0, r.output
    sub = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(sub) == 1 and (sub[0] / ".metadata").exists()
    r = invoke("verify", "--checkpoint-dir", str(tmp_path), "--overwrite", "--planner", "none")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not sub[0].exists()  # verified without --keep: fsdpck's own subdirectory is cleaned up


def test_json_to_stdout_is_pure_json(tmp_path: Path):
    r = CliRunner().invoke(cli, ["verify", "--planner", "none", "--json", "-"], catch_exceptions=False)
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 0 and doc["verdict"].startswith("fsdpck verify: VERIFIED")


def test_scale_figures_are_present_and_plausible(tmp_path: Path):
    """Timings, bytes and memory in the JSON: present, positive, and the bytes add up (not their speed)."""
    from fsdpck.model import ModelDims, checkpoint_bytes

    out = tmp_path / "v.json"
    r = invoke("verify", "--planner", "none", "--width", "5", "--json", str(out))
    assert r.exit_code == 0, r.output
    (flow,) = json.loads(out.read_text())["flows"]
    assert set(flow["timings_s"]) == {"step", "state-dict", "save", "setup", "load", "compare", "fingerprint"}
    assert all(t > 0 for t in flow["timings_s"].values())
    dims = ModelDims.for_world(1, 5)
    steps = 6  # Adam's `step`: one float32 scalar per parameter tensor
    assert flow["state_bytes"] == checkpoint_bytes(dims, optimizer="adam", dtype="float32") + 4 * steps
    assert flow["bytes_written"] >= flow["state_bytes"]  # plus DCP's framing and .metadata
    mem = flow["memory_bytes"]
    assert mem["state_bytes"] == [flow["state_bytes"]]
    assert mem["rss_peak"][0] >= mem["rss_baseline"][0] > 0
    assert flow["throughput"]["save_gbps"] > 0 and flow["throughput"]["load_gbps"] > 0
