"""fsdpck.checkpoint.torchsave: finding a chunk's elements in a torch.save archive, and refusing
every archive that is not a plain tensor of what the metadata says; and the offline reader's
direct path built on it (fsdpck.checkpoint.stream), against DCP's own reader."""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import struct
import threading
import time
import zipfile
import zlib
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import CLI_IN_SCRIPT, TORCH_MODULES, fresh_python

from fsdpck.checkpoint import stream, torchsave
from fsdpck.checkpoint.integrity import open_checkpoint
from fsdpck.checkpoint.storage import LocalStorage
from fsdpck.commands.offline import read_items
from fsdpck.errors import CheckpointFormatError
from tests.ckpt_factory import chunked_ckpt, marker_command

DTYPES = [getattr(torch, name) for name in torchsave.STORAGE_CLASS]


def saved(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def rebuilt(raw: bytes, start: int, found: torchsave.StoredTensor, dtype: torch.dtype) -> torch.Tensor:
    data = bytearray(raw[start + found.data_offset: start + found.data_offset + found.nbytes])
    flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).as_strided(found.size, found.stride, found.storage_offset)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def values(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return (torch.randn(shape, generator=gen) * 100).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_locate_finds_exactly_what_torch_saved(dtype):
    full = values(dtype, (6, 5))
    cases = {"contiguous": full.clone(), "column-major": full.t().contiguous().t(), "0-dim": full[1, 2].clone(),
             "empty": full[:0].clone(), "a view with a storage offset": full[2:4]}
    for name, t in cases.items():
        blob = saved(t)
        raw = b"\xffjunk-before" * 3 + blob + b"junk-after"
        start = 36
        found = torchsave.locate(io.BytesIO(raw), start, len(blob), dtype=dtype_name(t), itemsize=t.element_size(),
                                 sizes=tuple(t.shape))
        assert found is not None, name
        assert same_bits(rebuilt(raw, start, found, dtype), t), name


class Recording(io.BytesIO):
    """A stream that records the byte ranges read from it."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.ranges: list[tuple[int, int]] = []

    def readinto(self, buffer) -> int:
        at = self.tell()
        n = super().readinto(buffer)
        self.ranges.append((at, at + n))
        return n

    def read(self, size=-1) -> bytes:
        at = self.tell()
        data = super().read(size)
        self.ranges.append((at, at + len(data)))
        return data


def test_locate_reads_nothing_outside_the_item():
    t = values(torch.float32, (4, 4))
    blob = saved(t)
    # The bytes around the item are themselves a valid archive: a read outside would find it.
    decoy = saved(values(torch.float32, (4, 4)) + 1)
    raw = decoy + blob + decoy
    stream_ = Recording(raw)
    found = torchsave.locate(stream_, len(decoy), len(blob), dtype="float32", itemsize=4, sizes=(4, 4))
    assert found is not None and same_bits(rebuilt(raw, len(decoy), found, torch.float32), t)
    assert stream_.ranges and all(len(decoy) <= a and b <= len(decoy) + len(blob) for a, b in stream_.ranges)


def rezip(blob: bytes, *, replace: dict[str, bytes] | None = None, drop: tuple[str, ...] = (),
          compress: tuple[str, ...] = ()) -> bytes:
    """The archive ``blob`` with members replaced, dropped or deflated."""
    src = zipfile.ZipFile(io.BytesIO(blob))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for m in src.infolist():
            name = m.filename
            if any(name.endswith(d) for d in drop):
                continue
            data = next((v for k, v in (replace or {}).items() if name.endswith(k)), src.read(m))
            kind = zipfile.ZIP_DEFLATED if any(name.endswith(c) for c in compress) else zipfile.ZIP_STORED
            dst.writestr(name, data, compress_type=kind)
    return out.getvalue()


class _Pid:
    def __init__(self, pid):
        self.pid = pid


class _Rebuild:
    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _RecordPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Pid) else None


def record(numel: int, offset: int, size: tuple, stride: tuple, storage_class=torch.FloatStorage, key="0",
           hooks=None) -> bytes:
    """A data.pkl as torch.save writes it for a float32 tensor, with the fields given."""
    import collections

    buf = io.BytesIO()
    args = (_Pid(("storage", storage_class, key, "cpu", numel)), offset, size, stride, False,
            collections.OrderedDict() if hooks is None else hooks)
    _RecordPickler(buf, protocol=2).dump(_Rebuild(*args))
    return buf.getvalue()


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (marker_command(self.marker),)


def refusals(tmp_path: Path) -> dict[str, tuple[bytes, dict]]:
    """Archives ``locate`` must refuse, each with the metadata it is asked about."""
    t = values(torch.float32, (3, 4))
    blob = saved(t)
    ask = {"dtype": "float32", "itemsize": 4, "sizes": (3, 4)}
    evil = pickle.dumps(_Evil(tmp_path / "pwned"), protocol=2)
    return {
        "code in data.pkl": (rezip(blob, replace={"data.pkl": evil}), ask),
        "a view past the storage": (rezip(blob, replace={"data.pkl": record(12, 1, (3, 4), (4, 1))}), ask),
        "a storage larger than its record": (rezip(blob, replace={"data.pkl": record(13, 0, (3, 4), (4, 1))}), ask),
        "a negative stride": (rezip(blob, replace={"data.pkl": record(12, 11, (3, 4), (-4, 1))}), ask),
        "hooks": (rezip(blob, replace={"data.pkl": record(12, 0, (3, 4), (4, 1), hooks={"a": 1})}), ask),
        "a missing storage": (rezip(blob, drop=("data/0",)), ask),
        "a deflated storage": (rezip(blob, compress=("data/0",)), ask),
        "big-endian": (rezip(blob, replace={"byteorder": b"big"}), ask),
        "other sizes than the metadata's": (blob, {**ask, "sizes": (4, 3)}),
        "a dtype it does not know": (blob, {**ask, "dtype": "float8_e4m3fn", "itemsize": 1}),
        "cut short": (blob[: len(blob) - 30], ask),
        "not a zip": (b"\0" * len(blob), ask),
    }


def test_a_plain_tensor_of_another_dtype_than_the_metadata_says_is_an_error():
    # DCP's own reader would convert it to the named dtype silently; fsdpck names the lie.
    t = values(torch.float32, (3, 4))
    blob = saved(t)
    for dtype, itemsize in (("int32", 4), ("float16", 2), ("float64", 8)):
        with pytest.raises(CheckpointFormatError, match=f"stored as float32, where the checkpoint's metadata says {dtype}"):
            torchsave.locate(io.BytesIO(blob), 0, len(blob), dtype=dtype, itemsize=itemsize, sizes=(3, 4))
    # The record names another storage class than the metadata's dtype (the bytes unchanged).
    relabeled = rezip(blob, replace={"data.pkl": record(12, 0, (3, 4), (4, 1), storage_class=torch.IntStorage)})
    with pytest.raises(CheckpointFormatError, match="stored as int32, where the checkpoint's metadata says float32"):
        torchsave.locate(io.BytesIO(relabeled), 0, len(relabeled), dtype="float32", itemsize=4, sizes=(3, 4))


def test_locate_refuses_anything_but_a_plain_tensor_of_the_metadata(tmp_path):
    for name, (blob, ask) in refusals(tmp_path).items():
        raw = b"x" * 10 + blob
        assert torchsave.locate(io.BytesIO(raw), 10, len(blob), **ask) is None, name
    assert not (tmp_path / "pwned").exists()
    # Each refusal is of its archive, not of the method: the untouched archive is found.
    t = values(torch.float32, (3, 4))
    assert torchsave.locate(io.BytesIO(saved(t)), 0, len(saved(t)), dtype="float32", itemsize=4, sizes=(3, 4))


@pytest.fixture(scope="module")
def grid_ckpt(tmp_path_factory) -> Path:
    gen = torch.Generator().manual_seed(11)
    tensors = {
        "w32": (torch.randn(9, 7, generator=gen), (3, 2)),
        "bf": (torch.randn(8, 6, generator=gen).bfloat16(), (2, 3)),
        "ids": (torch.arange(40, dtype=torch.int64).reshape(5, 8), (1, 2)),
        "flags": (torch.rand(10, generator=gen) > 0.5, (3,)),
        "scalar": (torch.tensor(2.5, dtype=torch.float64), ()),
    }
    return chunked_ckpt(tmp_path_factory.mktemp("direct") / "ck", tensors, extra={"epoch": 3})


def read_all(path: Path, monkeypatch, *, direct: bool, stats: bool = True):
    monkeypatch.setattr(torchsave, "DIRECT_READS", direct)
    opened = open_checkpoint(LocalStorage(path))
    return read_items(opened, list(opened.metadata.keys.values()), fingerprints=True, stats=stats)


def close_stats(a, b) -> bool:
    """Equal statistics, up to the order the pieces were merged in (threads finish in any order)."""
    import dataclasses
    import math

    if a is None or b is None:
        return a is b
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, float) and isinstance(y, float):
            if not (x == y or math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)):
                return False
        elif x != y:
            return False
    return True


def test_direct_reads_give_what_dcps_reader_gives_and_skip_it(grid_ckpt, monkeypatch):
    want = read_all(grid_ckpt, monkeypatch, direct=False)
    from torch.distributed.checkpoint import FileSystemReader

    used = []
    real = FileSystemReader.read_data
    monkeypatch.setattr(FileSystemReader, "read_data", lambda self, plan, planner: used.append(plan) or real(
        self, plan, planner))
    got = read_all(grid_ckpt, monkeypatch, direct=True)
    assert got.keys() == want.keys()
    for key in want:
        assert (got[key].fingerprint, got[key].error) == (want[key].fingerprint, want[key].error), key
        assert close_stats(got[key].stats, want[key].stats), key
    tensor_items = [i for plan in used for i in plan.items if i.type.name == "TENSOR"]
    assert not tensor_items, "every tensor chunk of a plain local checkpoint is read directly"


def test_a_chunk_locate_refuses_goes_to_dcps_reader(grid_ckpt, tmp_path, monkeypatch):
    # One chunk's archive holds code: the direct path refuses it, DCP's reader (torch.load with
    # weights_only) refuses it too, and the error names that key only; nothing runs.
    import shutil

    from tests.ckpt_factory import storage_info

    bad = tmp_path / "bad"
    shutil.copytree(grid_ckpt, bad)
    name, offset, length = storage_info(bad, "w32")
    data = bytearray((bad / name).read_bytes())
    evil = rezip(bytes(data[offset: offset + length]),
                 replace={"data.pkl": pickle.dumps(_Evil(tmp_path / "pwned"), protocol=2)})
    assert len(evil) <= length
    data[offset: offset + length] = evil + b"\0" * (length - len(evil))
    (bad / name).write_bytes(bytes(data))
    got = read_all(bad, monkeypatch, direct=True, stats=False)
    assert got["w32"].error and all(got[k].error is None for k in got if k != "w32"), got
    assert not (tmp_path / "pwned").exists()
    # The same refusal without the direct path: the outcome does not depend on it.
    assert read_all(bad, monkeypatch, direct=False, stats=False)["w32"].error


def test_offline_commands_on_a_local_checkpoint_do_not_import_torch(grid_ckpt):
    # Importing torch takes longer than reading a gigabyte cold (docs/benchmarks.md), and DCP about as
    # long again: a local checkpoint read by fsdpck itself (tensors of float32, bfloat16, int64, bool and
    # float64, and byte items) needs neither for inspect --verify-data --stats and diff; show --slice
    # copies into a tensor (torch), still without DCP.
    code = (
        CLI_IN_SCRIPT
        + "run('inspect', sys.argv[1], '--verify-data', '--stats')\n"
        "run('diff', sys.argv[1], sys.argv[1])\n"
        f"print('torch:', {TORCH_MODULES})\n"
        "run('show', sys.argv[1], 'w32', '--slice', '0:2')\n"
        "print('dcp:', sorted(m for m in sys.modules if m.startswith('torch.distributed.checkpoint')))\n"
    )
    out = fresh_python(code, str(grid_ckpt))
    lines = out.splitlines()
    assert "torch: []" in lines and "dcp: []" in lines, out[-2000:]


RANKS_MODULES = ("fsdpck.cli.verify", "fsdpck.cli.saveload", "fsdpck.cli.ranks", "fsdpck.runtime.runner",
                 "fsdpck.state.registry")


@pytest.mark.parametrize("command", ["inspect", "diff"])
def test_an_offline_command_reads_first_and_imports_its_report_meanwhile(grid_ckpt, command):
    # What runs before the first read adds to every offline command's time (docs/benchmarks.md): the
    # modules of the commands that run on ranks are not loaded at all, and rich and the report's tables
    # are imported on the warm-up thread, never on the command's own thread (a finder on sys.meta_path
    # sees which thread asks for each module).
    code = (
        "import sys, threading\n"
        "asked = []\n"
        "class Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        asked.append((name, threading.current_thread().name))\n"
        "sys.meta_path.insert(0, Spy())\n"
        "import fsdpck.commands.offline as offline\n"
        "real = offline.read_pieces\n"
        "at_read = []\n"
        "def spy(*a, **k):\n"
        "    at_read.append(sorted(m for m in " + repr(RANKS_MODULES) + " if m in sys.modules))\n"
        "    return real(*a, **k)\n"
        "offline.read_pieces = spy\n"
        + CLI_IN_SCRIPT
        + "run(*sys.argv[1:])\n"
        "print('at read:', at_read)\n"
        "print('rich:', sorted({t for n, t in asked if n == 'rich' or n.startswith(('rich.', 'fsdpck.report'))}))\n"
    )
    args = ["inspect", str(grid_ckpt), "--verify-data"] if command == "inspect" else ["diff", str(grid_ckpt), str(grid_ckpt)]
    lines = fresh_python(code, *args).splitlines()
    reads = 2 if command == "diff" else 1
    assert lines[-2] == f"at read: {[[]] * reads}", lines
    assert lines[-1] == "rich: ['fsdpck-warm-up']", lines


def test_warm_up_gives_what_load_gives_and_raises_what_it_raises():
    from fsdpck.cli.options import warm_up

    where = []
    ready = warm_up(lambda: where.append(threading.current_thread().name) or "loaded")
    assert ready() == "loaded" and where[0] == "fsdpck-warm-up"

    def broken():
        raise ImportError("no module named 'rich'")

    with pytest.raises(ImportError, match="no module named 'rich'"):
        warm_up(broken)()


# Archives crafted entry by entry: what Python's zipfile and torch's reader read differently.
_LH = struct.Struct("<4sHHHHHIIIHH")
_CD = struct.Struct("<4sHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<4sHHHHIIH")


def build_zip(entries: list[tuple[bytes, bytes]], *, directory: list[int] | None = None, cd_offset_shift: int = 0,
              comment: bytes = b"", offsets: dict[int, int] | None = None) -> bytes:
    """A stored zip of (name, data) entries; ``directory`` lists the entries the central directory
    names (repeats allowed), ``offsets`` overrides an entry's local-header offset there."""
    out, where = bytearray(), []
    for name, data in entries:
        where.append(len(out))
        out += _LH.pack(b"PK\x03\x04", 20, 0, 0, 0, 0, zlib.crc32(data), len(data), len(data), len(name), 0)
        out += name + data
    start = len(out)
    listed = directory if directory is not None else list(range(len(entries)))
    for i in listed:
        name, data = entries[i]
        at = (offsets or {}).get(i, where[i])
        out += _CD.pack(b"PK\x01\x02", 20, 20, 0, 0, 0, 0, zlib.crc32(data), len(data), len(data), len(name), 0, 0,
                        0, 0, 0, at)
        out += name
    size = len(out) - start
    out += _EOCD.pack(b"PK\x05\x06", 0, 0, len(listed), len(listed), size, start + cd_offset_shift, len(comment))
    return bytes(out + comment)


def entries_of(t: torch.Tensor) -> list[tuple[bytes, bytes]]:
    archive = zipfile.ZipFile(io.BytesIO(saved(t)))
    return [(m.filename.encode(), archive.read(m)) for m in archive.infolist()]


def found_bits(blob: bytes, t: torch.Tensor) -> torch.Tensor | None:
    got = torchsave.locate(io.BytesIO(blob), 0, len(blob), dtype=dtype_name(t), itemsize=t.element_size(),
                           sizes=tuple(t.shape))
    return None if got is None else rebuilt(blob, 0, got, t.dtype)


def test_a_plainly_built_archive_is_found():
    # The crafted refusals below each differ from this one in one thing.
    t = values(torch.float32, (2, 4))
    assert same_bits(found_bits(build_zip(entries_of(t)), t), t)
    assert same_bits(found_bits(rezip(saved(t)), t), t)  # and what the refusals above are made from


def test_locate_refuses_archives_two_readers_would_read_differently():
    t = values(torch.float32, (2, 4))
    other = torch.full((2, 4), 1000.0)
    good, bad = entries_of(t), entries_of(other)
    data = next(i for i, (n, _) in enumerate(good) if n.endswith(b"data/0"))
    order = next(i for i, (n, _) in enumerate(good) if n.endswith(b"byteorder"))
    # A NUL in a name: zipfile cuts the name there, torch does not (the real member holds 1000s).
    nul = [*bad, (good[data][0] + b"\x00decoy", good[data][1])]
    # The same name twice.
    twice = [*good, (good[data][0], bad[data][1])]
    # Two central directories: the end record points at one, zipfile would read the other.
    blob_good = build_zip(good)
    cases = {
        "a NUL in a name": build_zip(nul),
        "a name twice": build_zip(twice),
        "a directory entry listed twice": build_zip(good, directory=[*range(len(good)), data]),
        "the directory elsewhere than the end record says": build_zip(good, cd_offset_shift=-10),
        "a directory offset past the directory": build_zip(good, cd_offset_shift=+7),
        "a comment": build_zip(good, comment=b"x"),
        "a member's header offset elsewhere": build_zip(good, offsets={data: 0}),
        "byteorder 'little\\n'": build_zip([(n, b"little\n" if i == order else d) for i, (n, d) in enumerate(good)]),
        "no version record": build_zip([e for e in good if not e[0].endswith(b"/version")]),
        "a member outside the top dir": build_zip([*good, (b"other/x", b"1")]),
        "too many members": build_zip([*good, *[(b"archive/pad%d" % i, b"") for i in range(torchsave.MAX_MEMBERS)]]),
        "cut before its end record": blob_good[:-1],
    }
    for name, blob in cases.items():
        assert found_bits(blob, t) is None, name
    assert same_bits(found_bits(blob_good, t), t)


def test_a_pickle_cannot_forge_or_change_the_records():
    t = values(torch.float32, (2, 4))
    entries = entries_of(t)
    pkl = next(i for i, (n, _) in enumerate(entries) if n.endswith(b"data.pkl"))
    real = entries[pkl][1]

    def with_record(record: bytes) -> bytes:
        return build_zip([(n, record if i == pkl else d) for i, (n, d) in enumerate(entries)])

    # The tuples fsdpck's records hold, pickled plainly (no global at all): not a record.
    forged = pickle.dumps(("tensor", (("storage", "0", 8), 0, (2, 4), (4, 1), False, ("hooks", ()))), protocol=2)
    assert found_bits(with_record(forged), t) is None
    # BUILD aimed at the record the rebuild made: refused by the record itself, before any check.
    build = real[:-1] + b"N}X\x04\x00\x00\x00args)s\x86b."
    with pytest.raises(torchsave._Refused):
        torchsave._TensorRecordUnpickler(io.BytesIO(build), "FloatStorage").load()
    assert found_bits(with_record(build), t) is None
    record = torchsave._Tensor((1, 2))
    with pytest.raises(torchsave._Refused):
        record.args = ()
    assert same_bits(found_bits(with_record(real), t), t)


def test_stored_digest_costs_what_the_bytes_are():
    # Thousands of directory entries naming one member: hashing them all would be quadratic.
    from fsdpck.checkpoint.reader import stored_digest

    entries = [(b"archive/data.pkl", b"x" * (1 << 16)), (b"archive/version", b"3")]
    blob = build_zip(entries, directory=[0] * 4000 + [1])
    t0 = time.perf_counter()
    digest = stored_digest(blob)
    assert time.perf_counter() - t0 < 1.0
    assert digest == hashlib.blake2b(blob, digest_size=8).hexdigest()  # not an archive fsdpck reads: hashed whole
    plain = build_zip(entries)
    assert stored_digest(plain) != hashlib.blake2b(plain, digest_size=8).hexdigest()  # a real one: by records


def test_locate_reads_only_small_records_whatever_the_directory_claims():
    # A byteorder record of 8 MiB: refused from its size, never read in full.
    t = values(torch.float32, (2, 4))
    entries = [(n, b"little" * (1 << 20) + b"ab" if n.endswith(b"byteorder") else d) for n, d in entries_of(t)]
    blob = build_zip(entries)
    stream_ = Recording(blob)
    assert torchsave.locate(stream_, 0, len(blob), dtype="float32", itemsize=4, sizes=(2, 4)) is None
    assert max(b - a for a, b in stream_.ranges) <= 1 << 16


def _archive_of(pkl: bytes) -> bytes:
    """A torch.save-like archive (stored members under one dir) around the given data.pkl."""
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/version", b"3\n")
    return out.getvalue()


PLAIN_VALUES = [{"lr": 0.001, "betas": (0.9, 0.999), "params": ["a", "b"], "amsgrad": False, "foreach": None},
                3.5, -7, 2**80, "text", [1, [2, [3.0]]], (), {"nested": {"k": [float("nan"), float("inf")]}}, True]


@pytest.mark.parametrize("value", PLAIN_VALUES, ids=range(len(PLAIN_VALUES)))
def test_plain_byte_items_decode_without_torch_to_what_torch_load_gives(value):
    from fsdpck.state.canonical import canonical

    buf = io.BytesIO()
    torch.save(value, buf)
    want = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    with mock.patch.object(torch, "load", side_effect=AssertionError("torch.load was used")):
        got = torchsave.decode_byte_item(buf.getvalue(), source="s")
    assert canonical(got) == canonical(want) and type(got) is type(want)


@pytest.mark.parametrize("value", [torch.tensor([1.0, 2.0]), {1, 2}, b"raw", collections.OrderedDict(a=1),
                                   {"t": torch.zeros(2)}], ids=["tensor", "set", "bytes", "ordered", "dict-tensor"])
def test_byte_items_that_are_not_plain_data_go_to_torch_load(value):
    from fsdpck.state.canonical import canonical

    buf = io.BytesIO()
    torch.save(value, buf)
    assert torchsave._plain_value(buf.getvalue()) == (False, None)
    got = torchsave.decode_byte_item(buf.getvalue(), source="s")
    assert canonical(got) == canonical(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))


def test_a_crafted_plain_looking_archive_is_decoded_only_as_torch_would():
    plain = pickle.dumps({"lr": 0.5}, protocol=2)
    assert torchsave._plain_value(_archive_of(plain)) == (True, {"lr": 0.5})
    # A global anywhere (here os.system): torch.load decides, and refuses it; nothing runs.
    evil = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85q\x01Rq\x02."
    assert torchsave._plain_value(_archive_of(evil)) == (False, None)
    with pytest.raises(CheckpointFormatError, match="without running code"):
        torchsave.decode_byte_item(_archive_of(evil), source="s")
    # Opcodes torch's weights_only unpickler handles differently (or not at all) are its to decode.
    for pkl in (pickle.dumps(b"ab"[:0].decode(), protocol=4), b"\x80\x02U\x02abq\x00.", b"\x80\x02]q\x00."[:-1]):
        assert torchsave._plain_value(_archive_of(pkl))[0] is False
    # No byte order, or a pickle larger than a record: not vouched for.
    assert torchsave._plain_value(_archive_of(plain).replace(b"little", b"big\0\0\0"))[0] is False


def test_a_chunk_that_fails_after_some_of_its_slices_is_an_error_not_read_twice(grid_ckpt, monkeypatch):
    # Slices of one row each; the third read of w32's rows fails. Its first rows were handed over
    # already: reading the chunk again would count them twice, so the key is an error instead.
    monkeypatch.setattr(stream, "SLICE_BYTES", 1)
    real_read_into, calls = stream._read_into, {"w32": 0}

    def flaky(stream_, start, buffer, nbytes, what):
        if "(w32)" in what:
            calls["w32"] += 1
            if calls["w32"] == 3:
                raise OSError(5, "Input/output error")
        return real_read_into(stream_, start, buffer, nbytes, what)

    monkeypatch.setattr(stream, "_read_into", flaky)
    opened = open_checkpoint(LocalStorage(grid_ckpt))
    got = read_items(opened, list(opened.metadata.keys.values()), threads=1)
    assert got["w32"].error is not None and "Input/output error" in got["w32"].error
    assert got["w32"].fingerprint is None
    assert all(got[k].error is None for k in ("bf", "ids", "flags", "scalar", "epoch"))
    # A failure on a chunk's first slice hands nothing over: that chunk is read again and succeeds.
    calls["w32"] = 0
    monkeypatch.setattr(stream, "SLICE_BYTES", 1 << 20)
    fresh = read_items(opened, [opened.metadata.keys["w32"]], threads=1)
    assert fresh["w32"].error is None and calls["w32"] >= 2
    monkeypatch.setattr(stream, "_read_into", real_read_into)
    assert fresh["w32"].fingerprint == read_items(opened, [opened.metadata.keys["w32"]])["w32"].fingerprint
