"""``fsdpck inspect`` and ``fsdpck diff`` through CliRunner: exit codes, verdict lines, JSON, tables, no tracebacks.

On checkpoints written without a process group (``ckpt_factory.plain_ckpt``). The same
commands on torchrun-made FSDP2 checkpoints, on ``fsdpck save`` output and as a
``python -m fsdpck`` subprocess are in tests/integration/.
"""

from __future__ import annotations

import contextlib
import json
import re

import pytest
import torch
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ckpt_factory as cf
import fsdpck
from fsdpck.checkpoint import torchsave
from fsdpck.cli import cli

ENVELOPE = ["schema", "versions", "exit_code", "outcome", "verdict", "error"]


def invoke(*args: str, columns: str | None = "160", runner: CliRunner | None = None):
    result = (runner or CliRunner()).invoke(cli, list(args), env={"COLUMNS": columns, "NO_COLOR": "1"})
    assert "Traceback" not in result.output and "Traceback" not in (result.stderr or ""), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def n_plain() -> int:
    """How many DCP keys the plain checkpoint has."""
    return len(cf.flat_state(cf.plain_state()))


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def table_lines(text: str) -> list[str]:
    """The lines of the tables in a report (rules, headers and rows)."""
    return [ln for ln in text.splitlines() if ln[:1] in ("┏", "┃", "┡", "│", "└", "+", "|")]


def check_envelope(doc: dict, *, command: str, code: int, verdict: str) -> None:
    assert list(doc)[: len(ENVELOPE)] == ENVELOPE
    assert doc["schema"] == f"fsdpck.{command}/1"
    assert doc["versions"]["fsdpck"] == fsdpck.__version__
    assert doc["versions"]["torch"] == torch.__version__ and re.fullmatch(r"3\.\d+\.\d+", doc["versions"]["python"])
    assert doc["exit_code"] == code
    assert doc["outcome"] == {0: "verified", 1: "difference found"}[code]
    assert doc["verdict"] == verdict
    assert doc["error"] is None
    assert set(doc["warnings"]) == {"count", "distinct"}
    assert doc["warnings"]["count"] == sum(w["count"] for w in doc["warnings"]["distinct"])
    assert all(set(w) == {"category", "message", "count"} for w in doc["warnings"]["distinct"])


# --- inspect -------------------------------------------------------------------------------


def test_inspect_whole_checkpoint_exits_0_with_a_greppable_verdict():
    r = invoke("inspect", str(cf.plain_ckpt()))
    assert r.exit_code == 0, r.output
    assert last_line(r.output).startswith(f"fsdpck inspect: OK (exit 0) — {n_plain()} keys, 1 file, ")
    assert last_line(r.output).endswith(", whole")
    assert "nested.a.bf" in r.output and "bfloat16" in r.output and f"fsdpck.json: {n_plain()} keys" in r.output


def test_inspect_chunks_and_key_filter():
    r = invoke("inspect", str(cf.plain_ckpt()), "--chunks", "--key", "nested.*")
    assert r.exit_code == 0, r.output
    assert f"'nested.*': 4 of {n_plain()} keys" in r.output
    assert "model.weight" not in r.output
    rows = [ln for ln in r.output.splitlines() if ln.startswith("│ nested.vol ") and "__0_0.distcp" in ln]
    assert len(rows) == 1 and "[0, 0, 0]" in rows[0] and "[2, 3, 4]" in rows[0]
    start, length = cf.storage_info(cf.plain_ckpt(), "nested.vol")[1:]
    assert f"[{start}, {start + length})" in rows[0]


def test_inspect_verify_data_and_json_to_stdout():
    r = invoke("inspect", str(cf.plain_ckpt()), "--verify-data", "--json", "-")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    verdict = last_line(r.stderr)  # the report went to stderr, its verdict last
    assert verdict.startswith("fsdpck inspect: OK (exit 0)") and "data verified against fsdpck.json" in verdict
    check_envelope(doc, command="inspect", code=0, verdict=verdict)
    assert doc["summary"]["status"] == "OK" and doc["summary"]["keys"] == n_plain()
    assert doc["manifest"]["valid"] is True and doc["manifest"]["keys"] == n_plain()
    assert {k["status"] for k in doc["keys"]} == {"verified"}
    vol = next(k for k in doc["keys"] if k["key"] == "nested.vol")
    assert vol["fingerprint"] == vol["expected"] and vol["chunks"][0]["file"] == "__0_0.distcp"
    assert "total_s" in doc["timings"]
    assert doc["warnings"]["count"] == 0  # no DCP reader ran (it warns that no process group is there)


def test_inspect_verbose_shows_warnings_and_timings(monkeypatch):
    # Through DCP's reader (as for remote storage), which warns that there is no process group.
    monkeypatch.setattr(torchsave, "DIRECT_READS", False)
    r = invoke("inspect", str(cf.plain_ckpt()), "--verify-data", "--verbose")
    assert r.exit_code == 0 and "timings:" in r.output
    assert "warning" in r.output and "torch.distributed is disabled" in r.output
    quiet = invoke("inspect", str(cf.plain_ckpt()), "--verify-data")
    assert "torch.distributed is disabled" not in quiet.output and "--verbose shows them" in quiet.output


def test_inspect_json_file(tmp_path):
    target = tmp_path / "out" / "inspect.json"
    r = invoke("inspect", str(cf.plain_ckpt()), "--json", str(target))
    assert r.exit_code == 0
    doc = json.loads(target.read_text())
    check_envelope(doc, command="inspect", code=0, verdict=last_line(r.output))
    assert doc["verify_data"] is False and doc["path"] == str(cf.plain_ckpt())


# --- faults: exit 1 with key and file, never a traceback -------------------------------


def test_truncated_shard(tmp_path):
    ckpt = cf.copy_ckpt(cf.plain_ckpt(), tmp_path / "c")
    (ckpt / "__0_0.distcp").write_bytes((ckpt / "__0_0.distcp").read_bytes()[:1000])
    r = invoke("inspect", str(ckpt))
    assert r.exit_code == 1
    assert "byte-range" in r.output and "__0_0.distcp" in r.output and "truncated?" in r.output
    assert "nested.vol" in r.output
    assert last_line(r.output).startswith("fsdpck inspect: PROBLEMS (exit 1) — ")


def test_flipped_byte_with_verify_data(tmp_path):
    ckpt = cf.copy_ckpt(cf.plain_ckpt(), tmp_path / "c")
    cf.flip_byte_in_tensor(ckpt, "optim.state.0.exp_avg", cf.plain_state()["optim"]["state"][0]["exp_avg"])
    assert invoke("inspect", str(ckpt)).exit_code == 0  # metadata and sizes cannot see it
    r = invoke("inspect", str(ckpt), "--verify-data", "--json", str(tmp_path / "r.json"))
    assert r.exit_code == 1
    assert "MISMATCH" in r.output and "fingerprint-mismatch" in r.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [(p["kind"], p["key"], p["file"]) for p in doc["problems"]] == [
        ("fingerprint-mismatch", "optim.state.0.exp_avg", "__0_0.distcp")]
    check_envelope(doc, command="inspect", code=1, verdict=last_line(r.output))
    assert doc["summary"]["status"] == "PROBLEMS"
    assert last_line(r.output) == "fsdpck inspect: PROBLEMS (exit 1) — 1 problem: 1 fingerprint-mismatch"


def test_changed_lr_with_verify_data(tmp_path):
    ckpt = cf.copy_ckpt(cf.plain_ckpt(), tmp_path / "c")
    cf.replace_byte_item(ckpt, "optim.param_groups.0.lr", 0.2)
    assert invoke("inspect", str(ckpt)).exit_code == 0
    r = invoke("inspect", str(ckpt), "--verify-data", "--json", "-")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert [(p["kind"], p["key"]) for p in doc["problems"]] == [("value-mismatch", "optim.param_groups.0.lr")]
    row = next(k for k in doc["keys"] if k["key"] == "optim.param_groups.0.lr")
    assert row["status"] == "MISMATCH" and row["value"] == "0.2" and row["expected"] == float.hex(0.1)
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("│ optim.param_groups.0.lr "))
    assert "MISMATCH" in line
    assert last_line(r.stderr) == "fsdpck inspect: PROBLEMS (exit 1) — 1 problem: 1 value-mismatch"


def test_symlinked_shard_file(tmp_path):
    ckpt = cf.copy_ckpt(cf.plain_ckpt(), tmp_path / "c")
    (ckpt / "__0_0.distcp").rename(tmp_path / "moved.distcp")
    (ckpt / "__0_0.distcp").symlink_to(tmp_path / "moved.distcp")
    r = invoke("inspect", str(ckpt), "--verify-data", "--json", str(tmp_path / "r.json"))
    assert r.exit_code == 1
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {p["kind"] for p in doc["problems"]} == {"symlink"}
    assert next(f for f in doc["files"] if f["name"] == "__0_0.distcp")["status"] == "SYMLINK"
    assert "SYMLINK" in r.output and "is a symlink" in r.output
    assert last_line(r.output).startswith("fsdpck inspect: PROBLEMS (exit 1) — ")
    d = invoke("diff", str(cf.plain_ckpt()), str(ckpt))
    assert d.exit_code == 1 and last_line(d.output).startswith("fsdpck diff: PROBLEMS (exit 1) — ")


def test_deleted_metadata_is_incomplete(tmp_path):
    ckpt = cf.copy_ckpt(cf.plain_ckpt(), tmp_path / "c")
    (ckpt / ".metadata").unlink()
    r = invoke("inspect", str(ckpt), "--json", str(tmp_path / "r.json"))
    assert r.exit_code == 1
    assert last_line(r.output).startswith("fsdpck inspect: INCOMPLETE (exit 1) — a save that did not finish")
    assert "no .metadata but 1 shard file(s)" in r.output
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["status"] == "INCOMPLETE"


def test_deleted_shard_file(tmp_path):
    ckpt = cf.copy_ckpt(cf.plain_ckpt(), tmp_path / "c")
    (ckpt / "__0_0.distcp").unlink()
    r = invoke("inspect", str(ckpt), "--verify-data")
    assert r.exit_code == 1
    assert "missing-file" in r.output and "__0_0.distcp, which is missing" in r.output
    assert "MISSING" in r.output


def test_garbage_metadata(tmp_path):
    ckpt = cf.copy_ckpt(cf.plain_ckpt(), tmp_path / "c")
    (ckpt / ".metadata").write_bytes(b"\x80\x04garbage" * 10)
    r = invoke("inspect", str(ckpt))
    assert r.exit_code == 1
    assert "not a readable DCP metadata pickle" in r.output
    assert "fsdpck inspect: PROBLEMS (exit 1) — 1 problem: 1 metadata" == last_line(r.output)


def test_crafted_pickle(tmp_path):
    import builtins
    import pickle

    ckpt = cf.copy_ckpt(cf.plain_ckpt(), tmp_path / "c")
    marker = tmp_path / "marker"
    (ckpt / ".metadata").write_bytes(pickle.dumps(
        cf.Payload(builtins.exec, f"open({str(marker)!r}, 'w').write('pwned')")))
    r = invoke("inspect", str(ckpt), "--verify-data")
    assert r.exit_code == 1
    assert "refused to unpickle builtins.exec" in r.output
    assert not marker.exists()
    d = invoke("diff", str(cf.plain_ckpt()), str(ckpt))
    assert d.exit_code == 1 and "refused to unpickle builtins.exec" in d.output and not marker.exists()


def test_empty_dir(tmp_path):
    r = invoke("inspect", str(tmp_path))
    assert r.exit_code == 1
    assert "no .metadata: not a DCP checkpoint dir (the dir is empty)" in r.output
    assert last_line(r.output).startswith("fsdpck inspect: PROBLEMS (exit 1)")


def test_malformed_manifest(tmp_path):
    ckpt = cf.copy_ckpt(cf.plain_ckpt(), tmp_path / "c")
    text = (ckpt / "fsdpck.json").read_text()
    (ckpt / "fsdpck.json").write_text(text[: len(text) // 3])
    r = invoke("inspect", str(ckpt))
    assert r.exit_code == 1 and "fsdpck.json INVALID" in r.output and "truncated?" in r.output
    (ckpt / "fsdpck.json").write_text(text.replace('"version": 1', '"version": 3', 1))
    r = invoke("inspect", str(ckpt))
    assert r.exit_code == 1 and "manifest format version 3" in r.output and "reads (version 1)" in r.output


@pytest.mark.parametrize("command", ["inspect", "diff"])
def test_bad_paths_exit_2(tmp_path, command):
    (tmp_path / "file").write_text("x")
    for bad, words in ((tmp_path / "nope", "does not exist"), (tmp_path / "file", "is a file, not a checkpoint dir")):
        args = [command, str(bad)] if command == "inspect" else [command, str(cf.plain_ckpt()), str(bad)]
        r = invoke(*args)
        assert r.exit_code == 2, r.output
        assert words in r.stderr and "fsdpck: error:" in r.stderr


def test_empty_dir_argument_and_json_dir_exit_2(tmp_path):
    r = invoke("inspect", "")
    assert r.exit_code == 2 and "DIR is empty" in r.stderr
    r = invoke("inspect", str(cf.plain_ckpt()), "--json", str(tmp_path))
    assert r.exit_code == 2 and "--json" in r.stderr and "is a directory" in r.stderr
    r = invoke("diff", str(cf.plain_ckpt()))
    assert r.exit_code == 2 and "Missing argument 'B'" in r.stderr


_tokens = st.sampled_from(["--chunks", "--key", "--verify-data", "--json", "--verbose", "-v", "--values", "-h",
                           "--nope", "-", "", "*", "optim.*", "[", "\x00", "é ü", "--key=*", "--json=-"])


@settings(max_examples=40, deadline=None)
@given(command=st.sampled_from(["inspect", "diff"]), args=st.lists(_tokens | st.text(max_size=6), max_size=4),
       dirs=st.integers(0, 3))
@example(command="inspect", args=["\x00"], dirs=0)  # a NUL in DIR itself (found by this test: a traceback)
@example(command="diff", args=["a\x00b", "."], dirs=0)
def test_fuzzed_arguments_never_crash(command, args, dirs):
    """Any mix of options and strings: exit 0, 1 or 2 with a message, never a traceback."""
    good = str(cf.plain_ckpt())
    paths = [[], [good], [good, good], ["/nonexistent/ckpt", good]][dirs]
    argv = [command, *paths, *args]
    if "--json" in args or any(a.startswith("--json=") and a != "--json=-" for a in args):
        return  # would write a file wherever the fuzzer says
    r = invoke(*argv)
    assert r.exit_code in (0, 1, 2), (argv, r.exit_code, r.output)
    if r.exit_code == 2:
        assert ("Error:" in r.stderr) or ("fsdpck: error:" in r.stderr), (argv, r.stderr)


def test_hostile_names_are_printed_escaped_not_interpreted(tmp_path):
    ckpt = tmp_path / "ck[/]pt [bold]"
    cf.dcp_save({"evil\x1b[2J[/]key": torch.ones(2), "ok": 1}, ckpt)
    r = invoke("inspect", str(ckpt), "--verify-data")
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "evil\\x1b[2J[/]key" in r.output and "ck[/]pt [bold]" in r.output
    d = invoke("diff", str(ckpt), str(ckpt), "--json", "-")
    assert d.exit_code == 0 and "\x1b" not in d.stderr and "evil\\x1b[2J[/]key" in d.stderr
    assert {row["key"] for row in json.loads(d.stdout)["rows"]} == {"evil\x1b[2J[/]key", "ok"}  # whole in the JSON


def test_ascii_only_output_does_not_crash():
    r = invoke("inspect", str(cf.plain_ckpt()), "--key", "model.*", runner=CliRunner(charset="ascii"))
    assert r.exit_code == 0, r.output
    assert "+----" in r.output and last_line(r.output).startswith(f"fsdpck inspect: OK (exit 0) - {n_plain()} keys")


def test_key_matching_nothing_exits_2():
    r = invoke("inspect", str(cf.plain_ckpt()), "--key", "nothing.*")
    assert r.exit_code == 2 and f"--key 'nothing.*' matches none of the {n_plain()} keys" in r.stderr


def test_unwritable_json_exits_2(tmp_path):
    (tmp_path / "file").write_text("x")
    r = invoke("inspect", str(cf.plain_ckpt()), "--json", str(tmp_path / "file" / "sub" / "out.json"))
    assert r.exit_code == 2 and "--json" in r.stderr and "cannot write" in r.stderr


# --- tables fit the console ------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_keys_ckpt(tmp_path_factory):
    """Keys far longer than a log line, and a problem message that must wrap."""
    path = tmp_path_factory.mktemp("long") / "ckpt"
    long = "model." + ".".join(f"block{i}" for i in range(30))
    cf.dcp_save({long + ".weight": torch.ones(3, 4), long + ".bias": torch.zeros(3), "lr": 0.1}, path)
    return path, long


@pytest.mark.parametrize("columns, width", [(None, 120), ("80", 80), ("200", 200)])
def test_tables_fit_the_log_width(long_keys_ckpt, tmp_path, columns, width):
    path, long = long_keys_ckpt
    damaged = cf.copy_ckpt(path, tmp_path / "d")
    (damaged / "__0_0.distcp").write_bytes(b"")  # every key a byte-range problem with a long message
    too_wide = []
    for args in (["inspect", str(path), "--chunks", "--verify-data"], ["inspect", str(damaged)],
                 ["diff", str(path), str(damaged), "--values"]):
        r = invoke(*args, columns=columns)
        lines = table_lines(r.output)
        assert lines and r.exit_code in (0, 1), r.output
        too_wide += [f"{args[0]} ({len(ln)} > {width}): {ln}" for ln in lines if len(ln) > width]
        if width < 200:
            assert any("…" in ln for ln in lines)  # the long keys were shortened, start and end kept
        assert any(ln.startswith("│ model.") and ln.endswith("│") for ln in lines)
    assert not too_wide, "\n".join(too_wide)


# --- diff ------------------------------------------------------------------------------


def test_diff_identical_with_json_envelope(tmp_path):
    cf.dcp_save(cf.plain_state(), tmp_path / "again")
    r = invoke("diff", str(cf.plain_ckpt()), str(tmp_path / "again"), "--json", str(tmp_path / "d.json"))
    assert r.exit_code == 0, r.output
    assert last_line(r.output) == (f"fsdpck diff: IDENTICAL (exit 0) — {n_plain()} keys: same keys, shapes, dtypes "
                                   "and data")
    doc = json.loads((tmp_path / "d.json").read_text())
    check_envelope(doc, command="diff", code=0, verdict=last_line(r.output))
    assert doc["summary"] == {"status": "IDENTICAL", "keys": n_plain(), "differing": 0, "by_status": {"same": n_plain()}}
    assert doc["a"]["path"] == str(cf.plain_ckpt()) and doc["a"]["world_size"] == 1 and doc["b"]["world_size"] is None
    row = next(x for x in doc["rows"] if x["key"] == "nested.vol")
    assert row["fingerprint_a"] == row["fingerprint_b"] and row["values"] is None


def test_diff_with_unreadable_shards_says_why_its_keys_differ(tmp_path):
    import os
    import shutil

    b = tmp_path / "b"
    shutil.copytree(cf.plain_ckpt(), b)
    for shard in b.glob("*.distcp"):
        shard.unlink()
        os.mkfifo(shard)  # never opened: a FIFO is not a regular file
    r = invoke("diff", str(cf.plain_ckpt()), str(b))
    assert r.exit_code == 1
    line = last_line(r.output)
    assert line.startswith("fsdpck diff: PROBLEMS (exit 1)") and "not-a-file" in line, line
    assert re.search(r"(\d+) of \1 keys differ: \1 unreadable$", line), line


def test_diff_different_with_values(tmp_path):
    state = cf.plain_state()
    state["nested"]["vol"] = state["nested"]["vol"] + 0.25
    del state["name"]
    cf.dcp_save(state, tmp_path / "b")
    r = invoke("diff", str(cf.plain_ckpt()), str(tmp_path / "b"), "--values", "--json", "-")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    verdict = f"fsdpck diff: DIFFERENT (exit 1) — 2 of {n_plain()} keys differ: 1 different, 1 only in A"
    assert last_line(r.stderr) == verdict
    check_envelope(doc, command="diff", code=1, verdict=verdict)
    assert doc["summary"]["status"] == "DIFFERENT" and doc["summary"]["differing"] == 2
    rows = {x["key"]: x for x in doc["rows"] if x["status"] != "same"}
    assert set(rows) == {"nested.vol", "name"}
    assert rows["name"]["status"] == "only in A" and rows["nested.vol"]["status"] == "DIFFERENT"
    values = rows["nested.vol"]["values"]
    assert (values["elements"], values["differing"], values["first_index"]) == (24, 24, [0, 0, 0])
    assert values["max_abs_diff"] == pytest.approx(0.25, abs=1e-6)
    a, b = cf.plain_state()["nested"]["vol"].double(), state["nested"]["vol"].double()
    assert values["max_rel_diff"] == pytest.approx(float(((a - b).abs() / torch.maximum(a.abs(), b.abs())).max()))
    assert rows["nested.vol"]["max_abs_diff"] == values["max_abs_diff"]
    vol_line = next(ln for ln in r.stderr.splitlines() if ln.startswith("│ nested.vol "))
    assert "24/24 differ, first at" in vol_line and "DIFFERENT" in vol_line  # the values column of the table


def test_diff_values_json_holds_non_finite_numbers(tmp_path):
    state = cf.plain_state()
    vol = state["nested"]["vol"].clone()
    vol[0, 0, 0] = float("nan")
    state["nested"]["vol"] = vol
    cf.dcp_save(state, tmp_path / "b")
    r = invoke("diff", str(cf.plain_ckpt()), str(tmp_path / "b"), "--values", "--json", "-")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)  # strict JSON: no bare NaN or Infinity
    row = next(x for x in doc["rows"] if x["key"] == "nested.vol")
    assert row["values"]["max_abs_diff"] == "inf" and row["values"]["differing"] == 1


def test_diff_table_lists_differences_first(tmp_path):
    state = cf.plain_state()
    state["step"] = 99
    cf.dcp_save(state, tmp_path / "b")
    r = invoke("diff", str(cf.plain_ckpt()), str(tmp_path / "b"))
    assert r.exit_code == 1
    body = [ln for ln in r.output.splitlines() if ln.startswith("│")]
    assert "step" in body[0] and "DIFFERENT" in body[0]
    assert len(body) == n_plain()  # few enough keys to list the same ones too


def test_asyncio_tracebacks_of_background_storage_requests_become_one_line(monkeypatch):
    # A store that goes away mid-write fails requests nobody awaits any more; asyncio logs each
    # with a traceback. Once a URL is opened, they are one line each (FSDPCK_DEBUG=1 keeps them).
    import logging
    import sys

    from fsdpck.checkpoint import remote

    asyncio_log = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_log, "filters", [])
    with contextlib.suppress(Exception):
        remote.open_url("memory://fsdpck-test")
    (one_line,) = [f for f in asyncio_log.filters if isinstance(f, remote.OneLineAsyncio)]

    def logged(debug: str) -> logging.LogRecord:
        monkeypatch.setenv("FSDPCK_DEBUG", debug)
        try:
            raise ConnectionError("Could not connect to the endpoint URL\nmore")
        except ConnectionError:
            record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Task exception was never retrieved",
                                       (), sys.exc_info())
        assert one_line.filter(record)
        return record

    quiet = logged("0")
    assert quiet.exc_info is None and quiet.getMessage() == (
        "fsdpck: a background storage request failed as well: ConnectionError: Could not connect to the endpoint URL")
    loud = logged("1")
    assert loud.exc_info is not None and loud.getMessage() == "Task exception was never retrieved"
