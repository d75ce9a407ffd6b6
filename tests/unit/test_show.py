"""``fsdpck show`` and the piece-by-piece reader under it: slices of tensors stored as many chunks are
exactly the saved values, only the chunks that meet a slice are read, ``--slice`` is parsed strictly;
and ``diff --values`` with ``--atol``/``--rtol`` over differently chunked checkpoints.

One process, no process group: ``ckpt_factory.chunked_ckpt`` writes tensors as grids of chunks over
two files in DCP's own format (what a save at several ranks writes), so that reads cross chunks.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

import ckpt_factory as cf
from fsdpck.checkpoint import stream
from fsdpck.checkpoint.integrity import open_checkpoint
from fsdpck.checkpoint.storage import LocalStorage
from fsdpck.checkpoint import torchsave
from fsdpck.checkpoint.stream import Box, Request, read_pieces
from fsdpck.cli import cli
from fsdpck.commands.diff import diff_checkpoints
from fsdpck.commands.inspect import inspect_checkpoint
from fsdpck.commands.offline import read_items, tensor_fingerprint
from fsdpck.commands.show import show_key
from fsdpck.commands.slices import parse, select
from fsdpck.errors import UsageError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

G = torch.Generator().manual_seed(7)
W = torch.randn(10, 7, generator=G)  # stored as 3 x 2 chunks
V = torch.randn(5, 4, 3, generator=G).to(torch.bfloat16)  # 2 x 1 x 3 chunks
I = torch.arange(11, dtype=torch.int64) * 3  # noqa: E741  (5 chunks)
C = torch.randn(4, 2, generator=G, dtype=torch.complex64)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return cf.chunked_ckpt(tmp_path_factory.mktemp("chunked") / "ck",
                           {"model.w": (W, (3, 2)), "nested.v": (V, (2, 1, 3)), "ids": (I, (5,)), "c": (C, (2, 1)),
                            "scalar": (torch.tensor(2.5), ())},
                           extra={"optim.param_groups.0.lr": 0.01, "name": "run-7"})


def python_slice(t: torch.Tensor, text: str) -> torch.Tensor:
    """The same selection through Python's own indexing (no clamping cases are used here)."""
    index = []
    for part in text.split(","):
        if ":" in part:
            a, b = part.split(":")
            index.append(slice(int(a) if a.strip() else None, int(b) if b.strip() else None))
        else:
            index.append(int(part))
    return t[tuple(index)]


@pytest.mark.parametrize("key,value,text", [
    ("model.w", W, "0:4,:8"[:-1] + "7"), ("model.w", W, "2:9,3:6"), ("model.w", W, "-3:,1"), ("model.w", W, "4"),
    ("model.w", W, ":"), ("model.w", W, "3:3"), ("nested.v", V, "1:4,2,-2:"), ("nested.v", V, "-1"),
    ("ids", I, "2:10"), ("ids", I, "-1"), ("c", C, "1:3"),
])
def test_show_slice_is_exactly_the_saved_values(ckpt, key, value, text):
    result = show_key(str(ckpt), key, slice_expr=text)
    assert result.exit_code == 0 and result.error is None
    want = python_slice(value, text)
    got = torch.tensor(result.values, dtype=value.dtype if not value.is_complex() else torch.float32)
    if value.is_complex():
        got = torch.view_as_complex(got) if got.numel() else got.reshape(want.shape)
    assert tuple(result.result_shape) == tuple(want.shape)
    assert torch.equal(got.reshape(want.shape), want)
    info = open_checkpoint(LocalStorage(ckpt)).metadata.keys[key]
    box = Box(result.selection.offsets, result.selection.sizes)
    meeting = [c for c in info.chunks if box.numel and stream.intersect(box, c) is not None]
    assert result.chunks_read == len(meeting) <= len(info.chunks)
    assert result.bytes_read == sum(c.storage.length for c in meeting)
    if want.numel():
        assert result.stats.numel == want.numel() * (2 if value.is_complex() else 1)


def test_show_whole_tensor_scalar_and_objects(ckpt):
    whole = show_key(str(ckpt), "model.w")
    assert torch.equal(torch.tensor(whole.values), W) and whole.chunks_read == 6 and whole.n_chunks == 6
    assert whole.stats.min == float(W.min()) and whole.stats.max == float(W.max())
    assert whole.text.startswith("tensor([[")
    scalar = show_key(str(ckpt), "scalar")
    assert scalar.values == 2.5 and scalar.result_shape == ()
    lr = show_key(str(ckpt), "optim.param_groups.0.lr")
    assert (lr.kind, lr.text, lr.canonical, lr.exit_code) == ("bytes", "0.01", float.hex(0.01), 0)
    assert show_key(str(ckpt), "name").text == "'run-7'"


def test_show_reads_only_what_the_slice_needs(ckpt, monkeypatch):
    """A slice inside one chunk reads that chunk alone: fsdpck's own read of the local file, or
    DCP's read planning over the narrowed box where DCP's reader is used."""
    parts = []
    original_part = stream._read_part

    def spy_part(stream_, part, on_piece, fmt):
        parts.append((part.req.info.key, part.box, part.chunk.offsets))
        return original_part(stream_, part, on_piece, fmt)

    monkeypatch.setattr(stream, "_read_part", spy_part)
    result = show_key(str(ckpt), "model.w", slice_expr="0:2,0:2")
    assert parts == [("model.w", Box((0, 0), (2, 2)), (0, 0))] and result.chunks_read == 1
    assert torch.equal(torch.tensor(result.values), W[0:2, 0:2])

    asked = []
    original = stream._read_dcp

    def spy(ckpt_dir, requests, *args):
        asked.extend((r.info.key, r.box) for r in requests)
        return original(ckpt_dir, requests, *args)

    monkeypatch.setattr(torchsave, "DIRECT_READS", False)
    monkeypatch.setattr(stream, "_read_dcp", spy)
    result = show_key(str(ckpt), "model.w", slice_expr="0:2,0:2")
    assert asked == [("model.w", Box((0, 0), (2, 2)))] and result.chunks_read == 1
    assert torch.equal(torch.tensor(result.values), W[0:2, 0:2])


@pytest.mark.parametrize("text,message", [
    ("", "empty"), ("1:2:3", "steps are not supported"), ("...", "'...' is not supported"), ("a", "expected an index"),
    ("1,,2", "expected an index"), ("9" * 30, "expected an index"), ("0:2,1:2,3", "3 items for a tensor of 2 dims"),
    ("10", "index 10 is outside it"), ("-11", "index -11 is outside it"), ("0:11", "stop 11 is outside it"),
    ("5:2", "start 5 comes after stop 2"), (",".join(["1"] * 3000), "not a slice"),
    (",".join(["1"] * 2000), "2000 items for a tensor of 2 dims"),
])
def test_slice_expressions_are_checked_strictly(text, message):
    with pytest.raises(UsageError, match=message):
        select(parse(text), (10, 7))


def test_slice_of_a_scalar_or_an_object_is_a_usage_error(ckpt):
    with pytest.raises(UsageError, match="scalar"):
        show_key(str(ckpt), "scalar", slice_expr="0")
    with pytest.raises(UsageError, match="an object, not a tensor"):
        show_key(str(ckpt), "optim.param_groups.0.lr", slice_expr="0")
    with pytest.raises(UsageError, match="did you mean 'model.w'"):
        show_key(str(ckpt), "model.ww")


def invoke(*args: str):
    r = CliRunner().invoke(cli, list(args), env={"COLUMNS": "120", "NO_COLOR": "1"})
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    return r


def test_show_cli_report_json_and_exit_codes(ckpt, tmp_path):
    r = invoke("show", str(ckpt), "model.w", "--slice", "2:9,3:6", "--json", str(tmp_path / "s.json"))
    assert r.exit_code == 0, r.output
    verdict = r.output.strip().splitlines()[-1]
    assert verdict == ("fsdpck show: OK (exit 0) — model.w[2:9,3:6]: [7, 3] float32, 21 values from 3 stored "
                       f"chunks of 6 ({show_key(str(ckpt), 'model.w', slice_expr='2:9,3:6').bytes_read / 1e3:.1f} kB "
                       "read)")
    assert "'2:9,3:6' = [2:9, 3:6] → [7, 3]" in r.output and "tensor([[" in r.output
    doc = json.loads((tmp_path / "s.json").read_text())
    assert list(doc)[:6] == ["schema", "versions", "exit_code", "outcome", "verdict", "error"]
    assert (doc["schema"], doc["exit_code"], doc["verdict"]) == ("fsdpck.show/1", 0, verdict)
    assert doc["box"] == {"offsets": [2, 3], "sizes": [7, 3]} and doc["result_shape"] == [7, 3]
    assert torch.equal(torch.tensor(doc["values"]), W[2:9, 3:6]) and doc["stats"]["numel"] == 21
    assert invoke("show", str(ckpt), "model.w", "--slice", "0:3:1").exit_code == 2
    bad = invoke("show", str(ckpt), "model.w", "--slice", "0:20")
    assert bad.exit_code == 2 and "stop 20 is outside it" in bad.output
    assert invoke("show", str(ckpt), "nope").exit_code == 2
    assert invoke("show", str(tmp_path / "missing"), "model.w").exit_code == 2


def test_show_of_a_damaged_key_exits_1(ckpt, tmp_path):
    damaged = cf.copy_ckpt(ckpt, tmp_path / "d")
    (damaged / "__1_0.distcp").write_bytes((damaged / "__1_0.distcp").read_bytes()[:200])
    r = invoke("show", str(damaged), "model.w", "--json", "-")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["problems"] and doc["values"] is None and doc["verdict"].startswith("fsdpck show: PROBLEMS (exit 1)")
    # A chunk whose bytes are garbage (sizes intact): the read fails, named, exit 1.
    garbled = cf.copy_ckpt(ckpt, tmp_path / "g")
    data = bytearray((garbled / "__0_0.distcp").read_bytes())
    data[10:200] = b"\0" * 190
    (garbled / "__0_0.distcp").write_bytes(bytes(data))
    r = invoke("show", str(garbled), "model.w")
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1].startswith("fsdpck show: UNREADABLE (exit 1)")


# --- the reader: pieces, threads, runs, errors ------------------------------------------------------


@pytest.mark.parametrize("threads,run_bytes,slice_bytes", [(1, 1 << 24, 8 << 20), (4, 1, 8 << 20), (2, 1 << 24, 1)])
def test_pieces_give_the_whole_tensors_fingerprints(ckpt, threads, run_bytes, slice_bytes, monkeypatch):
    monkeypatch.setattr(stream, "RUN_BYTES", run_bytes)  # 1: every stored item is a run of its own
    monkeypatch.setattr(stream, "SLICE_BYTES", slice_bytes)  # 1: every row of a chunk is read and handed over alone
    got = read_items(open_checkpoint(LocalStorage(ckpt)), list(open_checkpoint(LocalStorage(ckpt)).metadata.keys.values()),
                     stats=True, threads=threads)
    for key, value in (("model.w", W), ("nested.v", V), ("ids", I), ("c", C), ("scalar", torch.tensor(2.5))):
        assert got[key].fingerprint == tensor_fingerprint(value), key
        assert got[key].stats.numel == value.numel() * (2 if value.is_complex() else 1)
        real = torch.view_as_real(value) if value.is_complex() else value
        assert got[key].stats.min == float(real.min()) and got[key].stats.max == float(real.max()), key
        assert got[key].stats.mean == pytest.approx(float(real.double().mean()), rel=1e-9, abs=1e-12), key
    assert got["optim.param_groups.0.lr"].item.value == "0.01"


def test_a_bad_chunk_names_its_key_and_the_others_still_read(ckpt, tmp_path):
    bad = cf.copy_ckpt(ckpt, tmp_path / "b")
    name, offset, length = cf.storage_info(bad, "nested.v")
    data = bytearray((bad / name).read_bytes())
    data[offset: offset + 64] = b"\xff" * 64  # the zip header of one chunk of nested.v
    (bad / name).write_bytes(bytes(data))
    opened = open_checkpoint(LocalStorage(bad))
    errors = read_pieces(opened, [Request(i, Box.whole(i.shape)) for i in opened.metadata.keys.values()
                                  if i.kind == "tensor"], lambda *a: None)
    assert list(errors) == ["nested.v"]
    result = inspect_checkpoint(str(bad), stats=True)
    assert [(p.kind, p.key) for p in result.problems] == [("unreadable", "nested.v")] and result.exit_code == 1


def test_a_failure_of_the_work_on_a_piece_is_that_keys_error(ckpt):
    opened = open_checkpoint(LocalStorage(ckpt))
    seen = []

    def on_piece(req, offsets, piece):
        if req.info.key == "nested.v":
            raise MemoryError("no room for this piece")
        seen.append(req.info.key)

    tensors = [i for i in opened.metadata.keys.values() if i.kind == "tensor"]
    errors = read_pieces(opened, [Request(i, Box.whole(i.shape)) for i in tensors], on_piece, threads=2)
    assert list(errors) == ["nested.v"] and "no room for this piece" in errors["nested.v"]
    assert {i.key for i in tensors} - {"nested.v"} <= set(seen)


# --- diff --values with tolerances, across chunkings ---------------------------------------------


def test_diff_values_across_chunkings_finds_the_first_global_index(tmp_path):
    b = W.clone()
    b[8, 6] += 1.0
    b[3, 5] += 1e-6  # the first in row-major order, tiny
    a_dir = cf.chunked_ckpt(tmp_path / "a", {"model.w": (W, (3, 2))})
    b_dir = cf.chunked_ckpt(tmp_path / "b", {"model.w": (b, (2, 3))})
    d = diff_checkpoints(str(a_dir), str(b_dir), values=True)
    (row,) = d.rows
    assert row.status == "DIFFERENT" and row.values["differing"] == 2 and row.values["first_index"] == [3, 5]
    assert row.values["max_abs_diff"] == pytest.approx(1.0, rel=1e-6)
    close = diff_checkpoints(str(a_dir), str(b_dir), atol=1e-5)  # a tolerance implies --values
    (row,) = close.rows
    assert close.values and row.status == "DIFFERENT" and row.values["differing"] == 1
    assert row.values["first_index"] == [8, 6] and close.exit_code == 1
    within = diff_checkpoints(str(a_dir), str(b_dir), atol=1e-5, rtol=1e3)
    assert within.rows[0].status == "within tolerance" and within.exit_code == 0 and within.status == "WITHIN TOLERANCE"
    r = invoke("diff", str(a_dir), str(b_dir), "--rtol", "1e3", "--atol", "1e-5", "--json", str(tmp_path / "d.json"))
    assert r.exit_code == 0 and "WITHIN TOLERANCE (exit 0)" in r.output.strip().splitlines()[-1]
    doc = json.loads((tmp_path / "d.json").read_text())
    assert doc["tolerance"] == {"atol": 1e-5, "rtol": 1e3} and doc["rows"][0]["status"] == "within tolerance"
    assert invoke("diff", str(a_dir), str(b_dir), "--rtol", "1e-9").exit_code == 1
    for bad in ("-1", "nan", "x"):
        assert invoke("diff", str(a_dir), str(b_dir), "--atol", bad).exit_code == 2


def test_tolerance_does_not_hide_nan():
    from fsdpck.commands.diff import element_diff
    from fsdpck.state.compare import Tolerance

    a = torch.tensor([1.0, math.nan, 3.0])
    b = torch.tensor([1.0, 2.0, 3.0])
    d = element_diff(a, b, tolerance=Tolerance(atol=1e9, rtol=1e9))
    assert (d["differing"], d["first_index"], d["max_abs_diff"]) == (1, 1, math.inf)
    assert element_diff(a, a.clone(), tolerance=Tolerance(atol=1.0))["differing"] == 0


def test_an_empty_tensor_whose_shape_torch_cannot_hold_is_shown_empty(tmp_path):
    # A header may claim a dim of 0 beside dims whose strides pass int64: nothing to read, and no
    # tensor to make (torch.empty refuses the shape); show says so instead of failing (it exited 3).
    import struct

    shape = [0, 2**62 - 1, 2**62 - 1]
    header = {"__metadata__": {"DCP_SHARDING_INFO": json.dumps({"w": {"saved_offsets": [0, 0, 0]}})},
              "w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}
    text = json.dumps(header).encode()
    (tmp_path / "shard-00001-model-00001-of-00001.safetensors").write_bytes(struct.pack("<Q", len(text)) + text)
    result = show_key(str(tmp_path), "w")
    assert result.exit_code == 0 and result.values == [] and result.stats.numel == 0, result.error
    assert "size=(0, 4611686018427387903, 4611686018427387903)" in result.text
