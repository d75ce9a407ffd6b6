"""How fast is each fingerprint path, against a memory-bandwidth baseline measured in the same run?

Fingerprints one tensor (256 MiB of float32 by default) through every path that serves its
device (``torch`` always; ``c`` on the CPU; ``triton`` on CUDA), each forced with
``FSDPCK_FP_BACKEND``, and copies it with ``t.clone()`` and with ``copy_`` into a buffer kept
alive (which skips clone's page faults). Prints the rates in GB/s (tensor bytes per second)
and each path's ratio to ``copy_``, so that numbers from different machines compare by the
ratio, and checks that every path gives the same fingerprint. Run from the repo root::

    python scripts/bench_fingerprint.py                       # all intra-op threads
    OMP_NUM_THREADS=1 python scripts/bench_fingerprint.py     # per CPU core
    python scripts/bench_fingerprint.py --dtype bfloat16 --backends c,torch
    python scripts/bench_fingerprint.py --device cuda --triton-sweep
    python scripts/bench_fingerprint.py --json -              # the same figures as JSON on stdout
    python scripts/bench_fingerprint.py --compiled            # also a fused torch.compile kernel
    python scripts/bench_fingerprint.py --manifest --repeat 5 # a manifest entry against the fingerprint

Each figure is the best (and the median) of ``--repeat`` timed runs after one untimed warm-up (which also
compiles the C or Triton kernel, if that has not happened yet). The C path uses torch's
intra-op thread count (``--threads``, or ``OMP_NUM_THREADS``), as the torch path does. On the
CPU it also prints GB per CPU-second (bytes over the process's CPU time, all threads): a
per-core rate that other load on a shared machine hardly moves, where wall-clock rates do.

``--triton-sweep`` times the Triton kernel at a few tile sizes and warp counts
(``fsdpck.fingerprint.triton_kernel.BLOCK`` / ``NUM_WARPS`` / ``TILES``) to choose its defaults.
``--compiled`` times the same arithmetic through ``torch.compile``: the headroom a fused torch
kernel would have, compile time included; fsdpck does not use it. ``--piece-numel`` overrides
the torch path's piece size (``fsdpck.fingerprint.torch_path.PIECE_NUMEL``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ALL_BACKENDS = ("torch", "c", "triton")


def best_seconds(fn, *, repeat: int, sync) -> float:
    return best_times(fn, repeat=repeat, sync=sync)[0]


def best_times(fn, *, repeat: int, sync) -> tuple[float, float]:
    """The best wall-clock seconds and the best CPU seconds (this process, all threads) of ``repeat`` runs.

    CPU seconds make a per-core rate that other load on the machine hardly moves: a run that
    waits for a core does not count the wait.
    """
    walls, cpus = all_times(fn, repeat=repeat, sync=sync)
    return min(walls), min(cpus)


def all_times(fn, *, repeat: int, sync) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU seconds of each of ``repeat`` runs after one untimed warm-up."""
    fn()
    sync()
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def compiled_fp_tensor(piece_numel: int):
    """fp_tensor of a contiguous tensor through one torch.compile'd kernel per piece (experiment).

    The same arithmetic as the torch path (``fsdpck.fingerprint.torch_path``), its constants included.
    """
    import torch

    from fsdpck.fingerprint import MASK64
    from fsdpck.fingerprint import torch_path as tp

    def mix(z, *, nonnegative=False):
        s = z >> 30
        z = z ^ (s if nonnegative else s & tp._KEEP_AFTER_30)
        z = z * tp._MUL1_I64
        z = z ^ ((z >> 27) & tp._KEEP_AFTER_27)
        z = z * tp._MUL2_I64
        return z ^ ((z >> 31) & tp._KEEP_AFTER_31)

    def piece_sum(bits, first_index_plus_one):
        index = torch.arange(bits.numel(), dtype=torch.int64, device=bits.device) + first_index_plus_one
        return mix(bits.to(torch.int64) ^ mix(index, nonnegative=True)).sum()

    kernel = torch.compile(piece_sum, dynamic=True)

    def fp(t):
        bits = tp.bits_view(t).reshape(-1)
        acc = torch.zeros((), dtype=torch.int64, device=t.device)
        for start in range(0, bits.numel(), piece_numel):
            acc += kernel(bits[start : start + piece_numel], start + 1)
        return int(acc.item()) & MASK64

    return fp


def forced(name: str):
    """Context: FSDPCK_FP_BACKEND=name, restored afterwards."""
    import contextlib

    from fsdpck.fingerprint import BACKEND_ENV

    @contextlib.contextmanager
    def cm():
        old = os.environ.get(BACKEND_ENV)
        os.environ[BACKEND_ENV] = name
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(BACKEND_ENV, None)
            else:
                os.environ[BACKEND_ENV] = old

    return cm()


def make_tensor(mib: int, dtype_name: str, device):
    import torch

    dtype = getattr(torch, dtype_name)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = mib * (1 << 20) // itemsize
    # Random bytes viewed as the dtype: the paths must not care what the values are.
    data = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, device=device)
    if dtype == torch.bool:
        data &= 1
    return data.view(dtype)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="tensor size in MiB")
    parser.add_argument("--dtype", default="float32", help="torch dtype name (itemsize 1, 2, 4 or 8)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--backends", default=None, help=f"comma-separated paths to time, of {ALL_BACKENDS} (default: the device's)"
    )
    parser.add_argument("--piece-numel", type=int, default=None,
                        help="override fsdpck.fingerprint.torch_path.PIECE_NUMEL (the torch path's piece size)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--triton-sweep", action="store_true", help="also time Triton tile sizes and warp counts")
    parser.add_argument("--compiled", action="store_true", help="also time a torch.compile'd fused kernel")
    parser.add_argument("--manifest", action="store_true",
                        help="also time the manifest's per-key entry (fingerprint + statistics) against the "
                             "fingerprint alone, through fsdpck's summarize")
    parser.add_argument("--json", metavar="PATH", default=None, help="write the figures as JSON to PATH ('-': stdout)")
    args = parser.parse_args()

    import torch

    from fsdpck import fingerprint
    from fsdpck.errors import SetupError
    from fsdpck.fingerprint import torch_path

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.piece_numel is not None:
        torch_path.PIECE_NUMEL = args.piece_numel
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    to_stdout = args.json == "-"
    say = (lambda *a: print(*a, file=sys.stderr)) if to_stdout else print

    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    else:
        backends = {"cpu": ["torch", "c"], "cuda": ["torch", "triton"]}.get(device.type, ["torch"])

    t = make_tensor(args.mib, args.dtype, device)
    nbytes = t.numel() * t.element_size()
    clone_s = best_seconds(lambda: t.clone(), repeat=args.repeat, sync=sync)
    # clone() also pays for fresh pages; copy_ into a buffer kept alive is the pure bandwidth.
    dst = torch.empty_like(t)
    copy_walls, copy_cpus = all_times(lambda: dst.copy_(t), repeat=args.repeat, sync=sync)
    copy_s, copy_cpu_s, copy_median = min(copy_walls), min(copy_cpus), median(copy_walls)
    del dst

    report = {
        "schema": "fsdpck.bench_fingerprint/1",
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "mib": args.mib,
        "numel": t.numel(),
        "bytes": nbytes,
        "repeat": args.repeat,
        "baseline": {
            "clone": {"seconds": clone_s, "gb_per_s": gbps(nbytes, clone_s)},
            "copy_": {
                "seconds": copy_s,
                "median_seconds": copy_median,
                "cpu_seconds": copy_cpu_s,
                "gb_per_s": gbps(nbytes, copy_s),
                "gb_per_cpu_s": gbps(nbytes, copy_cpu_s) if device.type == "cpu" and copy_cpu_s > 0 else None,
            },
        },
        "backends": {},
    }
    say(
        f"torch {torch.__version__}  device {device}  threads {torch.get_num_threads()}  "
        f"tensor {args.mib} MiB {args.dtype} ({t.numel()} elements)"
    )
    say(f"{'clone':10} {gbps(nbytes, clone_s):9.2f} GB/s  ({clone_s * 1e3:.1f} ms)")
    copy_per_core = f"; {gbps(nbytes, copy_cpu_s):.2f} GB per CPU-second" if device.type == "cpu" and copy_cpu_s else ""
    say(f"{'copy_':10} {gbps(nbytes, copy_s):9.2f} GB/s  ({copy_s * 1e3:.1f} ms{copy_per_core})")

    values = {}
    for name in backends:
        with forced(name):
            try:
                used = fingerprint.backend(device)
                detail = fingerprint.backend_detail(device)
            except Exception as e:  # noqa: BLE001 - report a path that cannot run here, and go on
                report["backends"][name] = {"available": False, "why": str(e)}
                say(f"{name:10}  unavailable: {e}")
                continue
            if used != name:
                why = f"FSDPCK_FP_BACKEND={name} runs {used} on {device}"
                report["backends"][name] = {"available": False, "why": why}
                say(f"{name:10}  unavailable: {why}")
                continue
            start = time.perf_counter()
            values[name] = fingerprint.fp_tensor(t)
            sync()
            first_s = time.perf_counter() - start
            walls, cpus = all_times(lambda: fingerprint.fp_tensor(t), repeat=args.repeat, sync=sync)
            seconds, cpu_s, median_s = min(walls), min(cpus), median(walls)
        report["backends"][name] = {
            "available": True,
            "detail": detail,
            "seconds": seconds,
            "median_seconds": median_s,
            "median_ratio_to_copy": copy_median / median_s,
            "cpu_seconds": cpu_s,
            "first_call_seconds": first_s,
            "gb_per_s": gbps(nbytes, seconds),
            "gb_per_cpu_s": gbps(nbytes, cpu_s) if device.type == "cpu" and cpu_s > 0 else None,
            "ratio_to_copy": copy_s / seconds,
            "fingerprint": fingerprint.to_hex(values[name]),
        }
        per_core = f"; {gbps(nbytes, cpu_s):.2f} GB per CPU-second" if device.type == "cpu" and cpu_s > 0 else ""
        say(
            f"{name:10} {gbps(nbytes, seconds):9.2f} GB/s  ({seconds * 1e3:.1f} ms; ratio to copy_ "
            f"{copy_s / seconds:.3f}, median of {args.repeat} {copy_median / median_s:.3f}{per_core}; "
            f"first call {first_s * 1e3:.0f} ms)  [{detail}]"
        )
    same = len(set(values.values())) <= 1
    report["same_fingerprint"] = same
    if values:
        say(f"fingerprint {fingerprint.to_hex(next(iter(values.values())))}  same on every path: {same}")

    if args.manifest:
        report["manifest"] = manifest_cost(t, repeat=args.repeat, sync=sync, say=say)

    if args.triton_sweep and device.type == "cuda":
        try:
            with forced("triton"):
                fingerprint.backend(device)
        except SetupError as e:  # the kernel cannot run here: say why, keep the figures measured so far
            report["triton_sweep"] = {"skipped": str(e)}
            say(f"triton sweep skipped: {e}")
        else:
            report["triton_sweep"] = triton_sweep(t, nbytes, copy_s, args.repeat, sync, say)

    if args.compiled:
        fp = compiled_fp_tensor(torch_path.piece_numel(device))
        start = time.perf_counter()
        with forced("torch"):
            reference = fingerprint.fp_tensor(t)
        compiled_same = fp(t) == reference
        first_s = time.perf_counter() - start
        compiled_s = best_seconds(lambda: fp(t), repeat=args.repeat, sync=sync)
        report["compiled"] = {
            "seconds": compiled_s,
            "gb_per_s": gbps(nbytes, compiled_s),
            "ratio_to_copy": copy_s / compiled_s,
            "first_call_seconds": first_s,
            "same_fingerprint": compiled_same,
        }
        say(
            f"{'compiled':10} {gbps(nbytes, compiled_s):9.2f} GB/s  ({compiled_s * 1e3:.1f} ms; ratio to copy_ "
            f"{copy_s / compiled_s:.3f}; first call with compile {first_s:.1f} s; same fingerprint: {compiled_same})"
        )

    if args.json:
        text = json.dumps(report, indent=2) + "\n"
        if to_stdout:
            sys.stdout.write(text)
        else:
            Path(args.json).write_text(text)
    if not same:
        sys.exit(1)


def manifest_cost(t, *, repeat: int, sync, say) -> dict:
    """What a manifest entry costs next to the fingerprint it holds: ``summarize`` of one key,
    with and without the statistics ``fsdpck save`` records, at world size 1 (no collectives)."""
    from types import SimpleNamespace

    from fsdpck.state.summary import flatten, summarize, views

    import torch

    ctx = SimpleNamespace(world_size=1, rank=0)
    # Values as a state holds them (finite; the random bits of the fingerprint's tensor are often
    # NaN or infinite, which the statistics take a slower, masked path for).
    values = torch.randn(t.shape, generator=torch.Generator().manual_seed(0)).to(t.dtype).to(t.device) \
        if t.is_floating_point() else t
    local = views(flatten({"t": values}), rank=0)
    fp_walls, _ = all_times(lambda: summarize(local, ctx=ctx), repeat=repeat, sync=sync)
    st_walls, _ = all_times(lambda: summarize(local, ctx=ctx, stats=True), repeat=repeat, sync=sync)
    out = {"fingerprint_median_s": median(fp_walls), "entry_median_s": median(st_walls),
           "entry_over_fingerprint": median(st_walls) / median(fp_walls)}
    say(f"{'manifest':10} entry (fingerprint + statistics) {out['entry_median_s'] * 1e3:.1f} ms, fingerprint alone "
        f"{out['fingerprint_median_s'] * 1e3:.1f} ms: {out['entry_over_fingerprint']:.2f}x (medians of {repeat})")
    return out


def triton_sweep(t, nbytes: int, copy_s: float, repeat: int, sync, say) -> list[dict]:
    """The Triton path's rate at a few BLOCK / NUM_WARPS / TILES settings (each compiles once).

    fp_layout reads the three from its module at every call, so setting them here takes effect.
    """
    from fsdpck import fingerprint
    from fsdpck.fingerprint import triton_kernel

    saved = (triton_kernel.BLOCK, triton_kernel.NUM_WARPS, triton_kernel.TILES)
    rows = []
    try:
        with forced("triton"):
            expected = fingerprint.fp_tensor(t)
            for block, warps, tiles in [
                (512, 4, 8), (1024, 4, 8), (1024, 8, 8), (2048, 8, 8), (2048, 4, 8), (4096, 8, 8),
                (1024, 4, 2), (1024, 4, 32),
            ]:  # fmt: skip
                triton_kernel.BLOCK, triton_kernel.NUM_WARPS, triton_kernel.TILES = block, warps, tiles
                same = fingerprint.fp_tensor(t) == expected
                seconds = best_seconds(lambda: fingerprint.fp_tensor(t), repeat=repeat, sync=sync)
                rows.append(
                    {"block": block, "num_warps": warps, "tiles": tiles, "seconds": seconds,
                     "gb_per_s": gbps(nbytes, seconds), "ratio_to_copy": copy_s / seconds, "same_fingerprint": same}
                )  # fmt: skip
                say(
                    f"  triton BLOCK {block:5} warps {warps} tiles {tiles:2}: {gbps(nbytes, seconds):9.2f} GB/s  "
                    f"(ratio to copy_ {copy_s / seconds:.3f}; same fingerprint: {same})"
                )
    finally:
        triton_kernel.BLOCK, triton_kernel.NUM_WARPS, triton_kernel.TILES = saved
    return rows


if __name__ == "__main__":
    main()
