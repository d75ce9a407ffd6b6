"""Tests of fsdpck.fingerprint: every path equals the definition, and any split adds up.

Pure logic in one process, no process group (how DTensors and ShardedTensors split into
pieces is tests/integration/test_shards_dist.py's). The C kernel and
the torch path are both held to ``fp_reference`` (``FSDPCK_FP_BACKEND`` picks one); the
Triton kernel runs in Triton's interpreter in a subprocess where triton is installed, and on
the GPU where there is one. Run with ``bash scripts/test.sh tests/unit/test_fingerprint.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import warnings
import zlib
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsdpck import fingerprint
from fsdpck.errors import SetupError
from fsdpck.fingerprint import MASK64, ckernel, dispatch, fp_chunk, fp_reference, fp_tensor, mix64, to_hex, torch_path

REPO = Path(__file__).resolve().parents[2]

# Every dtype of itemsize <= 8 this torch has; float8 and friends only where present.
_DTYPE_NAMES = [
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2",
]  # fmt: skip
DTYPES = [getattr(torch, n) for n in _DTYPE_NAMES if hasattr(torch, n)]
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# The test's own idea of "raw bits": a signed int view of the same size, masked to k bytes.
# Deliberately not fingerprint's unsigned views, so the two paths are independent.
_SIGNED_BY_ITEMSIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def raw_bits(t: torch.Tensor) -> list[int]:
    """The elements' bits, row-major, as unsigned ints."""
    k = t.element_size()
    signed = t.detach().contiguous().view(_SIGNED_BY_ITEMSIZE[k]).reshape(-1).tolist()
    return [b & ((1 << (8 * k)) - 1) for b in signed]


def reference_fp(t: torch.Tensor) -> int:
    return fp_reference(raw_bits(t), range(t.numel()))


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random raw bytes viewed as ``dtype``: NaN payloads, denormals, infs all turn up."""
    gen = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    if dtype == torch.bool:
        # Bytes other than 0 and 1 are not valid bools.
        return torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8).view(torch.bool)
    k = torch.empty((), dtype=dtype).element_size()
    data = torch.randint(0, 256, (numel * k,), generator=gen, dtype=torch.uint8)
    return data.view(dtype).reshape(shape)


@contextlib.contextmanager
def forced_backend(name: str | None):
    """Run with ``FSDPCK_FP_BACKEND=name`` (None: unset, i.e. auto); hypothesis-safe like piece_numel."""
    env = {k: v for k, v in os.environ.items() if k != fingerprint.BACKEND_ENV}
    if name is not None:
        env[fingerprint.BACKEND_ENV] = name
    with mock.patch.dict(os.environ, env, clear=True):
        yield


def c_available() -> bool:
    with forced_backend(None):
        return fingerprint.backend("cpu") == "c"


# The CPU paths every equivalence test runs through; "c" is skipped (with its reason) where
# the C kernel cannot be built, and test_c_kernel_is_used_where_a_compiler_is catches a C
# kernel that silently went missing.
CPU_PATHS = ["torch", "c"]


@pytest.fixture(params=CPU_PATHS)
def cpu_path(request):
    """Each CPU path in turn, forced through FSDPCK_FP_BACKEND."""
    if request.param == "c" and not c_available():
        pytest.skip(f"no C kernel here: {fingerprint.backend_detail('cpu')}")
    with forced_backend(request.param):
        yield request.param


@contextlib.contextmanager
def piece_numel(n: int | None):
    """Set torch_path.PIECE_NUMEL so that pieces split inside chunks (None: the per-device default).

    A context manager rather than monkeypatch, which hypothesis cannot reset per example.
    """
    with mock.patch.object(torch_path, "PIECE_NUMEL", n):
        yield


# --- the definition --------------------------------------------------------------------


def test_mix64_is_splitmix64():
    # SplitMix64 seeded with 0 outputs mix(golden * 1), mix(golden * 2), ...: the published
    # first outputs pin mix64 to the standard finaliser, independently of this code.
    golden = 0x9E3779B97F4A7C15
    assert mix64(golden) == 0xE220A8397B1DCDAF
    assert mix64(2 * golden) == 0x6E789E6AA1B965F4


def test_known_answers(cpu_path):
    # Pinned so that the definition cannot drift: a manifest written today must still
    # verify tomorrow. Bits come from struct, not from torch.
    f32 = [struct.unpack("<I", struct.pack("<f", float(x)))[0] for x in range(12)]
    assert to_hex(fp_reference(f32, range(12))) == "f4683cbb0edec779"
    assert to_hex(fp_tensor(torch.arange(12, dtype=torch.float32).reshape(3, 4))) == "f4683cbb0edec779"
    # Rows 1..2 of the same tensor, as a chunk at offset (1, 0).
    assert to_hex(fp_reference(f32[4:], range(4, 12))) == "b418ff4988034e0f"
    chunk = torch.arange(4, 12, dtype=torch.float32).reshape(2, 4)
    assert to_hex(fp_chunk(chunk, global_shape=(3, 4), offsets=(1, 0))) == "b418ff4988034e0f"

    f64 = torch.tensor([-0.0, math.inf, 5e-324, math.nan], dtype=torch.float64)
    assert raw_bits(f64) == [0x8000000000000000, 0x7FF0000000000000, 0x1, 0x7FF8000000000000]
    assert to_hex(fp_tensor(f64)) == "cece0495de696b63"
    assert to_hex(fp_tensor(torch.tensor([-1, 0, 127, -128], dtype=torch.int8))) == "ca81e993f52a19d5"


def test_reference_rejects_bad_input():
    with pytest.raises(ValueError):
        fp_reference([1, 2], [0])
    with pytest.raises(ValueError):
        fp_reference([1 << 64], [0])


def test_hex():
    for x in (0, 1, 0xDEADBEEF, MASK64):
        s = to_hex(x)
        assert len(s) == 16 and s == s.lower() and int(s, 16) == x
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError):
            to_hex(bad)


def test_import_does_not_import_torch():
    code = "import sys, fsdpck.fingerprint; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the torch path equals the definition ------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (4, 6), (2, 3, 4)], ids=str)
def test_matches_reference_every_dtype(dtype, shape, cpu_path):
    t = random_tensor(shape, dtype, seed=zlib.crc32(f"{dtype}{shape}".encode()))
    expected = reference_fp(t)
    assert fp_tensor(t) == expected
    with piece_numel(2):
        assert fp_tensor(t) == expected
    if t.dim() >= 2 and t.numel() > 0:
        # The same values laid out column-major: strides do not matter, only positions.
        transposed = t.transpose(0, 1).contiguous().transpose(0, 1)
        assert not transposed.is_contiguous()
        assert fp_tensor(transposed) == expected


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_special_float_values(dtype, cpu_path):
    finfo = torch.finfo(dtype)
    values = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, finfo.smallest_normal, finfo.max], dtype=dtype)
    denormal = torch.tensor([1], dtype=_SIGNED_BY_ITEMSIZE[values.element_size()]).view(dtype)
    t = torch.cat([values, denormal])
    assert fp_tensor(t) == reference_fp(t)
    # Bitwise means exact: -0.0 is not 0.0, and a NaN's payload counts.
    assert fp_tensor(torch.tensor([0.0], dtype=dtype)) != fp_tensor(torch.tensor([-0.0], dtype=dtype))
    nan = torch.tensor([math.nan], dtype=dtype)
    other_nan = (nan.view(_SIGNED_BY_ITEMSIZE[nan.element_size()]) + 1).view(dtype)
    assert other_nan.isnan().all()
    assert fp_tensor(nan) != fp_tensor(other_nan)


def test_refuses_itemsize_over_8():
    with pytest.raises(ValueError, match="complex128"):
        fp_tensor(torch.zeros(3, dtype=torch.complex128))


def test_rejects_chunk_outside_global_shape():
    t = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="dim 1"):
        fp_chunk(t, global_shape=(4, 4), offsets=(0, 2))
    with pytest.raises(ValueError, match="number of dims"):
        fp_chunk(t, global_shape=(6,), offsets=(0,))
    with pytest.raises(ValueError):
        fp_chunk(t, global_shape=(4, 4), offsets=(-1, 0))
    # An empty chunk may sit at the end (an empty DTensor shard's offset is the dim size).
    assert fp_chunk(torch.zeros(0, 3), global_shape=(4, 3), offsets=(4, 0)) == 0


def test_requires_grad_and_views(cpu_path):
    base = torch.randn(6, 8, requires_grad=True)
    assert fp_tensor(base) == reference_fp(base)
    view = base[1:5:2, ::3]
    assert fp_tensor(view) == reference_fp(view)


# --- what changes it -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_every_flipped_bit_changes_it(dtype):
    t = random_tensor((3, 5), dtype, seed=7)
    base = fp_tensor(t)
    signed = _SIGNED_BY_ITEMSIZE[t.element_size()]
    nbits = 8 * t.element_size()
    for flat_index in (0, 7, 14):
        for bit in range(nbits):
            flipped = t.clone()
            ints = flipped.view(signed).view(-1)
            mask = torch.tensor(1, dtype=torch.int64).bitwise_left_shift(bit).to(signed)
            ints[flat_index] ^= mask
            assert fp_tensor(flipped) != base, (flat_index, bit)


def test_swapping_unequal_elements_changes_it():
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    base = fp_tensor(t)
    for a, b in [((0, 0), (0, 1)), ((0, 0), (3, 5)), ((1, 2), (2, 1))]:
        swapped = t.clone()
        swapped[a], swapped[b] = t[b], t[a]
        assert fp_tensor(swapped) != base
    # Equal values in swapped places are the same tensor, and so the same fingerprint.
    same = torch.ones(4)
    assert fp_tensor(same[[1, 0, 2, 3]]) == fp_tensor(same)


# --- any split adds up ---------------------------------------------------------------


@st.composite
def split_case(draw):
    """A random tensor and a random split of it into blocks (some empty), each laid out its own way."""
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))

    def split(lo: tuple[int, ...], hi: tuple[int, ...], depth: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        if depth == 0 or not draw(st.booleans()):
            return [(lo, hi)]
        d = draw(st.integers(0, ndim - 1))
        # Repeated cut points make empty blocks, as uneven sharding does.
        cuts = sorted(draw(st.lists(st.integers(lo[d], hi[d]), max_size=3)))
        edges = [lo[d], *cuts, hi[d]]
        blocks = []
        for a, b in zip(edges, edges[1:]):
            sub_lo, sub_hi = list(lo), list(hi)
            sub_lo[d], sub_hi[d] = a, b
            blocks += split(tuple(sub_lo), tuple(sub_hi), depth - 1)
        return blocks

    blocks = split((0,) * ndim, shape, depth=3)
    layouts = [draw(st.sampled_from(["slice", "copy", "column-major", "strided"])) for _ in blocks]
    pieces = draw(st.sampled_from([1, 3, 7, 16, None]))
    path = draw(st.sampled_from(CPU_PATHS))
    return shape, dtype, seed, blocks, layouts, pieces, path


def lay_out(chunk: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``chunk`` in another memory layout."""
    if layout == "slice" or chunk.dim() == 0:
        return chunk  # a view into the full tensor, usually non-contiguous
    if layout == "copy":
        return chunk.clone(memory_format=torch.contiguous_format)
    if layout == "column-major":
        return chunk.permute(*reversed(range(chunk.dim()))).contiguous().permute(*reversed(range(chunk.dim())))
    # "strided": every other element of a buffer twice as large in every dim.
    big = torch.empty([2 * n for n in chunk.shape], dtype=chunk.dtype)
    view = big[tuple(slice(None, None, 2) for _ in chunk.shape)]
    view.copy_(chunk)
    return view


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(split_case())
def test_any_split_adds_up(case):
    shape, dtype, seed, blocks, layouts, pieces, path = case
    if path == "c" and not c_available():
        path = "torch"
    full = random_tensor(shape, dtype, seed)
    total = 0
    with forced_backend(path), piece_numel(pieces):
        whole = fp_tensor(full)
        assert whole == reference_fp(full)
        for (lo, hi), layout in zip(blocks, layouts):
            chunk = lay_out(full[tuple(slice(a, b) for a, b in zip(lo, hi))], layout)
            part = fp_chunk(chunk, global_shape=shape, offsets=lo)
            assert 0 <= part <= MASK64
            total += part
        assert total & MASK64 == whole
        assert fp_tensor(full) == whole


def test_zero_dim_is_index_zero(cpu_path):
    t = torch.tensor(3.5)
    assert fp_tensor(t) == fp_reference(raw_bits(t), [0])
    assert fp_tensor(t) == fp_tensor(t.reshape(1)) == fp_tensor(t.reshape(1, 1))


def test_large_tensor_split_in_pieces(cpu_path):
    # Pieces split a row of a large last dim and span several rows of a short one.
    full = random_tensor((3, 1000), torch.float32, seed=3)
    expected = reference_fp(full)
    for n in (64, 999, 1000, 1001, 2500):
        with piece_numel(n):
            assert fp_tensor(full) == expected
            assert fp_tensor(full.t().contiguous().t()) == expected
            parts = fp_chunk(full[:, :333], global_shape=(3, 1000), offsets=(0, 0)) + fp_chunk(
                full[:, 333:], global_shape=(3, 1000), offsets=(0, 333)
            )
            assert parts & MASK64 == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32, torch.int64, torch.complex64], ids=str)
def test_cuda_matches_cpu(dtype):
    # The work runs on the tensor's device; the answer must not depend on which.
    full = random_tensor((37, 29), dtype, seed=9)
    on_gpu = full.cuda()
    expected = reference_fp(full)
    assert fp_tensor(on_gpu) == expected
    assert fp_tensor(on_gpu.t().contiguous().t()) == expected
    with piece_numel(16):
        parts = fp_chunk(on_gpu[:10], global_shape=(37, 29), offsets=(0, 0)) + fp_chunk(
            on_gpu[10:, 3:], global_shape=(37, 29), offsets=(10, 3)
        ) + fp_chunk(on_gpu[10:, :3], global_shape=(37, 29), offsets=(10, 0))
    assert parts & MASK64 == expected


# --- the paths: C kernel, torch, Triton --------------------------------------------------


def placed_reference(values: torch.Tensor, global_shape: tuple[int, ...], offsets: tuple[int, ...]) -> int:
    """fp_reference of ``values`` as a chunk at ``offsets`` in ``global_shape``, indices computed here."""
    strides = [math.prod(global_shape[d + 1 :]) for d in range(len(global_shape))]
    indices = [
        sum((o + j) * g for o, j, g in zip(offsets, position, strides))
        for position in itertools.product(*(range(n) for n in values.shape))
    ]
    return fp_reference(raw_bits(values), indices)


def odd_layouts() -> list[tuple[str, torch.Tensor, tuple[int, ...], tuple[int, ...]]]:
    """(name, chunk, global shape, offsets): layouts that exercise the kernels' dim handling."""
    big = random_tensor((3, 3, 3, 3, 3), torch.float32, seed=21)
    cube = random_tensor((4, 5, 6), torch.bfloat16, seed=22)
    row = random_tensor((1, 70), torch.int16, seed=23)
    return [
        # Five dims that no two can merge: more than the Triton kernel's four.
        ("five-dims", big[::2, ::2, ::2, ::2, ::2], (3, 3, 3, 3, 3), (1, 0, 1, 0, 1)),
        # A chunk read along its columns: memory order is not index order.
        ("column-major", cube.permute(2, 1, 0).contiguous().permute(2, 1, 0), (4, 5, 6), (0, 0, 0)),
        ("permuted-slice", cube.permute(1, 2, 0)[1:4, :, 2:], (9, 9, 9), (2, 3, 1)),
        # Stride 0: every element of a dim is the same memory.
        ("expanded", row.expand(3, 70), (5, 80), (1, 7)),
        ("step", row[0, 3::4], (200,), (17,)),
        ("size-1-dims", cube[2:3, :, 4:5], (4, 5, 6), (2, 0, 4)),
    ] + [(f"run-{n}", random_tensor((n,), torch.uint8, seed=n), (40,), (40 - n,)) for n in (1, 7, 16, 17, 33)]


@pytest.mark.parametrize("name, chunk, global_shape, offsets", odd_layouts(), ids=[c[0] for c in odd_layouts()])
def test_paths_agree_on_odd_layouts(name, chunk, global_shape, offsets, cpu_path):
    expected = placed_reference(chunk, global_shape, offsets)
    assert fp_chunk(chunk, global_shape=global_shape, offsets=offsets) == expected


def test_layout_orders_and_merges_dims():
    # A contiguous tensor is one run; a slice of whole rows too; a column slice is rows x columns.
    assert dispatch.layout([4, 5, 6], [30, 6, 1], [4, 5, 6], [0, 0, 0]) == ([(120, 1, 1)], 0)
    assert dispatch.layout([2, 5, 6], [30, 6, 1], [4, 5, 6], [1, 0, 0]) == ([(60, 1, 1)], 30)
    assert dispatch.layout([4, 3], [10, 1], [4, 10], [0, 7]) == ([(4, 10, 10), (3, 1, 1)], 7)
    # Column-major: the innermost loop walks memory (stride 1), the global index by a row (3).
    assert dispatch.layout([4, 3], [1, 4], [4, 3], [0, 0]) == ([(3, 4, 1), (4, 1, 3)], 0)
    # Size-1 dims only move the base; 0-dim is one element at index 0.
    assert dispatch.layout([1, 3, 1], [3, 1, 1], [2, 3, 4], [1, 0, 2]) == ([(3, 1, 4)], 14)
    assert dispatch.layout([], [], [], []) == ([], 0)


def test_c_kernel_is_used_where_a_compiler_is():
    # A kernel that stops building must fail here, not slip silently onto the torch path.
    if ckernel._c_compiler() is None:
        pytest.skip("no C compiler on PATH")
    with forced_backend(None):
        assert fingerprint.backend("cpu") == "c", fingerprint.backend_detail("cpu")
        assert "ISA" in fingerprint.backend_detail("cpu")


def test_c_kernel_splits_large_chunks_over_threads(monkeypatch):
    if not c_available():
        pytest.skip(f"no C kernel here: {fingerprint.backend_detail('cpu')}")
    full = random_tensor((9, 40), torch.float64, seed=31)
    expected = reference_fp(full)
    calls = []
    real_call = ckernel._c_call
    monkeypatch.setattr(ckernel, "_C_MIN_PER_THREAD", 16)
    monkeypatch.setattr(ckernel, "_c_call", lambda *args: calls.append(args) or real_call(*args))
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with forced_backend("c"):
            assert fp_tensor(full) == expected
            assert len(calls) == 4
            assert fp_tensor(full.t().contiguous().t()) == expected
            part = full[2:7, 5:]
            assert fp_chunk(part, global_shape=(9, 40), offsets=(2, 5)) == placed_reference(part, (9, 40), (2, 5))
    finally:
        torch.set_num_threads(threads)


def test_backend_env_var():
    with forced_backend("torch"):
        assert fingerprint.backend("cpu") == "torch"
        with mock.patch.object(ckernel, "fp_chunk_c", side_effect=AssertionError("C path used")):
            t = random_tensor((3, 4), torch.float32, seed=1)
            assert fp_tensor(t) == reference_fp(t)
    with forced_backend(" Torch "):
        assert fingerprint.backend("cpu") == "torch"
    with forced_backend("cuda"), pytest.raises(SetupError, match="FSDPCK_FP_BACKEND='cuda'"):
        fingerprint.backend("cpu")
    # A forced path serves its own devices; the others stay on torch.
    with forced_backend("c"):
        assert fingerprint.backend("meta") == "torch"
    if c_available():
        with forced_backend("c"):
            assert fingerprint.backend("cpu") == "c"
        with forced_backend("auto"):
            assert fingerprint.backend("cpu") == "c"


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """No C compiler (CC names a program that does not exist) and an empty kernel cache."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("FSDPCK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ckernel, "_c_state", None)
    yield tmp_path / "cache"
    monkeypatch.setattr(ckernel, "_c_state", None)


def test_no_compiler_falls_back_to_torch_silently(no_compiler, capfd):
    with forced_backend(None):
        assert fingerprint.backend("cpu") == "torch"
        assert "no C compiler" in fingerprint.backend_detail("cpu")
        for dtype in (torch.bool, torch.bfloat16, torch.float32, torch.int64):
            t = random_tensor((5, 7), dtype, seed=3)
            assert fp_tensor(t) == reference_fp(t)
            assert fp_tensor(t[1:, ::2]) == reference_fp(t[1:, ::2])
    with forced_backend("c"), pytest.raises(SetupError, match="no C compiler"):
        fingerprint.backend("cpu")
    assert capfd.readouterr() == ("", "")


@pytest.fixture(scope="module")
def built_library() -> Path:
    """The C kernel's library as this machine builds it (from the user's cache, or compiled into it)."""
    with forced_backend(None):
        fn, path, detail = ckernel.c_kernel()
    if fn is None:
        pytest.skip(f"no C kernel here: {detail}")
    return path


def test_cached_kernel_needs_no_compiler(built_library, no_compiler):
    # A compute node without a compiler uses the library that a login node cached; the key is
    # the source, flags and platform, so the name is the same in any cache dir.
    no_compiler.mkdir()
    copy = no_compiler / built_library.name
    copy.write_bytes(b"not a shared library")
    with forced_backend(None):
        assert fingerprint.backend("cpu") == "torch"
        assert "cannot load" in fingerprint.backend_detail("cpu")
    shutil.copyfile(built_library, copy)
    ckernel._c_state = None
    with forced_backend(None):
        assert fingerprint.backend("cpu") == "c"
        assert "(cached;" in fingerprint.backend_detail("cpu")
        t = random_tensor((4, 9), torch.float16, seed=4)
        assert fp_tensor(t) == reference_fp(t)


def test_concurrent_compiles_leave_one_whole_library(tmp_path):
    # Many ranks compile into one shared cache at once: each renames a whole file into place.
    compiler = ckernel._c_compiler()
    if compiler is None:
        pytest.skip("no C compiler on PATH")
    source = ckernel._C_SOURCE.read_bytes()
    flags = ckernel._C_FLAG_SETS[-1]  # the quick build: the renaming is what is tested
    target = tmp_path / "cache" / "fpkernel-test.so"
    results = []
    workers = [
        threading.Thread(target=lambda: results.append(ckernel._compile_c_kernel(compiler, flags, source, target)))
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert results == [None, None]
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    fn, why = ckernel._load_c_kernel(target)
    assert fn is not None, why


def test_unwritable_cache_compiles_privately(monkeypatch, tmp_path):
    # A home dir mounted read-only on compute nodes: build for this process alone, leave nothing.
    if ckernel._c_compiler() is None:
        pytest.skip("no C compiler on PATH")
    monkeypatch.setenv("FSDPCK_CACHE", os.devnull + "/fsdpck")  # cannot be created
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(ckernel, "_C_FLAG_SETS", ckernel._C_FLAG_SETS[-1:])  # the quick build
    monkeypatch.setattr(ckernel, "_c_state", None)
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR afresh
    with forced_backend(None):
        assert fingerprint.backend("cpu") == "c", fingerprint.backend_detail("cpu")
        assert "not writable" in fingerprint.backend_detail("cpu")
        t = random_tensor((6, 5), torch.int32, seed=8)
        assert fp_tensor(t.t()) == reference_fp(t.t())
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(ckernel, "_c_state", None)


def test_c_self_check_refuses_a_wrong_kernel():
    assert "itemsize 1" in ckernel._c_self_check(lambda *args: 0)
    if c_available():
        assert ckernel._c_self_check(ckernel.c_kernel()[0]) is None


def test_triton_failure_falls_back_to_torch(monkeypatch):
    # On CUDA, auto mode: a chunk the Triton kernel fails on is done by torch, and the device
    # stays on torch; forced, the failure is raised. Shown on the CPU with a kernel that fails.
    class Broken:
        @staticmethod
        def fp_layout(*args):
            raise RuntimeError("PTX assembly aborted")

    monkeypatch.setattr(dispatch, "backend", lambda device: "triton")
    monkeypatch.setattr(dispatch, "_triton_module", lambda: Broken)
    monkeypatch.setattr(dispatch, "_triton_state", {})
    t = random_tensor((300, 300), torch.float16, seed=13)  # past SMALL_CHUNK_NUMEL: a kernel would be used
    with forced_backend(None):
        assert fp_tensor(t) == reference_fp(t)
    usable, why = dispatch._triton_state["cpu"]
    assert not usable and "PTX assembly aborted" in why
    with forced_backend("triton"), pytest.raises(RuntimeError, match="PTX"):
        fp_tensor(t)


# The Triton kernel in Triton's interpreter: a process of its own, because triton decides
# interpreter or compiler once, from TRITON_INTERPRET, when it is imported.
TRITON_INTERPRETER_CHECK = r"""
import itertools, math, sys
import torch
sys.path.insert(0, "tests/unit")
from test_fingerprint import odd_layouts, placed_reference, random_tensor
from fsdpck import fingerprint
from fsdpck.fingerprint import triton_kernel
from fsdpck.fingerprint import fp_chunk, fp_tensor, torch_path

assert triton_kernel.interpreting()
assert fingerprint.backend("cpu") == "triton", fingerprint.backend_detail("cpu")
# Many launches per chunk, as a huge chunk has on a GPU; fewer tiles per program than on a
# GPU (each costs the interpreter a pass, used or not), but still a loop.
triton_kernel.MAX_PROGRAMS, triton_kernel.TILES = 1, 2
checked = 0
# Each itemsize, signed and unsigned (the kernel reads signed views and zero-extends them).
for dtype in (torch.bool, torch.int8, torch.bfloat16, torch.float32, torch.uint64):
    full = random_tensor((5, 300), dtype, seed=5)
    cases = [
        (full, (5, 300), (0, 0)),
        (full[1:4, 7:290], (5, 300), (1, 7)),
        (full[::2, ::3], (9, 400), (2, 50)),
        (full.t().contiguous().t(), (5, 300), (0, 0)),
        (full[2, 3], (), ()),
    ]
    for chunk, global_shape, offsets in cases:
        got = fp_chunk(chunk, global_shape=global_shape, offsets=offsets)
        assert got == placed_reference(chunk, global_shape, offsets), (dtype, chunk.shape, offsets)
        checked += 1
for name, chunk, global_shape, offsets in odd_layouts():
    got = fp_chunk(chunk, global_shape=global_shape, offsets=offsets)
    assert got == placed_reference(chunk, global_shape, offsets), name
    checked += 1
long = random_tensor((20000,), torch.float32, seed=6)  # 20 tiles: 10 launches
assert fp_tensor(long) == torch_path.fp_chunk_torch(long.view(torch.uint32), [20000], [20000], [0])
print("triton interpreter OK", checked + 1)
"""

INTERPRETER_TEST = "test_triton_kernel_in_interpreter"


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter_run(request):
    """The interpreter subprocess, started when the module starts (like three_rank_run) where triton imports."""
    selected = any(item.name == INTERPRETER_TEST for item in request.session.items)
    if not selected or importlib.util.find_spec("triton") is None:
        yield None
        return
    env = dict(os.environ, TRITON_INTERPRET="1", FSDPCK_FP_BACKEND="triton", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-c", TRITON_INTERPRETER_CHECK],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_triton_kernel_in_interpreter(triton_interpreter_run):
    if triton_interpreter_run is None:
        pytest.skip("triton is not installed (pip install triton==3.6.0 runs this test on the CPU)")
    try:
        output, _ = triton_interpreter_run.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        triton_interpreter_run.kill()
        output, _ = triton_interpreter_run.communicate()
        pytest.fail(f"interpreter run timed out after 240 s; output tail:\n{output[-4000:]}")
    assert triton_interpreter_run.returncode == 0 and "triton interpreter OK" in output, output[-4000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_matches_torch_on_cuda():
    pytest.importorskip("triton")
    with forced_backend(None):
        assert fingerprint.backend("cuda") == "triton", fingerprint.backend_detail("cuda")
    for dtype in DTYPES:
        full = random_tensor((21, 1029), dtype, seed=12)
        on_gpu = full.cuda()
        expected = reference_fp(full)
        for path in ("triton", "torch"):
            with forced_backend(path):
                assert fp_tensor(on_gpu) == expected, (path, dtype)
                assert fp_tensor(on_gpu.t().contiguous().t()) == expected, (path, dtype)
                part = fp_chunk(on_gpu[10:, 3::2], global_shape=(21, 1029), offsets=(10, 3))
                assert part == placed_reference(full[10:, 3::2], (21, 1029), (10, 3)), (path, dtype)
    for name, chunk, global_shape, offsets in odd_layouts():
        with forced_backend("triton"):
            got = fp_chunk(chunk.cuda(), global_shape=global_shape, offsets=offsets)
        assert got == placed_reference(chunk, global_shape, offsets), name
    # More than one launch (64 Mi elements each) and every itemsize of a large chunk.
    big = torch.randint(0, 256, ((1 << 26) + 4097,), dtype=torch.uint8, device="cuda")
    for dtype in (torch.uint8, torch.bfloat16, torch.float32, torch.float64):
        view = big[: big.numel() // 8 * 8].view(dtype)
        chunk = view[5:]
        with forced_backend("triton"):
            fast = fp_chunk(chunk, global_shape=(view.numel() + 3,), offsets=(8,))
        with forced_backend("torch"):
            slow = fp_chunk(chunk, global_shape=(view.numel() + 3,), offsets=(8,))
        assert fast == slow, dtype


def test_small_chunks_never_compile_a_kernel(monkeypatch):
    # A pre-flight verify's whole state is a few hundred bytes: no kernel is built for it.
    def no_kernel():
        raise AssertionError("a kernel was built for a small chunk")

    monkeypatch.setattr(ckernel, "c_kernel", no_kernel)
    monkeypatch.setattr(dispatch, "_triton_ready", lambda device: no_kernel())
    t = random_tensor((dispatch.SMALL_CHUNK_NUMEL - 1,), torch.float32, seed=3)
    with forced_backend(None):
        assert fp_tensor(t) == reference_fp(t)
    big = random_tensor((dispatch.SMALL_CHUNK_NUMEL,), torch.uint8, seed=4)
    with forced_backend(None), pytest.raises(AssertionError, match="kernel was built"):
        fp_tensor(big)


def _torch_stats(t: torch.Tensor) -> tuple[int, float, float | None, float | None]:
    """The statistics the C kernel's fused pass must give, computed plainly in float64."""
    x = t.detach().reshape(-1).double()
    finite = torch.isfinite(x)
    good = x[finite]
    if good.numel() == 0:
        return int((~finite).sum()), 0.0, None, None
    return int((~finite).sum()), float(good.sum()), float(good.min()), float(good.max())


@pytest.mark.skipif(not c_available(), reason="no C compiler here")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fused_statistics_agree_with_torch_and_the_fingerprint_with_fp_chunk(dtype):
    # Sizes around the fast path's blocks of 256 and the vectors of 8; non-finite values in some
    # blocks only (the masked path), negative zeros and negatives (the integer keys' order), and a
    # strided piece (the scalar path).
    gen = torch.Generator().manual_seed(3)
    for n in (2 * dispatch.SMALL_CHUNK_NUMEL, 2 * dispatch.SMALL_CHUNK_NUMEL + 527):
        x = (torch.randn(n, generator=gen) * 1000).to(dtype)
        x[17] = -0.0
        x[300] = float("nan")
        x[301] = float("-inf")
        x[n - 3] = float("inf")
        for piece, shape, offsets in ((x, (n,), (0,)), (x[1::2], (n,), (1,))):
            with forced_backend(None):
                fp, stats = dispatch.fp_chunk_stats(piece, global_shape=shape, offsets=offsets)
            assert stats is not None, "the C path must serve a large CPU chunk"
            assert fp == fp_chunk(piece, global_shape=shape, offsets=offsets)
            want = _torch_stats(piece)
            assert stats[0] == want[0] and stats[2] == want[2] and stats[3] == want[3], (dtype, n, stats, want)
            assert math.isclose(stats[1], want[1], rel_tol=1e-6, abs_tol=1e-3), (dtype, n, stats, want)
        allbad = torch.full((n,), float("nan"), dtype=dtype)
        with forced_backend(None):
            _, stats = dispatch.fp_chunk_stats(allbad, global_shape=(n,), offsets=(0,))
        assert stats == (n, 0.0, None, None)


@pytest.mark.skipif(not c_available(), reason="no C compiler here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_statistics_sum_finite_values_whose_float_sum_overflows(dtype):
    # Every value finite, but a block's float sum is not: the sum must still come out of float64
    # (and the statistics alone, fsdpck_stats, likewise), not as an infinity.
    n = 6 * dispatch.SMALL_CHUNK_NUMEL  # a third of it, strided, still takes the C path
    x = torch.full((n,), 3e38, dtype=dtype)
    x[n // 2:] = -1.0
    with forced_backend(None):
        fp, stats = dispatch.fp_chunk_stats(x, global_shape=(n,), offsets=(0,))
        assert fp == fp_chunk(x, global_shape=(n,), offsets=(0,))
        strided = dispatch.fp_chunk_stats(x[::3], global_shape=(n,), offsets=(0,))[1]
    for got, piece in ((stats, x), (strided, x[::3])):
        want = _torch_stats(piece)
        assert got[0] == 0 and math.isfinite(got[1]), got
        assert math.isclose(got[1], want[1], rel_tol=1e-9), (got, want)
        assert (got[2], got[3]) == (want[2], want[3])


@pytest.mark.skipif(not c_available(), reason="no C compiler here")
def test_the_two_pass_statistics_of_other_compilers_pass_the_self_check(tmp_path, monkeypatch):
    # GCC builds sum float32/bfloat16 pieces inside the hashing loop; other compilers take the
    # second pass over the piece. Built here with -DFSDPCK_TWO_PASS, that path must load and pass
    # the statistics' self-check (clean and non-finite values of every dtype, fused and alone).
    from fsdpck.fingerprint import ckernel

    monkeypatch.setattr(ckernel, "_c_stats", [])
    monkeypatch.setattr(ckernel, "_c_libraries", [])
    path = tmp_path / "two-pass.so"
    flags = (*ckernel._C_FLAG_SETS[-1], "-DFSDPCK_TWO_PASS")  # without the ISA clones: one build, not three
    assert ckernel._compile_c_kernel(ckernel._c_compiler(), flags, ckernel._C_SOURCE.read_bytes(), path) is None
    fn, why = ckernel._load_c_kernel(path)
    assert fn is not None, why
    assert ckernel._c_stats, "the two-pass statistics failed their self-check"


def test_fused_statistics_are_not_used_for_small_or_integer_chunks():
    with forced_backend(None):
        assert dispatch.fp_chunk_stats(torch.ones(8), global_shape=(8,), offsets=(0,))[1] is None
        big = torch.ones(dispatch.SMALL_CHUNK_NUMEL, dtype=torch.int64)
        assert dispatch.fp_chunk_stats(big, global_shape=big.shape, offsets=(0,))[1] is None


@pytest.mark.skipif(not c_available(), reason="no C compiler here")
def test_a_wrong_statistics_routine_is_refused_by_the_self_check():
    with forced_backend(None):
        ckernel.c_kernel()
    lib = ckernel._c_libraries[-1]
    fn, stats, fused = lib.fsdpck_fp_strided, lib.fsdpck_stats, lib.fsdpck_fp_stats_strided
    assert ckernel._stats_self_check(stats, fn, fused) is None

    def off_by_one(address, code, n, out):  # a sum that is one too large
        got = stats(address, code, n, out)
        out[1] += 1.0
        return got

    def no_nonfinite(address, itemsize, ndim, shape, strides, gstrides, base, code, out):
        got = fused(address, itemsize, ndim, shape, strides, gstrides, base, code, out)
        out[0] = 0.0
        return got

    assert "float32" in ckernel._stats_self_check(off_by_one, fn, fused)
    assert "fused" in ckernel._stats_self_check(stats, fn, no_nonfinite)


# --- pieces in host memory (the offline commands' path, without torch) ----------------------


@pytest.mark.parametrize("backend_name", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.uint8,
                                   torch.float64, torch.complex64, torch.complex128])
def test_fp_piece_is_fp_chunk(dtype, backend_name):
    from fsdpck.checkpoint.piece import Piece

    whole = random_tensor((6, 10, 4), dtype, seed=7)
    part = whole[1:4].transpose(0, 1)  # a view with its own global shape, not row-major in memory
    cases = [(whole, whole.shape, (0, 0, 0)), (whole[2:5, 3:9], whole.shape, (2, 3, 0)),
             (whole[4:5, 2:3], whole.shape, (4, 2, 0)), (whole[:0], whole.shape, (0, 0, 0)),
             (part, part.shape, (0, 0, 0)), (whole[:, 1:7:2], (6, 3, 4), (0, 0, 0))]
    wide = whole.element_size() > 8  # complex128: fingerprinted as its float64 view
    with forced_backend(backend_name):
        for view, shape, offsets in cases:
            want = fp_chunk(torch.view_as_real(view) if wide else view, global_shape=(*shape, 2) if wide else shape,
                            offsets=(*offsets, 0) if wide else offsets)
            piece = Piece(view.data_ptr(), str(dtype).removeprefix("torch."), view.element_size(), tuple(view.shape),
                          tuple(view.stride()), view)  # no tensor view: the path that reads memory by address
            assert dispatch.fp_piece(piece, global_shape=shape, offsets=offsets) == want, (dtype, view.shape)


@pytest.mark.skipif(not c_available(), reason="no C compiler here")
def test_fp_piece_reads_by_address_without_making_a_tensor():
    from fsdpck.checkpoint.piece import Piece

    t = random_tensor((300, 301), torch.float32, seed=3)
    piece = Piece(t.data_ptr(), "float32", 4, tuple(t.shape), tuple(t.stride()), t)
    with forced_backend("auto"), mock.patch.object(Piece, "tensor", side_effect=AssertionError("made a tensor")):
        assert dispatch.fp_piece(piece, global_shape=t.shape, offsets=(0, 0)) == fp_tensor(t)


def test_fp_piece_without_a_compiler_uses_torch_and_a_forced_c_says_why(no_compiler):
    from fsdpck.checkpoint.piece import Piece

    t = random_tensor((5, 3), torch.int32, seed=2)
    piece = Piece(t.data_ptr(), "int32", 4, tuple(t.shape), tuple(t.stride()), t)
    with forced_backend("auto"):
        assert dispatch.fp_piece(piece, global_shape=t.shape, offsets=(0, 0)) == reference_fp(t)
    with forced_backend("c"), pytest.raises(SetupError, match="C kernel is not available"):
        dispatch.fp_piece(piece, global_shape=t.shape, offsets=(0, 0))


@pytest.mark.skipif(not c_available(), reason="no C compiler here")
def test_a_wrong_value_statistics_routine_is_refused_by_the_self_check():
    with forced_backend(None):
        ckernel.c_kernel()
    values = ckernel._c_libraries[-1].fsdpck_value_stats
    assert ckernel._values_self_check(values) is None and ckernel._c_values

    def tamper(index: int, delta: float, integers: bool):
        def routine(address, code, n, counts, moments):
            got = values(address, code, n, counts, moments)
            if integers:
                counts[index] += int(delta)
            else:
                moments[index] += delta
            return got
        return routine

    assert "counts" in ckernel._values_self_check(tamper(0, 1, True))  # one zero too many
    assert "counts" in ckernel._values_self_check(tamper(1, 1, True))  # a NaN too many
    assert "extremes" in ckernel._values_self_check(tamper(0, 0.5, False))  # a wrong min
    assert "mean" in ckernel._values_self_check(tamper(2, 1e-9, False))
    assert "m2" in ckernel._values_self_check(tamper(3, 1e-3, False))
    assert "refused" in ckernel._values_self_check(lambda *args: -1)
