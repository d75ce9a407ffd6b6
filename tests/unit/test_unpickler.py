"""fsdpck.checkpoint.unpickler: DCP's .metadata is read with a restricted unpickler that runs nothing.

Real .metadata files name only admitted globals and load to the same Metadata as with the
plain unpickler; crafted ones are refused by name and their payload never runs (while the
plain unpickler does run it, so the check could fail); garbage is a format error. The same
checks on torchrun-made FSDP2 metadata are in tests/integration/test_offline_real.py.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path, PurePosixPath

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt_factory as cf
from conftest import fresh_python
from fsdpck.checkpoint import unpickler
from fsdpck.errors import CheckpointFormatError

DCP_MD = "torch.distributed.checkpoint.metadata"
DCP_FS = "torch.distributed.checkpoint.filesystem"


def pristine(name: str) -> Path:
    return {"plain": cf.plain_ckpt, "torch_save_to_dcp": cf.torch_save_ckpt}[name]()


def load_bytes(data: bytes, source: str = "test/.metadata"):
    return unpickler.load_metadata(io.BytesIO(data), size=len(data), source=source)


@pytest.mark.parametrize("name", ["plain", "torch_save_to_dcp"])
def test_real_metadata_names_only_admitted_globals_and_loads_the_same(name):
    path = pristine(name) / ".metadata"
    with open(path, "rb") as f:
        rec = cf.Recorder(f)
        plain = rec.load()
    assert (DCP_MD, "Metadata") in rec.seen
    for module, qualname in rec.seen:
        assert unpickler.resolve(module, qualname) is not None, f"{module}.{qualname} is not admitted"
    safe = cf.load_metadata_file(path)
    assert type(safe) is type(plain)  # the real class, not the sealed stand-in
    assert safe.state_dict_metadata == plain.state_dict_metadata
    assert safe.storage_data == plain.storage_data
    assert safe.version == plain.version == "1.0.0"


def test_admitted_names_resolve_and_nothing_else_does():
    assert (DCP_FS, "_StorageInfo") in unpickler.ADMITTED
    for module, name in unpickler.ADMITTED:
        assert unpickler.resolve(module, name) is not None, (module, name)
    assert unpickler.resolve("torch", "float32") is torch.float32
    assert unpickler.resolve("torch", "bfloat16") is torch.bfloat16
    assert unpickler.resolve("torch", "strided") is torch.strided
    assert unpickler.resolve("torch", "contiguous_format") is torch.contiguous_format
    assert unpickler.resolve("torch", "Size") is torch.Size
    for module, name in [("torch", "load"), ("torch", "Tensor"), ("torch", "nn"), ("builtins", "eval"),
                         ("builtins", "getattr"), ("os", "system"), ("posix", "system"), ("torch.serialization", "load"),
                         ("pathlib", "Path"), (DCP_MD, "Metadata.__init__"), ("torch", "float32.__class__"),
                         ("collections", "namedtuple"), (DCP_FS, "FileSystemReader"), ("torch", "Size.__new__")]:
        assert unpickler.resolve(module, name) is None, f"{module}.{name} must be refused"


def test_admitted_classes_build_real_instances_and_cannot_be_changed():
    from torch.distributed.checkpoint.metadata import Metadata

    stand_in = unpickler.resolve(DCP_MD, "Metadata")
    empty = stand_in.__new__(stand_in)  # NEWOBJ: what a pickle makes before BUILD fills it in
    assert type(empty) is Metadata
    made = stand_in(state_dict_metadata={})  # REDUCE: the real constructor
    assert type(made) is Metadata and made.state_dict_metadata == {}
    with pytest.raises(pickle.UnpicklingError, match="refused to set"):
        stand_in.__reduce_ex__ = print
    with pytest.raises(pickle.UnpicklingError, match="refused to delete"):
        del stand_in.__new__
    assert Metadata.__reduce_ex__ is not print


def test_paths_and_layouts_come_back_as_harmless_values():
    path_of = unpickler.resolve("pathlib", "PosixPath")
    value = path_of("/ckpt/step-1")
    assert type(value) is PurePosixPath and value == PurePosixPath("/ckpt/step-1")  # no file system access
    with pytest.raises(pickle.UnpicklingError):
        path_of._fn = os.system
    layout_of = unpickler.resolve("torch.serialization", "_get_layout")
    assert layout_of("torch.strided") is torch.strided
    for bad in ("os.system", "torch.float32", "torch.load", 3):
        with pytest.raises(pickle.UnpicklingError):
            layout_of(bad)


CRAFTED = ["os.system", "builtins.exec", "builtins.eval", "subprocess.Popen", "nested in real Metadata",
           "GLOBAL opcode", "dotted name"]


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_metadata_never_runs_and_names_the_class(tmp_path, case):
    marker = tmp_path / "marker"
    (tmp_path / ".metadata").write_bytes(cf.payloads(marker)[case])
    with pytest.raises(CheckpointFormatError) as info:
        cf.load_metadata_file(tmp_path / ".metadata")
    expected = {"os.system": "posix.system", "builtins.exec": "builtins.exec", "builtins.eval": "builtins.eval",
                "subprocess.Popen": "subprocess.Popen", "nested in real Metadata": "builtins.exec",
                "GLOBAL opcode": "builtins.exec",
                "dotted name": f"{DCP_MD}.Metadata.__init__.__globals__"}[case]
    assert f"refused to unpickle {expected}" in info.value.message
    assert "nothing in it was executed" in info.value.message
    assert str(tmp_path / ".metadata") in info.value.message
    assert info.value.exit_code == 1
    assert not marker.exists()


def test_the_planted_payload_is_live_with_the_plain_unpickler(tmp_path):
    """The check above could fail: DCP's own reader (plain pickle.load) does run the payload."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "marker"
    (tmp_path / ".metadata").write_bytes(cf.payloads(marker)["os.system"])
    try:
        dcp.FileSystemReader(str(tmp_path)).read_metadata()
    except Exception:
        pass  # os.system returns an int, which is not Metadata; the payload has run by then
    assert marker.read_text() == "pwned"


def test_build_aimed_at_an_admitted_class_is_refused():
    """GLOBAL Metadata, then BUILD with slot state: an attempt to set an attribute on the class itself."""
    from torch.distributed.checkpoint.metadata import Metadata

    data = (b"\x80\x02c" + DCP_MD.encode() + b"\nMetadata\n" + b"N}X\x0c\x00\x00\x00fsdpck_pwned" + b"K\x01s\x86b.")
    with pytest.raises(CheckpointFormatError, match="not a readable DCP metadata pickle"):
        load_bytes(data)
    assert not hasattr(Metadata, "fsdpck_pwned")
    assert "fsdpck_pwned" not in pickle.loads(pickle.dumps(Metadata(state_dict_metadata={}))).__dict__


def test_a_length_claiming_more_than_the_file_is_refused_without_reading_on():
    """BINBYTES8 claiming 2**40 bytes in a file of a few: an error, never a read past the file."""
    data = b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"abc."
    with pytest.raises(CheckpointFormatError, match="not a readable DCP metadata pickle"):
        load_bytes(data)
    stream = io.BytesIO(b"0123456789")  # the size given bounds what is read, whatever the stream holds
    with pytest.raises(CheckpointFormatError):
        unpickler.load_metadata(stream, size=4, source="s")
    assert stream.tell() <= 4


@pytest.mark.parametrize("content, words", [
    (b"", "empty file"),
    (b"this is not a pickle at all", "not a readable DCP metadata pickle"),
    (pickle.dumps({"a": 1}), "holds a dict, not DCP Metadata"),
    (pickle.dumps([torch.Size([2, 3])]), "holds a list, not DCP Metadata"),
    (b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01Q.", "not a readable DCP metadata pickle"),  # cut frame
    (b"\x80\x02X\x07\x00\x00\x00storageQ.", "refused a persistent id"),  # what torch.save uses for tensors
    (b"(" * 100_000 + b".", "not a readable DCP metadata pickle"),  # marks nested deeper than any metadata
])
def test_garbage_metadata_is_a_format_error(tmp_path, content, words):
    (tmp_path / ".metadata").write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=words):
        cf.load_metadata_file(tmp_path / ".metadata")


def test_truncated_metadata_is_a_format_error(tmp_path):
    data = (cf.plain_ckpt() / ".metadata").read_bytes()
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(CheckpointFormatError, match="not a readable DCP metadata pickle"):
            load_bytes(data[:cut])
    assert load_bytes(data).version == "1.0.0"  # the whole file is fine: the cut is what failed


# --- property: any damage to a real pickle is refused cleanly, and nothing global changes --------------


def _class_state() -> dict[str, dict]:
    """Every admitted class (the real one and its stand-in) with its attributes: what a pickle must not change."""
    out = {}
    for (module, name), origin in unpickler.ADMITTED.items():
        obj = unpickler.resolve(module, name)
        targets = [obj]
        if origin == "dcp class":
            targets.append(obj.__mro__[1])  # the real DCP class behind the stand-in
        for target in targets:
            attrs = getattr(target, "__dict__", None)
            out[f"{module}.{name}:{id(target)}"] = dict(attrs) if attrs is not None else {"slots": repr(target)}
    return out


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_damage_to_a_metadata_pickle_is_refused_cleanly(data):
    raw = (cf.plain_ckpt() / ".metadata").read_bytes()
    before = _class_state()
    blob = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 6))):
        how = data.draw(st.sampled_from(["flip", "cut", "insert", "opcode"]))
        at = data.draw(st.integers(0, max(0, len(blob) - 1)))
        if how == "flip":
            blob[at] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "cut":
            del blob[at: at + data.draw(st.integers(1, 64))]
        elif how == "insert":
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        else:  # a BUILD, a global, a memo get or a stack op dropped in anywhere
            blob[at:at] = data.draw(st.sampled_from([b"b", b"c__builtin__\nsetattr\n", b"h\x00", b"0", b"(", b"R",
                                                     b"\x93", b"\x81", b"s", b"u"]))
    try:
        md = load_bytes(bytes(blob))
    except CheckpointFormatError as e:
        assert e.message.startswith("test/.metadata: ")
    else:
        from torch.distributed.checkpoint.metadata import Metadata

        assert isinstance(md, Metadata)
    assert _class_state() == before


# --- light mode: the same names, fsdpck's own sealed records instead of DCP's classes --------------


def load_light(data: bytes, source: str = "test/.metadata"):
    return unpickler.load_metadata(io.BytesIO(data), size=len(data), source=source, light=True)


@pytest.mark.parametrize("name", ["plain", "torch_save_to_dcp"])
def test_light_records_parse_to_the_same_metadata(name):
    from fsdpck.checkpoint.metadata import parse_metadata

    data = (pristine(name) / ".metadata").read_bytes()
    records = load_light(data)
    assert type(records) is unpickler.record_class("Metadata")
    assert parse_metadata(records, source="s", light=True) == parse_metadata(load_bytes(data), source="s")
    # Fields a pickle leaves out read as DCP's defaults (a byte item's MetadataIndex has no offset).
    index = next(i for i in records.storage_data if i.fqn == {"plain": "step", "torch_save_to_dcp": "epoch"}[name])
    assert index.offset is None and "offset" not in index.__dict__


def test_light_mode_imports_nothing_of_dcp():
    code = ("import io, sys\nfrom fsdpck.checkpoint import unpickler\nfrom fsdpck.checkpoint.metadata import "
            f"parse_metadata\ndata = open({str(cf.plain_ckpt() / '.metadata')!r}, 'rb').read()\n"
            "md = parse_metadata(unpickler.load_metadata(io.BytesIO(data), size=len(data), source='s', light=True), "
            "source='s', light=True)\nassert 'nested.vol' in md.keys\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch.distributed.checkpoint')))")
    out = fresh_python(code)
    assert out.strip() == "[]", out


def test_records_are_sealed_and_take_no_arguments():
    Metadata = unpickler.record_class("Metadata")
    assert unpickler.resolve(DCP_MD, "Metadata", True) is Metadata
    with pytest.raises(pickle.UnpicklingError, match="refused to set"):
        Metadata.__setstate__ = print
    with pytest.raises(pickle.UnpicklingError, match="with arguments"):
        Metadata(state_dict_metadata={})
    record = Metadata.__new__(Metadata)
    with pytest.raises(pickle.UnpicklingError, match="not fields"):
        record.__setstate__({1: 2})
    with pytest.raises(pickle.UnpicklingError, match="not 5 fields"):
        unpickler.record_class("TensorProperties").__new__(unpickler.record_class("TensorProperties")).__setstate__({})
    with pytest.raises(TypeError):
        pickle.dumps(record)
    index = unpickler.record_class("MetadataIndex")
    a, b = index.__new__(index), index.__new__(index)
    a.__setstate__({"fqn": "w", "offset": torch.Size([0]), "index": 1})
    b.__setstate__({"fqn": "w", "offset": torch.Size([0]), "index": 7})
    assert a == b and hash(a) == hash(b) and len({a: 1, b: 2}) == 1  # as DCP's frozen dataclass: index ignored
    with pytest.raises(pickle.UnpicklingError):
        unpickler.resolve(DCP_MD, "_MEM_FORMAT_ENCODING", True)(7)


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_metadata_never_runs_in_light_mode(tmp_path, case):
    marker = tmp_path / "marker"
    with pytest.raises(CheckpointFormatError, match="nothing in it was executed|not a readable"):
        load_light(cf.payloads(marker)[case])
    assert not marker.exists()


def test_build_aimed_at_a_record_class_is_refused():
    Metadata = unpickler.record_class("Metadata")
    data = (b"\x80\x02c" + DCP_MD.encode() + b"\nMetadata\n" + b"N}X\x0c\x00\x00\x00fsdpck_pwned" + b"K\x01s\x86b.")
    with pytest.raises(CheckpointFormatError, match="not a readable DCP metadata pickle"):
        load_light(data)
    assert "fsdpck_pwned" not in Metadata.__dict__


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_damage_is_refused_cleanly_in_light_mode(data):
    raw = bytearray((cf.plain_ckpt() / ".metadata").read_bytes())
    records = {n: dict(unpickler.record_class(n).__dict__) for n in ("Metadata", "MetadataIndex", "TensorProperties")}
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if data.draw(st.booleans()):
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        else:
            raw[at:at] = data.draw(st.sampled_from([b"b", b"c__builtin__\nsetattr\n", b"h\x00", b"0", b"R", b"\x81"]))
    try:
        md = load_light(bytes(raw))
    except CheckpointFormatError as e:
        assert e.message.startswith("test/.metadata: ")
    else:
        assert type(md) is unpickler.record_class("Metadata")
    assert records == {n: dict(unpickler.record_class(n).__dict__) for n in records}


def test_the_dtype_table_is_torchs():
    from fsdpck.checkpoint.dtypes import ITEMSIZE, LAYOUTS, MEMORY_FORMATS

    # Every dtype, layout and memory format of this torch, with its element size (an older torch has
    # fewer; a newer one's new dtype would fail here, and is meanwhile asked of torch at run time).
    dtypes = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
    assert {n: d.itemsize for n, d in dtypes.items()} == {n: ITEMSIZE.get(n) for n in dtypes}
    assert {n for n, v in vars(torch).items() if isinstance(v, torch.layout)} <= LAYOUTS
    assert {n for n, v in vars(torch).items() if isinstance(v, torch.memory_format)} <= MEMORY_FORMATS


def test_light_mode_names_torch_objects_without_torch_and_seals_them(monkeypatch):
    from fsdpck.checkpoint import dtypes

    f32 = unpickler.resolve("torch", "bfloat16", True)
    assert (f32.kind, f32.name, f32.itemsize) == ("dtype", "bfloat16", 2) and repr(f32) == "torch.bfloat16"
    assert unpickler.resolve("torch", "strided", True).kind == "layout"
    assert unpickler.resolve("torch", "channels_last", True).kind == "memory_format"
    with pytest.raises(pickle.UnpicklingError, match="refused to set"):
        f32.itemsize = 8
    assert unpickler.resolve("torch", "load", True) is None  # not a dtype, layout or memory format
    assert unpickler.resolve("torch", "float", True).name == "float32"  # an alias, by its dtype's own name
    # A dtype the table does not know (a newer torch's) is asked of torch.
    unpickler.resolve.cache_clear()
    monkeypatch.setattr(unpickler, "ITEMSIZE", {k: v for k, v in dtypes.ITEMSIZE.items() if k != "float8_e5m2"})
    try:
        assert unpickler.resolve("torch", "float8_e5m2", True).itemsize == 1
    finally:
        unpickler.resolve.cache_clear()
    size = unpickler.resolve("torch", "Size", True)
    assert size((2, 3)) == (2, 3) and type(size([4])) is tuple
    with pytest.raises(pickle.UnpicklingError, match="torch.Size of a str"):
        size("abc")
    layout = unpickler.resolve("torch.serialization", "_get_layout", True)
    assert layout("torch.strided").name == "strided"
    with pytest.raises(pickle.UnpicklingError, match="not the name of a torch.layout"):
        layout("torch.float32")


def test_light_mode_refuses_a_dtype_that_is_a_layout():
    from fsdpck.checkpoint.metadata import parse_metadata

    data = (pristine("plain") / ".metadata").read_bytes()
    records = load_light(data)
    key = next(k for k, v in records.state_dict_metadata.items() if hasattr(v, "properties"))
    records.state_dict_metadata[key].properties.__dict__["dtype"] = unpickler.resolve("torch", "strided", True)
    with pytest.raises(CheckpointFormatError, match="is not a torch.dtype"):
        parse_metadata(records, source="s", light=True)


@pytest.mark.parametrize("light", [False, True])
def test_a_global_naming_a_lazy_torch_submodule_imports_nothing(light):
    # torch imports some submodules on first attribute access (torch._dynamo, torch.onnx, ...): a
    # .metadata naming one is refused by name without that import.
    code = ("import sys, torch\nfrom fsdpck.checkpoint import unpickler\n"
            f"assert unpickler.resolve('torch', 'onnx', {light}) is None\n"
            f"assert unpickler.resolve('torch', '_dynamo', {light}) is None\n"
            "print('torch.onnx' in sys.modules, 'torch._dynamo' in sys.modules)")
    out = fresh_python(code)
    assert out.strip() == "False False", out


def test_light_mode_refuses_an_unknown_torch_name_without_importing_torch():
    # Only a name shaped like a dtype's (a newer torch's float8_*, uint3, ...) is asked of torch; a
    # hostile .metadata naming torch.onnx, torch.save or torch.load costs no `import torch`.
    from fsdpck.checkpoint import dtypes

    code = ("import sys\nfrom fsdpck.checkpoint import unpickler\n"
            "for name in ('onnx', '_dynamo', 'save', 'load', 'Tensor', 'nn', 'floating', '__import__'):\n"
            "    assert unpickler.resolve('torch', name, True) is None, name\n"
            "assert unpickler.resolve('torch', 'float32', True).itemsize == 4\n"
            "assert unpickler.resolve('torch', 'double', True).name == 'float64'\n"
            "print('torch' in sys.modules)")
    out = fresh_python(code)
    assert out.strip() == "False", out
    aliases = {n: str(v).removeprefix("torch.") for n, v in vars(torch).items()
               if isinstance(v, torch.dtype) and str(v) != f"torch.{n}"}
    assert aliases == dtypes.ALIASES  # torch.float and the like are named without torch too
    canonical = [n for n, v in vars(torch).items() if isinstance(v, torch.dtype) and str(v) == f"torch.{n}"]
    assert "float8_e4m3fn" in canonical
    assert all(unpickler._DTYPE_NAME.fullmatch(n) for n in canonical if n != "bool"), canonical
