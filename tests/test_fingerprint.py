"""Tests of fsdpck.fingerprint: the torch path equals the definition, and any split adds up.

Pure logic in one process (plus a world-size-1 gloo group for DTensor and ShardedTensor),
and one ``torchrun`` test on 3 ranks for uneven and empty DTensor shards. Run with
``python -m pytest tests/test_fingerprint.py -q``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import Replicate, Shard

from fsdpck import fingerprint
from fsdpck.fingerprint import (
    MASK64,
    allreduce_sum_u64,
    fp_chunk,
    fp_local,
    fp_reference,
    fp_tensor,
    from_hex,
    mix64,
    to_hex,
)

REPO = Path(__file__).resolve().parent.parent

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
def piece_numel(n: int | None):
    """Set fingerprint.PIECE_NUMEL so that pieces split inside chunks (None: the per-device default).

    A context manager rather than monkeypatch, which hypothesis cannot reset per example.
    """
    with mock.patch.object(fingerprint, "PIECE_NUMEL", n):
        yield


# --- the definition --------------------------------------------------------------------


def test_mix64_is_splitmix64():
    # SplitMix64 seeded with 0 outputs mix(golden * 1), mix(golden * 2), ...: the published
    # first outputs pin mix64 to the standard finaliser, independently of this code.
    golden = 0x9E3779B97F4A7C15
    assert mix64(golden) == 0xE220A8397B1DCDAF
    assert mix64(2 * golden) == 0x6E789E6AA1B965F4


def test_known_answers():
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


def test_hex_round_trip():
    for x in (0, 1, 0xDEADBEEF, MASK64):
        s = to_hex(x)
        assert len(s) == 16 and s == s.lower()
        assert from_hex(s) == x
    assert from_hex("ABCDEF0123456789") == 0xABCDEF0123456789
    for bad in ("", "123", "0x0000000000000000", "g" * 16, "1" * 17):
        with pytest.raises(ValueError):
            from_hex(bad)
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
def test_matches_reference_every_dtype(dtype, shape):
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
def test_special_float_values(dtype):
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


def test_requires_grad_and_views():
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
    return shape, dtype, seed, blocks, layouts, pieces


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
    shape, dtype, seed, blocks, layouts, pieces = case
    full = random_tensor(shape, dtype, seed)
    whole = fp_tensor(full)
    assert whole == reference_fp(full)
    total = 0
    with piece_numel(pieces):
        for (lo, hi), layout in zip(blocks, layouts):
            chunk = lay_out(full[tuple(slice(a, b) for a, b in zip(lo, hi))], layout)
            part = fp_chunk(chunk, global_shape=shape, offsets=lo)
            assert 0 <= part <= MASK64
            total += part
        assert total & MASK64 == whole
        assert fp_tensor(full) == whole


def test_zero_dim_is_index_zero():
    t = torch.tensor(3.5)
    assert fp_tensor(t) == fp_reference(raw_bits(t), [0])
    assert fp_tensor(t) == fp_tensor(t.reshape(1)) == fp_tensor(t.reshape(1, 1))


def test_large_tensor_split_in_pieces():
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


# --- distributed values, one process -----------------------------------------------------


def test_allreduce_without_process_group_returns_values():
    if dist.is_initialized():
        pytest.skip("a process group exists in this session")
    assert allreduce_sum_u64([0, MASK64, 5]) == [0, MASK64, 5]
    with pytest.raises(ValueError):
        allreduce_sum_u64([-1])


@pytest.fixture(scope="module")
def world1():
    """A world-size-1 gloo group and a 1-D CPU mesh over it; torn down with the module."""
    from torch.distributed.device_mesh import init_device_mesh

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (dist.get_world_size(),))
    finally:
        if created:
            dist.destroy_process_group()


@pytest.mark.parametrize("placement", [Shard(0), Shard(1), Replicate()], ids=str)
def test_dtensor_world1(world1, placement):
    from torch.distributed.tensor import distribute_tensor

    full = random_tensor((5, 3), torch.float32, seed=11)
    dt = distribute_tensor(full, world1, [placement])
    assert fp_local(dt) == fp_tensor(full)
    assert allreduce_sum_u64([fp_local(dt)]) == [fp_tensor(full)]


def test_dtensor_partial_is_refused(world1):
    from torch.distributed.tensor import DTensor, Partial

    dt = DTensor.from_local(torch.ones(2, 2), world1, [Partial()])
    with pytest.raises(ValueError, match="Partial"):
        fp_local(dt)


def test_sharded_tensor_world1(world1):
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    full = random_tensor((5, 3), torch.bfloat16, seed=5)
    blocks = [((0, 0), (2, 3)), ((2, 0), (5, 1)), ((2, 1), (5, 3))]
    shards = [
        Shard.from_tensor_and_offsets(full[lo[0] : hi[0], lo[1] : hi[1]].clone(), list(lo), 0) for lo, hi in blocks
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sharded = init_from_local_shards(shards, 5, 3)
    assert fp_local(sharded) == fp_tensor(full)


def test_fp_local_plain_tensor_and_refusal():
    t = random_tensor((4,), torch.int32, seed=2)
    assert fp_local(t) == fp_tensor(t)
    with pytest.raises(TypeError):
        fp_local([1, 2, 3])


def test_allreduce_world1_is_exact(world1):
    values = [0, 1, MASK64, 1 << 63, 0xFFFFFFFF, 1 << 32]
    assert allreduce_sum_u64(values) == values
    assert allreduce_sum_u64([]) == []


# --- distributed values, three ranks -------------------------------------------------


THREE_RANK_TEST = "test_uneven_and_empty_dtensor_shards_three_ranks"


@pytest.fixture(scope="module", autouse=True)
def three_rank_run(request):
    """torchrun on 3 ranks with tests/_fp_dtensor_worker.py, started when the module starts.

    Nearly all of its time is four Python processes importing torch, so it runs in the
    background while the in-process tests run, and the test below waits for it. It is not
    started when that test is not selected.
    """
    if not any(item.name == THREE_RANK_TEST for item in request.session.items):
        yield None
        return
    # Drop a surrounding launcher's rank variables: torchrun sets its own.
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"  # 3 ranks share few cores
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
        str(REPO / "tests" / "_fp_dtensor_worker.py"),
    ]  # fmt: skip
    # A session of its own, so that a timeout can end torchrun and its workers together.
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def test_uneven_and_empty_dtensor_shards_three_ranks(three_rank_run):
    try:
        output, _ = three_rank_run.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(three_rank_run.pid, signal.SIGKILL)
        output, _ = three_rank_run.communicate()
        pytest.fail(f"torchrun worker timed out after 180 s; output tail:\n{output[-4000:]}")
    ok = set(re.findall(r"rank (\d) OK", output))
    code = three_rank_run.returncode
    assert code == 0 and ok == {"0", "1", "2"}, f"exit {code}; output tail:\n{output[-4000:]}"
