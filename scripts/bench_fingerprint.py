"""How fast is fsdpck's fingerprint, against a memory-bandwidth baseline measured in the same run?

Fingerprints a float32 tensor (256 MiB by default) with ``fp_tensor`` and copies it with
``t.clone()`` (and ``copy_`` into a buffer kept alive, which skips clone's page faults), and
prints the rates in GB/s (tensor bytes per second) and their ratios, so that numbers from
different machines can be compared by the ratio. Run from the repo root::

    python scripts/bench_fingerprint.py                       # all intra-op threads
    python scripts/bench_fingerprint.py --threads 1           # per CPU core
    python scripts/bench_fingerprint.py --piece-numel 65536   # another piece size
    python scripts/bench_fingerprint.py --device cuda
    python scripts/bench_fingerprint.py --compiled            # also a fused torch.compile kernel

Each figure is the best of ``--repeat`` timed runs after one untimed warm-up.

``--compiled`` measures the headroom of a fused kernel: the same arithmetic through
``torch.compile`` (one loop in registers instead of ~25 passes over int64 temporaries).
fsdpck does not use it; it is here to size that option, compile time included.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def best_seconds(fn, *, repeat: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def compiled_fp_tensor(piece_numel: int):
    """fp_tensor of a contiguous tensor through one torch.compile'd kernel per piece (experiment)."""
    import torch

    from fsdpck import fingerprint as fpm

    def mix(z, *, nonnegative=False):
        s = z >> 30
        z = z ^ (s if nonnegative else s & fpm._KEEP_AFTER_30)
        z = z * fpm._MUL1_I64
        z = z ^ ((z >> 27) & fpm._KEEP_AFTER_27)
        z = z * fpm._MUL2_I64
        return z ^ ((z >> 31) & fpm._KEEP_AFTER_31)

    def piece_sum(bits, first_index_plus_one):
        index = torch.arange(bits.numel(), dtype=torch.int64, device=bits.device) + first_index_plus_one
        return mix(bits.to(torch.int64) ^ mix(index, nonnegative=True)).sum()

    kernel = torch.compile(piece_sum, dynamic=True)

    def fp(t):
        bits = fpm._bits_view(t).reshape(-1)
        acc = torch.zeros((), dtype=torch.int64, device=t.device)
        for start in range(0, bits.numel(), piece_numel):
            acc += kernel(bits[start : start + piece_numel], start + 1)
        return int(acc.item()) & fpm.MASK64

    return fp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="tensor size in MiB (float32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--piece-numel", type=int, default=None, help="override fingerprint.PIECE_NUMEL")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compiled", action="store_true", help="also time a torch.compile'd fused kernel")
    args = parser.parse_args()

    import torch

    from fsdpck import fingerprint

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.piece_numel is not None:
        fingerprint.PIECE_NUMEL = args.piece_numel
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    t = torch.randn(args.mib * (1 << 20) // 4, device=device)
    nbytes = t.numel() * t.element_size()
    clone_s = best_seconds(lambda: t.clone(), repeat=args.repeat, sync=sync)
    # clone() also pays for fresh pages; copy_ into a buffer kept alive is the pure bandwidth.
    dst = torch.empty_like(t)
    copy_s = best_seconds(lambda: dst.copy_(t), repeat=args.repeat, sync=sync)
    del dst
    fp_s = best_seconds(lambda: fingerprint.fp_tensor(t), repeat=args.repeat, sync=sync)

    piece = fingerprint.piece_numel(device)
    print(
        f"torch {torch.__version__}  device {device}  threads {torch.get_num_threads()}  "
        f"tensor {args.mib} MiB float32  piece {piece} elements"
    )
    print(f"clone        {nbytes / clone_s / 1e9:8.2f} GB/s  ({clone_s * 1e3:.1f} ms)")
    print(f"copy_        {nbytes / copy_s / 1e9:8.2f} GB/s  ({copy_s * 1e3:.1f} ms)")
    print(f"fp_tensor    {nbytes / fp_s / 1e9:8.2f} GB/s  ({fp_s * 1e3:.1f} ms)")
    print(f"ratio fp_tensor/clone  {clone_s / fp_s:.3f}")
    print(f"ratio fp_tensor/copy_  {copy_s / fp_s:.3f}")
    if args.compiled:
        fp = compiled_fp_tensor(piece)
        start = time.perf_counter()
        same = fp(t) == fingerprint.fp_tensor(t)
        first_s = time.perf_counter() - start
        compiled_s = best_seconds(lambda: fp(t), repeat=args.repeat, sync=sync)
        print(
            f"compiled     {nbytes / compiled_s / 1e9:8.2f} GB/s  ({compiled_s * 1e3:.1f} ms; first call with "
            f"compile {first_s:.1f} s; same fingerprint: {same})"
        )
        print(f"ratio compiled/copy_   {copy_s / compiled_s:.3f}")


if __name__ == "__main__":
    main()
