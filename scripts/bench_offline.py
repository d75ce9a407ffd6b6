"""How fast the offline commands read a checkpoint, side by side with reading its files cold from disk.

Usage (CPU is enough; the checkpoint is made once with ``fsdpck save -n NPROC --size SIZE`` and a
copy of it is the second side of ``diff``)::

    python scripts/bench_offline.py --dir /tmp/bench-offline --size 1GB --reps 3 --json offline.json

Each repetition, in an order that rotates so that a drift of the machine favours none, measures:

- ``cat``: every file of the checkpoint read with 64 MiB reads after its pages were dropped
  from the page cache (``posix_fadvise(DONTNEED)`` after ``fsync``; the fraction still resident
  is measured with ``mincore``) — and the same for both checkpoints (the baseline of ``diff``);
- ``fsdpck inspect --verify-data``, ``fsdpck inspect --stats`` and ``fsdpck diff A B``, each a
  fresh process started after the pages were dropped: its wall time, and the read phase its JSON
  reports (``timings.read_s``), so that the command's own start-up is seen apart;
- start-up: ``python -c "import torch"`` against ``fsdpck inspect A`` (metadata only, warm).

Each command is measured next to its own ``cat`` of the same files, in an order that alternates
by repetition (on a virtual disk whichever reads second may find the host still caching the
files). Each ratio is given two ways, the median over the repetitions of these side-by-side
ratios and the ratio of the medians; a target counts as met only where both are within it.

It prints a table of medians and the ratios the targets of issue 20 are about (a command within
1.25x of ``cat`` cold; ``inspect`` within 2x of ``import torch``) and writes every sample to
``--json`` (``"schema": "fsdpck.bench-offline/1"``). Nothing is asserted: the numbers are the result.
``--code DIR`` runs the fsdpck of another checkout (``git worktree add DIR REF``): the same
measurements of an older version, for a before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_io  # noqa: E402

TARGETS = {"inspect --verify-data / cat": 1.25, "inspect --stats / cat": 1.25, "diff / cat A+B": 1.25,
           "inspect / import torch": 2.0}


CODE: list[Path | None] = [None]  # --code: the checkout whose fsdpck runs (None: the installed one)


def fsdpck(*args: str) -> list[str]:
    return [sys.executable, "-m", "fsdpck", *args]


def run(argv: list[str], *, json_path: Path | None = None) -> tuple[float, dict | None]:
    """(wall seconds, the JSON document it wrote) of a fresh process; a non-zero exit is an error."""
    env = dict(os.environ)
    if CODE[0] is not None:
        env["PYTHONPATH"] = str(CODE[0]) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=CODE[0])  # python -m looks in the working dir first
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench_offline: {' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return wall, (json.loads(json_path.read_text()) if json_path is not None else None)


def compile_bytecode() -> None:
    """Compile fsdpck's modules to bytecode, as ``pip install`` does: an editable install (or
    ``--code``'s checkout) under ``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile them from
    source in every process measured (0.12 s of a 0.35 s start-up here)."""
    run([sys.executable, "-c", "import compileall, os, fsdpck; compileall.compile_dir(os.path.dirname(fsdpck.__file__), quiet=1)"])


def cold(paths: list[Path]) -> float | None:
    """Drop the files' pages; the fraction still resident afterwards."""
    return bench_io.drop_pages(paths)


def cat(paths: list[Path], buffer: bytearray) -> float:
    t0 = time.perf_counter()
    for path in paths:
        bench_io.raw_read(path, buffer)
    return time.perf_counter() - t0


def make_checkpoints(root: Path, size: str, nproc: int) -> tuple[Path, Path]:
    a, b = root / "ck-a", root / "ck-b"
    if not (a / ".metadata").exists():
        shutil.rmtree(a, ignore_errors=True)
        print(f"bench_offline: saving a {size} checkpoint at {nproc} ranks into {a} ...", flush=True)
        subprocess.run(fsdpck("save", "-n", str(nproc), str(a), "--size", size), check=True,
                       stdout=subprocess.DEVNULL)
    if not (b / ".metadata").exists():
        shutil.rmtree(b, ignore_errors=True)
        shutil.copytree(a, b)
    return a, b


def measure(a: Path, b: Path, reps: int, work: Path, skip: list[str]
            ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Every sample, and every ratio of a command to its baseline measured next to it (one per repetition)."""
    files_a, files_b = bench_io.files_under(a), bench_io.files_under(b)
    buffer = bench_io.io_buffer(bench_io.IO_CHUNK, seed=0)
    out: dict[str, list[float]] = {}
    pairs: dict[str, list[float]] = {}

    def add(name: str, value: float | None) -> None:
        if value is not None:
            out.setdefault(name, []).append(value)

    def cold_cat(base: str, files: list[Path]) -> float:
        add("resident after drop", cold(files))
        took = cat(files, buffer)
        add(base, took)
        return took

    def step_pair(name: str, args: list[str], files: list[Path], base: str, rep: int) -> None:
        # The command and its baseline one after the other, in an order that alternates: whichever
        # goes second reads files the first has just read, which a virtual disk's host may still cache.
        target = work / "doc.json"
        took = cold_cat(base, files) if rep % 2 == 0 else None
        add("resident after drop", cold(files))
        wall, doc = run(fsdpck(*args, "--json", str(target)), json_path=target)
        timings = doc["timings"]  # before issue 20, inspect called its read phase verify_data_s
        read = timings.get("read_s", timings.get("verify_data_s"))
        add(f"{name} (wall)", wall)
        add(f"{name} (read phase)", read)
        if took is None:
            took = cold_cat(base, files)
        short = "cat" if base == "cat A (cold)" else "cat A+B"
        pairs.setdefault(f"{name} / {short}", []).append(wall / took)
        pairs.setdefault(f"{name} read phase / {short}", []).append(read / took)

    def step_startup(rep: int) -> None:
        torch_s = run([sys.executable, "-c", "import torch"])[0]
        inspect_s = run(fsdpck("inspect", str(a)))[0]
        add("import torch", torch_s)
        add("inspect (wall)", inspect_s)
        pairs.setdefault("inspect / import torch", []).append(inspect_s / torch_s)

    commands = {"inspect --verify-data": (["inspect", str(a), "--verify-data"], files_a, "cat A (cold)"),
                "inspect --stats": (["inspect", str(a), "--stats"], files_a, "cat A (cold)"),
                "diff": (["diff", str(a), str(b)], files_a + files_b, "cat A+B (cold)")}
    steps = [step_startup] + [
        (lambda rep, name=name, argv=argv, files=files, base=base: step_pair(name, argv, files, base, rep))
        for name, (argv, files, base) in commands.items() if name not in skip]
    compile_bytecode()
    # Warm the interpreter's own files and the C kernels' cache (a fresh node compiles them once: ~6 s).
    run(fsdpck("inspect", str(a), "--verify-data", "--stats"))
    for rep in range(reps):
        order = steps[rep % len(steps):] + steps[: rep % len(steps)]
        for step in order:
            step(rep)
        print(f"bench_offline: repetition {rep + 1} of {reps} done", flush=True)
    return out, pairs


def ratios(pairs: dict[str, list[float]]) -> dict[str, float]:
    """Each ratio's median over the repetitions (a command against the baseline measured next to it)."""
    return {name: statistics.median(values) for name, values in pairs.items()}


BASES = {"inspect --verify-data": "cat A (cold)", "inspect --stats": "cat A (cold)", "diff": "cat A+B (cold)",
         "inspect": "import torch"}


def ratios_of_medians(samples: dict[str, list[float]], pairs: dict[str, list[float]]) -> dict[str, float]:
    """The same ratios as the median of a command's samples over the median of its baseline's: where
    the baseline jumps between two speeds from one read to the next (this VM's disk does), a median
    of ratios depends on which reads were paired, a ratio of medians does not."""
    medians = {k: statistics.median(v) for k, v in samples.items()}
    out = {}
    for name in pairs:
        command = name.split(" / ")[0]
        phase = command.endswith(" read phase")
        command = command.removesuffix(" read phase")
        measured = f"{command} ({'read phase' if phase else 'wall'})"
        out[name] = medians[measured] / medians[BASES[command]]
    return out


def report(samples: dict[str, list[float]], pairs: dict[str, list[float]], data_bytes: int) -> str:
    medians = {k: statistics.median(v) for k, v in samples.items()}
    lines = [f"checkpoint data: {data_bytes / 1e9:.3f} GB per side; {os.cpu_count()} CPUs; "
             f"load average {os.getloadavg()[0]:.1f}",
             "", "| measurement | median s (min–max) |", "| --- | --- |"]
    for name, values in samples.items():
        unit = "" if name == "resident after drop" else " s"
        lines.append(f"| {name} | {medians[name]:.3f}{unit} ({min(values):.3f}–{max(values):.3f}) |")
    lines += ["", "| ratio | median of side-by-side pairs (min–max) | ratio of medians | target (both) |",
              "| --- | --- | --- | --- |"]
    of_medians = ratios_of_medians(samples, pairs)
    for name, value in ratios(pairs).items():
        target = TARGETS.get(name)
        worst = max(value, of_medians[name])
        verdict = f"≤ {target} **{'met' if worst <= target else 'missed'}**" if target else "(info)"
        lines.append(f"| {name} | {value:.2f} ({min(pairs[name]):.2f}–{max(pairs[name]):.2f}) | "
                     f"{of_medians[name]:.2f} | {verdict} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="where the checkpoints live (made once; kept)")
    parser.add_argument("--size", default="1GB", help="checkpoint size for fsdpck save --size (default 1GB)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks that save it (default 2)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write every sample there")
    parser.add_argument("--code", type=Path, default=None, help="run the fsdpck of this checkout (a git worktree)")
    parser.add_argument("--skip", action="append", default=[], metavar="NAME",
                        help="leave a command out (e.g. 'inspect --stats' for a version without it)")
    args = parser.parse_args()
    CODE[0] = args.code.resolve() if args.code is not None else None
    root = args.dir or Path(tempfile.mkdtemp(prefix="fsdpck-bench-offline-"))
    root.mkdir(parents=True, exist_ok=True)
    a, b = make_checkpoints(root, args.size, args.nproc)
    with tempfile.TemporaryDirectory() as work:
        samples, pairs = measure(a, b, args.reps, Path(work), args.skip)
    data_bytes = sum(p.stat().st_size for p in bench_io.files_under(a))
    text = report(samples, pairs, data_bytes)
    verdict = (f"fsdpck bench-offline: MEASURED (exit 0) — {args.reps} repetition(s), {data_bytes / 1e9:.3f} GB "
               "per checkpoint")
    print(text + "\n\n" + verdict)
    if args.json is not None:
        from fsdpck.report.envelope import envelope

        doc = envelope("bench-offline", code=0, verdict=verdict, error=None,
                       checkpoint=str(a), data_bytes=data_bytes, cpus=os.cpu_count(),
                       filesystem=bench_io.filesystem_of(a), reps=args.reps, samples=samples,
                       medians={k: statistics.median(v) for k, v in samples.items()},
                       pairs=pairs, ratios=ratios(pairs), ratios_of_medians=ratios_of_medians(samples, pairs),
                       targets=TARGETS)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
