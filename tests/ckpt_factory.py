"""Checkpoint dirs for the tests of ``fsdpck inspect`` / ``fsdpck diff``, written with plain DCP.

No conftest fixtures: test modules import these functions. Pristine checkpoints are
written once per test process (``functools.cache``) into a private temp dir and must not
be modified; a test that injects a fault copies one first (:func:`copy_ckpt`).

* :func:`plain_ckpt`: ``dcp.save`` without a process group of nested dicts, a Linear
  model and its Adam state, an LR scheduler's state, an int step counter, a string,
  scalar and empty tensors and several dtypes, with an ``fsdpck.json`` manifest.
* :func:`torch_save_ckpt`: ``format_utils.torch_save_to_dcp`` output.
* :func:`fsdp2_ckpts`: FSDP2 DTensor state saved at 2 and 3 ranks by one torchrun launch
  of ``tests/_ckpt_fsdp2_worker.py`` (the same state at both world sizes).
* :func:`fsdpck_save_ckpt`: ``python -m fsdpck save`` output with fsdpck's own manifest.
* :func:`synthetic_ckpt`: N keys in DCP's own metadata classes, built without N torch.save
  calls (for the 10,000-key test).
* :func:`chunked_ckpt`: tensors stored as a grid of chunks over two files, as a save at several
  ranks stores them (for ``show --slice`` and piece-by-piece reads), in DCP's own classes.
* :func:`resume_ckpt`: model and Adam state named as DCP's state-dict API names them, saved
  without a process group; ``faults=True`` plants what ``inspect --stats`` must name
  (:data:`PLANTED`): NaN and +Inf, zeroed moments, a step that disagrees, lr 0, state lost.

Faults and hostile input: :func:`flip_byte_in_tensor` (one bit of a tensor's stored data),
:func:`replace_byte_item` (another value for a byte item, e.g. an lr), :func:`rewrite_metadata`
(edit ``.metadata`` in DCP's classes), :func:`payloads` (crafted ``.metadata`` pickles that leave
a marker file if anything runs them), :class:`Recorder` (the globals a trusted pickle names)
and :func:`load_metadata_file` (a file through fsdpck's restricted unpickler).

Used by tests/unit/ (no process group: plain_ckpt, torch_save_ckpt, synthetic_ckpt, chunked_ckpt,
resume_ckpt) and tests/integration/ (fsdp2_ckpts, fsdpck_save_ckpt).
"""

from __future__ import annotations

import atexit
import functools
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_CACHE_DIR: Path | None = None


def cache_dir() -> Path:
    """A private temp dir for this test process's pristine checkpoints, removed at exit."""
    global _CACHE_DIR
    if _CACHE_DIR is None:
        _CACHE_DIR = Path(tempfile.mkdtemp(prefix="fsdpck-ckpt-tests-"))
        atexit.register(shutil.rmtree, _CACHE_DIR, True)
    return _CACHE_DIR


def plain_state(seed: int = 0) -> dict[str, Any]:
    """A state dict with the kinds of values real training state has."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    gen = torch.Generator().manual_seed(seed + 1)
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "sched": sched.state_dict(),
        "step": 7,
        "name": "run-42",
        "nested": {
            "a": {"ids": torch.arange(6, dtype=torch.int64).reshape(2, 3), "bf": torch.randn(3, 2, generator=gen).bfloat16()},
            "half": torch.randn(5, generator=gen).half(),
            "vol": torch.randn(2, 3, 4, generator=gen),
        },
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 3),
        "flags": torch.tensor([True, False, True]),
    }


def dcp_save(state: dict[str, Any], path: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return path


def flat_state(state: dict[str, Any]) -> dict[str, Any]:
    """The state flattened to DCP keys, exactly as dcp.save names them."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, _ = flatten_state_dict(state)
    return flat


def manifest_for(state: dict[str, Any], *, world_size: int = 1):
    """An fsdpck.json Manifest of ``state`` (fingerprints of the in-memory values)."""
    import torch

    from fsdpck.checkpoint.manifest import Manifest, ManifestEntry, TensorStats
    from fsdpck.fingerprint import fp_tensor, to_hex
    from fsdpck.state.canonical import canonical

    keys = {}
    for key, value in flat_state(state).items():
        if isinstance(value, torch.Tensor):
            t = value.detach()
            stats = TensorStats(numel=t.numel(), nonfinite=0)
            if t.numel() and t.is_floating_point():
                f = t.float()
                stats = TensorStats(numel=t.numel(), min=float(f.min()), max=float(f.max()),
                                    abs_max=float(f.abs().max()), mean=float(f.mean()), nonfinite=0)
            keys[key] = ManifestEntry(kind="tensor", shape=tuple(t.shape), dtype=str(t.dtype).removeprefix("torch."),
                                      fingerprint=to_hex(fp_tensor(t)), stats=stats)
        else:
            keys[key] = ManifestEntry(kind="object", canonical=canonical(value))
    return Manifest(torch_version=torch.__version__, world_size=world_size,
                    flow={"fsdp": 0, "api": "plain", "optimizer": "adam", "dtype": "float32", "steps": 1, "save_mode": "sync"},
                    model={"dims": [4, 3], "width": 1, "seed": 0}, keys=keys)


@functools.cache
def plain_ckpt() -> Path:
    """A pristine plain checkpoint with its fsdpck.json manifest."""
    from fsdpck.checkpoint.manifest import write_manifest
    from fsdpck.checkpoint.storage import LocalStorage

    path = dcp_save(plain_state(), cache_dir() / "plain")
    write_manifest(LocalStorage(path), manifest_for(plain_state()))
    return path


@functools.cache
def torch_save_ckpt() -> Path:
    """A pristine checkpoint written by format_utils.torch_save_to_dcp."""
    import torch
    from torch.distributed.checkpoint.format_utils import torch_save_to_dcp

    src = cache_dir() / "ts.pt"
    gen = torch.Generator().manual_seed(3)
    torch.save({"w": torch.randn(3, 3, generator=gen), "inner": {"b": torch.ones(2, dtype=torch.float16)}, "epoch": 4}, src)
    out = cache_dir() / "torch_save"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_save_to_dcp(src, out)
    return out


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


_LAUNCHES: dict[str, dict[str, Any]] = {}


def _start(name: str, cmd: list[str]) -> None:
    """Start ``cmd`` in the background once per process; :func:`_wait` collects it."""
    if name in _LAUNCHES:
        return
    log = open(cache_dir() / f"{name}.log", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    _LAUNCHES[name] = {"proc": proc, "log": log}

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()

    atexit.register(stop)


def _wait(name: str, expected: list[Path]) -> None:
    proc, log = _LAUNCHES[name]["proc"], _LAUNCHES[name]["log"]
    try:
        code = proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        code = proc.wait()
    log.seek(0)
    tail = "\n".join(log.read().splitlines()[-40:])
    if code != 0 or not all(p.exists() for p in expected):
        raise RuntimeError(f"{name} failed (exit {code}):\n$ {' '.join(proc.args)}\n{tail}")


def start_background() -> None:
    """Start the slow checkpoint writers (torchrun, fsdpck save) in the background, once per process.

    Test modules call this when they are imported, so that the launches (10-20 s of torch
    imports on a 2-core machine) overlap the tests that run before the first one needs them.
    """
    _start("fsdp2", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                     str(REPO / "tests" / "_ckpt_fsdp2_worker.py"), str(cache_dir() / "fsdp2")])
    _start("fsdpck-save", [sys.executable, "-m", "fsdpck", "save", str(cache_dir() / "fsdpck-save")])


@functools.cache
def fsdp2_ckpts() -> tuple[Path, Path]:
    """FSDP2 checkpoints of the same state saved at world sizes 2 and 3 (one torchrun launch)."""
    start_background()
    out = cache_dir() / "fsdp2"
    _wait("fsdp2", [out / "ws2" / ".metadata", out / "ws3" / ".metadata"])
    return out / "ws2", out / "ws3"


@functools.cache
def fsdpck_save_ckpt() -> Path:
    """fsdpck's own checkpoint: ``python -m fsdpck save DIR`` at world size 1, with its manifest."""
    start_background()
    out = cache_dir() / "fsdpck-save"
    _wait("fsdpck-save", [out / ".metadata", out / "fsdpck.json"])
    return out


def copy_ckpt(src: Path, dst: Path) -> Path:
    """A private copy of a pristine checkpoint, for a test to damage."""
    shutil.copytree(src, dst)
    return dst


def storage_info(path: Path, key: str) -> tuple[str, int, int]:
    """(file, byte offset, byte length) of a key's first stored item, from DCP's own reader (trusted here)."""
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(str(path)).read_metadata()
    for index, info in md.storage_data.items():
        if index.fqn == key:
            return info.relative_path, info.offset, info.length
    raise KeyError(key)


def flip_byte_in_tensor(path: Path, key: str, value: Any) -> str:
    """Flip one bit in the middle of tensor ``value``'s raw data as stored for ``key``; returns the file name."""
    name, offset, length = storage_info(path, key)
    raw = value.detach().contiguous().reshape(-1).view(__import__("torch").uint8).numpy().tobytes()
    data = bytearray((path / name).read_bytes())
    at = data.find(raw, offset, offset + length)
    assert at >= 0, f"the raw data of {key} was not found in its byte range of {name}"
    data[at + len(raw) // 2] ^= 0x10
    (path / name).write_bytes(bytes(data))
    return name


def replace_byte_item(path: Path, key: str, value: Any) -> str:
    """Overwrite the byte item ``key`` in its shard file with ``torch.save(value)``; returns the file name.

    The new archive must have the stored item's exact length (a float for a float, say), so
    that ``.metadata`` stays right and only the value changes: what a flipped lr looks like.
    """
    import torch

    name, offset, length = storage_info(path, key)
    buf = io.BytesIO()
    torch.save(value, buf)
    blob = buf.getvalue()
    assert len(blob) == length, f"torch.save({value!r}) is {len(blob)} bytes, the stored {key} is {length}"
    data = bytearray((path / name).read_bytes())
    data[offset : offset + length] = blob
    (path / name).write_bytes(bytes(data))
    return name


def rewrite_metadata(path: Path, edit) -> None:
    """Load .metadata with the plain unpickler (the tests wrote it), let ``edit`` change it, write it back."""
    with open(path / ".metadata", "rb") as f:
        md = pickle.load(f)
    edit(md)
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)


class Payload:
    """Pickles as a call of ``func(*args)``: what a crafted .metadata holds."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def marker_command(marker: Path) -> str:
    return f"{sys.executable} -c \"open({str(marker)!r}, 'w').write('pwned')\""


def payloads(marker: Path) -> dict[str, bytes]:
    """Crafted ``.metadata`` pickles that each create ``marker`` if anything runs them."""
    import builtins

    from torch.distributed.checkpoint.metadata import Metadata

    code = f"open({str(marker)!r}, 'w').write('pwned')"
    return {
        "os.system": pickle.dumps(Payload(os.system, marker_command(marker))),
        "builtins.exec": pickle.dumps(Payload(builtins.exec, code)),
        "builtins.eval": pickle.dumps(Payload(builtins.eval, f"exec({code!r})")),
        "subprocess.Popen": pickle.dumps(Payload(subprocess.Popen, ["sh", "-c", f"echo > {marker}"])),
        "nested in real Metadata": pickle.dumps(
            Metadata(state_dict_metadata={"x": Payload(builtins.exec, code)}, storage_data={})),
        # Protocol 0 GLOBAL opcodes, and an attribute chain behind an admitted class.
        "GLOBAL opcode": f"cbuiltins\nexec\n(V{code}\ntR.".encode(),
        "dotted name": b"ctorch.distributed.checkpoint.metadata\nMetadata.__init__.__globals__\n.",
    }


class Recorder(pickle.Unpickler):
    """Records every global a pickle names (used on files these tests wrote themselves)."""

    def __init__(self, f):
        super().__init__(f)
        self.seen: set[tuple[str, str]] = set()

    def find_class(self, module, name):
        self.seen.add((module, name))
        return super().find_class(module, name)


def load_metadata_file(path: Path) -> Any:
    """A ``.metadata`` file through fsdpck's restricted unpickler."""
    from fsdpck.checkpoint.unpickler import load_metadata

    with open(path, "rb") as f:
        return load_metadata(f, size=os.fstat(f.fileno()).st_size, source=str(path))


def synthetic_ckpt(path: Path, n_keys: int) -> list[str]:
    """A loadable DCP checkpoint of ``n_keys`` tensor keys, built in DCP's own classes without N saves.

    Every key is a float32 tensor [2, 3] whose one chunk points at its own copy of the same
    torch.save blob in ``__0_0.distcp``; ``.metadata`` is pickled as FileSystemWriter does.
    """
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    path.mkdir(parents=True)
    value = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    buf = io.BytesIO()
    torch.save(value, buf)
    blob = buf.getvalue()
    (path / "__0_0.distcp").write_bytes(blob * n_keys)
    keys = [f"model.layers.{i // 10}.p{i % 10}" for i in range(n_keys)]
    sdm, storage = {}, {}
    props = TensorProperties(dtype=torch.float32)
    for i, key in enumerate(keys):
        sdm[key] = TensorStorageMetadata(properties=props, size=torch.Size([2, 3]),
                                         chunks=[ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([2, 3]))])
        storage[MetadataIndex(key, [0, 0])] = _StorageInfo("__0_0.distcp", i * len(blob), len(blob))
    md = Metadata(state_dict_metadata=sdm, planner_data={k: (k,) for k in keys}, storage_data=storage,
                  storage_meta=StorageMeta(checkpoint_id=path), version="1.0.0")
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return keys


def chunked_ckpt(path: Path, tensors: dict[str, tuple[Any, tuple[int, ...]]], *, extra: dict[str, Any] | None = None
                 ) -> Path:
    """A loadable DCP checkpoint whose tensor ``key`` is stored as a grid of chunks: ``grid[d]`` (near-)equal
    parts along dim d, written alternately to ``__0_0.distcp`` and ``__1_0.distcp`` as ``torch.save`` blobs
    (what FileSystemWriter writes). ``extra``: byte items (``torch.save``d values) beside them."""
    import itertools

    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    path.mkdir(parents=True)
    files = {"__0_0.distcp": bytearray(), "__1_0.distcp": bytearray()}
    names = list(files)
    sdm, storage = {}, {}
    n = 0

    def put(blob: bytes) -> tuple[str, int]:
        nonlocal n
        name = names[n % 2]
        n += 1
        offset = len(files[name])
        files[name] += blob
        return name, offset

    for key, (value, grid) in tensors.items():
        edges = [[size * k // parts for k in range(parts + 1)] for size, parts in zip(value.shape, grid)]
        chunks = []
        for cell in itertools.product(*[range(len(e) - 1) for e in edges]):
            offsets = [edges[d][c] for d, c in enumerate(cell)]
            sizes = [edges[d][c + 1] - edges[d][c] for d, c in enumerate(cell)]
            piece = value[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].clone()
            buf = io.BytesIO()
            torch.save(piece, buf)
            name, offset = put(buf.getvalue())
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
            storage[MetadataIndex(key, offsets)] = _StorageInfo(name, offset, len(buf.getvalue()))
        sdm[key] = TensorStorageMetadata(properties=TensorProperties(dtype=value.dtype), size=value.shape,
                                         chunks=chunks)
    for key, value in (extra or {}).items():
        buf = io.BytesIO()
        torch.save(value, buf)
        name, offset = put(buf.getvalue())
        sdm[key] = BytesStorageMetadata()
        storage[MetadataIndex(key)] = _StorageInfo(name, offset, len(buf.getvalue()))
    for name, data in files.items():
        (path / name).write_bytes(bytes(data))
    md = Metadata(state_dict_metadata=sdm, planner_data={k: (k,) for k in sdm}, storage_data=storage,
                  storage_meta=StorageMeta(checkpoint_id=path), version="1.0.0")
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return path


# What resume_ckpt(faults=True) plants, by suspicious rule: the keys inspect --stats must name.
PLANTED = {
    "non-finite": ["model.0.weight"],
    "zero-moment": ["optim.state.2.weight.exp_avg", "optim.state.2.weight.exp_avg_sq"],
    "step": ["optim.state.0.bias.step"],
    "lr": ["optim.param_groups.0.lr"],
    "state-missing": ["optim.param_groups.0.params"],
}


def resume_state(*, faults: bool) -> dict[str, Any]:
    """Model and Adam state after two steps, keyed by FQN as ``get_state_dict`` gives them (and FSDP's
    optimizer state dicts); with ``faults``, what a bad resume leaves (:data:`PLANTED`)."""
    import math

    import torch
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        msd, osd = get_state_dict(model, opt)
    if faults:
        msd["0.weight"][1, 2] = math.nan
        msd["0.weight"][0, 0] = math.inf
        osd["state"]["2.weight"]["exp_avg"].zero_()
        osd["state"]["2.weight"]["exp_avg_sq"].zero_()
        osd["state"]["0.bias"]["step"] = torch.tensor(1.0)
        osd["param_groups"][0]["lr"] = 0.0
        del osd["state"]["2.bias"]
    return {"model": msd, "optim": osd}


@functools.cache
def resume_ckpt(faults: bool) -> Path:
    """A pristine checkpoint of :func:`resume_state` (``dcp.save`` without a process group)."""
    return dcp_save(resume_state(faults=faults), cache_dir() / f"resume-{'bad' if faults else 'clean'}")
