"""fsdpck.commands.inspect / diff / offline: --verify-data, diff and --values on checkpoints written here.

One process, no process group: the checkpoints are ``dcp.save(..., no_dist=True)`` output.
Every data check is shown to fail on a planted fault (a flipped bit, a changed lr, a
damaged item), and an item that is a pickle payload is never run. Diffs across world sizes
of real FSDP2 checkpoints are in tests/integration/test_offline_real.py.
"""

from __future__ import annotations

import io
import math
import os
import zipfile

import pytest
import torch

import ckpt_factory as cf
from fsdpck.checkpoint import integrity
from fsdpck.checkpoint.integrity import P_FINGERPRINT, P_UNREADABLE, P_VALUE
from fsdpck.checkpoint.reader import stored_digest
from fsdpck.checkpoint.storage import LocalStorage
from fsdpck.commands.diff import diff_checkpoints, element_diff
from fsdpck.commands.inspect import inspect_checkpoint
from fsdpck.commands.offline import byte_item, read_items, tensor_fingerprint
from fsdpck.errors import UsageError
from fsdpck.fingerprint import fp_tensor, to_hex
from fsdpck.state.canonical import canonical

LR = "optim.param_groups.0.lr"


@pytest.fixture
def plain_copy(tmp_path):
    return cf.copy_ckpt(cf.plain_ckpt(), tmp_path / "ckpt")


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# --- inspect --verify-data ---------------------------------------------------------------


def test_verify_data_matches_the_manifest():
    result = inspect_checkpoint(str(cf.plain_ckpt()), verify_data=True)
    assert result.problems == [] and result.exit_code == 0 and result.status == "OK"
    statuses = {r.key: r.status for r in result.rows}
    assert set(statuses.values()) == {"verified"}, statuses
    assert len(statuses) == len(cf.flat_state(cf.plain_state()))
    step = next(r for r in result.rows if r.key == "step")
    assert step.value == "7" and step.expected == "7"
    assert next(r for r in result.rows if r.key == "name").value == "'run-42'"
    lr = next(r for r in result.rows if r.key == LR)
    assert lr.expected == canonical(0.1) == float.hex(0.1)  # objects are checked by their canonical text
    vol = next(r for r in result.rows if r.key == "nested.vol")
    assert vol.fingerprint == vol.expected == to_hex(fp_tensor(cf.plain_state()["nested"]["vol"]))


def test_flipped_byte_is_reported_for_exactly_that_key(plain_copy):
    state = cf.plain_state()
    name = cf.flip_byte_in_tensor(plain_copy, "nested.vol", state["nested"]["vol"])
    result = inspect_checkpoint(str(plain_copy), verify_data=True)
    assert result.exit_code == 1 and result.status == "PROBLEMS"
    (p,) = result.problems
    assert (p.kind, p.key, p.file) == (P_FINGERPRINT, "nested.vol", name)
    bad = [r for r in result.rows if r.status != "verified"]
    assert [(r.key, r.status) for r in bad] == [("nested.vol", "MISMATCH")]
    # Without --verify-data the flip is invisible: metadata and sizes are intact.
    assert inspect_checkpoint(str(plain_copy)).problems == []


def test_changed_param_group_lr_is_a_value_mismatch(plain_copy):
    """A byte item rewritten in the shard (lr 0.1 -> 0.2): --verify-data checks objects too."""
    name = cf.replace_byte_item(plain_copy, LR, 0.2)
    assert inspect_checkpoint(str(plain_copy)).problems == []  # same sizes: only the data can tell
    result = inspect_checkpoint(str(plain_copy), verify_data=True)
    assert result.exit_code == 1 and result.status == "PROBLEMS"
    (p,) = result.problems
    assert (p.kind, p.key, p.file) == (P_VALUE, LR, name)
    assert float.hex(0.2) in p.message and float.hex(0.1) in p.message
    assert [(r.key, r.status) for r in result.rows if r.status != "verified"] == [(LR, "MISMATCH")]
    row = next(r for r in result.rows if r.key == LR)
    assert row.value == "0.2" and row.expected == float.hex(0.1)
    # diff sees it as well, as a byte item whose value differs.
    d = diff_checkpoints(str(cf.plain_ckpt()), str(plain_copy))
    assert [(r.key, r.status) for r in d.differing] == [(LR, "DIFFERENT")] and d.exit_code == 1


def test_unreadable_item_is_reported_not_raised(plain_copy):
    name, offset, length = cf.storage_info(plain_copy, "model.weight")
    data = bytearray((plain_copy / name).read_bytes())
    data[offset : offset + 64] = b"\0" * 64  # the zip header of that item's torch.save archive
    (plain_copy / name).write_bytes(bytes(data))
    result = inspect_checkpoint(str(plain_copy), verify_data=True)
    (p,) = result.problems
    assert (p.kind, p.key, p.file) == (P_UNREADABLE, "model.weight", name)
    assert "cannot be read" in p.message and "Traceback" not in p.message
    assert {r.key for r in result.rows if r.status != "verified"} == {"model.weight"}
    assert next(r for r in result.rows if r.key == "model.weight").status == "UNREADABLE"


def test_evil_byte_item_is_read_but_never_unpickled(tmp_path):
    """DCP's default planner would torch.load(weights_only=False) a byte item; fsdpck never does."""
    import torch.distributed.checkpoint as dcp

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    cf.dcp_save({"w": torch.ones(2), "evil": cf.Payload(os.system, cf.marker_command(ours))}, tmp_path / "ckpt")
    assert inspect_checkpoint(str(tmp_path / "ckpt")).exit_code == 0  # metadata alone: whole
    result = inspect_checkpoint(str(tmp_path / "ckpt"), verify_data=True)
    assert not ours.exists()
    evil = next(r for r in result.rows if r.key == "evil")
    assert evil.status == "UNREADABLE" and evil.value is None and "without running code" in evil.detail
    assert [(p.kind, p.key) for p in result.problems] == [(P_UNREADABLE, "evil")] and result.exit_code == 1
    assert next(r for r in result.rows if r.key == "w").status == "read ok"
    diff = diff_checkpoints(str(tmp_path / "ckpt"), str(tmp_path / "ckpt"))
    assert diff.exit_code == 0 and not ours.exists()  # compared by its stored records, still never run
    # ... while DCP's own load with its default planner runs it (so the test could fail).
    cf.dcp_save({"evil": cf.Payload(os.system, cf.marker_command(theirs))}, tmp_path / "theirs_ckpt")
    target = {"evil": io.BytesIO()}
    with pytest.warns(UserWarning):
        dcp.load(target, checkpoint_id=str(tmp_path / "theirs_ckpt"), no_dist=True)
    assert theirs.read_text() == "pwned"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_evil_byte_item_through_dcp_load_with_fsdpck_reader_is_refused(tmp_path):
    """DCP's own load, given fsdpck's reader, decodes byte items with weights_only: the payload never runs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from fsdpck.errors import CheckpointFormatError

    marker = tmp_path / "marker"
    cf.dcp_save({"evil": cf.Payload(os.system, cf.marker_command(marker)), "lr": 0.5}, tmp_path / "ckpt")
    target = {"evil": io.BytesIO(), "lr": 0.0}
    with pytest.raises(CheckpointException) as info:
        dcp.load(target, storage_reader=LocalStorage(tmp_path / "ckpt").dcp_reader(), no_dist=True)
    (cause, _), = info.value.failures.values()
    assert isinstance(cause, CheckpointFormatError) and "'evil': cannot be loaded without running code" in cause.message
    assert not marker.exists()
    ok = {"lr": 0.0}
    dcp.load(ok, storage_reader=LocalStorage(tmp_path / "ckpt").dcp_reader(), no_dist=True)
    assert ok["lr"] == 0.5  # plain values still load


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_reading_pieces_one_thread_or_many_gives_the_same_fingerprints(monkeypatch):
    from fsdpck.checkpoint import stream

    ckpt = integrity.open_checkpoint(LocalStorage(cf.plain_ckpt()))
    infos = [i for i in ckpt.metadata.keys.values() if i.kind == "tensor"]
    one = {k: r.fingerprint for k, r in read_items(ckpt, infos, threads=1).items()}
    monkeypatch.setattr(stream, "RUN_BYTES", 1)  # every stored item a run of its own, read by 4 threads
    many = {k: r.fingerprint for k, r in read_items(ckpt, infos, threads=4).items()}
    assert one == many and len(one) == len(infos)
    flat = cf.flat_state(cf.plain_state())
    assert many == {i.key: tensor_fingerprint(flat[i.key]) for i in infos}
    assert many["nested.a.bf"] == to_hex(fp_tensor(cf.plain_state()["nested"]["a"]["bf"]))
    result = inspect_checkpoint(str(cf.plain_ckpt()), verify_data=True, threads=1)
    assert {r.status for r in result.rows} == {"verified"}


# --- diff --------------------------------------------------------------------------------


def test_diff_of_two_saves_of_the_same_state_is_identical(tmp_path):
    """Byte items compare by value: the serialization_id torch.save writes differs from save to save."""
    cf.dcp_save(cf.plain_state(), tmp_path / "again")
    result = diff_checkpoints(str(cf.plain_ckpt()), str(tmp_path / "again"), values=True)
    assert result.exit_code == 0 and result.status == "IDENTICAL", [r for r in result.differing]
    assert len(result.rows) == len(cf.flat_state(cf.plain_state()))
    assert all(r.values is None for r in result.rows)  # --values looks only at keys whose data differ


def test_diff_names_every_kind_of_difference(tmp_path):
    state = cf.plain_state()
    state["nested"]["vol"] = state["nested"]["vol"].clone()
    state["nested"]["vol"][1, 2, 3] += 0.5
    del state["nested"]["half"]
    state["extra"] = torch.zeros(2)
    state["scalar"] = torch.tensor(3.5, dtype=torch.float64)
    state["empty"] = torch.empty(0, 4)
    state["step"] = 8
    state["name"] = torch.zeros(1)  # a byte item in A, a tensor in B
    cf.dcp_save(state, tmp_path / "b")
    result = diff_checkpoints(str(cf.plain_ckpt()), str(tmp_path / "b"), values=True)
    status = {r.key: r.status for r in result.differing}
    assert status == {"nested.vol": "DIFFERENT", "nested.half": "only in A", "extra": "only in B",
                      "scalar": "DTYPE DIFFERS", "empty": "SHAPE DIFFERS", "step": "DIFFERENT", "name": "KIND DIFFERS"}
    vol = next(r for r in result.rows if r.key == "nested.vol")
    assert vol.values["elements"] == 24 and vol.values["differing"] == 1
    assert vol.values["first_index"] == [1, 2, 3]
    assert vol.values["max_abs_diff"] == pytest.approx(0.5, abs=1e-6)
    assert next(r for r in result.rows if r.key == "step").values is None  # a byte item has no element diff
    assert result.exit_code == 1 and result.status == "DIFFERENT"
    sub = diff_checkpoints(str(cf.plain_ckpt()), str(tmp_path / "b"), key_glob="model.*")
    assert sub.exit_code == 0 and {r.key for r in sub.rows} == {"model.weight", "model.bias"}
    with pytest.raises(UsageError, match="matches none"):
        diff_checkpoints(str(cf.plain_ckpt()), str(tmp_path / "b"), key_glob="nothing*")


def test_diff_sees_a_flipped_bit_that_metadata_cannot(plain_copy):
    cf.flip_byte_in_tensor(plain_copy, "optim.state.0.exp_avg", cf.plain_state()["optim"]["state"][0]["exp_avg"])
    result = diff_checkpoints(str(cf.plain_ckpt()), str(plain_copy), values=True)
    (row,) = result.differing
    assert (row.key, row.status) == ("optim.state.0.exp_avg", "DIFFERENT")
    assert row.fingerprint_a != row.fingerprint_b and row.values["differing"] == 1


def test_diff_with_a_damaged_side_reports_problems(plain_copy):
    (plain_copy / "__0_0.distcp").unlink()
    result = diff_checkpoints(str(cf.plain_ckpt()), str(plain_copy))
    assert result.status == "PROBLEMS" and result.exit_code == 1
    assert result.problems and all(p.message.startswith("B: ") for p in result.problems)
    assert {r.status for r in result.differing} == {"UNREADABLE"}
    assert len(result.differing) == len(cf.flat_state(cf.plain_state()))


def test_diff_bad_paths_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="A .* does not exist"):
        diff_checkpoints(str(tmp_path / "nope"), str(cf.plain_ckpt()))
    with pytest.raises(UsageError, match="B .* does not exist"):
        diff_checkpoints(str(cf.plain_ckpt()), str(tmp_path / "nope"))


def test_element_diff_semantics():
    nan, inf = math.nan, math.inf
    a = torch.tensor([1.0, nan, inf, -0.0, 5.0])
    same = element_diff(a, a.clone(), block_numel=2)
    assert same == {"elements": 5, "differing": 0, "first_index": None, "max_abs_diff": 0.0, "max_rel_diff": 0.0}
    b = torch.tensor([1.0, nan, inf, -0.0, 2.0])
    d = element_diff(a, b, block_numel=2)  # the difference lies in the third block
    assert (d["differing"], d["first_index"], d["max_abs_diff"]) == (1, 4, 3.0)
    assert d["max_rel_diff"] == pytest.approx(3.0 / 5.0)
    # NaN against a number: differing, with an infinite difference.
    d = element_diff(a, torch.tensor([1.0, 0.0, inf, -0.0, 5.0]))
    assert (d["differing"], d["first_index"], d["max_abs_diff"]) == (1, 1, inf)
    d = element_diff(torch.tensor([1, 2], dtype=torch.int64), torch.tensor([1, 7]))
    assert (d["differing"], d["max_abs_diff"]) == (1, 5.0) and d["max_rel_diff"] == pytest.approx(5 / 7)
    assert element_diff(torch.tensor([True]), torch.tensor([False]))["max_abs_diff"] == 1.0
    assert element_diff(torch.zeros(0), torch.zeros(0)) == {"elements": 0, "differing": 0, "first_index": None,
                                                            "max_abs_diff": 0.0, "max_rel_diff": 0.0}
    with pytest.raises(ValueError):
        element_diff(torch.zeros(2), torch.zeros(3))


def test_element_diff_counts_what_the_fingerprint_sees():
    """Bitwise exact, as the fingerprint is: -0.0 vs 0.0 and NaN payloads differ (with |Δ| 0).

    A row is DIFFERENT when its fingerprints differ; --values must then find the elements.
    """
    a = torch.tensor([-0.0, 1.0])
    b = torch.tensor([0.0, 1.0])
    assert tensor_fingerprint(a) != tensor_fingerprint(b)
    d = element_diff(a, b)
    assert (d["differing"], d["first_index"], d["max_abs_diff"]) == (1, 0, 0.0)
    n1 = torch.tensor([math.nan])
    n2 = n1.clone()
    n2.view(torch.int32)[0] ^= 1  # another NaN payload
    assert tensor_fingerprint(n1) != tensor_fingerprint(n2)
    assert element_diff(n1, n2)["differing"] == 1


def test_byte_item_identity():
    a1 = byte_item(saved({"lr": 0.1, "betas": (0.9, 0.99)}), key="k")
    a2 = byte_item(saved({"betas": (0.9, 0.99), "lr": 0.1}), key="k")
    assert a1.digest == a2.digest and a1.canonical is not None and a1.error is None
    assert byte_item(saved({"lr": 0.2}), key="k").digest != a1.digest
    assert byte_item(saved(0.0), key="k").digest != byte_item(saved(-0.0), key="k").digest
    assert byte_item(saved(1), key="k").digest != byte_item(saved(1.0), key="k").digest
    junk = byte_item(b"not a zip", key="k")
    assert junk.canonical is None and junk.value is None and junk.error and len(junk.digest) == 16


def with_serialization_id(raw: bytes, new_id: bytes) -> bytes:
    """The same torch.save archive as another save would write it: another serialization_id record."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for member in src.infolist():
            data = src.read(member)
            dst.writestr(member.filename, new_id if member.filename.endswith("serialization_id") else data)
    return out.getvalue()


def test_stored_digest_ignores_only_the_serialization_id():
    evil = cf.Payload(os.system, "true")
    first = saved(evil)
    second = with_serialization_id(first, b"1" * 40)
    assert first != second
    assert stored_digest(first) == stored_digest(second)
    assert byte_item(second, key="k").digest == byte_item(first, key="k").digest
    assert stored_digest(saved(cf.Payload(os.system, "false"))) != stored_digest(first)
    assert stored_digest(b"not a zip") != stored_digest(b"not a zip!")


# --- scale -----------------------------------------------------------------------------


def test_ten_thousand_keys(tmp_path):
    from rich.console import Console

    from fsdpck.report import inspect as report

    keys = cf.synthetic_ckpt(tmp_path / "big", 10_000)
    result = inspect_checkpoint(str(tmp_path / "big"))
    assert result.exit_code == 0 and result.problems == []
    assert result.n_keys == result.n_tensors == 10_000 and len(result.rows) == 10_000
    assert [r.key for r in result.rows] == sorted(keys)
    assert sum(1 for f in result.files if f.role == "shard" and f.items == 10_000) == 1
    # The whole report renders (one line per key) and fits a log's width.
    out = io.StringIO()
    Console(file=out, width=120, color_system=None).print(report.render(result))
    lines = out.getvalue().splitlines()
    assert sum(1 for ln in lines if ln.startswith("│ model.layers.")) == 10_000
    assert max(len(ln) for ln in lines) <= 120
    # The synthetic checkpoint is a real one: DCP reads it (a sample of keys, through --key).
    sample = inspect_checkpoint(str(tmp_path / "big"), key_glob="model.layers.99*", verify_data=True)
    assert len(sample.rows) == 110 and {r.status for r in sample.rows} == {"read ok"}
    assert {r.fingerprint for r in sample.rows} == {to_hex(fp_tensor(torch.arange(6, dtype=torch.float32).reshape(2, 3)))}
