"""Failure drills (FSDPCK_FAULT): every rank ends promptly with exit 3 and the message names the rank and phase.

CI runs one drill per kind, across two world sizes, through ``fsdpck verify -n N`` (the exact
code); scripts/drills.sh runs the whole table. The drill-spec parsing is tests/unit/test_cli_parse.py's.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import check_envelope, fsdpck, invoke, load_json, worker_env
from reliability import record, sees

TIMEOUT = 8  # --timeout for the runs here: a hang must end within it plus a few seconds


# One drill per kind, across both world sizes; scripts/drills.sh runs the whole table.
@pytest.mark.parametrize(
    "phase,rank,kind,nproc",
    [("save", 1, "raise", 2), ("step", 2, "exit", 3), ("save", 1, "hang", 2), ("save", 2, "kill", 3)],
)
def test_drill(phase: str, rank: int, kind: str, nproc: int, tmp_path: Path):
    ck = tmp_path / "ck"
    out = tmp_path / "r.json"
    t0 = time.monotonic()
    r = fsdpck("verify", "--planner", "none", "--checkpoint-dir", str(ck), "--timeout", str(TIMEOUT), "--json", str(out),
               nproc=nproc, env=worker_env(FSDPCK_FAULT=f"{phase}:{rank}:{kind}"), timeout=120)
    took = time.monotonic() - t0
    assert r.code == 3, r.tail()
    assert "Traceback" not in r.text, r.tail()
    # The rank that failed, and where, is named by fsdpck (or, for a killed rank, by its launcher).
    named = {
        "raise": f"rank {rank}: InjectedFault",  # a save drill fires inside DCP, which lists the failed ranks
        "exit": f"rank {rank} during {phase}",
        "hang": f"rank {rank} stopped responding (last seen in {phase}",
        "kill": f"rank {rank} was ended by signal SIGKILL",
    }[kind]
    assert named in r.text, r.tail()
    if kind in ("raise", "hang"):
        # Rank 0 is alive and reports: the verdict and the JSON name the cause.
        assert r.last_line().startswith("fsdpck verify: FAILED (exit 3)") and named in r.last_line(), r.tail()
        doc = load_json(out)
        check_envelope(doc, "verify", 3, verdict=r.last_line())
        assert named in " ".join([doc["error"] or ""] + [f["error"] or "" for f in doc["flows"]])
    # Promptly: a launch here takes ~5-20 s on 2 loaded cores; a hang adds --timeout.
    assert took < 60 + (TIMEOUT if kind == "hang" else 0), r.tail()
    sub = next(ck.iterdir(), None)
    metadata = sub is not None and (sub / ".metadata").exists()
    if phase in ("step", "save"):
        assert not metadata, "a failed save must not leave a valid-looking .metadata"
    left = "checkpoint dir kept" + ("" if phase not in ("step", "save") else ", no .metadata")
    record(f"FSDPCK_FAULT={phase}:{rank}:{kind} at {nproc} ranks", sees=sees(r.text, named), code=r.code,
           seconds=took, left=left)


def test_overwrite_killed_mid_save_leaves_no_old_metadata(tmp_path: Path):
    ck = tmp_path / "ck"
    first = invoke("save", str(ck))  # the earlier checkpoint: world size 1, in this process
    assert first.exit_code == 0, first.output
    assert (ck / ".metadata").exists() and (ck / "fsdpck.json").exists()
    t0 = time.monotonic()
    r = fsdpck("save", str(ck), "--overwrite", "--timeout", str(TIMEOUT), nproc=2,
               env=worker_env(FSDPCK_FAULT="save:1:kill"), timeout=120)
    took = time.monotonic() - t0
    assert r.code == 3, r.tail()
    assert "rank 1 was ended by signal SIGKILL" in r.text, r.tail()
    assert not (ck / ".metadata").exists(), "the old .metadata must go before new shards are written"
    assert not (ck / "fsdpck.json").exists(), "a manifest is written only after every rank finished"
    record("rank killed during `save --overwrite` over an earlier checkpoint", sees=sees(r.text, "SIGKILL"),
           code=r.code, seconds=took, left="new and old shard files, no .metadata, no manifest")
