"""How fast is fsdpck against bare DCP and against the disk, on the same state and the same dir?

One launch builds fsdpck's three-layer model at a size (``--size`` or ``--width``), takes its
optimizer step once to know the state (its fingerprints and bytes), and then, for each of
``--reps`` repetitions, measures side by side in one directory:

1. the disk: each rank writes its share of the checkpoint's bytes into its own file (64 MiB
   writes through the page cache, then fsync), drops the file's pages from the page cache
   (``posix_fadvise(DONTNEED)``, the fraction still resident checked with mincore) and reads
   it back;
2. bare DCP as a trainer uses it: train, ``dcp.save(state, checkpoint_id=dir)``, let the model
   go; then, its pages dropped, a resume with PyTorch's own API into a fresh model + optimizer:
   ``get_state_dict`` (allocates the load target), ``dcp.load`` (the "bare load"),
   ``set_state_dict``, each timed;
3. ``fsdpck verify``'s own round trip, its code and no copy of it (``commands.verify.run_flow``),
   each of its phases timed as ``fsdpck-<phase>``: train, state dict, the fingerprints of the
   saved state, save (and the time inside DCP's own save core), a fresh model, load (and inside
   DCP), the read-back of the loaded state, its fingerprints, the comparison; the checkpoint's
   pages are dropped between save and load. Whether verify kept the saved tensors or compared
   against their fingerprints (states over ``VerifyOptions.saved_copy_limit`` per rank) is in
   the document as ``saved_copy_kept``.

The manifest's per-key entry (fingerprint and statistics) is timed against the fingerprint alone
by ``scripts/bench_fingerprint.py --manifest``.

Every phase starts after a barrier (and a CUDA synchronize on GPU) and counts the slowest
rank. An untimed tiny round trip first loads PyTorch's lazily imported modules and kernels.
fsdpck's pair runs first in even repetitions, bare DCP's in odd ones, so that a drift in the
machine's load favours neither; the memory target's figure is fsdpck's peak (VmHWM reset
before each phase; CUDA max allocated on GPU) in the set-up and repetition 0, before any bare
DCP path has run in the process. Last, ``dst.copy_(src)`` on every rank at once gives the
memory bandwidth the fingerprint is held against. It prints medians, spreads (min-max), the
ratios with their targets, peak memory per rank against its share of the state, and with
``--json`` every raw figure. It removes everything it wrote.

    python scripts/bench.py --width 64 --reps 1                                 # world size 1
    torchrun --standalone --nproc_per_node=2 scripts/bench.py --size 1GB --reps 5
    torchrun --standalone --nproc_per_node=4 scripts/bench.py --size 32GB --dir /scratch --json b.json
    NPROC=2 bash scripts/bench.sh --size 8GB --json b.json                      # the same through a wrapper
    python scripts/bench.py --markdown a.json b.json                            # docs/benchmarks.md's tables

It runs through fsdpck's per-rank runner (``fsdpck.runtime.runner.run_distributed``), as the
commands do: the same exit codes, error paragraphs and JSON writing. Exit code: 0 when every
repetition's round trip verified, 1 when one did not, 2 for a bad option or dir, 3 when a rank
failed. The modules beside it: bench_run.py (the measurements), bench_io.py (disk, page cache
and memory), bench_report.py (figures, tables, markdown).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

T0 = time.perf_counter()  # about the process's start: --max-seconds counts from here
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's fsdpck

import bench_report  # noqa: E402  (beside this file; no torch: --markdown stays light)

from fsdpck.state import registry  # noqa: E402
from fsdpck.state.model import parse_size  # noqa: E402

EXAMPLES = """examples:
  python scripts/bench.py --width 64 --reps 1
  python scripts/bench.py --markdown a.json b.json      # docs/benchmarks.md's tables from --json output
  torchrun --standalone --nproc_per_node=2 scripts/bench.py --size 1GB --reps 3 --json bench.json
  torchrun --standalone --nproc_per_node=2 scripts/bench.py --size 8GB --fsdp 2 --dir /scratch"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=EXAMPLES)
    p.add_argument("--markdown", nargs="+", metavar="RUN.json", default=None,
                   help="print docs/benchmarks.md's tables from --json documents (no run, no process group)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size", default=None, help="bytes of model + optimizer state to checkpoint (500MB, 8GB, 1.5GiB); default 1GB")
    size.add_argument("--width", type=int, default=None, help="the model's width multiplier instead of --size")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--dir", default=None, help="where to write; a fresh subdir is made and removed (default: a temp dir)")
    p.add_argument("--fsdp", type=int, choices=registry.FSDP_VERSIONS, default=1)
    p.add_argument("--api", choices=registry.APIS, default=None, help="state-dict API (default: legacy for --fsdp 1, dsd for 2)")
    p.add_argument("--optimizer", default=registry.DEFAULT_OPTIMIZER, choices=list(registry.OPTIMIZERS))
    p.add_argument("--dtype", default=registry.DEFAULT_DTYPE, choices=list(registry.DTYPES))
    p.add_argument("--thread-count", type=int, default=1, help="FileSystemWriter thread_count, for fsdpck and bare DCP alike")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per rank (default: torch's; torchrun sets 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="collective timeout in seconds")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no repetition that would end past this many seconds since launch (keeps a run inside a job's time limit)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every raw timing and figure as JSON (- for stdout)")
    p.add_argument("--verbose", action="store_true", help="show PyTorch's warnings")
    p.add_argument("--quiet", action="store_true", help="no per-phase progress lines on stderr")
    args = p.parse_args(argv)
    if args.markdown is not None:
        return args
    for name in ("reps", "width", "thread_count", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.api is None:
        args.api = registry.default_api(args.fsdp)
    why = registry.wrapper_problem(args.fsdp, args.api)
    if why:
        p.error(why)
    args.size_bytes = None
    if args.width is None:
        try:
            args.size_bytes = parse_size(args.size or "1GB")
        except ValueError as e:
            p.error(f"--size: {e}")
    args.t0 = T0
    return args


def present(result: Any, *, code: int, error: str | None, warnings: list[dict[str, Any]], ctx: Any,
            elapsed: float | None):
    """What rank 0 shows (the runner's Presentation): the tables, the verdict and the JSON document."""
    from fsdpck.runtime.runner import Presentation

    doc = bench_report.document(result.raw if result is not None else None, code=code, error=error,
                                warnings=warnings, ctx=ctx, elapsed=elapsed)
    return Presentation(bench_report.render(doc) if result is not None else None, doc["verdict"], doc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.markdown is not None:
        try:
            docs = [json.loads(Path(f).read_text()) for f in args.markdown]
        except (OSError, ValueError) as e:
            print(f"fsdpck bench: error: --markdown: {e}", file=sys.stderr)
            return 2
        print(bench_report.markdown(docs))
        return 0

    import torch
    from bench_run import run_bench

    from fsdpck.report.console import make_console
    from fsdpck.runtime.runner import run_distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    return run_distributed("bench", lambda ctx: run_bench(args, ctx), device=args.device, timeout=args.timeout,
                           json_target=args.json, verbose=args.verbose, present=present,
                           out=make_console(stderr=args.json == "-"), err=make_console(stderr=True))


if __name__ == "__main__":
    from fsdpck.cli import finish  # the commands' end: os._exit after a multi-rank run (see dist.needs_hard_exit)

    finish(main())
