"""fsdpck.checkpoint.integrity: is a checkpoint whole, judged from metadata, listing and sizes alone.

Every check is shown to fail: each fault is injected into a private copy of the pristine
plain checkpoint (``dcp.save(..., no_dist=True)``) and must be reported with its key and
file. The exact-cover check (:func:`covers_exactly`) is held to a brute-force count in any
number of dims. Faults that need a real FSDP2 layout (several chunks per key in several
files) are in tests/integration/test_offline_real.py.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt_factory as cf
from fsdpck.checkpoint import integrity
from fsdpck.checkpoint.integrity import (
    P_BYTE_OVERLAP,
    P_BYTE_RANGE,
    P_CHUNK_BOUNDS,
    P_CHUNK_GAP,
    P_CHUNK_OVERLAP,
    P_INCOMPLETE,
    P_MANIFEST,
    P_MANIFEST_MISMATCH,
    P_METADATA,
    P_MISSING_FILE,
    P_NO_STORAGE,
    P_NOT_CHECKPOINT,
    P_NOT_FILE,
    P_ORPHAN_STORAGE,
    P_OUTSIDE,
    P_SYMLINK,
    chunk_cover_problems,
    covers_exactly,
    find_overlapping_chunks,
)
from fsdpck.checkpoint.manifest import MANIFEST_NAME, read_manifest, write_manifest
from fsdpck.checkpoint.metadata import ChunkInfo, StorageRef
from fsdpck.checkpoint.storage import LocalStorage
from fsdpck.commands.inspect import inspect_checkpoint
from fsdpck.errors import CheckpointFormatError, UsageError

KEY = "nested.vol"  # a float32 [2, 3, 4] tensor of the plain checkpoint, one chunk


def open_dir(path: Path):
    return integrity.open_checkpoint(LocalStorage(path))


def kinds(problems) -> set[str]:
    return {p.kind for p in problems}


def only(problems, kind):
    found = [p for p in problems if p.kind == kind]
    assert found, f"no {kind} problem among {problems}"
    return found


@contextlib.contextmanager
def no_hang(seconds: int = 30):
    """Fail (instead of hanging the suite) when the body blocks, e.g. on a FIFO."""
    def fail(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def plain_copy(tmp_path) -> Path:
    return cf.copy_ckpt(cf.plain_ckpt(), tmp_path / "ckpt")


# --- chunk coverage --------------------------------------------------------------------


def chunks(*boxes) -> tuple[ChunkInfo, ...]:
    return tuple(ChunkInfo(tuple(o), tuple(s), StorageRef(f"__{n}_0.distcp", 0, 1)) for n, (o, s) in enumerate(boxes))


@pytest.mark.parametrize("shape, boxes", [
    ((7, 5), [((0, 0), (3, 5)), ((3, 0), (3, 5)), ((6, 0), (1, 5))]),  # FSDP rows, uneven
    ((2, 5), [((0, 0), (1, 5)), ((1, 0), (1, 5)), ((2, 0), (0, 5))]),  # an empty shard at the end
    ((4, 6), [((0, 0), (2, 3)), ((0, 3), (2, 3)), ((2, 0), (2, 3)), ((2, 3), (2, 3))]),  # 2x2 grid
    ((4, 6, 2), [((0, 0, 0), (4, 3, 2)), ((0, 3, 0), (4, 3, 2))]),  # column split of a 3-D tensor
    ((2, 2, 2, 2, 2), [((i, 0, 0, 0, 0), (1, 2, 2, 2, 2)) for i in range(2)]),  # 5 dims
    ((), [((), ())]),  # a scalar
    ((0, 3), []),  # an empty tensor needs no chunk
])
def test_exact_covers_pass(shape, boxes):
    assert chunk_cover_problems("k", shape, chunks(*boxes)) == []


@pytest.mark.parametrize("shape, boxes, kind, words", [
    ((7, 5), [((0, 0), (4, 5)), ((3, 0), (4, 5))], P_CHUNK_OVERLAP,
     "chunks 0 (offsets [0, 0] sizes [4, 5] in __0_0.distcp) and 1"),
    ((7, 5), [((0, 0), (3, 5)), ((3, 0), (3, 5))], P_CHUNK_GAP, "2 chunks hold 30 of 35 elements"),
    ((7, 5), [((0, 0), (3, 5)), ((0, 0), (3, 5)), ((3, 0), (4, 5))], P_CHUNK_OVERLAP, "chunks 0"),
    ((7, 5), [((0, 0), (8, 5))], P_CHUNK_BOUNDS, "lies outside the tensor's shape [7, 5]"),
    ((7, 5), [((-1, 0), (7, 5))], P_CHUNK_BOUNDS, "lies outside"),
    ((7, 5), [((0,), (7,))], P_CHUNK_BOUNDS, "does not have the tensor's 2 dims"),
    ((), [((), ()), ((), ())], P_CHUNK_OVERLAP, "overlap"),
    ((3,), [], P_CHUNK_GAP, "0 chunks hold 0 of 3 elements"),
    # The same volume as the tensor, but one block shifted: an overlap hides a gap.
    ((4, 4), [((0, 0), (2, 2)), ((0, 2), (2, 2)), ((1, 0), (2, 2)), ((2, 2), (2, 2))], P_CHUNK_GAP, "some twice"),
])
def test_broken_covers_are_named(shape, boxes, kind, words):
    problems = chunk_cover_problems("k", shape, chunks(*boxes))
    assert any(p.kind == kind and words in p.message and p.key == "k" for p in problems), problems


def brute_force_counts(shape, boxes):
    counts = torch.zeros(shape, dtype=torch.int64)
    for o, s in boxes:
        counts[tuple(slice(a, a + b) for a, b in zip(o, s))] += 1
    return counts


@st.composite
def grid_partition(draw, max_dims=5):
    ndim = draw(st.integers(1, max_dims))
    shape, cuts = [], []
    for _ in range(ndim):
        size = draw(st.integers(1, 6 if ndim <= 3 else 3))
        inner = sorted(set(draw(st.lists(st.integers(0, size), max_size=3))))
        shape.append(size)
        cuts.append([0] + [c for c in inner if 0 < c < size] + [size])
    boxes = []
    for cell in itertools.product(*(range(len(c) - 1) for c in cuts)):
        o = tuple(cuts[d][i] for d, i in enumerate(cell))
        s = tuple(cuts[d][i + 1] - cuts[d][i] for d, i in enumerate(cell))
        boxes.append((o, s))
    return tuple(shape), boxes


@settings(max_examples=200, deadline=None)
@given(grid_partition(), st.data())
def test_cover_check_agrees_with_brute_force(part, data):
    """Grid partitions pass; any perturbation is reported exactly when an element is covered != once."""
    shape, boxes = part
    assert chunk_cover_problems("k", shape, chunks(*boxes)) == []
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
        # Never below 0: parse_metadata refuses negative offsets before chunks get here (and a
        # negative offset has its own case in test_broken_covers_are_named).
        step = data.draw(st.sampled_from([-1, 1]))
        o[d] += step if o[d] + step >= 0 else 1
    elif action == "drop":
        boxes.pop(n)
    elif action == "duplicate":
        boxes.append((tuple(o), tuple(s)))
    if action in ("grow", "shrink", "shift"):
        boxes[n] = (tuple(o), tuple(s))
    if action == "swap-size" and len(boxes) > 1:
        m = (n + 1) % len(boxes)
        boxes[n], boxes[m] = (boxes[n][0], boxes[m][1]), (boxes[m][0], boxes[n][1])
    problems = chunk_cover_problems("k", shape, chunks(*boxes))
    in_bounds = all(all(a >= 0 and (b == 0 or a + b <= dim) for a, b, dim in zip(o, s, shape)) for o, s in boxes)
    if not in_bounds:
        assert kinds(problems) == {P_CHUNK_BOUNDS}, (shape, boxes, problems)
        return
    exact = bool((brute_force_counts(shape, boxes) == 1).all())
    assert (problems == []) == exact, (shape, boxes, problems)
    assert covers_exactly(shape, list(chunks(*boxes))) == exact
    if not exact:
        assert kinds(problems) <= {P_CHUNK_OVERLAP, P_CHUNK_GAP}


@pytest.mark.parametrize("ndim", [3, 7, 12])
def test_cover_check_works_in_any_number_of_dims(ndim):
    """Unit cells of a 2**ndim tensor: exact; a dropped, doubled or moved cell is caught in every case."""
    shape = (2,) * ndim
    cells = [(o, (1,) * ndim) for o in itertools.product((0, 1), repeat=ndim)]
    assert covers_exactly(shape, list(chunks(*cells)))
    assert chunk_cover_problems("k", shape, chunks(*cells)) == []
    dropped = cells[:-1]
    doubled = cells + [cells[5]]
    moved = cells[:-1] + [cells[0]]  # same volume: the last cell missing, the first twice
    assert kinds(chunk_cover_problems("k", shape, chunks(*dropped))) == {P_CHUNK_GAP}
    assert P_CHUNK_OVERLAP in kinds(chunk_cover_problems("k", shape, chunks(*doubled)))
    assert chunk_cover_problems("k", shape, chunks(*moved)) != []
    for wrong in (dropped, doubled, moved):
        assert not covers_exactly(shape, list(chunks(*wrong)))


def test_cover_check_of_many_chunks():
    """A 250 x 200 grid (50,000 chunks): exact, and one chunk grown by one row is caught."""
    cells = [((2 * i, 3 * j), (2, 3)) for i in range(250) for j in range(200)]
    assert chunk_cover_problems("k", (500, 600), chunks(*cells)) == []
    cells[12_345] = (cells[12_345][0], (3, 3))
    assert kinds(chunk_cover_problems("k", (500, 600), chunks(*cells))) <= {P_CHUNK_OVERLAP, P_CHUNK_GAP}
    assert chunk_cover_problems("k", (500, 600), chunks(*cells)) != []


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(1, 4), st.integers(1, 4)), min_size=2,
                max_size=7))
def test_overlap_sweep_is_exact_in_two_dims(rects):
    """The O(n log n) sweep finds an overlapping pair iff one exists (for up to 2 dims)."""
    cs = chunks(*[((a, b), (c, d)) for a, b, c, d in rects])
    found = find_overlapping_chunks(cs)

    def meet(x, y):
        return all(x.offsets[i] < y.offsets[i] + y.sizes[i] and y.offsets[i] < x.offsets[i] + x.sizes[i] for i in range(2))

    truth = any(meet(cs[i], cs[j]) for i in range(len(cs)) for j in range(i + 1, len(cs)))
    assert (found is not None) == truth
    if found is not None:
        assert meet(cs[found[0]], cs[found[1]])


# --- pristine checkpoints ---------------------------------------------------------------


@pytest.mark.parametrize("make", [cf.plain_ckpt, cf.torch_save_ckpt], ids=["plain", "torch_save_to_dcp"])
def test_pristine_checkpoints_are_whole(make):
    ckpt = open_dir(make())
    assert ckpt.problems == [], ckpt.problems
    assert ckpt.notes == []
    assert ckpt.metadata is not None and ckpt.metadata.dcp_version == "1.0.0"


def test_plain_checkpoint_layout():
    keys = open_dir(cf.plain_ckpt()).metadata.keys
    assert set(keys) == set(cf.flat_state(cf.plain_state()))
    assert keys["step"].kind == "bytes" and keys["sched.last_epoch"].kind == "bytes"
    assert keys["optim.param_groups.0.lr"].kind == "bytes"
    assert (keys["nested.a.bf"].dtype, keys["nested.a.bf"].shape) == ("bfloat16", (3, 2))
    assert (keys["nested.a.ids"].dtype, keys["nested.half"].dtype) == ("int64", "float16")
    assert keys["scalar"].shape == () and keys["empty"].shape == (0, 3)
    assert keys["model.weight"].chunks[0].storage.file == "__0_0.distcp"
    assert keys["flags"].dtype == "bool" and keys["flags"].itemsize == 1


# --- missing, truncated and leftover files ----------------------------------------------


def test_truncated_shard_file_names_its_keys_and_file(plain_copy):
    shard = plain_copy / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    found = only(open_dir(plain_copy).problems, P_BYTE_RANGE)
    assert {p.file for p in found} == {"__0_0.distcp"}
    assert 0 < len({p.key for p in found}) < len(cf.flat_state(cf.plain_state()))  # the items past the cut
    assert all("truncated?" in p.message for p in found)


def test_deleted_shard_file_is_missing_for_every_key_in_it(plain_copy):
    (plain_copy / "__0_0.distcp").unlink()
    ckpt = open_dir(plain_copy)
    found = only(ckpt.problems, P_MISSING_FILE)
    assert {p.key for p in found} == set(cf.flat_state(cf.plain_state()))
    assert {p.file for p in found} == {"__0_0.distcp"}
    assert kinds(ckpt.problems) == {P_MISSING_FILE}
    assert next(f for f in ckpt.files if f.name == "__0_0.distcp").status == "MISSING"


def test_deleted_metadata_is_incomplete(plain_copy):
    (plain_copy / ".metadata").unlink()
    ckpt = open_dir(plain_copy)
    assert ckpt.incomplete and kinds(ckpt.problems) == {P_INCOMPLETE}
    assert "no .metadata but 1 shard file(s) (__0_0.distcp)" in ckpt.problems[0].message


def test_metadata_tmp_left_over_is_incomplete(plain_copy):
    shutil.copy(plain_copy / ".metadata", plain_copy / ".metadata.tmp")
    ckpt = open_dir(plain_copy)
    assert ckpt.incomplete and only(ckpt.problems, P_INCOMPLETE)[0].file == ".metadata.tmp"
    assert next(f for f in ckpt.files if f.name == ".metadata.tmp").status == "LEFTOVER"


def test_rank_local_metadata_only_is_a_problem(tmp_path):
    shutil.copy(cf.plain_ckpt() / ".metadata", tmp_path / "__0.metadata")
    ckpt = open_dir(tmp_path)
    assert "rank-local __0.metadata" in only(ckpt.problems, P_METADATA)[0].message


def test_garbage_metadata_is_a_problem_not_a_crash(plain_copy):
    (plain_copy / ".metadata").write_bytes(os.urandom(300))
    ckpt = open_dir(plain_copy)
    assert kinds(ckpt.problems) == {P_METADATA} and ckpt.metadata is None and ckpt.raw_metadata is None
    assert ckpt.problems[0].file == ".metadata"


def test_crafted_metadata_in_a_dir_is_a_problem_naming_the_class(plain_copy, tmp_path):
    marker = tmp_path / "marker"
    (plain_copy / ".metadata").write_bytes(cf.payloads(marker)["os.system"])
    ckpt = open_dir(plain_copy)
    assert "refused to unpickle posix.system" in only(ckpt.problems, P_METADATA)[0].message
    assert not marker.exists()


def test_unreferenced_shard_file_is_a_note_not_a_problem(plain_copy):
    (plain_copy / "__7_0.distcp").write_bytes(b"old")
    ckpt = open_dir(plain_copy)
    assert ckpt.problems == []
    assert ckpt.notes and "__7_0.distcp is not referenced" in ckpt.notes[0]
    assert next(f for f in ckpt.files if f.name == "__7_0.distcp").status == "unreferenced"


def test_empty_dir_is_not_a_checkpoint(tmp_path):
    ckpt = open_dir(tmp_path)
    assert kinds(ckpt.problems) == {P_NOT_CHECKPOINT}
    assert "no .metadata: not a DCP checkpoint dir (the dir is empty)" == ckpt.problems[0].message


def test_missing_path_and_file_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        open_dir(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a checkpoint dir"):
        open_dir(tmp_path / "f")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UsageError, match=r"is neither a file nor a dir \(a FIFO, socket or device\), not a checkpoint"):
        open_dir(tmp_path / "fifo")


def test_metadata_and_manifest_that_are_fifos_do_not_hang(tmp_path):
    os.mkfifo(tmp_path / ".metadata")
    with no_hang():
        ckpt = open_dir(tmp_path)
    p = only(ckpt.problems, P_NOT_FILE)[0]
    assert p.file == ".metadata" and "not a regular file" in p.message and ckpt.metadata is None
    plain = cf.copy_ckpt(cf.plain_ckpt(), tmp_path / "c")
    (plain / MANIFEST_NAME).unlink()
    os.mkfifo(plain / MANIFEST_NAME)
    with no_hang():
        ckpt = open_dir(plain)
        with pytest.raises(CheckpointFormatError, match="not a regular file"):
            read_manifest(LocalStorage(plain))
        with pytest.raises(CheckpointFormatError, match="not a regular file"):
            LocalStorage(plain).open_read(MANIFEST_NAME)
    p = only(ckpt.problems, P_NOT_FILE)[0]
    assert p.file == MANIFEST_NAME and ckpt.manifest is None


# --- damaged metadata -------------------------------------------------------------------


def storage_entry(md, key):
    return next(info for index, info in md.storage_data.items() if index.fqn == key)


def test_chunk_outside_its_tensor(plain_copy):
    cf.rewrite_metadata(plain_copy, lambda md: setattr(md.state_dict_metadata[KEY].chunks[0], "sizes",
                                                       torch.Size([3, 3, 4])))
    p = only(open_dir(plain_copy).problems, P_CHUNK_BOUNDS)[0]
    assert p.key == KEY and p.file == "__0_0.distcp" and "outside the tensor's shape [2, 3, 4]" in p.message


def test_doubled_chunk_overlaps(plain_copy):
    def edit(md):
        c = md.state_dict_metadata[KEY].chunks[0]
        md.state_dict_metadata[KEY].chunks.append(type(c)(offsets=c.offsets, sizes=c.sizes))
    cf.rewrite_metadata(plain_copy, edit)
    problems = open_dir(plain_copy).problems
    p = only(problems, P_CHUNK_OVERLAP)[0]
    assert p.key == KEY and "chunks 0 (offsets [0, 0, 0] sizes [2, 3, 4] in __0_0.distcp) and 1" in p.message
    assert kinds(problems) == {P_CHUNK_OVERLAP, P_BYTE_OVERLAP}  # both chunks point at the one stored item


def test_chunk_missing_from_metadata_leaves_a_gap(plain_copy):
    cf.rewrite_metadata(plain_copy, lambda md: md.state_dict_metadata[KEY].chunks.pop())
    problems = open_dir(plain_copy).problems
    gap = only(problems, P_CHUNK_GAP)[0]
    assert gap.key == KEY and "0 chunks hold 0 of 24 elements" in gap.message
    assert only(problems, P_ORPHAN_STORAGE)[0].key == KEY  # its storage entry now matches no chunk


def test_chunk_without_storage_entry(plain_copy):
    def edit(md):
        md.storage_data = {i: s for i, s in md.storage_data.items() if i.fqn != KEY}
    cf.rewrite_metadata(plain_copy, edit)
    p = only(open_dir(plain_copy).problems, P_NO_STORAGE)[0]
    assert p.key == KEY and "the tensor has no storage entry" in p.message


def test_negative_offset_in_metadata_is_a_format_problem(plain_copy):
    cf.rewrite_metadata(plain_copy, lambda md: setattr(md.state_dict_metadata[KEY].chunks[0], "offsets",
                                                       torch.Size([-1, 0, 0])))
    ckpt = open_dir(plain_copy)
    p = only(ckpt.problems, P_METADATA)[0]
    assert repr(KEY) in p.message and "out of range" in p.message and ckpt.metadata is None


def test_storage_entry_outside_the_dir_and_with_no_file(plain_copy, tmp_path):
    (tmp_path / "secret.distcp").write_bytes(b"x" * 10_000)

    def edit(md):
        storage_entry(md, KEY).relative_path = "../secret.distcp"
        storage_entry(md, "model.bias").relative_path = "__9_0.distcp"
        storage_entry(md, "model.weight").relative_path = "/etc/passwd"
    cf.rewrite_metadata(plain_copy, edit)
    ckpt = open_dir(plain_copy)
    outside = {p.key: p for p in only(ckpt.problems, P_OUTSIDE)}
    assert set(outside) == {KEY, "model.weight"} and outside[KEY].file == "../secret.distcp"
    missing = only(ckpt.problems, P_MISSING_FILE)[0]
    assert missing.key == "model.bias" and missing.file == "__9_0.distcp"
    # --verify-data does not read what lies outside the dir, nor keys with integrity problems.
    result = inspect_checkpoint(str(plain_copy), verify_data=True)
    row = next(r for r in result.rows if r.key == KEY)
    assert row.status == "PROBLEM" and row.fingerprint is None
    assert next(r for r in result.rows if r.key == "scalar").status == "verified"


def test_byte_range_too_short_for_its_data_and_entry_without_file_name(plain_copy):
    def edit(md):
        storage_entry(md, KEY).length = 10  # 2 x 3 x 4 float32 need 96 bytes
        storage_entry(md, "model.bias").relative_path = ""
    cf.rewrite_metadata(plain_copy, edit)
    problems = open_dir(plain_copy).problems
    short = only(problems, P_BYTE_RANGE)[0]
    assert short.key == KEY and "10 bytes in __0_0.distcp cannot hold its 96 bytes of data" in short.message
    nameless = only(problems, P_MISSING_FILE)[0]
    assert nameless.key == "model.bias" and "names no file" in nameless.message


def test_two_items_sharing_bytes(plain_copy):
    def edit(md):
        entries = sorted(md.storage_data.values(), key=lambda s: s.offset)
        entries[1].offset = entries[0].offset
    cf.rewrite_metadata(plain_copy, edit)
    p = only(open_dir(plain_copy).problems, P_BYTE_OVERLAP)[0]
    assert p.file == "__0_0.distcp" and "overlap" in p.message


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


_hostile_values = st.sampled_from([None, 0, -5, 10**20, 10**5000, "", "x/../../y", "/etc/passwd", [], {}, (), [1, 2],
                                   "__0_0.distcp", torch.Size([10**9, 10**9]), torch.Size([-1]), torch.float32, 1.5,
                                   True, torch.strided])


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
    result = inspect_checkpoint(str(path), verify_data=True)
    assert result.exit_code in (0, 1)
    if result.exit_code == 0:
        assert all(r.status in ("read ok", "ok") for r in result.rows)


# --- symlinks: problems, never followed -------------------------------------------------


def test_symlinked_shard_file_is_a_problem_for_it_and_every_key_in_it(plain_copy, tmp_path):
    outside = tmp_path / "elsewhere.distcp"
    shutil.move(plain_copy / "__0_0.distcp", outside)  # the very bytes: following the link would verify
    (plain_copy / "__0_0.distcp").symlink_to(outside)
    ckpt = open_dir(plain_copy)
    found = only(ckpt.problems, P_SYMLINK)
    assert {p.file for p in found} == {"__0_0.distcp"}
    assert {p.key for p in found} == set(cf.flat_state(cf.plain_state())) | {None}  # the listing's, then each key's
    assert next(f for f in ckpt.files if f.name == "__0_0.distcp").status == "SYMLINK"
    result = inspect_checkpoint(str(plain_copy), verify_data=True)
    assert result.exit_code == 1 and {r.status for r in result.rows} == {"PROBLEM"}
    assert all(r.fingerprint is None for r in result.rows)


def test_symlinked_metadata_and_manifest_are_not_read(plain_copy, tmp_path):
    for name in (".metadata", MANIFEST_NAME):
        shutil.move(plain_copy / name, tmp_path / name)
        (plain_copy / name).symlink_to(tmp_path / name)
    ckpt = open_dir(plain_copy)
    assert {p.file for p in only(ckpt.problems, P_SYMLINK)} == {".metadata", MANIFEST_NAME}
    assert ckpt.metadata is None and ckpt.manifest is None
    # DCP's reader as fsdpck hands it to DCP refuses the link too.
    with pytest.raises(CheckpointFormatError, match="symlink: not followed"):
        LocalStorage(plain_copy).dcp_reader().read_metadata()
    with pytest.raises(CheckpointFormatError, match="not a regular file"):
        read_manifest(LocalStorage(plain_copy))


def test_any_symlink_in_the_dir_is_a_problem(plain_copy):
    (plain_copy / "notes.txt").symlink_to("/etc/passwd")
    ckpt = open_dir(plain_copy)
    (p,) = ckpt.problems
    assert (p.kind, p.file, p.key) == (P_SYMLINK, "notes.txt", None)
    assert ckpt.metadata is not None  # the rest of the checkpoint is still read


def _shard_in_subdir(ckpt: Path, tmp_path: Path, *, link: bool) -> None:
    """model.bias's storage entry names sub/__0_0.distcp; sub is a real dir, or a symlink to one outside."""
    real = tmp_path / "real-sub" if link else ckpt / "sub"
    real.mkdir()
    shutil.copy(ckpt / "__0_0.distcp", real / "__0_0.distcp")
    if link:
        (ckpt / "sub").symlink_to(real)
    cf.rewrite_metadata(ckpt, lambda md: setattr(storage_entry(md, "model.bias"), "relative_path",
                                                 "sub/__0_0.distcp"))


def test_shard_in_a_real_subdir_is_read(plain_copy, tmp_path):
    """The control for the next test: a name with a dir in it is fine when no link is on the way."""
    _shard_in_subdir(plain_copy, tmp_path, link=False)
    result = inspect_checkpoint(str(plain_copy), verify_data=True)
    assert result.problems == [] and next(r for r in result.rows if r.key == "model.bias").status == "verified"


def test_shard_behind_a_symlinked_subdir_is_a_symlink_problem(plain_copy, tmp_path):
    _shard_in_subdir(plain_copy, tmp_path, link=True)
    ckpt = open_dir(plain_copy)
    assert any(p.kind == P_SYMLINK and p.file == "sub" for p in ckpt.problems)
    by_key = {p.key: p for p in ckpt.problems if p.key == "model.bias"}
    assert by_key["model.bias"].kind == P_SYMLINK, by_key  # not "missing": the file is there, behind a link
    assert by_key["model.bias"].file == "sub/__0_0.distcp"


# --- the manifest against the metadata ------------------------------------------------


def test_manifest_mismatches_are_named(plain_copy):
    storage = LocalStorage(plain_copy)
    m = read_manifest(storage)
    m.keys["ghost.key"] = m.keys["scalar"]
    del m.keys["model.bias"]
    m.keys["nested.vol"].shape = (9, 9)
    m.keys["nested.half"].dtype = "float32"
    m.keys["step"], m.keys["scalar"] = m.keys["scalar"], m.keys["step"]  # a tensor entry for an object and back
    write_manifest(storage, m)
    problems = only(open_dir(plain_copy).problems, P_MANIFEST_MISMATCH)
    by_key = {p.key: p.message for p in problems}
    assert "listed in fsdpck.json but not in the checkpoint" in by_key["ghost.key"]
    assert "in the checkpoint but not in fsdpck.json" in by_key["model.bias"]
    assert "shape [2, 3, 4] in the checkpoint, [9, 9] in fsdpck.json" in by_key["nested.vol"]
    assert "dtype float16 in the checkpoint, float32 in fsdpck.json" in by_key["nested.half"]
    assert "fsdpck.json lists a tensor, the checkpoint holds a byte item" in by_key["step"]
    assert "fsdpck.json lists an object, the checkpoint holds a tensor" in by_key["scalar"]
    assert len(problems) == 6


@pytest.mark.parametrize("text, words", [
    ('{"format": "fsdpck.manifest", "version": 1, "fsdpck_ver', "truncated"),
    ('{"format": "fsdpck.manifest", "version": 7}', "version 7"),
    ('[]', "not an object"),
])
def test_malformed_manifest_is_a_problem(plain_copy, text, words):
    (plain_copy / MANIFEST_NAME).write_text(text)
    ckpt = open_dir(plain_copy)
    p = only(ckpt.problems, P_MANIFEST)[0]
    assert words in p.message and p.file == MANIFEST_NAME
    assert ckpt.manifest is None and ckpt.manifest_error == p.message
