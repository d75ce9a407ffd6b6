"""inspect and diff on real FSDP2 checkpoints (torchrun, 2 and 3 ranks) and on ``fsdpck save`` output.

The checkpoints come from ``ckpt_factory``: one torchrun launch of
``tests/_ckpt_fsdp2_worker.py`` saves the same FSDP2 DTensor state at world sizes 2 and 3
(uneven row chunks in one file per rank), and ``python -m fsdpck save`` writes fsdpck's own
checkpoint with its manifest. Both start in the background when this module is imported.
Faults are injected into private copies; every one must be reported with its key and file.
The same checks on checkpoints written without a process group are in tests/unit/.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ckpt_factory as cf

cf.start_background()  # torchrun and fsdpck save, while the tests before the first user run

from fsdpck.checkpoint import unpickler  # noqa: E402
from fsdpck.checkpoint.integrity import (  # noqa: E402
    P_BYTE_OVERLAP,
    P_BYTE_RANGE,
    P_CHUNK_BOUNDS,
    P_CHUNK_GAP,
    P_CHUNK_OVERLAP,
    P_INCOMPLETE,
    P_MISSING_FILE,
    P_NO_STORAGE,
    P_ORPHAN_STORAGE,
    P_OUTSIDE,
    open_checkpoint,
)
from fsdpck.checkpoint.storage import LocalStorage  # noqa: E402
from fsdpck.cli import cli  # noqa: E402
from fsdpck.commands.diff import diff_checkpoints  # noqa: E402
from fsdpck.commands.inspect import inspect_checkpoint  # noqa: E402
from fsdpck.commands.show import show_key  # noqa: E402

KEY = "optim.state.0.weight.exp_avg"  # [5, 8]: rows 2+2+1 at world size 3, 3+2 at world size 2
N_FSDP2_KEYS = 38


def ws(n: int) -> Path:
    return cf.fsdp2_ckpts()[{2: 0, 3: 1}[n]]


def open_dir(path: Path):
    return open_checkpoint(LocalStorage(path))


def kinds(problems) -> set[str]:
    return {p.kind for p in problems}


def only(problems, kind):
    found = [p for p in problems if p.kind == kind]
    assert found, f"no {kind} problem among {problems}"
    return found


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args), env={"COLUMNS": "160", "NO_COLOR": "1"})
    assert "Traceback" not in result.output and "Traceback" not in (result.stderr or ""), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.fixture
def ws3_copy(tmp_path) -> Path:
    return cf.copy_ckpt(ws(3), tmp_path / "ckpt")


# --- metadata and layout ----------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
def test_fsdp2_metadata_names_only_admitted_globals_and_loads_the_same(n):
    path = ws(n) / ".metadata"
    with open(path, "rb") as f:
        rec = cf.Recorder(f)
        plain = rec.load()
    assert ("torch.distributed.checkpoint.metadata", "Metadata") in rec.seen
    for module, qualname in rec.seen:
        assert unpickler.resolve(module, qualname) is not None, f"{module}.{qualname} is not admitted"
    safe = cf.load_metadata_file(path)
    assert safe.state_dict_metadata == plain.state_dict_metadata
    assert safe.storage_data == plain.storage_data
    assert safe.version == plain.version == "1.0.0"


@pytest.mark.parametrize("n", [2, 3])
def test_fsdp2_checkpoints_are_whole(n):
    ckpt = open_dir(ws(n))
    assert ckpt.problems == [], ckpt.problems
    assert ckpt.notes == []
    assert ckpt.metadata is not None and ckpt.metadata.dcp_version == "1.0.0"
    assert len(ckpt.metadata.keys) == N_FSDP2_KEYS


def test_fsdp2_layout_has_uneven_chunks_in_several_files():
    k3 = open_dir(ws(3)).metadata.keys[KEY]
    assert k3.shape == (5, 8)
    assert [(c.offsets, c.sizes) for c in k3.chunks] == [((0, 0), (2, 8)), ((2, 0), (2, 8)), ((4, 0), (1, 8))]
    assert k3.files == ("__0_0.distcp", "__1_0.distcp", "__2_0.distcp")
    k2 = open_dir(ws(2)).metadata.keys[KEY]
    assert [(c.offsets, c.sizes) for c in k2.chunks] == [((0, 0), (3, 8)), ((3, 0), (2, 8))]


def keys_in_file(path: Path, name: str) -> set[str]:
    return {k for k, info in open_dir(path).metadata.keys.items() if name in info.files}


# --- faults in one rank's file or in the metadata ---------------------------------------


def test_truncated_shard_file_names_its_keys_and_file(ws3_copy):
    in_file = keys_in_file(ws3_copy, "__1_0.distcp")
    shard = ws3_copy / "__1_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    found = only(open_dir(ws3_copy).problems, P_BYTE_RANGE)
    assert {p.file for p in found} == {"__1_0.distcp"}
    assert found and {p.key for p in found} < in_file  # the items past the cut, all in that file
    assert all("truncated?" in p.message for p in found)


def test_deleted_shard_file_is_missing_for_every_key_in_it(ws3_copy):
    in_file = keys_in_file(ws3_copy, "__2_0.distcp")
    (ws3_copy / "__2_0.distcp").unlink()
    ckpt = open_dir(ws3_copy)
    found = only(ckpt.problems, P_MISSING_FILE)
    assert {p.key for p in found} == in_file and {p.file for p in found} == {"__2_0.distcp"}
    assert kinds(ckpt.problems) == {P_MISSING_FILE}
    assert next(f for f in ckpt.files if f.name == "__2_0.distcp").status == "MISSING"


def test_deleted_metadata_is_incomplete(ws3_copy):
    (ws3_copy / ".metadata").unlink()
    ckpt = open_dir(ws3_copy)
    assert ckpt.incomplete and kinds(ckpt.problems) == {P_INCOMPLETE}
    assert "no .metadata but 3 shard file(s)" in ckpt.problems[0].message


def test_overlapping_chunks_in_metadata(ws3_copy):
    def edit(md):
        md.state_dict_metadata[KEY].chunks[0].sizes = torch.Size([3, 8])  # rows 0..2 now overlap chunk 1's rows 2..3
    cf.rewrite_metadata(ws3_copy, edit)
    problems = open_dir(ws3_copy).problems
    p = only(problems, P_CHUNK_OVERLAP)[0]
    assert p.key == KEY and "chunks 0 (offsets [0, 0] sizes [3, 8] in __0_0.distcp) and 1" in p.message
    assert kinds(problems) == {P_CHUNK_OVERLAP}


def test_chunk_missing_from_metadata_leaves_a_gap(ws3_copy):
    cf.rewrite_metadata(ws3_copy, lambda md: md.state_dict_metadata[KEY].chunks.pop())
    problems = open_dir(ws3_copy).problems
    gap = only(problems, P_CHUNK_GAP)[0]
    assert gap.key == KEY and "2 chunks hold 32 of 40 elements" in gap.message
    assert only(problems, P_ORPHAN_STORAGE)[0].key == KEY  # its storage entry now matches no chunk


def test_chunk_outside_its_tensor(ws3_copy):
    def edit(md):
        md.state_dict_metadata[KEY].chunks[2].sizes = torch.Size([2, 8])  # rows 4..5 of a 5-row tensor
    cf.rewrite_metadata(ws3_copy, edit)
    p = only(open_dir(ws3_copy).problems, P_CHUNK_BOUNDS)[0]
    assert p.key == KEY and p.file == "__2_0.distcp" and "outside the tensor's shape [5, 8]" in p.message


def test_chunk_without_storage_entry(ws3_copy):
    def edit(md):
        md.storage_data = {i: s for i, s in md.storage_data.items() if not (i.fqn == KEY and i.offset[0] == 2)}
    cf.rewrite_metadata(ws3_copy, edit)
    p = only(open_dir(ws3_copy).problems, P_NO_STORAGE)[0]
    assert p.key == KEY and "chunk 1 (offsets [2, 0] sizes [2, 8]) has no storage entry" in p.message


def test_storage_entry_with_no_file_and_path_traversal(ws3_copy, tmp_path):
    (tmp_path / "secret.distcp").write_bytes(b"x" * 10_000)

    def edit(md):
        for index, info in md.storage_data.items():
            if index.fqn == KEY and index.offset[0] == 0:
                info.relative_path = "../secret.distcp"
            if index.fqn == "model.0.bias" and index.offset[0] == 0:
                info.relative_path = "__9_0.distcp"
    cf.rewrite_metadata(ws3_copy, edit)
    ckpt = open_dir(ws3_copy)
    outside = only(ckpt.problems, P_OUTSIDE)[0]
    assert outside.key == KEY and outside.file == "../secret.distcp"
    missing = only(ckpt.problems, P_MISSING_FILE)[0]
    assert missing.key == "model.0.bias" and missing.file == "__9_0.distcp"
    # --verify-data does not read what lies outside the dir, nor keys with integrity problems.
    result = inspect_checkpoint(str(ws3_copy), verify_data=True)
    row = next(r for r in result.rows if r.key == KEY)
    assert row.status == "PROBLEM" and row.fingerprint is None
    assert next(r for r in result.rows if r.key == "optim.state.0.weight.exp_avg_sq").status == "read ok"


def test_byte_range_too_short_for_its_data_and_entry_without_file_name(ws3_copy):
    def edit(md):
        for index, info in md.storage_data.items():
            if index.fqn == KEY and index.offset[0] == 0:
                info.length = 10  # 2 x 8 float32 need 64 bytes
            if index.fqn == "model.0.bias" and index.offset[0] == 0:
                info.relative_path = ""
    cf.rewrite_metadata(ws3_copy, edit)
    problems = open_dir(ws3_copy).problems
    short = only(problems, P_BYTE_RANGE)[0]
    assert short.key == KEY and "10 bytes in __0_0.distcp cannot hold its 64 bytes of data" in short.message
    nameless = only(problems, P_MISSING_FILE)[0]
    assert nameless.key == "model.0.bias" and "names no file" in nameless.message


def test_two_items_sharing_bytes(ws3_copy):
    def edit(md):
        entries = [(i, s) for i, s in md.storage_data.items() if s.relative_path == "__0_0.distcp"]
        (_, first), (_, second) = entries[0], entries[1]
        second.offset = first.offset
    cf.rewrite_metadata(ws3_copy, edit)
    p = only(open_dir(ws3_copy).problems, P_BYTE_OVERLAP)[0]
    assert p.file == "__0_0.distcp" and "overlap" in p.message


def test_unreferenced_shard_file_is_a_note_not_a_problem(ws3_copy):
    (ws3_copy / "__7_0.distcp").write_bytes(b"old")
    ckpt = open_dir(ws3_copy)
    assert ckpt.problems == []
    assert ckpt.notes and "__7_0.distcp is not referenced" in ckpt.notes[0]


# --- data ---------------------------------------------------------------------------------


def test_verify_data_reads_fsdp2_chunks_without_a_manifest():
    result = inspect_checkpoint(str(ws(3)), verify_data=True)
    assert result.problems == [] and {r.status for r in result.rows} == {"read ok"}
    assert result.manifest is None and result.exit_code == 0


def test_diff_across_world_sizes_is_identical():
    result = diff_checkpoints(str(ws(2)), str(ws(3)), values=True)
    assert result.exit_code == 0 and result.status == "IDENTICAL" and result.problems == []
    row = next(r for r in result.rows if r.key == KEY)
    assert (row.chunks_a, row.chunks_b) == (2, 3) and row.fingerprint_a == row.fingerprint_b
    assert row.values is None  # nothing differs, so nothing was read again
    assert len(result.rows) == N_FSDP2_KEYS


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_diff_across_world_sizes_finds_one_flipped_bit(ws3_copy):
    """A bit flipped in rank 0's file at world size 3 shows against world size 2, at its global index."""
    full = torch.tensor(show_key(str(ws3_copy), KEY).values)
    cf.flip_byte_in_tensor(ws3_copy, KEY, full[0:2])  # chunk 0: rows 0..1, stored in __0_0.distcp
    result = diff_checkpoints(str(ws(2)), str(ws3_copy), values=True)
    (row,) = result.differing
    assert (row.key, row.status) == (KEY, "DIFFERENT") and result.exit_code == 1
    assert row.values["elements"] == 40 and row.values["differing"] == 1
    assert row.values["first_index"] == [1, 0]  # byte 32 of 64: element 8 of the chunk, global row 1
    assert 0 < row.values["max_abs_diff"] < 1e-3  # a low mantissa bit


def dcp_full(path: Path, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The whole tensor as DCP's own load assembles it (trusted here: these checkpoints were written by the tests)."""
    import torch.distributed.checkpoint as dcp

    target = {key: torch.empty(shape)}
    dcp.load(target, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    return target[key]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("text", ["1:4,2:7", "-1", "4", ":,0:1", "0:5,7"])
def test_show_slices_of_fsdp2_chunks_exactly(n, text):
    """Rows of KEY are split 3+2 (ws 2) and 2+2+1 (ws 3) over files: slices that cross them are exact."""
    full = dcp_full(ws(n), KEY, (5, 8))
    want = eval(f"full[{text}]")  # noqa: S307 (the test's own literal slices)
    result = show_key(str(ws(n)), KEY, slice_expr=text)
    assert result.exit_code == 0 and tuple(result.result_shape) == tuple(want.shape)
    assert torch.equal(torch.tensor(result.values).reshape(want.shape), want)
    assert result.stats.numel == want.numel()


def test_stats_of_real_checkpoints_are_clean():
    """FSDP2 at 2 and 3 ranks, and fsdpck's own save: nothing suspicious, the same stats at any world size."""
    a = inspect_checkpoint(str(ws(2)), stats=True, strict=True)
    b = inspect_checkpoint(str(ws(3)), stats=True, strict=True)
    assert a.exit_code == b.exit_code == 0 and a.suspicious == b.suspicious == []
    assert a.verdict_rules.parameters_with_state == 4
    for ra, rb in zip(a.rows, b.rows):
        assert ra.key == rb.key and (ra.stats is None) == (rb.stats is None)
        if ra.stats is not None:
            sa, sb = ra.stats.as_dict(), rb.stats.as_dict()
            assert {k: sa[k] for k in ("numel", "min", "max", "zeros", "nan")} == \
                   {k: sb[k] for k in ("numel", "min", "max", "zeros", "nan")}
            assert sa["mean"] == pytest.approx(sb["mean"], rel=1e-6, abs=1e-12)
    # fsdpck's own save at world size 1 (dims 8, 1, 2, 3): ReLUs that are dead for every sample leave whole
    # layers without a gradient, so some Adam moments are all zero; that is what the rule is for.
    own = inspect_checkpoint(str(cf.fsdpck_save_ckpt()), stats=True)
    assert own.exit_code == 0 and own.verdict_rules.optimizers == ["optim"]
    rows = {r.key: r for r in own.rows}
    for finding in own.suspicious:
        assert finding.rule == "zero-moment", finding
        assert rows[finding.key].stats.zeros == rows[finding.key].stats.numel > 0


def test_diff_with_a_damaged_side_reports_problems(ws3_copy):
    (ws3_copy / "__0_0.distcp").unlink()
    result = diff_checkpoints(str(ws(3)), str(ws3_copy))
    assert result.status == "PROBLEMS" and result.exit_code == 1
    assert all(p.message.startswith("B: ") for p in result.problems)
    assert {r.status for r in result.differing} == {"UNREADABLE"}


# --- the command line on these checkpoints ----------------------------------------------


def test_inspect_chunks_and_key_filter():
    r = invoke("inspect", str(ws(3)), "--chunks", "--key", "optim.state.0.weight.*")
    assert r.exit_code == 0, r.output
    assert f"'optim.state.0.weight.*': 3 of {N_FSDP2_KEYS}" in r.output
    assert "model.0.weight" not in r.output
    rows = [ln for ln in r.output.splitlines() if "optim.state.0.weight.exp_avg " in ln and "__" in ln]
    assert len(rows) == 3 and "[4, 0]" in rows[2] and "__2_0.distcp" in rows[2]


def test_inspect_json_file(tmp_path):
    target = tmp_path / "out" / "inspect.json"
    r = invoke("inspect", str(ws(2)), "--json", str(target))
    assert r.exit_code == 0
    doc = json.loads(target.read_text())
    assert doc["verdict"] == last_line(r.output) and doc["exit_code"] == 0 and doc["summary"]["status"] == "OK"
    assert doc["summary"]["files"] == 2 and doc["world_size"] is None  # no manifest says how it was saved


def test_inspect_truncated_shard(tmp_path):
    ckpt = cf.copy_ckpt(ws(3), tmp_path / "c")
    os.truncate(ckpt / "__2_0.distcp", 1000)
    r = invoke("inspect", str(ckpt))
    assert r.exit_code == 1
    assert "byte-range" in r.output and "__2_0.distcp" in r.output and "truncated?" in r.output
    assert "optim.state.2.weight.exp_avg" in r.output
    assert last_line(r.output).startswith("fsdpck inspect: PROBLEMS (exit 1) — ")


def test_inspect_deleted_metadata_is_incomplete(tmp_path):
    ckpt = cf.copy_ckpt(ws(3), tmp_path / "c")
    (ckpt / ".metadata").unlink()
    r = invoke("inspect", str(ckpt))
    assert r.exit_code == 1
    assert last_line(r.output).startswith("fsdpck inspect: INCOMPLETE (exit 1) — a save that did not finish")
    assert "no .metadata but 3 shard file(s)" in r.output


def test_inspect_deleted_shard_file(tmp_path):
    ckpt = cf.copy_ckpt(ws(3), tmp_path / "c")
    (ckpt / "__0_0.distcp").unlink()
    r = invoke("inspect", str(ckpt), "--verify-data")
    assert r.exit_code == 1
    assert "missing-file" in r.output and "__0_0.distcp, which is missing" in r.output
    assert "MISSING" in r.output


def test_diff_identical_across_world_sizes(tmp_path):
    r = invoke("diff", str(ws(2)), str(ws(3)), "--json", str(tmp_path / "d.json"))
    assert r.exit_code == 0, r.output
    assert last_line(r.output).startswith(f"fsdpck diff: IDENTICAL (exit 0) — {N_FSDP2_KEYS} keys")
    doc = json.loads((tmp_path / "d.json").read_text())
    assert doc["schema"] == "fsdpck.diff/1" and doc["exit_code"] == 0 and doc["outcome"] == "verified"
    assert doc["verdict"] == last_line(r.output) and doc["error"] is None
    assert doc["summary"]["status"] == "IDENTICAL" and doc["summary"]["differing"] == 0
    assert (doc["a"]["files"], doc["b"]["files"]) == (2, 3)
    row = next(x for x in doc["rows"] if x["key"] == KEY)
    assert (row["chunks_a"], row["chunks_b"]) == (2, 3) and row["fingerprint_a"] == row["fingerprint_b"]


def test_inspect_and_diff_fsdpck_own_checkpoint(tmp_path):
    """A checkpoint and manifest written by `fsdpck save`: every key verified against its fingerprint or value."""
    ckpt = cf.fsdpck_save_ckpt()
    r = invoke("inspect", str(ckpt), "--verify-data", "--json", str(tmp_path / "i.json"))
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "i.json").read_text())
    n = doc["summary"]["keys"]
    assert n > 0 and doc["manifest"]["keys"] == n and {k["status"] for k in doc["keys"]} == {"verified"}
    assert {k["kind"] for k in doc["keys"]} == {"tensor", "bytes"}  # objects were checked too
    assert doc["world_size"] == 1 and doc["summary"]["status"] == "OK"
    assert last_line(r.output).endswith(f"data verified against fsdpck.json ({n} of {n} keys)")
    damaged = cf.copy_ckpt(ckpt, tmp_path / "c")
    key = next(k["key"] for k in doc["keys"] if k["key"].endswith("exp_avg_sq") and k["shape"])
    name, offset, length = cf.storage_info(damaged, key)
    data = bytearray((damaged / name).read_bytes())
    data[offset : offset + 4] = b"\0\0\0\0"  # the zip signature of that item's torch.save archive
    (damaged / name).write_bytes(bytes(data))
    r = invoke("inspect", str(damaged), "--verify-data")
    assert r.exit_code == 1 and key in r.output and "UNREADABLE" in r.output
    d = invoke("diff", str(ckpt), str(damaged))
    assert d.exit_code == 1 and f"1 of {n} keys differ: 1 unreadable" in last_line(d.output)


def test_fsdpck_own_checkpoint_with_a_changed_lr(tmp_path):
    """The lr of a param group changed in rank 0's file: --verify-data says which object and how."""
    ckpt = cf.copy_ckpt(cf.fsdpck_save_ckpt(), tmp_path / "c")
    md = open_dir(ckpt).metadata
    lr_key = next(k for k in md.keys if k.startswith("optim.param_groups.") and k.endswith(".lr"))
    result = inspect_checkpoint(str(ckpt), verify_data=True)
    old = next(r for r in result.rows if r.key == lr_key)
    assert old.status == "verified"
    cf.replace_byte_item(ckpt, lr_key, float.fromhex(old.expected) * 2)
    r = invoke("inspect", str(ckpt), "--verify-data", "--json", "-")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert [(p["kind"], p["key"]) for p in doc["problems"]] == [("value-mismatch", lr_key)]
    assert next(k for k in doc["keys"] if k["key"] == lr_key)["status"] == "MISMATCH"
    assert last_line(r.stderr) == "fsdpck inspect: PROBLEMS (exit 1) — 1 problem: 1 value-mismatch"
