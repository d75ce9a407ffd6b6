"""Write docs/reliability.md from the rows the reliability tests recorded.

The tests call ``tests/reliability.py:record(...)``; with FSDPCK_RELIABILITY_LOG=path set
each call appends one JSON line (fault, sees, code, seconds, left, test: the pytest node id of the
test that recorded it). This script turns
such a log into the table: one row per (fault, test), the last run's values where a test
ran more than once.

    FSDPCK_RELIABILITY_LOG=/tmp/rel.jsonl python3 -m pytest tests/integration/test_drills.py \\
        tests/integration/test_storage.py tests/integration/test_multinode.py
    python3 scripts/reliability_table.py /tmp/rel.jsonl [--drills drills.out] [-o docs/reliability.md]

``--drills`` takes the output of scripts/drills.sh (the whole drill table) and puts its
summary in the document; without it, a drills section already in the document is kept.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIELDS = ("fault", "sees", "code", "seconds", "left", "test")
DRILLS_BEGIN, DRILLS_END = "<!-- drills -->", "<!-- /drills -->"

INTRO = """\
# Reliability: what fsdpck does on its bad days

A pre-flight check is judged on the days something goes wrong: a rank that dies or hangs, a
full disk, a checkpoint dir that is not shared between nodes, a half-written checkpoint, a
hostile command line. Each row below is one such fault, produced by a test in the suite: what
the user sees (the line a log reader would find), the exit code fsdpck ends with (0 verified,
1 difference or integrity problem, 2 usage or set-up error, 3 runtime failure), the time from
launch to exit on the machine the table was made on (a 2-core CPU box running gloo; most of it
is starting Python and torch), and what was left on disk. Rows starting "none:" are the
multi-node runs that must pass.

Regenerate it from a real run:

```bash
rm -f /tmp/rel.jsonl
FSDPCK_RELIABILITY_LOG=/tmp/rel.jsonl python3 -m pytest tests/integration/test_drills.py \\
    tests/integration/test_storage.py tests/integration/test_multinode.py
bash scripts/drills.sh > /tmp/drills.out     # optional: the whole drill table, ~15 min on 2 cores
python3 scripts/reliability_table.py /tmp/rel.jsonl --drills /tmp/drills.out
```

Command lines are fuzzed separately (tests/unit/test_fuzz_cli.py): every command's options, ~100
generated cases per run, each must end with exit 2, a message naming the option, and no
traceback.
"""


def read_rows(path: Path) -> list[dict]:
    """The recorded rows, one per (fault, test), in first-seen order with the last values."""
    rows: dict[tuple[str, str], dict] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{n}: not a JSON line ({e.msg}); was it written by tests/reliability.py?")
        missing = [f for f in FIELDS if f not in row]
        if missing:
            raise SystemExit(f"{path}:{n}: missing field(s) {', '.join(missing)}")
        rows[(row["fault"], row["test"])] = row  # a re-run replaces its earlier row, keeping its place
    return list(rows.values())


def cell(text: object, *, code: bool = False) -> str:
    """One markdown table cell: one line, pipes escaped."""
    s = re.sub(r"\s+", " ", str(text)).strip()
    if code and s and "`" not in s:
        return "`" + s.replace("|", "\\|") + "`"
    return s.replace("|", "\\|") or "—"


def untemp(text: str) -> str:
    """A test's temporary dir is noise in the table: /tmp/pytest-of-root/pytest-58/test_x0/ck -> $TMP/ck."""
    return re.sub(r"/tmp/pytest-of-[^/\s]+/pytest-\d+/[^/\s']+", "$TMP", text)


def table(rows: list[dict]) -> str:
    lines = ["| fault | what the user sees | exit code | time to exit (s) | left on disk | test |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append("| " + " | ".join([
            cell(r["fault"]), cell(untemp(r["sees"]), code=True), cell(r["code"]), cell(f"{float(r['seconds']):.1f}"),
            cell(r["left"]), cell(r["test"], code=True),
        ]) + " |")
    return "\n".join(lines) + "\n"


def drills_section(drills_out: str) -> str:
    """The summary of a scripts/drills.sh run, verbatim."""
    body = drills_out.strip("\n")
    return (f"{DRILLS_BEGIN}\n## The whole drill table (scripts/drills.sh)\n\n"
            "Every phase × kind at world sizes 2 and 3 (`fsdpck verify -n N --timeout 10 --planner none` with "
            "`FSDPCK_FAULT=PHASE:RANK:KIND`, the last rank failing). A drill passes when it ends with exit 3 "
            "within --timeout + 30 s; *named* says whether the output names the failed rank.\n\n"
            f"```\n{body}\n```\n{DRILLS_END}\n")


def kept_drills_section(document: Path) -> str | None:
    if not document.exists():
        return None
    text = document.read_text(encoding="utf-8")
    start, end = text.find(DRILLS_BEGIN), text.find(DRILLS_END)
    if start < 0 or end < start:
        return None
    return text[start:end + len(DRILLS_END)] + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="JSON lines written with FSDPCK_RELIABILITY_LOG=path")
    parser.add_argument("-o", "--output", type=Path, default=REPO / "docs" / "reliability.md")
    parser.add_argument("--drills", type=Path, help="output of scripts/drills.sh to include")
    args = parser.parse_args(argv)
    if not args.log.is_file():
        parser.error(f"{args.log}: no such file (run the tests with FSDPCK_RELIABILITY_LOG={args.log} first)")
    rows = read_rows(args.log)
    if not rows:
        parser.error(f"{args.log}: no rows recorded")
    drills = drills_section(args.drills.read_text(encoding="utf-8")) if args.drills else kept_drills_section(args.output)
    text = INTRO + "\n## Faults and what fsdpck does\n\n" + table(rows) + ("\n" + drills if drills else "")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(f".{args.output.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(args.output)
    print(f"{args.output}: {len(rows)} rows" + (", drills summary" if drills else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
