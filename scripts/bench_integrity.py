"""How long, and how much memory, does judging a hostile chunk layout take? (docs/security.md)

Builds the layouts a crafted ``.metadata`` can declare for one tensor and times fsdpck's cover
check on each, in this process: an exact cover of a 12-dim tensor by about 100,000 chunks with
every dim split, the same with one chunk shifted (overlap and gap), and random boxes; then the
whole ``fsdpck inspect`` path (restricted unpickler, parsing, every check) on a ``.metadata``
holding the exact cover. Prints seconds and the process's peak RSS after each.

    python scripts/bench_integrity.py            # ~100k chunks
    python scripts/bench_integrity.py --chunks 20000
"""

from __future__ import annotations

import argparse
import itertools
import pickle
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsdpck.checkpoint.integrity import chunk_cover_problems, open_checkpoint  # noqa: E402
from fsdpck.checkpoint.metadata import ChunkInfo  # noqa: E402
from fsdpck.checkpoint.storage import LocalStorage  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def grid(n_chunks: int, ndim: int = 12) -> tuple[tuple[int, ...], list[ChunkInfo]]:
    """A 12-dim tensor split in two along every dim but the first, which takes the rest of the chunks."""
    first = max(1, n_chunks // 2 ** (ndim - 1))
    shape = (first * 3,) + (4,) * (ndim - 1)
    chunks = []
    for cell in itertools.product(range(first), *([range(2)] * (ndim - 1))):
        offsets = (cell[0] * 3,) + tuple(c * 2 for c in cell[1:])
        chunks.append(ChunkInfo(offsets=offsets, sizes=(3,) + (2,) * (ndim - 1), storage=None))
    return shape, chunks


def timed(label: str, fn) -> None:
    t0 = time.perf_counter()
    out = fn()
    took = time.perf_counter() - t0
    kinds = sorted({p.kind for p in out}) if isinstance(out, list) else out
    print(f"{label:<58} {took:7.2f} s   peak RSS {peak_mb():7.0f} MB   -> {kinds or 'whole'}")


def metadata_file(shape: tuple[int, ...], chunks: list[ChunkInfo], path: Path) -> None:
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"\0" * 8)
    md_chunks = [ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)) for c in chunks]
    storage = {MetadataIndex("t", list(c.offsets)): _StorageInfo("__0_0.distcp", 0, 0) for c in chunks}
    md = Metadata(state_dict_metadata={"t": TensorStorageMetadata(TensorProperties(dtype=torch.uint8),
                                                                  torch.Size(shape), md_chunks)},
                  storage_data=storage)
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=100_000)
    args = p.parse_args()
    shape, chunks = grid(args.chunks)
    print(f"tensor {list(shape)}, {len(chunks)} chunks of 12 dims, every dim split; baseline peak RSS {peak_mb():.0f} MB")
    timed("exact cover", lambda: chunk_cover_problems("t", shape, tuple(chunks)))
    moved = list(chunks)
    c = moved[len(moved) // 2]
    moved[len(moved) // 2] = ChunkInfo(offsets=(c.offsets[0],) + (1,) + c.offsets[2:], sizes=c.sizes, storage=None)
    timed("one chunk shifted by one (an overlap and a gap)", lambda: chunk_cover_problems("t", shape, tuple(moved)))
    rng = random.Random(0)
    boxes = [ChunkInfo(offsets=tuple(rng.randrange(0, n - 1) for n in shape), sizes=(1,) * len(shape), storage=None)
             for _ in range(len(chunks))]
    timed("random boxes", lambda: chunk_cover_problems("t", shape, tuple(boxes)))
    with tempfile.TemporaryDirectory() as tmp:
        metadata_file(shape, chunks, Path(tmp) / "ck")
        size = (Path(tmp) / "ck" / ".metadata").stat().st_size
        timed(f"open_checkpoint of a {size / 1e6:.0f} MB .metadata (unpickle, parse, check)",
              lambda: open_checkpoint(LocalStorage(Path(tmp) / "ck")).problems)


if __name__ == "__main__":
    main()
