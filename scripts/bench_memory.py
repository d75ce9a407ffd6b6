"""Where a load's memory goes: the peak of each PyTorch call inside ``fsdpck verify``'s load, at one rank.

Trains fsdpck's model at ``--size``, saves it with ``flows.save`` and lets it go, then loads it
into a fresh model and optimizer with ``flows.load_into`` (the code verify runs) while every
PyTorch call on that path is wrapped: each reports the peak above the memory held when the load
began (host RSS through VmHWM, or CUDA max allocated on a GPU), in units of the state's size
(the share: model + optimizer state). It prints one line per call, in call order. Run from the
repo root::

    python scripts/bench_memory.py --size 512MB                       # FSDP1, legacy API (CPU)
    python scripts/bench_memory.py --size 512MB --fsdp 2              # FSDP2, state_dict API
    python scripts/bench_memory.py --size 8GB --device cuda --json m.json

Peaks nest: a call's peak includes those of the calls inside it. A single process (world size 1,
gloo or NCCL with one rank); the figures at N ranks are each rank's own share's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_io import MemoryWatch, rss_now  # noqa: E402

# (module, attribute, label): every call of the load path that may allocate, outermost first.
WRAPPED = (
    ("torch.distributed.checkpoint.state_dict", "get_state_dict", "get_state_dict (allocates the load target)"),
    ("torch.distributed.checkpoint.state_dict", "set_state_dict", "set_state_dict"),
    ("torch.distributed.checkpoint.optimizer", "load_sharded_optimizer_state_dict",
     "load_sharded_optimizer_state_dict"),
    ("torch.distributed.fsdp.FullyShardedDataParallel", "optim_state_dict_to_load", "FSDP.optim_state_dict_to_load"),
    ("torch.distributed.checkpoint.state_dict_loader", "_load_state_dict", "DCP's read (inside dcp.load)"),
    ("torch.nn.Module", "load_state_dict", "Module.load_state_dict"),
    ("torch.nn.Module", "state_dict", "Module.state_dict (the load target)"),
    ("torch.optim.Optimizer", "load_state_dict", "Optimizer.load_state_dict"),
)


def _target(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    try:
        return importlib.import_module(path)
    except ImportError:
        return getattr(importlib.import_module(module), attr)


class Calls:
    """Wraps the calls in WRAPPED; each records the peak above ``floor`` reached while it ran."""

    def __init__(self, device: Any) -> None:
        self.watch = MemoryWatch(device)
        self.cuda = device.type == "cuda"
        self.floor = 0
        self.rows: list[dict[str, Any]] = []
        self.depth = 0
        self.open_labels: set[str] = set()

    def now(self) -> int:
        import torch

        return int(torch.cuda.memory_allocated()) if self.cuda else rss_now()

    @contextlib.contextmanager
    def wrapped(self) -> Iterator[None]:
        originals = []
        for module, attr, label in WRAPPED:
            owner = _target(module)
            original = getattr(owner, attr, None)
            if original is None:
                continue
            originals.append((owner, attr, original))
            setattr(owner, attr, self._wrap(original, label, isinstance(owner, type)))
        try:
            yield
        finally:
            for owner, attr, original in reversed(originals):
                setattr(owner, attr, original)

    def _wrap(self, original: Any, label: str, method: bool) -> Any:
        calls = self

        def call(*args: Any, **kwargs: Any) -> Any:
            if label in calls.open_labels:  # a recursive call (Module.state_dict of the submodules): the outer one counts
                return original(*args, **kwargs)
            calls.open_labels.add(label)
            try:
                return measured(*args, **kwargs)
            finally:
                calls.open_labels.discard(label)

        def measured(*args: Any, **kwargs: Any) -> Any:
            row = {"call": label, "depth": calls.depth, "at_start": calls.now() - calls.floor}
            calls.rows.append(row)
            calls.depth += 1
            outer = calls.watch.stop()  # the enclosing calls' peaks so far, before this call resets it
            for r in calls.rows[:-1]:
                if "peak" not in r and "open_peak" in r:
                    r["open_peak"] = max(r["open_peak"], outer[1] if calls.cuda else outer[0])
            calls.watch.start()
            row["open_peak"] = 0
            try:
                return original(*args, **kwargs)
            finally:
                rss, cuda = calls.watch.stop()
                peak = max(row["open_peak"], cuda if calls.cuda else rss)
                row["peak"] = peak - calls.floor
                row.pop("open_peak")
                for r in calls.rows:  # the calls still running saw this peak too
                    if "open_peak" in r:
                        r["open_peak"] = max(r["open_peak"], peak)
                calls.depth -= 1
        return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512MB", help="state size (model + optimizer), e.g. 512MB, 8GB")
    parser.add_argument("--fsdp", type=int, choices=(1, 2), default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dir", default=None, help="where the checkpoint goes (default: a temp dir)")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args()

    from fsdpck.checkpoint.storage import LocalStorage
    from fsdpck.commands.verify import VerifyOptions, fresh, local_bytes, release_memory, trained
    from fsdpck.runtime import dist
    from fsdpck.state import flows
    from fsdpck.state.model import parse_size
    from fsdpck.state.registry import WriterOptions
    from fsdpck.state.summary import flatten, views

    ctx = dist.setup(device=args.device, timeout_s=600)
    (flow,) = flows.select(matrix=False, world_size=1, cuda=ctx.device.type == "cuda", fsdp=args.fsdp,
                           planner="default")
    dims = VerifyOptions(size=parse_size(args.size)).dims_for(flow, 1)
    root = Path(tempfile.mkdtemp(prefix="fsdpck-mem-", dir=args.dir))
    try:
        net, optim, trainer = trained(dims, flow, seed=0, ctx=ctx)
        state = flows.state_dict(net, optim, flow, trainer)
        share = local_bytes(views(flatten(state), rank=0))
        flows.save(state, LocalStorage(root), flow, WriterOptions())
        del net, optim, trainer, state
        release_memory(ctx)
        calls = Calls(ctx.device)
        calls.floor = calls.now()
        net, optim, trainer = fresh(dims, flow, seed=0, ctx=ctx)
        fresh_bytes = calls.now() - calls.floor
        calls.watch.start()
        with calls.wrapped():
            flows.load_into(net, optim, LocalStorage(root), flow, rank=0, trainer=trainer)
        whole = calls.watch.stop()
        whole_peak = max([(whole[1] if calls.cuda else whole[0]) - calls.floor, *(r["peak"] for r in calls.rows)])
    finally:
        shutil.rmtree(root, ignore_errors=True)
        dist.teardown()

    unit = "CUDA allocated" if calls.cuda else "RSS"
    print(f"{flow.name}: share {share / 1e9:.3f} GB; {unit} above the start of the load, in shares")
    print(f"  {'fresh model + optimizer':58} {fresh_bytes / share:6.2f} (held when the load starts)")
    for row in calls.rows:
        name = "  " * row["depth"] + row["call"]
        print(f"  {name:58} peak {row['peak'] / share:6.2f}  (at its start {row['at_start'] / share:5.2f})")
    print(f"  {'the whole load':58} peak {whole_peak / share:6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"flow": flow.as_dict(), "share_bytes": share, "basis": unit,
                                               "fresh_bytes": fresh_bytes, "calls": calls.rows,
                                               "whole_peak": whole_peak}, indent=2) + "\n")


if __name__ == "__main__":
    main()
