"""safetensors headers: read as ``json.loads`` would read them, refused where the format has no such
thing, and never built whole (``fsdpck.checkpoint.safetensors.read_entries`` over
``fsdpck.checkpoint.jsonscan``)."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fsdpck.checkpoint import integrity, safetensors
from fsdpck.checkpoint.metadata import MAX_INT
from fsdpck.checkpoint.storage import LocalStorage
from fsdpck.errors import CheckpointFormatError


def framed(text: str | bytes, *, tail: int = 0) -> tuple[io.BytesIO, int]:
    body = text.encode() if isinstance(text, str) else text
    data = struct.pack("<Q", len(body)) + body + b"\0" * tail
    return io.BytesIO(data), len(data)


def entries(text: str | bytes, *, tail: int = 0):
    stream, size = framed(text, tail=tail)
    return safetensors.read_entries(stream, size=size, source="f.safetensors")


def reference(text: str) -> list[safetensors.Entry]:
    """What the header says, read with json.loads (trusting it): the answer read_entries must give."""
    header = json.loads(text)
    meta = header.pop("__metadata__", None) or {}
    sharding = json.loads(meta[safetensors.SHARDING_KEY]) if safetensors.SHARDING_KEY in meta else {}
    out = []
    for key, e in header.items():
        offsets = sharding.get(key, {}).get("saved_offsets", [0] * len(e["shape"]))
        out.append(safetensors.Entry(key, safetensors.DTYPES[e["dtype"]], tuple(e["shape"]), tuple(offsets),
                                     *e["data_offsets"]))
    return out


names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
dims = st.lists(st.integers(0, MAX_INT), max_size=5)


@st.composite
def headers(draw) -> str:
    keys = draw(st.lists(names.filter(lambda k: k != "__metadata__"), max_size=6, unique=True))
    header, sharding = {}, {}
    for key in keys:
        shape = draw(dims)
        begin = draw(st.integers(0, MAX_INT))
        entry = {"dtype": draw(st.sampled_from(sorted(safetensors.DTYPES))), "shape": shape,
                 "data_offsets": [begin, draw(st.integers(begin, MAX_INT))]}
        if draw(st.booleans()):
            entry["note"] = draw(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False,
                                                                                             allow_infinity=False), names))
        items = list(entry.items())
        header[key] = dict(draw(st.permutations(items)))
        if draw(st.booleans()):
            sharding[key] = {"saved_offsets": draw(st.lists(st.integers(0, MAX_INT), min_size=len(shape),
                                                            max_size=len(shape)))}
    meta = {"format": "pt"}
    if sharding or draw(st.booleans()):
        meta[safetensors.SHARDING_KEY] = json.dumps(sharding, indent=draw(st.sampled_from([None, 1])))
    if draw(st.booleans()):
        header["__metadata__"] = meta
    items = list(header.items())
    return json.dumps(dict(draw(st.permutations(items))), indent=draw(st.sampled_from([None, 0, 2])),
                      ensure_ascii=draw(st.booleans()))


@settings(max_examples=300, deadline=None)
@given(headers())
def test_a_valid_header_reads_as_json_loads_reads_it(text):
    got, start = entries(text)
    assert got == reference(text)
    assert start == 8 + len(text.encode())


@pytest.mark.parametrize("text, words", [
    ("[]", "the header is not a JSON object"),
    ('{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 0]}} x', "more after its JSON value"),
    ('{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 0]}, "a": {}}', "the key 'a' twice"),
    ('{"a": {"dtype": "F32", "dtype": "F16", "shape": [], "data_offsets": [0, 0]}}', "the key 'dtype' twice"),
    ('{"a": {"dtype": "F31", "shape": [], "data_offsets": [0, 0]}}', "not a safetensors dtype"),
    ('{"a": {"dtype": "F32", "data_offsets": [0, 0]}}', "has no shape"),
    ('{"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}', "not a list of at most 64"),
    ('{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', "not a list of at most 64"),
    ('{"a": {"dtype": "F32", "shape": [01], "data_offsets": [0, 4]}}', "not a list of at most 64"),
    ('{"a": {"dtype": "F32", "shape": [1e2], "data_offsets": [0, 4]}}', "not a list of at most 64"),
    ('{"a": {"dtype": "F32", "shape": [12345678901234567890], "data_offsets": [0, 4]}}', "not a list of at most 64"),
    ('{"a": {"dtype": "F32", "shape": [9223372036854775807], "data_offsets": [0, 4]}}', "beyond"),
    ('{"a": {"dtype": "F32", "shape": [' + ",".join(["1"] * 65) + '], "data_offsets": [0, 4]}}', "at most 64"),
    ('{"a": {"dtype": "F32", "shape": [1,], "data_offsets": [0, 4]}}', "not a list of at most 64"),
    ('{"a": {"dtype": "F32", "shape": [], "data_offsets": [4, 0]}}', "not a [begin, end] byte range"),
    ('{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4, 8]}}', "not a [begin, end] byte range"),
    ('{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 0], "x": NaN}}', "NaN is not JSON"),
    ('{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 0], "x": [1]}}', "is a JSON list"),
    ('{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 0], "x": {}}}', "is a JSON object"),
    ('{"a": [1, 2]}', "tensor 'a' is not a JSON object"),
    ('{"__metadata__": {"format": 1}}', "is not a string"),
    ('{"__metadata__": {"junk": [{}, {}]}}', "is not a string"),
    ('{"__metadata__": []}', "__metadata__ is not a JSON object"),
    ('{"__metadata__": {"DCP_SHARDING_INFO": "{\\"a\\": {}}"}}', "has no saved_offsets"),
    ('{"__metadata__": {"DCP_SHARDING_INFO": "{\\"a\\": "}}', "DCP_SHARDING_INFO"),
    ('{"__metadata__": {"DCP_SHARDING_INFO": "{\\"a\\": {\\"saved_offsets\\": [0]}}"}, '
     '"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 0]}}', "1 offsets for 0 dims"),
    ('{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 0]}', "the header is not JSON"),
    ('{"a" {}}', "no ':'"),
    ("", "the header is not a JSON object"),
    (b'{"\xff": {}}', "UnicodeDecodeError"),
    ('{"a": {"dtype": "F32", "shape": [' + " " * 200_000 + "x]}}", "not a list of at most 64"),
])
def test_what_the_format_does_not_have_is_refused_with_a_reason(text, words):
    with pytest.raises(CheckpointFormatError) as e:
        entries(text)
    assert words in e.value.message and e.value.message.startswith("f.safetensors: "), e.value.message


@settings(max_examples=300, deadline=None)
@given(headers(), st.data())
def test_any_damage_to_a_header_is_refused_cleanly_or_read(text, data):
    raw = bytearray(text.encode())
    if raw:
        cut = data.draw(st.integers(0, len(raw)))
        if data.draw(st.booleans()):
            raw = raw[:cut]
        elif cut < len(raw):
            raw[cut] = data.draw(st.integers(0, 255))
    try:
        got, start = entries(bytes(raw))
    except CheckpointFormatError as e:  # anything else (a ValueError, a RecursionError) fails the test
        assert e.message.startswith("f.safetensors: ")
    else:
        assert all(isinstance(e, safetensors.Entry) for e in got) and start == 8 + len(raw)


def peak_of(f) -> int:
    tracemalloc.start()
    try:
        f()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_header_costs_about_its_bytes_whatever_it_holds():
    # json.loads built a header of empty objects at about 28 times its bytes; the walk refuses them
    # unbuilt, and a valid header of many tiny tensors costs its text plus its entries (about 4.5 times
    # its bytes here, against 10.5 times parsed whole and then read).
    junk = '{"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [], "data_offsets": [0, 0], ' \
           '"x": [' + "{}," * 200_000 + "{}]}}"
    stream, size = framed(junk)
    assert peak_of(lambda: pytest.raises(CheckpointFormatError, safetensors.read_entries, stream, size=size,
                                         source="f")) < 3 * len(junk)
    many = json.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(50_000)})
    stream, size = framed(many)
    built = peak_of(lambda: safetensors.read_entries(stream, size=size, source="f"))
    loaded = peak_of(lambda: reference(many))  # the header parsed whole, then its entries (as before)
    assert built < 6 * len(many) and built < loaded / 2, (built, loaded, len(many))


def test_headers_are_let_go_file_by_file(tmp_path):
    # Each file's text is let go once its entries are read: a dir of many files with large headers
    # peaks at about one of them, not their sum.
    body = json.dumps({"__metadata__": {"note": "x" * 1_000_000}}).encode()

    def peak(n: int) -> int:
        d = tmp_path / f"n{n}"
        d.mkdir()
        for i in range(1, n + 1):
            (d / f"shard-0000{i}-model-00001-of-00001.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
        files = {p.name: integrity.FileInfo(p.name, p.stat().st_size, "shard", "ok") for p in d.iterdir()}
        got = {}
        used = peak_of(lambda: got.update(integrity._headers(LocalStorage(d), files, sorted(files))))
        assert len(got) == n and all(e == [] for e, _, _ in got.values())
        return used

    one, four = peak(1), peak(4)
    assert one > len(body)  # the header's text was read
    assert four < 1.5 * one, (one, four)
