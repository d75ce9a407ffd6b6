"""The layouts real trainers use, at 4 ranks on CPU/gloo: HSDP (2 replicas x 2 shards) and TP 2 x
FSDP2, verified, self-tested (a replica flipped on one rank is named), saved and resharded across
mesh shapes; and the whole resume state (--trainer-state) at 2 ranks."""

from __future__ import annotations

import json

import pytest
from conftest import check_envelope, fsdpck

pytestmark = pytest.mark.slow

LAYOUTS = ["--matrix", "--fsdp", "2", "--api", "dsd", "--save-mode", "sync", "--planner", "default"]


def rows(doc: dict, flow_name_part: str) -> list[dict]:
    (flow,) = [f for f in doc["flows"] if flow_name_part in f["name"]]
    return flow["rows"]


def test_hsdp_and_tp_verify_at_four_ranks(tmp_path):
    run = fsdpck("verify", *LAYOUTS, "--json", str(tmp_path / "v.json"), nproc=4)
    assert run.code == 0, run.tail()
    doc = json.loads((tmp_path / "v.json").read_text())
    check_envelope(doc, "verify", 0)
    layouts = {(f["flow"]["replicate"], f["flow"]["tp"]) for f in doc["flows"]}
    assert layouts == {(1, 1), (2, 1), (1, 2)}
    hsdp = rows(doc, "hsdp2")
    assert {r["sharding"] for r in hsdp if r["key"] == "model.net1.0.weight"} == {"DTensor (R, S(0))"}
    tp = rows(doc, "tp2")
    assert "_S(0, 2)" in next(r["sharding"] for r in tp if r["key"] == "model.net1.0.weight")
    assert "R" in next(r["sharding"] for r in tp if r["key"] == "model.net2.0.bias")  # replicated over the TP dim
    assert all(r["status"] == "match" and r["differing"] in (0, None) for f in doc["flows"] for r in f["rows"])


def test_self_test_under_each_layout_and_the_replica_flip_names_the_rank(tmp_path):
    run = fsdpck("verify", *LAYOUTS, "--self-test", "--json", str(tmp_path / "v.json"), nproc=4)
    assert run.code == 1, run.tail()
    doc = json.loads((tmp_path / "v.json").read_text())
    for flow in doc["flows"]:
        bad = [r for r in flow["rows"] if r["status"] != "match"]
        assert len(bad) == 1, (flow["name"], bad)
        assert bad[0]["key"] == flow["self_test"]["key"] and flow["self_test"]["rank"] == 3
    (hsdp_bad,) = [r for r in rows(doc, "hsdp2") if r["status"] != "match"]
    # Rank 3 holds replica 1's copy: the saved and the counted (replica 0) values agree, the replica does not.
    assert hsdp_bad["status"] == "replica-differs" and hsdp_bad["replica_ranks"] == [3]
    assert "rank(s) 3" in hsdp_bad["note"]
    (plain_bad,) = [r for r in doc["flows"][0]["rows"] if r["status"] != "match"]
    assert doc["flows"][0]["flow"]["replicate"] == 1 and plain_bad["status"] == "differs"


def test_hsdp_flipped_on_replica_zero_is_a_difference_not_a_replica_row(tmp_path):
    run = fsdpck("verify", "--fsdp", "2", "--replicate", "2", "--planner", "default", "--self-test",
                 "--self-test-rank", "0", "--json", str(tmp_path / "v.json"), nproc=4)
    assert run.code == 1, run.tail()
    (bad,) = [r for r in json.loads((tmp_path / "v.json").read_text())["flows"][0]["rows"] if r["status"] != "match"]
    # The counted copy changed, so the row differs from what was saved, and rank 0 is the one that changed.
    assert bad["status"] == "differs" and bad["replica_ranks"] == [0] and "rank(s) 0" in bad["note"]


def test_save_hsdp_then_load_into_other_meshes_and_world_sizes(tmp_path):
    ck = str(tmp_path / "hsdp")
    saved = fsdpck("save", ck, "--fsdp", "2", "--replicate", "2", "--trainer-state", nproc=4)
    assert saved.code == 0, saved.tail()
    manifest = json.loads((tmp_path / "hsdp" / "fsdpck.json").read_text())
    assert manifest["layout"] == {"replicate": 2, "tp": 1} and manifest["world_size"] == 4
    for nproc, extra in ((3, ["--fsdp", "2"]), (4, ["--tp", "2"])):
        run = fsdpck("load", ck, *extra, "--json", str(tmp_path / f"l{nproc}.json"), nproc=nproc)
        assert run.code == 0, run.tail()
        doc = json.loads((tmp_path / f"l{nproc}.json").read_text())
        check_envelope(doc, "load", 0)
        (checkpoint,) = doc["checkpoints"]
        assert checkpoint["saved_layout"] == {"replicate": 2, "tp": 1}
        assert checkpoint["load_flow"]["tp"] == (2 if "--tp" in extra else 1)
        assert checkpoint["keys_compared"] == len(manifest["keys"]) and checkpoint["keys_differing"] == 0


def test_impossible_meshes_are_refused_in_one_line():
    for args, nproc, needle in ((["--replicate", "2"], 3, "not divisible"), (["--fsdp", "1", "--tp", "2"], None,
                                                                             "need --fsdp 2")):
        run = fsdpck("verify", *args, nproc=nproc)
        assert run.code == 2, run.tail()
        assert needle in run.text and "Traceback" not in run.text


def test_trainer_state_is_saved_and_compared(tmp_path):
    run = fsdpck("verify", "--trainer-state", "--fsdp", "2", "--planner", "default", "--json",
                 str(tmp_path / "v.json"), nproc=2)
    assert run.code == 0, run.tail()
    (flow,) = json.loads((tmp_path / "v.json").read_text())["flows"]
    keys = {r["key"]: r for r in flow["rows"]}
    for key in ("trainer.scheduler.last_epoch", "trainer.scheduler.base_lrs", "trainer.step", "trainer.rng.cpu",
                "trainer.data.epoch", "trainer.data.sample", "trainer.data.seed"):
        assert keys[key]["status"] == "match", key
    assert keys["trainer.scheduler.last_epoch"]["saved"] == "1"
    assert keys["trainer.data.sample"]["saved"] == "8"
    assert keys["trainer.rng.cpu"]["shape"] == [5056] and keys["trainer.rng.cpu"]["replica_ranks"] == []
