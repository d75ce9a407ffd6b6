"""``fsdpck verify`` at world size 1, in this process through click's CliRunner: the JSON document,
the rows per DCP key, the checkpoint dir's rules, every optimizer and dtype, trainer state, an
async save, the self-test, and the usage errors that are decided once the process group exists.

A run here costs a second or two where a launch costs ten; what needs several ranks is in
test_verify_dist.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import ROW_FIELDS, STATUSES, bad_rows, check_envelope, invoke, load_json
from fsdpck.state import registry

FLOW_NONE = "fsdp1-legacy-planner_none-sync-adam-float32"  # verify's subdirectory for --planner none
PARAMS = ["net1.0.bias", "net1.0.weight", "net2.0.bias", "net2.0.weight", "net3.0.bias", "net3.0.weight"]


def last_line(result) -> str:
    return result.output.strip().splitlines()[-1]


def test_world_of_one_verifies_every_key_and_writes_json(tmp_path: Path):
    out = tmp_path / "report.json"
    ck = tmp_path / "ck"
    r = invoke("verify", "--checkpoint-dir", str(ck), "--json", str(out))
    assert r.exit_code == 0, r.output
    assert last_line(r) == "fsdpck verify: VERIFIED (exit 0) — 2 flow(s), 72 rows, world size 1, 0 differences"
    doc = load_json(out)
    check_envelope(doc, "verify", 0, verdict=last_line(r))
    assert (doc["world_size"], doc["backend"], doc["device"]) == (1, "gloo", "cpu")
    assert doc["model_dims"] == [8, 1, 2, 3] and doc["checkpoint_kept"] is False
    assert [f["flow"]["planner"] for f in doc["flows"]] == ["default", "none"]
    for flow in doc["flows"]:
        assert (flow["exit_code"], flow["error"], flow["rows_differing"]) == (0, None, 0)
        rows = flow["rows"]
        assert flow["rows_compared"] == len(rows) == 36
        assert all(list(row) == ROW_FIELDS for row in rows)
        assert [row["key"] for row in rows] == sorted(row["key"] for row in rows)
        assert {row["status"] for row in rows} == {"match"}
        # One row per DCP key: the model's parameters, Adam's state per parameter, the param group's entries.
        model = [row for row in rows if row["group"] == "model"]
        assert [(row["fqn"], row["state"]) for row in model] == [(p, "param") for p in PARAMS]
        state = {(row["fqn"], row["state"]) for row in rows if row["key"].startswith("optim.state.")}
        assert state == {(p, s) for p in PARAMS for s in ("exp_avg", "exp_avg_sq", "step")}
        groups = {row["state"]: row for row in rows if row["fqn"] == "param_groups.0"}
        assert groups["lr"]["kind"] == "object" and groups["lr"]["saved"] == "0x1.999999999999ap-4"
        assert groups["lr"]["fp_before"] is None and groups["lr"]["numel"] is None
        for row in rows:
            if row["kind"] == "tensor":
                assert row["fp_before"] == row["fp_after"] == row["saved"] == row["loaded"]
                assert row["differing"] == 0 and row["max_abs_diff"] == 0.0 and row["numel"] >= 1
        assert {row["sharding"] for row in rows if row["key"].endswith(".exp_avg")} == {"ShardedTensor"}
    # Verified without --keep: what fsdpck created is gone, the dir it was given too (it made it).
    assert not ck.exists()


def test_non_empty_dir_is_refused_and_left_alone(tmp_path: Path):
    (tmp_path / "precious.txt").write_text("do not touch")
    out = tmp_path.parent / f"{tmp_path.name}.json"
    r = invoke("verify", "--checkpoint-dir", str(tmp_path), "--json", str(out))
    assert r.exit_code == 2
    assert "not empty" in r.output and "--overwrite" in r.output and "1 entries fsdpck did not write" in r.output
    assert "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]
    assert (tmp_path / "precious.txt").read_text() == "do not touch"
    check_envelope(load_json(out), "verify", 2, verdict=last_line(r))


def test_keep_leaves_a_manifest_and_a_rerun_is_refused_until_overwrite(tmp_path: Path):
    ck = tmp_path / "ck"
    r = invoke("verify", "--checkpoint-dir", str(ck), "--keep", "--planner", "none")
    assert r.exit_code == 0, r.output
    kept = ck / FLOW_NONE
    assert {p.name for p in kept.iterdir()} >= {".metadata", "fsdpck.json", ".fsdpck-run"}
    manifest = load_json(kept / "fsdpck.json")
    assert manifest["world_size"] == 1 and manifest["flow"]["planner"] == "none"
    assert f"checkpoint kept at {ck}" in r.output
    # The same command again: refused, saying what is there.
    r = invoke("verify", "--checkpoint-dir", str(ck), "--keep", "--planner", "none")
    assert r.exit_code == 2, r.output
    assert f"holds the checkpoints of an earlier fsdpck run (1 flow dir(s): {FLOW_NONE})" in r.output
    assert (kept / ".metadata").exists()
    # With --overwrite it replaces its own flow dir, and (no --keep) cleans up after a pass.
    r = invoke("verify", "--checkpoint-dir", str(ck), "--overwrite", "--planner", "none")
    assert r.exit_code == 0, r.output
    assert ck.is_dir() and not kept.exists()  # the dir was the user's by then: only fsdpck's flow dir went


def test_overwrite_replaces_only_fsdpcks_own(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    r = invoke("verify", "--checkpoint-dir", str(tmp_path), "--overwrite", "--keep", "--planner", "none")
    assert r.exit_code == 0, r.output
    assert (tmp_path / FLOW_NONE / ".metadata").exists()
    # A dir with a flow's name that fsdpck did not mark is not replaced, even with --overwrite.
    foreign = tmp_path / "fsdp1-legacy-planner_default-sync-adam-float32"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"theirs")
    r = invoke("verify", "--checkpoint-dir", str(tmp_path), "--overwrite", "--planner", "default")
    assert r.exit_code == 2 and "was not written by fsdpck" in r.output, r.output
    assert (foreign / "data.bin").read_bytes() == b"theirs"
    r = invoke("verify", "--checkpoint-dir", str(tmp_path), "--overwrite", "--planner", "none")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / FLOW_NONE).exists()  # verified without --keep: its own flow dir is cleaned up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fsdp1-legacy-planner_default-sync-adam-float32", "notes.txt"]


def test_json_to_stdout_is_pure_json_and_the_report_moves_to_stderr():
    from fsdpck.cli import cli

    r = CliRunner().invoke(cli, ["verify", "--planner", "none", "--json", "-"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # the whole of stdout is the document
    check_envelope(doc, "verify", 0)
    assert r.stderr.strip().splitlines()[-1] == doc["verdict"]  # the report, verdict last, went to stderr
    assert "│" in r.stderr and "│" not in r.stdout


def test_scale_figures_are_present_and_plausible(tmp_path: Path):
    """Timings, bytes and memory in the JSON: present, positive, and the bytes add up (not their speed)."""
    from fsdpck.state.model import ModelDims, checkpoint_bytes

    out = tmp_path / "v.json"
    r = invoke("verify", "--planner", "none", "--width", "5", "--json", str(out))
    assert r.exit_code == 0, r.output
    doc = load_json(out)
    (flow,) = doc["flows"]
    assert doc["model_dims"] == flow["model_dims"] == [8, 5, 10, 15]
    assert set(flow["timings_s"]) == {"step", "state-dict", "save", "setup", "load", "read-back", "compare", "fingerprint"}
    assert all(t > 0 for t in flow["timings_s"].values())
    dims = ModelDims.for_world(1, 5)
    steps = 6  # Adam's `step`: one float32 scalar per parameter tensor
    assert flow["state_bytes"] == checkpoint_bytes(dims, optimizer="adam", dtype="float32") + 4 * steps
    assert flow["bytes_written"] > flow["state_bytes"]  # plus DCP's framing and .metadata
    mem = flow["memory_bytes"]
    assert mem["state_bytes"] == [flow["state_bytes"]]
    assert mem["rss_peak"][0] >= mem["rss_baseline"][0] > 0 and mem["cuda_max_allocated"] == [0]
    assert flow["throughput"]["save_gbps"] > 0 and flow["throughput"]["load_gbps"] > 0
    assert flow["compared"] == "values"
    assert doc["writer"] == {"thread_count": 1, "sync_files": True, "single_file_per_rank": True}


def test_every_optimizer_and_dtype_round_trips(tmp_path: Path):
    out = tmp_path / "v.json"
    r = invoke("verify", "--optimizer", "all", "--dtype", "all", "--planner", "none", "--json", str(out))
    assert r.exit_code == 0, r.output
    flows = load_json(out)["flows"]
    assert {(f["flow"]["optimizer"], f["flow"]["dtype"]) for f in flows} == {
        (o, d) for o in registry.OPTIMIZERS for d in registry.DTYPES}
    for f in flows:
        assert f["rows_differing"] == 0, f["name"]
        spec = registry.OPTIMIZERS[f["flow"]["optimizer"]]
        states = {row["state"] for row in f["rows"] if row["key"].startswith("optim.state.")}
        assert states == set(spec.state), f["name"]  # each optimizer's own state, every entry compared
        assert {row["dtype"] for row in f["rows"] if row["group"] == "model"} == {f["flow"]["dtype"]}
        lr = next(row for row in f["rows"] if row["key"] == "optim.param_groups.0.lr")
        assert lr["saved"] == float.hex(spec.hyper["lr"])


def test_every_optimizer_and_dtype_fails_on_exactly_its_flipped_row(tmp_path: Path):
    out = tmp_path / "v.json"
    r = invoke("verify", "--optimizer", "all", "--dtype", "all", "--planner", "none", "--self-test",
               "--json", str(out))
    assert r.exit_code == 1, r.output
    flows = load_json(out)["flows"]
    assert len(flows) == len(registry.OPTIMIZERS) * len(registry.DTYPES)
    for f in flows:
        bad = [row for row in f["rows"] if row["status"] != "match"]
        assert [row["key"] for row in bad] == [f["self_test"]["key"]], f["name"]


def test_fsdp2_trainer_state_through_an_async_save(tmp_path: Path):
    out = tmp_path / "v.json"
    r = invoke("verify", "--fsdp", "2", "--trainer-state", "--save-mode", "async", "--steps-during-save", "2",
               "--planner", "none", "--json", str(out))
    assert r.exit_code == 0, r.output
    (flow,) = load_json(out)["flows"]
    assert (flow["flow"]["fsdp"], flow["flow"]["api"], flow["flow"]["save_mode"]) == (2, "dsd", "async")
    assert flow["flow"]["trainer_state"] is True and flow["flow"]["steps_during_save"] == 2
    assert flow["name"].endswith("-trainer")
    trainer = {row["key"] for row in flow["rows"] if row["group"] == "trainer"}
    assert {"trainer.step", "trainer.rng.cpu", "trainer.data.epoch", "trainer.data.sample"} <= trainer, trainer
    assert any(k.startswith("trainer.scheduler.") for k in trainer), trainer
    assert bad_rows(flow["rows"]) == []
    # The state moved on during the write: the load is held to the fingerprints taken at the save.
    assert flow["compared"] == "fingerprints"
    assert all(row["numel"] is None for row in flow["rows"])
    assert "async: 2 optimizer step(s) ran during the write" in r.output
    assert {row["sharding"].split(" ")[0] for row in flow["rows"] if row["key"].endswith(".exp_avg")} == {"DTensor"}


def test_self_test_fails_every_flow_on_exactly_one_row(tmp_path: Path):
    out = tmp_path / "v.json"
    ck = tmp_path / "ck"
    r = invoke("verify", "--self-test", "--checkpoint-dir", str(ck), "--json", str(out))
    assert r.exit_code == 1, r.output
    doc = load_json(out)
    check_envelope(doc, "verify", 1, verdict=last_line(r))
    assert last_line(r).startswith("fsdpck verify: DIFFERENCE (exit 1) — 2 of 2 flow(s) differ, 2 of 72 rows")
    for flow in doc["flows"]:
        (bad,) = bad_rows(flow["rows"])
        assert flow["self_test"] == {"rank": 0, "key": bad["key"], "bit": 0}
        assert bad["status"] == "differs" and bad["differing"] == 1 and bad["fp_before"] != bad["fp_after"]
        assert f"self-test: flipped bit 0 of {bad['key']} on rank 0" in r.output
    # A failed check keeps its checkpoint for inspection.
    assert doc["checkpoint_kept"] is True and (ck / FLOW_NONE / ".metadata").exists()
    assert {row["status"] for f in doc["flows"] for row in f["rows"]} <= STATUSES


@pytest.mark.parametrize("argv,message", [
    (["--save-mode", "async-shm"], "cannot stage FSDP1's ShardedTensor state"),
    (["--fsdp", "2", "--save-mode", "async-pinned"], "needs GPUs"),
    (["--self-test", "--self-test-rank", "1"], "--self-test-rank 1 is not a rank of this world of 1"),
    (["--tp", "2"], "world size 1 is not divisible by --replicate 1 × --tp 2"),
])
def test_usage_errors_decided_on_the_ranks(argv: list[str], message: str, tmp_path: Path):
    out = tmp_path / "v.json"
    r = invoke("verify", *argv, "--json", str(out))
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    doc = load_json(out)
    check_envelope(doc, "verify", 2, verdict=last_line(r))
    assert message in doc["error"] and doc["flows"] == []
