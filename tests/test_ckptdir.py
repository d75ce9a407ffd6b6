"""fsdpck.ckptdir: safe metadata reading, integrity checks, --verify-data and diff, on checkpoints written here.

Every check is shown to fail: each fault is injected into a private copy of a pristine
checkpoint and must be reported with its key and file.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ckpt_factory as cf  # noqa: E402

cf.start_background()  # torchrun and fsdpck save, while the tests before the first user run

from fsdpck import ckptdir  # noqa: E402
from fsdpck.ckptdir import ChunkInfo, StorageRef  # noqa: E402
from fsdpck.errors import CheckpointFormatError, UsageError  # noqa: E402
from fsdpck.manifest import MANIFEST_NAME, read_manifest, write_manifest  # noqa: E402


def kinds(problems) -> set[str]:
    return {p.kind for p in problems}


def only(problems, kind):
    found = [p for p in problems if p.kind == kind]
    assert found, f"no {kind} problem among {problems}"
    return found


# --- the restricted unpickler ----------------------------------------------------------


class Recorder(pickle.Unpickler):
    """Records every global a pickle names (used on files these tests wrote themselves)."""

    def __init__(self, f):
        super().__init__(f)
        self.seen = set()

    def find_class(self, module, name):
        self.seen.add((module, name))
        return super().find_class(module, name)


def pristine(name: str) -> Path:
    return {"plain": cf.plain_ckpt, "torch_save_to_dcp": cf.torch_save_ckpt, "fsdp2-ws2": lambda: cf.fsdp2_ckpts()[0],
            "fsdp2-ws3": lambda: cf.fsdp2_ckpts()[1]}[name]()


@pytest.mark.parametrize("name", ["plain", "torch_save_to_dcp", "fsdp2-ws2", "fsdp2-ws3"])
def test_real_metadata_names_only_admitted_globals_and_loads_the_same(name):
    path = pristine(name) / ".metadata"
    with open(path, "rb") as f:
        rec = Recorder(f)
        plain = rec.load()
    assert ("torch.distributed.checkpoint.metadata", "Metadata") in rec.seen
    for module, qualname in rec.seen:
        assert ckptdir._resolve_global(module, qualname) is not None, f"{module}.{qualname} is not admitted"
    safe = ckptdir.load_metadata(path)
    assert safe.state_dict_metadata == plain.state_dict_metadata
    assert safe.storage_data == plain.storage_data
    assert safe.version == plain.version == "1.0.0"


def test_admitted_globals_are_exactly_the_listed_ones():
    listed = {tuple(g.rsplit(".", 1)) for g in ckptdir.ADMITTED_GLOBALS if "<" not in g}
    assert ("torch.distributed.checkpoint.filesystem", "_StorageInfo") in listed
    assert ckptdir._resolve_global("torch", "float32") is torch.float32
    assert ckptdir._resolve_global("torch", "bfloat16") is torch.bfloat16
    for module, name in [("torch", "load"), ("torch", "Tensor"), ("builtins", "eval"), ("os", "system"),
                         ("posix", "system"), ("torch.serialization", "load"), ("pathlib", "Path"),
                         ("torch.distributed.checkpoint.metadata", "Metadata.__init__"),
                         ("torch", "float32.__class__"), ("collections", "namedtuple")]:
        assert ckptdir._resolve_global(module, name) is None, f"{module}.{name} must be refused"
    # Path objects and layouts come back as harmless stand-ins, not the named callables.
    assert ckptdir._resolve_global("pathlib", "PosixPath") is ckptdir.PurePosixPath
    assert ckptdir._resolve_global("torch.serialization", "_get_layout") is ckptdir._layout_from_name
    assert ckptdir._layout_from_name("torch.strided") is torch.strided
    with pytest.raises(pickle.UnpicklingError):
        ckptdir._layout_from_name("os.system")


def _payloads(marker: Path) -> dict[str, bytes]:
    import builtins
    import subprocess

    from torch.distributed.checkpoint.metadata import Metadata

    code = f"open({str(marker)!r}, 'w').write('pwned')"
    return {
        "os.system": pickle.dumps(cf.Payload(os.system, cf.marker_command(marker))),
        "builtins.exec": pickle.dumps(cf.Payload(builtins.exec, code)),
        "builtins.eval": pickle.dumps(cf.Payload(builtins.eval, f"exec({code!r})")),
        "subprocess.Popen": pickle.dumps(cf.Payload(subprocess.Popen, ["sh", "-c", f"echo > {marker}"])),
        "nested in real Metadata": pickle.dumps(
            Metadata(state_dict_metadata={"x": cf.Payload(builtins.exec, code)}, storage_data={})),
        # Protocol 0 GLOBAL opcodes, and an attribute chain behind an admitted class.
        "GLOBAL opcode": f"cbuiltins\nexec\n(V{code}\ntR.".encode(),
        "dotted name": (b"ctorch.distributed.checkpoint.metadata\nMetadata.__init__.__globals__\n."),
    }


@pytest.mark.parametrize("case", ["os.system", "builtins.exec", "builtins.eval", "subprocess.Popen",
                                  "nested in real Metadata", "GLOBAL opcode", "dotted name"])
def test_crafted_metadata_never_runs_and_names_the_class(tmp_path, case):
    marker = tmp_path / "marker"
    payload = _payloads(marker)[case]
    (tmp_path / ".metadata").write_bytes(payload)
    with pytest.raises(CheckpointFormatError) as info:
        ckptdir.load_metadata(tmp_path / ".metadata")
    expected = {"os.system": "posix.system", "builtins.exec": "builtins.exec", "builtins.eval": "builtins.eval",
                "subprocess.Popen": "subprocess.Popen", "nested in real Metadata": "builtins.exec",
                "GLOBAL opcode": "builtins.exec",
                "dotted name": "torch.distributed.checkpoint.metadata.Metadata.__init__.__globals__"}[case]
    assert f"refused to unpickle {expected}" in info.value.message
    assert "nothing in it was executed" in info.value.message
    assert not marker.exists()


def test_the_planted_payload_is_live_with_the_plain_unpickler(tmp_path):
    """The check above could fail: DCP's own reader (plain pickle.load) does run the payload."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "marker"
    (tmp_path / ".metadata").write_bytes(_payloads(marker)["os.system"])
    try:
        dcp.FileSystemReader(str(tmp_path)).read_metadata()
    except Exception:
        pass  # os.system returns an int, which is not Metadata; the payload has run by then
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("content, words", [
    (b"", "empty file"),
    (b"this is not a pickle at all", "not a readable DCP metadata pickle"),
    (pickle.dumps({"a": 1}), "holds a dict, not DCP Metadata"),
    (b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01Q.", "not a readable DCP metadata pickle"),  # persistent id
])
def test_garbage_metadata_is_a_format_error(tmp_path, content, words):
    (tmp_path / ".metadata").write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=words):
        ckptdir.load_metadata(tmp_path / ".metadata")


def test_truncated_metadata_is_a_format_error(tmp_path):
    data = (cf.plain_ckpt() / ".metadata").read_bytes()
    (tmp_path / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="not a readable DCP metadata pickle"):
        ckptdir.load_metadata(tmp_path / ".metadata")


# --- chunk coverage --------------------------------------------------------------------


def chunks(*boxes) -> tuple[ChunkInfo, ...]:
    return tuple(ChunkInfo(tuple(o), tuple(s), StorageRef(f"__{n}_0.distcp", 0, 1)) for n, (o, s) in enumerate(boxes))


@pytest.mark.parametrize("shape, boxes", [
    ((7, 5), [((0, 0), (3, 5)), ((3, 0), (3, 5)), ((6, 0), (1, 5))]),  # FSDP rows, uneven
    ((2, 5), [((0, 0), (1, 5)), ((1, 0), (1, 5)), ((2, 0), (0, 5))]),  # an empty shard at the end
    ((4, 6), [((0, 0), (2, 3)), ((0, 3), (2, 3)), ((2, 0), (2, 3)), ((2, 3), (2, 3))]),  # 2x2 grid
    ((4, 6, 2), [((0, 0, 0), (4, 3, 2)), ((0, 3, 0), (4, 3, 2))]),  # column split of a 3-D tensor
    ((), [((), ())]),  # a scalar
    ((0, 3), []),  # an empty tensor needs no chunk
])
def test_exact_covers_pass(shape, boxes):
    assert ckptdir.chunk_cover_problems("k", shape, chunks(*boxes)) == []


@pytest.mark.parametrize("shape, boxes, kind, words", [
    ((7, 5), [((0, 0), (4, 5)), ((3, 0), (4, 5))], "chunk-overlap", "chunks 0 (offsets [0, 0] sizes [4, 5] in __0_0.distcp) and 1"),
    ((7, 5), [((0, 0), (3, 5)), ((3, 0), (3, 5))], "chunk-gap", "2 chunks hold 30 of 35 elements"),
    ((7, 5), [((0, 0), (3, 5)), ((0, 0), (3, 5)), ((3, 0), (4, 5))], "chunk-overlap", "chunks 0"),
    ((7, 5), [((0, 0), (8, 5))], "chunk-bounds", "lies outside the tensor's shape [7, 5]"),
    ((7, 5), [((-1, 0), (7, 5))], "chunk-bounds", "lies outside"),
    ((7, 5), [((0,), (7,))], "chunk-bounds", "does not have the tensor's 2 dims"),
    ((), [((), ()), ((), ())], "chunk-overlap", "overlap"),
    ((3,), [], "chunk-gap", "0 chunks hold 0 of 3 elements"),
    # The same volume as the tensor, but one block shifted: an overlap hides a gap.
    ((4, 4), [((0, 0), (2, 2)), ((0, 2), (2, 2)), ((1, 0), (2, 2)), ((2, 2), (2, 2))], "chunk-gap", "some twice"),
])
def test_broken_covers_are_named(shape, boxes, kind, words):
    problems = ckptdir.chunk_cover_problems("k", shape, chunks(*boxes))
    assert any(p.kind == kind and words in p.message and p.key == "k" for p in problems), problems


def brute_force_counts(shape, boxes):
    counts = torch.zeros(shape, dtype=torch.int64)
    for o, s in boxes:
        counts[tuple(slice(a, a + b) for a, b in zip(o, s))] += 1
    return counts


@st.composite
def grid_partition(draw, max_dims=3):
    ndim = draw(st.integers(1, max_dims))
    shape, cuts = [], []
    for _ in range(ndim):
        size = draw(st.integers(1, 6))
        inner = sorted(set(draw(st.lists(st.integers(0, size), max_size=3))))
        shape.append(size)
        cuts.append([0] + [c for c in inner if 0 < c < size] + [size])
    import itertools

    boxes = []
    for cell in itertools.product(*(range(len(c) - 1) for c in cuts)):
        o = tuple(cuts[d][i] for d, i in enumerate(cell))
        s = tuple(cuts[d][i + 1] - cuts[d][i] for d, i in enumerate(cell))
        boxes.append((o, s))
    return tuple(shape), boxes


@settings(max_examples=150, deadline=None)
@given(grid_partition(), st.data())
def test_cover_check_agrees_with_brute_force(part, data):
    """Grid partitions pass; any perturbation is reported exactly when an element is covered != once."""
    shape, boxes = part
    assert ckptdir.chunk_cover_problems("k", shape, chunks(*boxes)) == []
    boxes = list(boxes)
    action = data.draw(st.sampled_from(["grow", "shrink", "shift", "drop", "duplicate", "swap-size"]))
    n = data.draw(st.integers(0, len(boxes) - 1))
    d = data.draw(st.integers(0, len(shape) - 1))
    o, s = map(list, boxes[n])
    if action == "grow":
        s[d] += 1
    elif action == "shrink":
        s[d] = max(0, s[d] - 1)
    elif action == "shift":
        o[d] += data.draw(st.sampled_from([-1, 1]))
    elif action == "drop":
        boxes.pop(n)
    elif action == "duplicate":
        boxes.append((tuple(o), tuple(s)))
    if action in ("grow", "shrink", "shift"):
        boxes[n] = (tuple(o), tuple(s))
    if action == "swap-size" and len(boxes) > 1:
        m = (n + 1) % len(boxes)
        boxes[n], boxes[m] = (boxes[n][0], boxes[m][1]), (boxes[m][0], boxes[n][1])
    problems = ckptdir.chunk_cover_problems("k", shape, chunks(*boxes))
    in_bounds = all(all(a >= 0 and (b == 0 or a + b <= dim) for a, b, dim in zip(o, s, shape)) for o, s in boxes)
    if not in_bounds:
        assert kinds(problems) == {"chunk-bounds"}
        return
    exact = bool((brute_force_counts(shape, boxes) == 1).all())
    assert (problems == []) == exact, (shape, boxes, problems)
    if not exact:
        assert kinds(problems) <= {"chunk-overlap", "chunk-gap"}


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(1, 4), st.integers(1, 4)), min_size=2,
                max_size=7))
def test_overlap_sweep_is_exact_in_two_dims(rects):
    """The O(n log n) sweep finds an overlapping pair iff one exists (for up to 2 dims)."""
    cs = chunks(*[((a, b), (c, d)) for a, b, c, d in rects])
    found = ckptdir.find_overlapping_chunks(cs)

    def meet(x, y):
        return all(x.offsets[i] < y.offsets[i] + y.sizes[i] and y.offsets[i] < x.offsets[i] + x.sizes[i] for i in range(2))

    truth = any(meet(cs[i], cs[j]) for i in range(len(cs)) for j in range(i + 1, len(cs)))
    assert (found is not None) == truth
    if found is not None:
        assert meet(cs[found[0]], cs[found[1]])


# --- integrity of real checkpoint dirs -------------------------------------------------


@pytest.mark.parametrize("name", ["plain", "torch_save_to_dcp", "fsdp2-ws2", "fsdp2-ws3"])
def test_pristine_checkpoints_are_whole(name):
    ckpt = ckptdir.open_checkpoint_dir(pristine(name))
    assert ckpt.problems == [], ckpt.problems
    assert ckpt.notes == []
    assert ckpt.metadata is not None and ckpt.metadata.dcp_version == "1.0.0"


def test_plain_checkpoint_layout():
    keys = ckptdir.open_checkpoint_dir(cf.plain_ckpt()).metadata.keys
    assert set(keys) == set(cf.flat_state(cf.plain_state()))
    assert keys["step"].kind == "bytes" and keys["sched.last_epoch"].kind == "bytes"
    assert keys["optim.param_groups.0.lr"].kind == "bytes"
    assert (keys["nested.a.bf"].dtype, keys["nested.a.bf"].shape) == ("bfloat16", (3, 2))
    assert (keys["nested.a.ids"].dtype, keys["nested.half"].dtype) == ("int64", "float16")
    assert keys["scalar"].shape == () and keys["empty"].shape == (0, 3)
    assert keys["model.weight"].chunks[0].storage.file == "__0_0.distcp"


def test_fsdp2_layout_has_uneven_chunks_in_several_files():
    ws2, ws3 = cf.fsdp2_ckpts()
    k3 = ckptdir.open_checkpoint_dir(ws3).metadata.keys["optim.state.0.weight.exp_avg"]
    assert k3.shape == (5, 8)
    assert [(c.offsets, c.sizes) for c in k3.chunks] == [((0, 0), (2, 8)), ((2, 0), (2, 8)), ((4, 0), (1, 8))]
    assert k3.files == ("__0_0.distcp", "__1_0.distcp", "__2_0.distcp")
    k2 = ckptdir.open_checkpoint_dir(ws2).metadata.keys["optim.state.0.weight.exp_avg"]
    assert [(c.offsets, c.sizes) for c in k2.chunks] == [((0, 0), (3, 8)), ((3, 0), (2, 8))]


@pytest.fixture
def ws3_copy(tmp_path) -> Path:
    return cf.copy_ckpt(cf.fsdp2_ckpts()[1], tmp_path / "ckpt")


@pytest.fixture
def plain_copy(tmp_path) -> Path:
    return cf.copy_ckpt(cf.plain_ckpt(), tmp_path / "ckpt")


def keys_in_file(path: Path, name: str) -> set[str]:
    md = ckptdir.open_checkpoint_dir(path).metadata
    return {k for k, info in md.keys.items() if name in info.files}


def test_truncated_shard_file_names_its_keys_and_file(ws3_copy):
    in_file = keys_in_file(ws3_copy, "__1_0.distcp")
    shard = ws3_copy / "__1_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    ckpt = ckptdir.open_checkpoint_dir(ws3_copy)
    found = only(ckpt.problems, "byte-range")
    assert {p.file for p in found} == {"__1_0.distcp"}
    assert {p.key for p in found} < in_file and found  # the items past the cut, all in that file
    assert all("truncated?" in p.message for p in found)


def test_deleted_shard_file_is_missing_for_every_key_in_it(ws3_copy):
    in_file = keys_in_file(ws3_copy, "__2_0.distcp")
    (ws3_copy / "__2_0.distcp").unlink()
    ckpt = ckptdir.open_checkpoint_dir(ws3_copy)
    found = only(ckpt.problems, "missing-file")
    assert {p.key for p in found} == in_file and {p.file for p in found} == {"__2_0.distcp"}
    assert kinds(ckpt.problems) == {"missing-file"}
    assert next(f for f in ckpt.files if f.name == "__2_0.distcp").status == "MISSING"


def test_deleted_metadata_is_incomplete(ws3_copy):
    (ws3_copy / ".metadata").unlink()
    ckpt = ckptdir.open_checkpoint_dir(ws3_copy)
    assert ckpt.incomplete and kinds(ckpt.problems) == {"incomplete"}
    assert "no .metadata but 3 shard file(s)" in ckpt.problems[0].message


def test_metadata_tmp_left_over_is_incomplete(ws3_copy):
    shutil.copy(ws3_copy / ".metadata", ws3_copy / ".metadata.tmp")
    ckpt = ckptdir.open_checkpoint_dir(ws3_copy)
    assert ckpt.incomplete and only(ckpt.problems, "incomplete")[0].file == ".metadata.tmp"


def test_rank_local_metadata_only_is_a_problem(tmp_path):
    shutil.copy(cf.plain_ckpt() / ".metadata", tmp_path / "__0.metadata")
    ckpt = ckptdir.open_checkpoint_dir(tmp_path)
    assert "rank-local __0.metadata" in only(ckpt.problems, "metadata")[0].message


def test_garbage_metadata_is_a_problem_not_a_crash(ws3_copy):
    (ws3_copy / ".metadata").write_bytes(os.urandom(300))
    ckpt = ckptdir.open_checkpoint_dir(ws3_copy)
    assert kinds(ckpt.problems) == {"metadata"} and ckpt.metadata is None
    assert ckpt.problems[0].file == ".metadata"


def test_crafted_metadata_in_a_dir_is_a_problem_naming_the_class(ws3_copy, tmp_path):
    marker = tmp_path / "marker"
    (ws3_copy / ".metadata").write_bytes(_payloads(marker)["os.system"])
    ckpt = ckptdir.open_checkpoint_dir(ws3_copy)
    assert "refused to unpickle posix.system" in only(ckpt.problems, "metadata")[0].message
    assert not marker.exists()


def _objects(md):
    """Every DCP object inside a Metadata, as (owner, attribute names) pairs a mutation can pick from."""
    out = [(md, ["state_dict_metadata", "storage_data", "version", "planner_data"])]
    for item in md.state_dict_metadata.values():
        if hasattr(item, "chunks"):
            out.append((item, ["properties", "size", "chunks"]))
            out.append((item.properties, ["dtype"]))
            out.extend((c, ["offsets", "sizes"]) for c in item.chunks)
    for index, info in md.storage_data.items():
        out.append((index, ["fqn", "offset"]))
        out.append((info, ["relative_path", "offset", "length"]))
    return out


_hostile_values = st.sampled_from([None, 0, -5, 10**20, "", "x/../../y", [], {}, (), [1, 2], "__0_0.distcp",
                                   torch.Size([10**9, 10**9]), torch.Size([-1]), torch.float32, 1.5, True])


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_hostile_metadata_fields_never_crash(tmp_path_factory, data):
    """Any field of a real .metadata deleted or replaced by any admitted value: problems, never an exception."""
    path = cf.copy_ckpt(cf.plain_ckpt(), tmp_path_factory.mktemp("hostile") / "c")
    (path / MANIFEST_NAME).unlink()

    def edit(md):
        objects = _objects(md)  # listed before any change: a changed object may not even hash any more
        for _ in range(data.draw(st.integers(1, 3))):
            owner, names = objects[data.draw(st.integers(0, len(objects) - 1))]
            name = data.draw(st.sampled_from(names))
            # (TensorProperties pickles through __getstate__, which needs every field.)
            if data.draw(st.booleans()) and type(owner).__name__ != "TensorProperties":
                if name in vars(owner):
                    object.__delattr__(owner, name)
            else:
                object.__setattr__(owner, name, data.draw(_hostile_values))
    cf.rewrite_metadata(path, edit)
    result = ckptdir.inspect_checkpoint(path, verify_data=True)
    assert result.exit_code in (0, 1)
    if result.exit_code == 0:
        assert all(r.status in ("read ok", "ok") for r in result.rows)


def test_metadata_that_is_a_fifo_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / ".metadata")
    ckpt = ckptdir.open_checkpoint_dir(tmp_path)
    assert "not a regular file" in only(ckpt.problems, "metadata")[0].message
    plain = cf.copy_ckpt(cf.plain_ckpt(), tmp_path / "c")
    (plain / MANIFEST_NAME).unlink()
    os.mkfifo(plain / MANIFEST_NAME)
    assert "not a regular file" in only(ckptdir.open_checkpoint_dir(plain).problems, "manifest")[0].message


def test_empty_dir_is_not_a_checkpoint(tmp_path):
    ckpt = ckptdir.open_checkpoint_dir(tmp_path)
    assert kinds(ckpt.problems) == {"not-a-checkpoint"}
    assert "no .metadata: not a DCP checkpoint dir (the dir is empty)" == ckpt.problems[0].message


def test_missing_path_and_file_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        ckptdir.open_checkpoint_dir(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a checkpoint dir"):
        ckptdir.open_checkpoint_dir(tmp_path / "f")


KEY = "optim.state.0.weight.exp_avg"


def test_overlapping_chunks_in_metadata(ws3_copy):
    def edit(md):
        c = md.state_dict_metadata[KEY].chunks[0]
        c.sizes = torch.Size([3, 8])  # rows 0..2 now overlap chunk 1's rows 2..3
    cf.rewrite_metadata(ws3_copy, edit)
    problems = ckptdir.open_checkpoint_dir(ws3_copy).problems
    p = only(problems, "chunk-overlap")[0]
    assert p.key == KEY and "chunks 0 (offsets [0, 0] sizes [3, 8] in __0_0.distcp) and 1" in p.message
    assert kinds(problems) == {"chunk-overlap"}


def test_chunk_missing_from_metadata_leaves_a_gap(ws3_copy):
    cf.rewrite_metadata(ws3_copy, lambda md: md.state_dict_metadata[KEY].chunks.pop())
    problems = ckptdir.open_checkpoint_dir(ws3_copy).problems
    gap = only(problems, "chunk-gap")[0]
    assert gap.key == KEY and "2 chunks hold 32 of 40 elements" in gap.message
    assert only(problems, "orphan-storage")[0].key == KEY  # its storage entry now matches no chunk


def test_chunk_outside_its_tensor(ws3_copy):
    def edit(md):
        md.state_dict_metadata[KEY].chunks[2].sizes = torch.Size([2, 8])  # rows 4..5 of a 5-row tensor
    cf.rewrite_metadata(ws3_copy, edit)
    p = only(ckptdir.open_checkpoint_dir(ws3_copy).problems, "chunk-bounds")[0]
    assert p.key == KEY and p.file == "__2_0.distcp" and "outside the tensor's shape [5, 8]" in p.message


def test_storage_entry_with_no_file_and_path_traversal(ws3_copy, tmp_path):
    secret = tmp_path / "secret.distcp"
    secret.write_bytes(b"x" * 10_000)

    def edit(md):
        for index, info in md.storage_data.items():
            if index.fqn == KEY and index.offset[0] == 0:
                info.relative_path = "../secret.distcp"
            if index.fqn == "model.0.bias" and index.offset[0] == 0:
                info.relative_path = "__9_0.distcp"
    cf.rewrite_metadata(ws3_copy, edit)
    ckpt = ckptdir.open_checkpoint_dir(ws3_copy)
    outside = only(ckpt.problems, "file-outside-dir")[0]
    assert outside.key == KEY and outside.file == "../secret.distcp"
    missing = only(ckpt.problems, "missing-file")[0]
    assert missing.key == "model.0.bias" and missing.file == "__9_0.distcp"
    # --verify-data does not read what lies outside the dir, nor keys with integrity problems.
    result = ckptdir.inspect_checkpoint(ws3_copy, verify_data=True)
    row = next(r for r in result.rows if r.key == KEY)
    assert row.status == "PROBLEM" and row.fingerprint is None


def test_byte_range_too_short_for_its_data_and_entry_without_file_name(ws3_copy):
    def edit(md):
        for index, info in md.storage_data.items():
            if index.fqn == KEY and index.offset[0] == 0:
                info.length = 10  # 2 x 8 float32 need 64 bytes
            if index.fqn == "model.0.bias" and index.offset[0] == 0:
                info.relative_path = ""
    cf.rewrite_metadata(ws3_copy, edit)
    problems = ckptdir.open_checkpoint_dir(ws3_copy).problems
    short = only(problems, "byte-range")[0]
    assert short.key == KEY and "10 bytes in __0_0.distcp cannot hold its 64 bytes of data" in short.message
    nameless = only(problems, "missing-file")[0]
    assert nameless.key == "model.0.bias" and "names no file" in nameless.message


def test_chunk_without_storage_entry(ws3_copy):
    def edit(md):
        md.storage_data = {i: s for i, s in md.storage_data.items() if not (i.fqn == KEY and i.offset[0] == 2)}
    cf.rewrite_metadata(ws3_copy, edit)
    p = only(ckptdir.open_checkpoint_dir(ws3_copy).problems, "no-storage")[0]
    assert p.key == KEY and "chunk 1 (offsets [2, 0] sizes [2, 8]) has no storage entry" in p.message


def test_two_items_sharing_bytes(ws3_copy):
    def edit(md):
        entries = [(i, s) for i, s in md.storage_data.items() if s.relative_path == "__0_0.distcp"]
        (_, first), (_, second) = entries[0], entries[1]
        second.offset = first.offset
    cf.rewrite_metadata(ws3_copy, edit)
    p = only(ckptdir.open_checkpoint_dir(ws3_copy).problems, "byte-overlap")[0]
    assert p.file == "__0_0.distcp" and "overlap" in p.message


def test_unreferenced_shard_file_is_a_note_not_a_problem(ws3_copy):
    (ws3_copy / "__7_0.distcp").write_bytes(b"old")
    ckpt = ckptdir.open_checkpoint_dir(ws3_copy)
    assert ckpt.problems == []
    assert ckpt.notes and "__7_0.distcp is not referenced" in ckpt.notes[0]


# --- the manifest against the metadata ------------------------------------------------


def test_manifest_mismatches_are_named(plain_copy):
    m = read_manifest(plain_copy)
    m.keys["ghost.key"] = m.keys["scalar"]
    del m.keys["model.bias"]
    m.keys["nested.vol"].shape = (9, 9)
    m.keys["nested.half"].dtype = "float32"
    m.keys["step"], m.keys["scalar"] = m.keys["scalar"], m.keys["step"]  # a tensor entry for an object and back
    write_manifest(plain_copy, m)
    problems = only(ckptdir.open_checkpoint_dir(plain_copy).problems, "manifest-mismatch")
    by_key = {p.key: p.message for p in problems}
    assert "listed in fsdpck.json but not in the checkpoint" in by_key["ghost.key"]
    assert "in the checkpoint but not in fsdpck.json" in by_key["model.bias"]
    assert "shape [2, 3, 4] in the checkpoint, [9, 9] in fsdpck.json" in by_key["nested.vol"]
    assert "dtype float16 in the checkpoint, float32 in fsdpck.json" in by_key["nested.half"]
    assert "fsdpck.json lists a tensor, the checkpoint holds a byte item" in by_key["step"]
    assert "fsdpck.json lists an object, the checkpoint holds a tensor" in by_key["scalar"]


@pytest.mark.parametrize("text, words", [
    ('{"format": "fsdpck.manifest", "version": 1, "fsdpck_ver', "truncated"),
    ('{"format": "fsdpck.manifest", "version": 7}', "version 7"),
    ('[]', "not an object"),
])
def test_malformed_manifest_is_a_problem(plain_copy, text, words):
    (plain_copy / MANIFEST_NAME).write_text(text)
    ckpt = ckptdir.open_checkpoint_dir(plain_copy)
    p = only(ckpt.problems, "manifest")[0]
    assert words in p.message and p.file == MANIFEST_NAME
    assert ckpt.manifest is None and ckpt.manifest_error == p.message


# --- --verify-data ---------------------------------------------------------------------


def test_verify_data_matches_the_manifest():
    result = ckptdir.inspect_checkpoint(cf.plain_ckpt(), verify_data=True)
    assert result.problems == [] and result.exit_code == 0
    statuses = {r.key: r.status for r in result.rows}
    assert set(statuses.values()) == {"verified"}, statuses
    row = next(r for r in result.rows if r.key == "step")
    assert row.value == "7"
    assert next(r for r in result.rows if r.key == "name").value == "'run-42'"


def test_flipped_byte_is_reported_for_exactly_that_key(plain_copy):
    state = cf.plain_state()
    name = cf.flip_byte_in_tensor(plain_copy, "nested.vol", state["nested"]["vol"])
    result = ckptdir.inspect_checkpoint(plain_copy, verify_data=True)
    assert result.exit_code == 1 and result.verdict == "PROBLEMS"
    (p,) = result.problems
    assert (p.kind, p.key, p.file) == ("fingerprint-mismatch", "nested.vol", name)
    bad = [r for r in result.rows if r.status != "verified"]
    assert [(r.key, r.status) for r in bad] == [("nested.vol", "MISMATCH")]
    # Without --verify-data the flip is invisible: metadata and sizes are intact.
    assert ckptdir.inspect_checkpoint(plain_copy).problems == []


def test_unreadable_item_is_reported_not_raised(plain_copy):
    name, offset, length = cf.storage_info(plain_copy, "model.weight")
    data = bytearray((plain_copy / name).read_bytes())
    data[offset : offset + 64] = b"\0" * 64  # the zip header of that item's torch.save archive
    (plain_copy / name).write_bytes(bytes(data))
    result = ckptdir.inspect_checkpoint(plain_copy, verify_data=True)
    (p,) = result.problems
    assert (p.kind, p.key, p.file) == ("unreadable", "model.weight", name)
    assert "cannot be read through DCP" in p.message and "Traceback" not in p.message
    assert {r.key for r in result.rows if r.status != "verified"} == {"model.weight"}


def test_verify_data_reads_fsdp2_chunks_without_a_manifest():
    result = ckptdir.inspect_checkpoint(cf.fsdp2_ckpts()[1], verify_data=True)
    assert result.problems == [] and {r.status for r in result.rows} == {"read ok"}


def test_evil_byte_item_is_read_but_never_unpickled(tmp_path):
    """DCP's default planner would torch.load(weights_only=False) a byte item; fsdpck never does."""
    import torch.distributed.checkpoint as dcp

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    state = {"w": torch.ones(2), "evil": cf.Payload(os.system, cf.marker_command(ours))}
    cf.dcp_save(state, tmp_path / "ckpt")
    result = ckptdir.inspect_checkpoint(tmp_path / "ckpt", verify_data=True)
    assert result.exit_code == 0 and not ours.exists()
    assert next(r for r in result.rows if r.key == "evil").value is None  # not decodable safely
    diff = ckptdir.diff_checkpoints(tmp_path / "ckpt", tmp_path / "ckpt")
    assert diff.exit_code == 0 and not ours.exists()
    # ... while DCP's own load with its default planner runs it (so the test could fail).
    (tmp_path / "theirs_ckpt").mkdir()
    cf.dcp_save({"evil": cf.Payload(os.system, cf.marker_command(theirs))}, tmp_path / "theirs_ckpt")
    target = {"evil": io.BytesIO()}
    with pytest.warns(UserWarning):
        dcp.load(target, checkpoint_id=str(tmp_path / "theirs_ckpt"), no_dist=True)
    assert theirs.read_text() == "pwned"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_reading_in_small_batches_gives_the_same_fingerprints():
    ckpt = ckptdir.open_checkpoint_dir(cf.plain_ckpt())
    infos = [i for i in ckpt.metadata.keys.values() if i.kind == "tensor"]
    reader = ckptdir.CheckpointReader(ckpt)
    one = {i.key: ckptdir.tensor_fingerprint(t) for i, t, _ in reader.tensors(infos, batch_bytes=1)}
    many = {i.key: ckptdir.tensor_fingerprint(t) for i, t, _ in reader.tensors(infos)}
    assert one == many and len(one) == len(infos)


# --- diff ------------------------------------------------------------------------------


def test_diff_across_world_sizes_is_identical():
    ws2, ws3 = cf.fsdp2_ckpts()
    result = ckptdir.diff_checkpoints(ws2, ws3, values=True)
    assert result.exit_code == 0 and result.verdict == "IDENTICAL" and result.problems == []
    row = next(r for r in result.rows if r.key == KEY)
    assert (row.chunks_a, row.chunks_b) == (2, 3) and row.fingerprint_a == row.fingerprint_b
    assert row.max_abs_diff == 0.0


def test_diff_of_two_saves_of_the_same_state_is_identical(tmp_path):
    """Byte items compare by value: the serialization_id torch.save writes differs from save to save."""
    cf.dcp_save(cf.plain_state(), tmp_path / "again")
    result = ckptdir.diff_checkpoints(cf.plain_ckpt(), tmp_path / "again")
    assert result.exit_code == 0, [r for r in result.differing]


def test_diff_names_every_kind_of_difference(tmp_path):
    state = cf.plain_state()
    state["nested"]["vol"] = state["nested"]["vol"].clone()
    state["nested"]["vol"][1, 2, 3] += 0.5
    del state["nested"]["half"]
    state["extra"] = torch.zeros(2)
    state["scalar"] = torch.tensor(3.5, dtype=torch.float64)
    state["empty"] = torch.empty(0, 4)
    state["step"] = 8
    cf.dcp_save(state, tmp_path / "b")
    result = ckptdir.diff_checkpoints(cf.plain_ckpt(), tmp_path / "b", values=True)
    status = {r.key: r.status for r in result.differing}
    assert status == {"nested.vol": "DIFFERENT", "nested.half": "only in A", "extra": "only in B",
                      "scalar": "DTYPE DIFFERS", "empty": "SHAPE DIFFERS", "step": "DIFFERENT"}
    vol = next(r for r in result.rows if r.key == "nested.vol")
    assert vol.max_abs_diff == pytest.approx(0.5, abs=1e-6)
    assert result.exit_code == 1 and result.verdict == "DIFFERENT"
    sub = ckptdir.diff_checkpoints(cf.plain_ckpt(), tmp_path / "b", key_glob="model.*")
    assert sub.exit_code == 0 and {r.key for r in sub.rows} == {"model.weight", "model.bias"}
    with pytest.raises(UsageError, match="matches none"):
        ckptdir.diff_checkpoints(cf.plain_ckpt(), tmp_path / "b", key_glob="nothing*")


def test_diff_with_a_damaged_side_reports_problems(ws3_copy):
    (ws3_copy / "__0_0.distcp").unlink()
    result = ckptdir.diff_checkpoints(cf.fsdp2_ckpts()[1], ws3_copy)
    assert result.verdict == "PROBLEMS" and result.exit_code == 1
    assert all(p.message.startswith("B: ") for p in result.problems)
    assert {r.status for r in result.differing} == {"UNREADABLE"}


def test_max_abs_diff_semantics():
    nan, inf = math.nan, math.inf
    a = torch.tensor([1.0, nan, inf, -0.0, 5.0])
    assert ckptdir.max_abs_diff(a, a.clone(), block_numel=2) == 0.0
    b = torch.tensor([1.0, nan, inf, 0.0, 2.0])
    assert ckptdir.max_abs_diff(a, b, block_numel=2) == 3.0
    assert math.isnan(ckptdir.max_abs_diff(a, torch.tensor([1.0, 0.0, inf, 0.0, 5.0])))
    assert ckptdir.max_abs_diff(torch.tensor([1, 2], dtype=torch.int64), torch.tensor([1, 7])) == 5.0
    assert ckptdir.max_abs_diff(torch.tensor([True]), torch.tensor([False])) == 1.0
    assert ckptdir.max_abs_diff(torch.zeros(0), torch.zeros(0)) == 0.0


def test_byte_item_identity():
    def saved(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    a1, a2 = ckptdir.byte_item_identity(saved({"lr": 0.1, "betas": (0.9, 0.99)})), ckptdir.byte_item_identity(
        saved({"betas": (0.9, 0.99), "lr": 0.1}))
    assert a1.digest == a2.digest and a1.decoded
    assert ckptdir.byte_item_identity(saved({"lr": 0.2})).digest != a1.digest
    assert ckptdir.byte_item_identity(saved(0.0)).digest != ckptdir.byte_item_identity(saved(-0.0)).digest
    assert ckptdir.byte_item_identity(b"not a zip").decoded is False


# --- scale -----------------------------------------------------------------------------


def test_ten_thousand_keys(tmp_path):
    keys = cf.synthetic_ckpt(tmp_path / "big", 10_000)
    result = ckptdir.inspect_checkpoint(tmp_path / "big")
    assert result.exit_code == 0 and result.problems == []
    assert result.n_keys == result.n_tensors == 10_000 and len(result.rows) == 10_000
    assert [r.key for r in result.rows] == sorted(keys)
    assert sum(1 for f in result.files if f.role == "shard" and f.items == 10_000) == 1
    # The synthetic checkpoint is a real one: DCP reads it (a sample of keys, through --key).
    sample = ckptdir.inspect_checkpoint(tmp_path / "big", key_glob="model.layers.99*", verify_data=True)
    assert len(sample.rows) == 110 and {r.status for r in sample.rows} == {"read ok"}
    from fsdpck.fingerprint import fp_tensor, to_hex

    assert {r.fingerprint for r in sample.rows} == {to_hex(fp_tensor(torch.arange(6, dtype=torch.float32).reshape(2, 3)))}
