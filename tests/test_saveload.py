"""fsdpck save / load: the manifest, resharding N -> M, flows crossed, and a bit flipped on disk."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import fsdpck, load_json
from fsdpck.cli import cli
from fsdpck.manifest import ManifestEntry
from fsdpck.saveload import compare_entries


def entry(fp: str = "0" * 16, shape=(2, 3), dtype="float32") -> ManifestEntry:
    return ManifestEntry(kind="tensor", shape=shape, dtype=dtype, fingerprint=fp)


def test_compare_entries_statuses():
    saved = {"a": entry(), "b": entry("1" * 16), "c": entry(), "d": ManifestEntry(kind="object", canonical="0.1"),
             "e": entry()}
    loaded = {"a": entry(), "b": entry("2" * 16), "d": ManifestEntry(kind="object", canonical="0.2"),
              "e": entry(shape=(3, 2)), "f": entry()}
    rows = {r.key: r for r in compare_entries(saved, loaded)}
    assert {k: r.status for k, r in rows.items()} == {
        "a": "match", "b": "differs", "c": "missing", "d": "differs", "e": "differs", "f": "unexpected"}
    assert "[2, 3]" in rows["e"].note and "[3, 2]" in rows["e"].note


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_save_and_load_in_one_process(tmp_path: Path):
    ck = tmp_path / "ck"
    r = invoke("save", str(ck))
    assert r.exit_code == 0, r.output
    manifest = json.loads((ck / "fsdpck.json").read_text())
    assert manifest["format"] == "fsdpck.manifest" and manifest["world_size"] == 1
    assert manifest["model"]["dims"] == [8, 1, 2, 3]
    assert manifest["keys"]["optim.state.net1.0.weight.exp_avg"]["shape"] == [1, 8]
    r = invoke("load", str(ck))
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1].startswith("fsdpck load: VERIFIED (exit 0)")


def test_load_self_test_reports_exactly_one_key(tmp_path: Path):
    ck = tmp_path / "ck"
    assert invoke("save", str(ck)).exit_code == 0
    out = tmp_path / "l.json"
    r = invoke("load", str(ck), "--self-test", "--json", str(out))
    assert r.exit_code == 1, r.output
    doc = load_json(out)
    (cp,) = doc["checkpoints"]
    bad = [row for row in cp["rows"] if row["status"] != "match"]
    s = cp["self_test"]
    assert [row["key"] for row in bad] == [f"optim.state.{s['fqn']}.{s['state']}"]


def test_save_refuses_a_non_empty_dir_and_overwrites_only_its_own(tmp_path: Path):
    (tmp_path / "theirs.txt").write_text("x")
    r = invoke("save", str(tmp_path))
    assert r.exit_code == 2 and "not empty" in r.output
    r = invoke("save", str(tmp_path), "--overwrite")
    assert r.exit_code == 2 and "not written by fsdpck" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs.txt"]
    ck = tmp_path / "ck"
    assert invoke("save", str(ck)).exit_code == 0
    assert invoke("save", str(ck), "--overwrite", "--optimizer", "sgd").exit_code == 0
    assert json.loads((ck / "fsdpck.json").read_text())["flow"]["optimizer"] == "sgd"


def test_load_without_manifest_is_a_usage_error(tmp_path: Path):
    r = invoke("load", str(tmp_path))
    assert r.exit_code == 2 and "no fsdpck.json" in r.output
    r = invoke("load", str(tmp_path / "missing"))
    assert r.exit_code == 2 and "does not exist" in r.output


def test_load_with_malformed_manifest(tmp_path: Path):
    ck = tmp_path / "ck"
    assert invoke("save", str(ck)).exit_code == 0
    text = (ck / "fsdpck.json").read_text()
    (ck / "fsdpck.json").write_text(text[: len(text) // 2])
    r = invoke("load", str(ck))
    assert r.exit_code == 1 and "truncated" in r.output and "Traceback" not in r.output


# --- across launches and world sizes --------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints saved at 2 ranks through FSDP1/legacy and FSDP2/dsd."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for name, args in (("fsdp1", []), ("fsdp2", ["--fsdp", "2"])):
        r = fsdpck("save", str(root / name), *args, nproc=2)
        assert r.code == 0, r.tail()
        out[name] = root / name
    return out


# Each launch loads both checkpoints; at 2 and 3 ranks one of them goes through the other flow,
# so every world size 1-4 sees both checkpoints and both migrations are covered.
@pytest.mark.parametrize("nproc,flow_args", [
    (1, []),
    (2, ["--fsdp", "1", "--api", "legacy"]),  # FSDP2/dsd save -> FSDP1/legacy load
    (3, ["--fsdp", "2", "--api", "dsd"]),     # FSDP1/legacy save -> FSDP2/dsd load
    (4, []),
])
def test_saved_at_2_loads_at_any_world_size_and_across_flows(saved, nproc: int, flow_args: list[str], tmp_path: Path):
    out = tmp_path / "l.json"
    r = fsdpck("load", str(saved["fsdp1"]), str(saved["fsdp2"]), *flow_args, "--json", str(out), nproc=nproc)
    assert r.code == 0, r.tail()
    doc = load_json(out)
    assert doc["world_size"] == nproc
    for cp in doc["checkpoints"]:
        assert cp["saved_world_size"] == 2
        assert cp["keys_differing"] == 0 and cp["keys_compared"] == 36
    if flow_args:
        assert {(cp["save_flow"]["fsdp"], cp["load_flow"]["fsdp"]) for cp in doc["checkpoints"]} >= {(1, 2)} or \
               {(cp["save_flow"]["fsdp"], cp["load_flow"]["fsdp"]) for cp in doc["checkpoints"]} >= {(2, 1)}


def test_saved_at_3_with_uneven_width_loads_at_2(tmp_path: Path):
    ck = tmp_path / "ck"
    r = fsdpck("save", str(ck), "--fsdp", "2", "--width", "3", nproc=3)
    assert r.code == 0, r.tail()
    assert load_json(ck / "fsdpck.json")["model"]["dims"] == [8, 9, 18, 27]  # 9 rows over 2 ranks: uneven
    r = fsdpck("load", str(ck), nproc=2)
    assert r.code == 0, r.tail()


def flip_bit_in_stored_tensor(ck: Path, key: str) -> None:
    """Flip one bit inside the raw data of a stored tensor, in place, at its byte range."""
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(str(ck)).read_metadata()  # our own test checkpoint: trusted
    index = next(i for i in md.storage_data if i.fqn == key)
    info = md.storage_data[index]
    path = ck / info.relative_path
    data = bytearray(path.read_bytes())
    record = bytes(data[info.offset : info.offset + info.length])
    tensor = torch.load(io.BytesIO(record), weights_only=True)
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    at = record.find(raw)
    assert at >= 0 and raw
    data[info.offset + at + len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_bit_flipped_on_disk_is_reported_on_exactly_that_key(saved, tmp_path: Path):
    ck = tmp_path / "ck"
    shutil.copytree(saved["fsdp2"], ck)
    key = "optim.state.net3.0.weight.exp_avg_sq"
    flip_bit_in_stored_tensor(ck, key)
    out = tmp_path / "l.json"
    r = fsdpck("load", str(ck), "--json", str(out), nproc=2)
    assert r.code == 1, r.tail()
    (cp,) = load_json(out)["checkpoints"]
    assert [row["key"] for row in cp["rows"] if row["status"] != "match"] == [key]
    assert key in r.last_line()
