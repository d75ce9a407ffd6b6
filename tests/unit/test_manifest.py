"""fsdpck.checkpoint.manifest: fsdpck.json written atomically, read back equal, every malformed one refused clearly.

Pure logic on a local dir (``LocalStorage``); that the module imports without torch is
checked in a subprocess in tests/integration/test_offline_subprocess.py.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsdpck.checkpoint import manifest as manifest_module
from fsdpck.checkpoint.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    ManifestEntry,
    TensorStats,
    parse_manifest_bytes,
    read_manifest,
    write_manifest,
)
from fsdpck.checkpoint.storage import LocalStorage
from fsdpck.errors import CheckpointFormatError


def sample_manifest() -> Manifest:
    return Manifest(
        torch_version="2.13.0+cpu",
        world_size=2,
        created="2026-11-28T13:00:00Z",
        flow={"fsdp": 1, "api": "legacy", "optimizer": "adam", "dtype": "float32", "steps": 1, "save_mode": "sync"},
        model={"dims": [8, 2, 4, 6], "width": 1, "seed": 0},
        keys={
            "optim.state.net1.0.weight.exp_avg": ManifestEntry(
                kind="tensor", shape=(2, 8), dtype="float32", fingerprint="0123456789abcdef",
                stats=TensorStats(numel=16, min=-0.1, max=0.1, abs_max=0.1, mean=0.0, nonfinite=0)),
            "optim.state.net1.0.weight.step": ManifestEntry(kind="tensor", shape=(), dtype="float32",
                                                            fingerprint="fedcba9876543210"),
            "empty": ManifestEntry(kind="tensor", shape=(0, 3), dtype="bfloat16", fingerprint="0000000000000000",
                                   stats=TensorStats(numel=0)),
            "optim.param_groups.0.lr": ManifestEntry(kind="object", canonical="0.1"),
        },
    )


def valid_doc() -> dict:
    return sample_manifest().to_json()


def write_doc(tmp_path: Path, doc) -> LocalStorage:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    (tmp_path / MANIFEST_NAME).write_text(text)
    return LocalStorage(tmp_path)


def refusal(tmp_path: Path, doc) -> str:
    storage = write_doc(tmp_path, doc)
    with pytest.raises(CheckpointFormatError) as info:
        read_manifest(storage)
    assert info.value.exit_code == 1
    message = info.value.message
    assert f"{tmp_path}/{MANIFEST_NAME}" in message
    return message


def test_round_trip_is_equal_and_leaves_no_temp_file(tmp_path):
    m = sample_manifest()
    storage = LocalStorage(tmp_path)
    write_manifest(storage, m)
    path = tmp_path / MANIFEST_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME]
    assert read_manifest(storage) == m
    assert parse_manifest_bytes(path.read_bytes(), source="x") == m
    doc = json.loads(path.read_text())
    assert doc["format"] == "fsdpck.manifest" and doc["version"] == FORMAT_VERSION == 1
    assert doc["keys"]["optim.param_groups.0.lr"] == {"kind": "object", "canonical": "0.1"}
    assert doc["keys"]["optim.state.net1.0.weight.exp_avg"]["stats"]["numel"] == 16
    assert Manifest.from_json(doc) == m


def test_the_documented_example_is_read(tmp_path):
    doc = {
        "format": "fsdpck.manifest", "version": 1, "fsdpck_version": "0.1.0", "torch_version": "2.13.0+cpu",
        "created": "2026-11-28T13:00:00Z", "world_size": 2,
        "flow": {"fsdp": 1, "api": "legacy", "optimizer": "adam", "dtype": "float32", "steps": 1, "save_mode": "sync"},
        "model": {"dims": [8, 2, 4, 6], "width": 1, "seed": 0},
        "keys": {
            "optim.state.net1.0.weight.exp_avg": {"kind": "tensor", "shape": [2, 8], "dtype": "float32",
                                                  "fingerprint": "0123456789abcdef",
                                                  "stats": {"numel": 16, "min": -0.1, "max": 0.1, "abs_max": 0.1,
                                                            "mean": 0.0, "nonfinite": 0}},
            "optim.param_groups.0.lr": {"kind": "object", "canonical": "0.1"},
        },
    }
    m = read_manifest(write_doc(tmp_path, doc))
    assert m.world_size == 2 and m.flow["api"] == "legacy" and m.model["dims"] == [8, 2, 4, 6]
    assert m.keys["optim.state.net1.0.weight.exp_avg"].shape == (2, 8)
    assert m.keys["optim.param_groups.0.lr"].canonical == "0.1"


def test_manifest_is_readable_by_others_as_the_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        write_manifest(LocalStorage(tmp_path), sample_manifest())
    finally:
        os.umask(old)
    assert (tmp_path / MANIFEST_NAME).stat().st_mode & 0o777 == 0o644


def test_overwrite_replaces_the_old_manifest(tmp_path):
    storage = LocalStorage(tmp_path)
    write_manifest(storage, sample_manifest())
    newer = sample_manifest()
    newer.world_size = 4
    write_manifest(storage, newer)
    assert read_manifest(storage).world_size == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME]


def test_no_manifest_is_none(tmp_path):
    assert read_manifest(LocalStorage(tmp_path)) is None
    write_manifest(LocalStorage(tmp_path), sample_manifest())
    assert read_manifest(LocalStorage(tmp_path)) is not None


def test_write_does_not_follow_a_symlink_planted_as_the_manifest(tmp_path):
    """A link named fsdpck.json is replaced by the new file; what it pointed at is left alone."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / MANIFEST_NAME).symlink_to(victim)
    write_manifest(LocalStorage(ckpt), sample_manifest())
    assert victim.read_text() == "precious"
    assert not (ckpt / MANIFEST_NAME).is_symlink() and read_manifest(LocalStorage(ckpt)) == sample_manifest()


def test_symlinked_manifest_is_refused_not_followed(tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_bytes(sample_manifest().encode())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / MANIFEST_NAME).symlink_to(outside)
    with pytest.raises(CheckpointFormatError, match="not a regular file") as info:
        read_manifest(LocalStorage(ckpt))
    assert "not followed" in info.value.message


def test_oversized_manifest_is_refused_before_reading(tmp_path, monkeypatch):
    storage = write_doc(tmp_path, valid_doc())
    size = (tmp_path / MANIFEST_NAME).stat().st_size
    monkeypatch.setattr(manifest_module, "MAX_BYTES", size - 1)
    with pytest.raises(CheckpointFormatError, match=f"{size} bytes, more than the {size - 1}"):
        read_manifest(storage)
    monkeypatch.setattr(manifest_module, "MAX_BYTES", size)
    assert read_manifest(storage) == sample_manifest()


def test_nonfinite_stats_are_written_as_null(tmp_path):
    m = sample_manifest()
    m.keys["optim.state.net1.0.weight.exp_avg"].stats = TensorStats(numel=3, min=-math.inf, max=math.nan, abs_max=1.0,
                                                                     mean=None, nonfinite=2)
    write_manifest(LocalStorage(tmp_path), m)
    stats = json.loads((tmp_path / MANIFEST_NAME).read_text())["keys"]["optim.state.net1.0.weight.exp_avg"]["stats"]
    assert stats == {"numel": 3, "min": None, "max": None, "abs_max": 1.0, "mean": None, "nonfinite": 2}


def test_malformed_json_is_refused(tmp_path):
    message = refusal(tmp_path, "{this is not json")
    assert "not valid JSON" in message and "line 1" in message


def test_truncated_manifest_is_refused_and_called_truncated(tmp_path):
    text = json.dumps(valid_doc(), indent=1)
    message = refusal(tmp_path, text[: len(text) // 2])
    assert "not valid JSON" in message and "truncated" in message


def test_empty_manifest_is_refused(tmp_path):
    assert "not valid JSON" in refusal(tmp_path, "")


def test_newer_version_says_which_and_which_is_read(tmp_path):
    doc = valid_doc()
    doc["version"] = 2
    doc["fsdpck_version"] = "0.9.0"
    message = refusal(tmp_path, doc)
    assert "version 2" in message and "version 1" in message and "0.9.0" in message and "upgrade" in message


@pytest.mark.parametrize("field", ["version", "fsdpck_version", "torch_version", "created", "world_size", "flow",
                                   "model", "keys"])
def test_missing_field_is_named(tmp_path, field):
    doc = valid_doc()
    del doc[field]
    message = refusal(tmp_path, doc)
    assert f"{field}: missing" in message


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda d: d.update(format="something.else"), "format"),
        (lambda d: d.update(version="1"), "version: expected an integer, got a string"),
        (lambda d: d.update(version=True), "version: expected an integer, got a boolean"),
        (lambda d: d.update(version=0), "not a manifest format version"),
        (lambda d: d.update(world_size=0), "world_size"),
        (lambda d: d.update(flow=[1]), "flow: expected an object, got an array"),
        (lambda d: d["keys"].update(x=[]), "keys['x']: expected an object"),
        (lambda d: d["keys"].update(x={"kind": "weird"}), "keys['x'].kind"),
        (lambda d: d["keys"]["optim.param_groups.0.lr"].pop("canonical"), "keys['optim.param_groups.0.lr'].canonical: missing"),
        (lambda d: d["keys"]["empty"].update(fingerprint="XYZ"), "keys['empty'].fingerprint: expected 16 lowercase hex"),
        (lambda d: d["keys"]["empty"].update(fingerprint="0123456789ABCDEF"), "keys['empty'].fingerprint"),
        (lambda d: d["keys"]["empty"].update(shape=[2, -1]), "keys['empty'].shape"),
        (lambda d: d["keys"]["empty"].update(shape="2x3"), "keys['empty'].shape: expected an array"),
        (lambda d: d["keys"]["empty"].pop("dtype"), "keys['empty'].dtype: missing"),
        (lambda d: d["keys"]["empty"].update(stats={"numel": "16"}), "keys['empty'].stats.numel"),
        (lambda d: d["keys"]["empty"].update(stats={"numel": 1, "min": "low"}), "keys['empty'].stats.min"),
    ],
)
def test_mistyped_fields_are_named(tmp_path, mutate, words):
    doc = valid_doc()
    mutate(doc)
    assert words in refusal(tmp_path, doc)


def test_not_an_object_is_refused(tmp_path):
    assert "not an object" in refusal(tmp_path, [1, 2, 3])


def test_duplicate_json_keys_are_refused(tmp_path):
    text = json.dumps(valid_doc())
    text = text.replace('"world_size": 2', '"world_size": 2, "world_size": 3')
    assert "'world_size' twice" in refusal(tmp_path, text)


def test_binary_garbage_is_refused(tmp_path):
    (tmp_path / MANIFEST_NAME).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointFormatError, match="not UTF-8"):
        read_manifest(LocalStorage(tmp_path))


@pytest.mark.parametrize("text, words", [
    ('{"world_size": NaN}', "NaN is not JSON"),
    ('{"world_size": Infinity}', "Infinity is not JSON"),
    ('{"world_size": ' + "9" * 40 + "}", "an integer of 40 digits is out of range"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_hostile_json_is_refused(tmp_path, text, words):
    assert words in refusal(tmp_path, text)


def test_huge_shape_is_refused(tmp_path):
    doc = valid_doc()
    doc["keys"]["empty"]["shape"] = [1] * 65
    assert "keys['empty'].shape: 65 dims" in refusal(tmp_path, doc)
    doc["keys"]["empty"]["shape"] = [2**63 - 1]
    assert "keys['empty'].shape" in refusal(tmp_path, doc)


def test_unknown_fields_are_ignored(tmp_path):
    doc = valid_doc()
    doc["future_field"] = {"anything": 1}
    doc["keys"]["empty"]["future"] = True
    assert read_manifest(write_doc(tmp_path, doc)) == sample_manifest()


def test_entry_validates_itself():
    with pytest.raises(ValueError, match="fingerprint"):
        ManifestEntry(kind="tensor", shape=(1,), dtype="float32", fingerprint="nothex")
    with pytest.raises(ValueError, match="canonical"):
        ManifestEntry(kind="object")
    with pytest.raises(ValueError, match="kind"):
        ManifestEntry(kind="blob")


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mutation_is_read_or_refused_cleanly(tmp_path, data):
    """Replace or delete any field anywhere: the reader returns a Manifest or raises CheckpointFormatError, nothing else."""
    doc = valid_doc()
    node = doc
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        k = data.draw(st.sampled_from(keys))
        child = node[k]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            node = child
            continue
        if isinstance(node, dict) and data.draw(st.booleans()):
            del node[k]
        else:
            node[k] = data.draw(_json_values)
        break
    storage = write_doc(tmp_path, doc)
    try:
        m = read_manifest(storage)
    except CheckpointFormatError as e:
        assert MANIFEST_NAME in e.message
    else:
        assert isinstance(m, Manifest)
