"""fsdpck save / load: the manifest, resharding N -> M, flows and layouts crossed, and a bit flipped on disk.

World size 1 runs in this process (CliRunner). Across launches: two checkpoints are saved once
for the module (FSDP1/legacy at 2; FSDP2/dsd at 2 with AdamW, trainer state and an async save)
and every load reads both, at world sizes 1, 2 and 3 (uneven: 2 rows over 3 ranks), each launch
crossing the flows in a known direction. Mesh layouts (HSDP and TP saves and loads, at 4 ranks)
are test_layouts.py's; a save at 4 ranks over two nodes loaded at 2 is test_multinode.py's.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ROW_FIELDS, bad_rows, check_envelope, fsdpck, invoke, load_json


def last_line(result) -> str:
    return result.output.strip().splitlines()[-1]


# --- world size 1, in this process ---------------------------------------------------------------


def test_save_and_load_in_one_process(tmp_path: Path):
    ck = tmp_path / "ck"
    r = invoke("save", str(ck), "--json", str(tmp_path / "s.json"))
    assert r.exit_code == 0, r.output
    assert last_line(r) == f"fsdpck save: SAVED (exit 0) — 36 keys at world size 1, manifest written, {ck}"
    doc = load_json(tmp_path / "s.json")
    check_envelope(doc, "save", 0, verdict=last_line(r))
    assert (doc["directory"], doc["keys"], doc["tensors"], doc["model_dims"]) == (str(ck), 36, 24, [8, 1, 2, 3])
    assert doc["bytes_written"] > 0 and set(doc["timings_s"]) >= {"step", "save"}
    manifest = load_json(ck / "fsdpck.json")
    assert manifest["format"] == "fsdpck.manifest" and manifest["world_size"] == 1
    assert manifest["model"]["dims"] == [8, 1, 2, 3] and manifest["layout"] == {"replicate": 1, "tp": 1}
    assert manifest["flow"]["fsdp"] == 1 and manifest["flow"]["api"] == "legacy"
    assert len(manifest["keys"]) == 36
    assert manifest["keys"]["optim.state.net1.0.weight.exp_avg"]["shape"] == [1, 8]
    assert manifest["keys"]["model.net3.0.weight"]["stats"]["numel"] == 6
    assert manifest["keys"]["optim.param_groups.0.lr"] == {"kind": "object", "canonical": "0x1.999999999999ap-4"}

    r = invoke("load", str(ck), "--json", str(tmp_path / "l.json"))
    assert r.exit_code == 0, r.output
    assert last_line(r) == "fsdpck load: VERIFIED (exit 0) — 36 keys match the manifest; saved at world size 1, loaded at 1"
    doc = load_json(tmp_path / "l.json")
    check_envelope(doc, "load", 0, verdict=last_line(r))
    (cp,) = doc["checkpoints"]
    assert (cp["directory"], cp["saved_world_size"], cp["keys_compared"], cp["keys_differing"]) == (str(ck), 1, 36, 0)
    assert all(list(row) == ROW_FIELDS for row in cp["rows"])
    by_key = {row["key"]: row for row in cp["rows"]}
    assert set(by_key) == set(manifest["keys"])
    for key, entry in manifest["keys"].items():  # each loaded value is the one the manifest recorded
        expected = entry["fingerprint"] if entry["kind"] == "tensor" else entry["canonical"]
        assert by_key[key]["saved"] == by_key[key]["loaded"] == expected, key


def test_load_self_test_reports_exactly_one_key(tmp_path: Path):
    ck = tmp_path / "ck"
    assert invoke("save", str(ck)).exit_code == 0
    out = tmp_path / "l.json"
    r = invoke("load", str(ck), "--self-test", "--json", str(out))
    assert r.exit_code == 1, r.output
    doc = load_json(out)
    check_envelope(doc, "load", 1, verdict=last_line(r))
    (cp,) = doc["checkpoints"]
    (bad,) = bad_rows(cp["rows"])
    assert cp["self_test"] == {"rank": 0, "key": bad["key"], "bit": 0}
    assert bad["status"] == "differs" and bad["saved"] != bad["loaded"]
    assert cp["keys_differing"] == 1
    assert f"{bad['key']} (differs)" in last_line(r)
    r = invoke("load", str(ck), "--self-test", "--self-test-rank", "3")
    assert r.exit_code == 2 and "--self-test-rank 3 is not a rank of this world of 1" in r.output, r.output


def test_save_refuses_a_non_empty_dir_and_overwrites_only_its_own(tmp_path: Path):
    (tmp_path / "theirs.txt").write_text("x")
    r = invoke("save", str(tmp_path))
    assert r.exit_code == 2 and "not empty" in r.output and "1 entries fsdpck did not write" in r.output, r.output
    r = invoke("save", str(tmp_path), "--overwrite")
    assert r.exit_code == 2 and "not written by fsdpck" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs.txt"]
    ck = tmp_path / "ck"
    assert invoke("save", str(ck)).exit_code == 0
    r = invoke("save", str(ck))
    assert r.exit_code == 2 and "it holds an earlier `fsdpck save` (fsdpck.json is there)" in r.output, r.output
    (ck / "notes.txt").write_text("kept")
    assert invoke("save", str(ck), "--overwrite", "--optimizer", "sgd").exit_code == 0
    assert load_json(ck / "fsdpck.json")["flow"]["optimizer"] == "sgd"
    assert (ck / "notes.txt").read_text() == "kept"  # --overwrite replaces the save, nothing else
    assert invoke("load", str(ck)).exit_code == 0  # and what is there now is whole: no old shard left over


def test_load_without_a_manifest_or_dir_is_a_usage_error(tmp_path: Path):
    r = invoke("load", str(tmp_path))
    assert r.exit_code == 2 and "has no fsdpck.json" in r.output and "fsdpck inspect" in r.output, r.output
    r = invoke("load", str(tmp_path / "missing"))
    assert r.exit_code == 2 and "does not exist" in r.output, r.output


def test_load_with_a_truncated_manifest_is_a_checkpoint_problem(tmp_path: Path):
    ck = tmp_path / "ck"
    assert invoke("save", str(ck)).exit_code == 0
    text = (ck / "fsdpck.json").read_text()
    (ck / "fsdpck.json").write_text(text[: len(text) // 2])
    r = invoke("load", str(ck))
    assert r.exit_code == 1, r.output
    assert "truncated" in r.output and "Nothing was loaded" in r.output and "Traceback" not in r.output


def test_manifest_that_does_not_describe_the_checkpoint_is_refused(tmp_path: Path):
    ck = tmp_path / "ck"
    assert invoke("save", str(ck)).exit_code == 0
    manifest = load_json(ck / "fsdpck.json")
    manifest["model"]["dims"] = [8, 1000, 2000, 3000]  # would allocate far more than the checkpoint holds
    (ck / "fsdpck.json").write_text(json.dumps(manifest))
    r = invoke("load", str(ck))
    assert r.exit_code == 2, r.output
    assert "model.dims [8, 1000, 2000, 3000]" in r.output and "does not describe this checkpoint" in r.output


# --- across launches and world sizes ----------------------------------------------------------------

SAVES = {
    "fsdp1": (2, []),
    "fsdp2": (2, ["--fsdp", "2", "--optimizer", "adamw", "--trainer-state", "--save-mode", "async"]),
}
FLIPPED_KEY = "optim.state.net3.0.weight.exp_avg_sq"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for name, (nproc, args) in SAVES.items():
        r = fsdpck("save", str(root / name), *args, "--json", str(root / f"{name}.json"), nproc=nproc)
        assert r.code == 0, r.tail()
        check_envelope(load_json(root / f"{name}.json"), "save", 0, verdict=r.last_line())
        out[name] = root / name
    return out


def test_saves_record_their_flow_layout_and_world(saved):
    manifests = {name: load_json(path / "fsdpck.json") for name, path in saved.items()}
    assert {n: (m["world_size"], m["flow"]["fsdp"], m["flow"]["api"]) for n, m in manifests.items()} == {
        "fsdp1": (2, 1, "legacy"), "fsdp2": (2, 2, "dsd")}
    assert all(m["layout"] == {"replicate": 1, "tp": 1} and m["model"]["dims"] == [8, 2, 4, 6]
               for m in manifests.values())
    fsdp2 = manifests["fsdp2"]
    assert (fsdp2["flow"]["save_mode"], fsdp2["flow"]["optimizer"], fsdp2["flow"]["trainer_state"]) == (
        "async", "adamw", True)
    assert any(k.startswith("trainer.") for k in fsdp2["keys"])
    assert "optim.param_groups.0.weight_decay" in fsdp2["keys"]
    assert fsdp2["keys"]["optim.param_groups.0.weight_decay"]["canonical"] == float.hex(0.01)  # AdamW's


def test_saved_at_2_loads_at_1_in_one_process(saved, tmp_path: Path):
    out = tmp_path / "l.json"
    r = invoke("load", *map(str, saved.values()), "--json", str(out))
    assert r.exit_code == 0, r.output
    doc = load_json(out)
    check_envelope(doc, "load", 0, verdict=last_line(r))
    assert [cp["saved_world_size"] for cp in doc["checkpoints"]] == [2, 2]
    for cp, path in zip(doc["checkpoints"], saved.values()):
        assert cp["keys_differing"] == 0 and cp["keys_compared"] == len(load_json(path / "fsdpck.json")["keys"])
        assert cp["load_flow"]["fsdp"] == cp["save_flow"]["fsdp"]  # no flow given: the save's


# (nproc, load options, (save fsdp, load fsdp) per checkpoint in SAVES order)
LOADS = [
    (2, ["--fsdp", "1", "--api", "legacy"], [(1, 1), (2, 1)]),  # FSDP2/dsd -> FSDP1/legacy
    (3, ["--fsdp", "2", "--api", "dsd"], [(1, 2), (2, 2)]),  # FSDP1/legacy -> FSDP2/dsd; 2 -> 3: uneven shards
]


@pytest.mark.parametrize("nproc,flow_args,directions", LOADS, ids=[f"at-{n}" for n, *_ in LOADS])
def test_loads_at_another_world_size_through_another_flow(saved, nproc: int, flow_args: list[str],
                                                          directions: list[tuple[int, int]], tmp_path: Path):
    checkpoints = list(saved.values())
    flipped = None
    if nproc == 2:
        # One corrupted copy rides along: exactly its one key differs, the others still verify.
        flipped = tmp_path / "flipped"
        shutil.copytree(saved["fsdp2"], flipped)
        flip_bit_in_stored_tensor(flipped, FLIPPED_KEY)
        checkpoints.append(flipped)
    out = tmp_path / "l.json"
    r = fsdpck("load", *map(str, checkpoints), *flow_args, "--json", str(out), nproc=nproc)
    assert r.code == (1 if flipped else 0), r.tail()
    doc = load_json(out)
    check_envelope(doc, "load", r.code, verdict=r.last_line())
    assert doc["world_size"] == nproc
    cps = doc["checkpoints"][:2]
    assert [(cp["save_flow"]["fsdp"], cp["load_flow"]["fsdp"]) for cp in cps] == directions
    assert [cp["saved_world_size"] for cp in cps] == [2, 2]
    for cp, path in zip(cps, saved.values()):
        assert cp["load_flow"]["api"] == ("legacy" if cp["load_flow"]["fsdp"] == 1 else "dsd")
        assert cp["keys_differing"] == 0, (path.name, bad_rows(cp["rows"]))
        assert cp["keys_compared"] == len(load_json(path / "fsdpck.json")["keys"])
        wrapper = "ShardedTensor" if cp["load_flow"]["fsdp"] == 1 else "DTensor"
        assert {row["sharding"].split(" ")[0] for row in cp["rows"] if row["key"].endswith(".exp_avg")} == {wrapper}
    if flipped is not None:
        last = doc["checkpoints"][2]
        assert last["directory"] == str(flipped)
        assert [(row["key"], row["status"]) for row in bad_rows(last["rows"])] == [(FLIPPED_KEY, "differs")]
        assert FLIPPED_KEY in r.last_line() and f"first in {flipped}" in r.last_line()


def flip_bit_in_stored_tensor(ck: Path, key: str) -> None:
    """Flip one bit inside the raw data of a stored tensor, in place, at its byte range."""
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(str(ck)).read_metadata()  # our own test checkpoint: trusted
    index = next(i for i in md.storage_data if i.fqn == key)
    info = md.storage_data[index]
    path = ck / info.relative_path
    data = bytearray(path.read_bytes())
    record = bytes(data[info.offset: info.offset + info.length])
    tensor = torch.load(io.BytesIO(record), weights_only=True)
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    at = record.find(raw)
    assert at >= 0 and raw
    data[info.offset + at + len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(data))
