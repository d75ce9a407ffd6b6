"""Storage and paths: a full disk, a read-only dir, a path that is a file, relative and unicode paths.

World size 1, in this process, through click's CliRunner: the failures are decided by the
storage and rank 0's checks, not by the number of ranks, and a run here costs a second
where a launch costs ten. Full and read-only disks are small tmpfs mounts (root, and a
kernel that lets us mount; skipped with the reason otherwise), unmounted afterwards.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import check_envelope, invoke, load_json
from reliability import record, sees

FULL_DISK = "1m"  # tmpfs size; --width 128 needs several MiB of checkpoint
FLOW_NONE = "fsdp1-legacy-planner_none-sync-adam-float32"  # verify's subdirectory for --planner none


def mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here, needed to fake this storage: "
                    f"{p.stderr.strip() or p.returncode}")


def unmount(where: Path) -> None:
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def listing(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


# --- a full disk ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["both", "none"], ids=["planner-both", "planner-none"])
def full_disk_run(request, tmp_path_factory):
    """verify into a 1 MiB tmpfs, once per planner setting: the run every full-disk test looks at.

    --planner both: the first flow fills the disk inside DCP, the second cannot even start.
    --planner none: the one flow fills the disk inside DCP's writer.
    """
    base = tmp_path_factory.mktemp("full")
    disk = base / "disk"
    mount_tmpfs(disk, f"size={FULL_DISK}")
    request.addfinalizer(lambda: unmount(disk))
    (disk / "sibling.txt").write_text("the user's own file\n")
    ck = disk / "ck"
    import fsdpck.commands.verify  # noqa: F401  (torch's import is not the time a full disk takes to fail)
    report = tmp_path_factory.mktemp("report") / "v.json"  # not on the full disk
    result = invoke("verify", "--checkpoint-dir", str(ck), "--width", "128", "--planner", request.param, "--timeout", "30",
                    "--json", str(report))
    return {"result": result, "disk": disk, "base": base, "ck": ck, "planner": request.param, "report": report}


def test_full_disk_fails_promptly_and_touches_nothing_else(full_disk_run):
    r, disk, ck = full_disk_run["result"], full_disk_run["disk"], full_disk_run["ck"]
    assert r.exit_code == 3, r.output
    assert "Traceback" not in r.output, r.output
    assert r.output.strip().splitlines()[-1].startswith("fsdpck verify: FAILED (exit 3)"), r.output
    assert r.took < 60, f"a full disk must fail fast, took {r.took:.0f}s"
    assert listing(full_disk_run["base"]) == {"disk"}
    assert listing(disk) == {"sibling.txt", "ck"}, "nothing written beside the checkpoint dir"
    assert (disk / "sibling.txt").read_text() == "the user's own file\n"
    assert not list(ck.rglob(".metadata")), "a failed save must leave no valid-looking .metadata"
    doc = load_json(full_disk_run["report"])
    check_envelope(doc, "verify", 3, verdict=r.output.strip().splitlines()[-1])
    errors = [doc["error"] or ""] + [f["error"] or "" for f in doc["flows"]]  # the run's, or the flow's that raised
    assert any("no space left" in e.lower() for e in errors), errors
    record(f"disk full during save (1 MiB tmpfs, verify --planner {full_disk_run['planner']})",
           sees=sees(r.output, "FAILED"), code=r.exit_code, seconds=r.took,
           left="the partial checkpoint dir, kept for inspection; no .metadata; nothing else touched")


def test_full_disk_message_says_no_space_and_names_the_path(full_disk_run):
    r, ck = full_disk_run["result"], full_disk_run["ck"]
    assert "no space left" in r.output.lower(), r.output
    assert str(ck) in r.output, r.output


# --- a dir we cannot write, a path that is a file -----------------------------------------------


def test_read_only_dir_is_a_set_up_error(tmp_path: Path):
    ro = tmp_path / "ro"
    mount_tmpfs(ro, "ro")  # root ignores permission bits; a read-only mount stops even root
    first = None
    try:
        for args, path in [(("verify", "--checkpoint-dir", str(ro / "ck")), ro / "ck"),
                           (("verify", "--checkpoint-dir", str(ro)), ro),
                           (("save", str(ro / "ck")), ro / "ck")]:
            r = invoke(*args)
            assert r.exit_code == 2, (args, r.output)
            assert str(path) in r.output and "Traceback" not in r.output, (args, r.output)
            assert "Read-only file system" in r.output or "not writable" in r.output, (args, r.output)
            first = first or r
        assert listing(ro) == set()
    finally:
        unmount(ro)
    record("checkpoint dir on a read-only file system (verify, save)", sees=sees(first.output, "FAILED (exit"),
           code=first.exit_code, seconds=first.took, left="nothing")


def test_path_that_is_a_file_is_a_set_up_error(tmp_path: Path):
    f = tmp_path / "not a dir ✓.txt"
    f.write_text("keep me\n")
    first = None
    for args in [("verify", "--checkpoint-dir", str(f)), ("save", str(f)), ("save", str(f), "--overwrite"),
                 ("load", str(f)), ("inspect", str(f)), ("diff", str(f), str(tmp_path))]:
        r = invoke(*args)
        assert r.exit_code == 2, (args, r.output)
        assert f.name in r.output and "Traceback" not in r.output, (args, r.output)
        assert f.read_text() == "keep me\n", args
        first = first or r
    assert listing(tmp_path) == {f.name}
    record("checkpoint dir that is a file (verify, save [--overwrite], load, inspect, diff)",
           sees=sees(first.output, "FAILED (exit"), code=first.exit_code, seconds=first.took, left="the file, untouched")


# --- paths that must simply work -------------------------------------------------------------


def test_relative_path_is_taken_from_the_working_dir(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("verify", "--checkpoint-dir", "rel/ck", "--keep", "--planner", "none")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rel" / "ck" / FLOW_NONE / ".metadata").exists()
    assert str(tmp_path / "rel" / "ck") in r.output  # said as an absolute path: a log reader needs it
    r = invoke("save", "saved")
    assert r.exit_code == 0, r.output
    r = invoke("load", "saved")
    assert r.exit_code == 0, r.output


def test_spaces_and_unicode_in_paths(tmp_path: Path):
    verified = tmp_path / "ck dir ✓" / "ü"
    r = invoke("verify", "--checkpoint-dir", str(verified), "--keep", "--planner", "none")
    assert r.exit_code == 0, r.output
    kept = verified / FLOW_NONE
    assert (kept / ".metadata").exists() and (kept / "fsdpck.json").exists()
    saved = tmp_path / "saved ✓" / "straße 1"
    for args in [("save", str(saved)), ("load", str(saved)), ("load", str(kept), str(saved)),
                 ("inspect", str(kept)), ("inspect", str(saved), "--verify-data"), ("diff", str(saved), str(saved))]:
        r = invoke(*args)
        assert r.exit_code == 0, (args, r.output)
        assert "Traceback" not in r.output, (args, r.output)
