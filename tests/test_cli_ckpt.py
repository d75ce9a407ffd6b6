"""``fsdpck inspect`` and ``fsdpck diff`` from the command line: exit codes, verdict lines, JSON, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ckpt_factory as cf  # noqa: E402

from fsdpck.cli import cli  # noqa: E402

cf.start_background()  # torchrun and fsdpck save, while the tests before the first user run

REPO = Path(__file__).resolve().parent.parent


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args), env={"COLUMNS": "160", "NO_COLOR": "1"})
    assert "Traceback" not in result.output and "Traceback" not in (result.stderr or ""), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def n_plain() -> int:
    """How many DCP keys the plain checkpoint has."""
    return len(cf.flat_state(cf.plain_state()))


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def test_help_shows_examples_and_does_not_import_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from fsdpck.cli import cli\n"
        "for cmd in ('inspect', 'diff'):\n"
        "    r = CliRunner().invoke(cli, [cmd, '--help'])\n"
        "    assert r.exit_code == 0, r.output\n"
        "    assert 'Examples:' in r.output and '--json' in r.output, r.output\n"
        "    print(r.output)\n"
        "assert 'torch' not in sys.modules, 'help imported torch'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fsdpck inspect /ckpt/step-1000 --verify-data" in out.stdout
    assert "--values" in out.stdout and "--chunks" in out.stdout and "--key GLOB" in out.stdout


def test_inspect_whole_checkpoint_exits_0_with_a_greppable_verdict():
    r = invoke("inspect", str(cf.plain_ckpt()))
    assert r.exit_code == 0, r.output
    assert last_line(r.output).startswith(f"fsdpck inspect: OK — {n_plain()} keys, 1 file, ")
    assert last_line(r.output).endswith(", whole")
    assert "nested.a.bf" in r.output and "bfloat16" in r.output and f"fsdpck.json: {n_plain()} keys" in r.output


def test_inspect_chunks_and_key_filter():
    r = invoke("inspect", str(cf.fsdp2_ckpts()[1]), "--chunks", "--key", "optim.state.0.weight.*")
    assert r.exit_code == 0, r.output
    assert "'optim.state.0.weight.*': 3 of" in r.output
    assert "model.0.weight" not in r.output
    rows = [ln for ln in r.output.splitlines() if "optim.state.0.weight.exp_avg " in ln and "__" in ln]
    assert len(rows) == 3 and "[4, 0]" in rows[2] and "__2_0.distcp" in rows[2]


def test_inspect_verify_data_and_json_to_stdout():
    r = invoke("inspect", str(cf.plain_ckpt()), "--verify-data", "--json", "-")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["schema"] == "fsdpck.inspect/1" and doc["verdict"] == "OK" and doc["exit_code"] == 0
    assert doc["fsdpck_version"] == "0.1.0" and doc["torch_version"].startswith("2.")
    assert doc["summary"]["keys"] == n_plain() and doc["manifest"]["valid"] is True
    assert {k["status"] for k in doc["keys"]} == {"verified"}
    vol = next(k for k in doc["keys"] if k["key"] == "nested.vol")
    assert vol["fingerprint"] == vol["expected_fingerprint"] and vol["chunks"][0]["file"] == "__0_0.distcp"
    assert "total_s" in doc["timings"] and doc["warnings"]["count"] >= 0
    # The report went to stderr, its verdict last.
    assert last_line(r.stderr).startswith("fsdpck inspect: OK") and "data verified against fsdpck.json" in r.stderr


def test_inspect_verbose_shows_warnings_and_timings():
    r = invoke("inspect", str(cf.plain_ckpt()), "--verify-data", "--verbose")
    assert r.exit_code == 0 and "timings:" in r.output
    assert "warning" in r.output and "torch.distributed is disabled" in r.output
    quiet = invoke("inspect", str(cf.plain_ckpt()), "--verify-data")
    assert "torch.distributed is disabled" not in quiet.output and "--verbose shows them" in quiet.output


def test_inspect_json_file(tmp_path):
    target = tmp_path / "out" / "inspect.json"
    r = invoke("inspect", str(cf.fsdp2_ckpts()[0]), "--json", str(target))
    assert r.exit_code == 0
    doc = json.loads(target.read_text())
    assert doc["verdict_line"] == last_line(r.output)


# --- faults: exit 1 with key and file, never a traceback -------------------------------


def test_truncated_shard(tmp_path):
    ckpt = cf.copy_ckpt(cf.fsdp2_ckpts()[1], tmp_path / "c")
    os.truncate(ckpt / "__2_0.distcp", 1000)
    r = invoke("inspect", str(ckpt))
    assert r.exit_code == 1
    assert "byte-range" in r.output and "__2_0.distcp" in r.output and "truncated?" in r.output
    assert "optim.state.2.weight.exp_avg" in r.output
    assert last_line(r.output).startswith("fsdpck inspect: PROBLEMS — ") and last_line(r.output).endswith("(exit 1)")


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
    assert doc["exit_code"] == 1 and doc["verdict"] == "PROBLEMS"


def test_deleted_metadata_is_incomplete(tmp_path):
    ckpt = cf.copy_ckpt(cf.fsdp2_ckpts()[1], tmp_path / "c")
    (ckpt / ".metadata").unlink()
    r = invoke("inspect", str(ckpt))
    assert r.exit_code == 1
    assert last_line(r.output).startswith("fsdpck inspect: INCOMPLETE — a save that did not finish")
    assert "no .metadata but 3 shard file(s)" in r.output


def test_deleted_shard_file(tmp_path):
    ckpt = cf.copy_ckpt(cf.fsdp2_ckpts()[1], tmp_path / "c")
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
    assert "fsdpck inspect: PROBLEMS — 1 problem: 1 metadata (exit 1)" == last_line(r.output)


def test_crafted_pickle(tmp_path):
    ckpt = cf.copy_ckpt(cf.plain_ckpt(), tmp_path / "c")
    marker = tmp_path / "marker"
    import builtins

    (ckpt / ".metadata").write_bytes(__import__("pickle").dumps(
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
    assert last_line(r.output).startswith("fsdpck inspect: PROBLEMS")


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
    import torch

    ckpt = tmp_path / "ck[/]pt [bold]"
    cf.dcp_save({"evil\x1b[2J[/]key": torch.ones(2), "ok": 1}, ckpt)
    r = invoke("inspect", str(ckpt), "--verify-data")
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "evil\\x1b[2J[/]key" in r.output and "ck[/]pt [bold]" in r.output


def test_ascii_only_output_does_not_crash():
    r = CliRunner(charset="ascii").invoke(cli, ["inspect", str(cf.plain_ckpt()), "--key", "model.*"])
    assert r.exit_code == 0, r.output
    assert "+----" in r.output and last_line(r.output).startswith(f"fsdpck inspect: OK - {n_plain()} keys")


def test_key_matching_nothing_exits_2():
    r = invoke("inspect", str(cf.plain_ckpt()), "--key", "nothing.*")
    assert r.exit_code == 2 and f"--key 'nothing.*' matches none of the {n_plain()} keys" in r.stderr


def test_unwritable_json_exits_2(tmp_path):
    (tmp_path / "file").write_text("x")
    r = invoke("inspect", str(cf.plain_ckpt()), "--json", str(tmp_path / "file" / "sub" / "out.json"))
    assert r.exit_code == 2 and "--json" in r.stderr and "cannot write" in r.stderr


# --- diff ------------------------------------------------------------------------------


def test_diff_identical_across_world_sizes(tmp_path):
    ws2, ws3 = cf.fsdp2_ckpts()
    r = invoke("diff", str(ws2), str(ws3), "--json", str(tmp_path / "d.json"))
    assert r.exit_code == 0, r.output
    assert last_line(r.output).startswith("fsdpck diff: IDENTICAL — 38 keys")
    doc = json.loads((tmp_path / "d.json").read_text())
    assert doc["schema"] == "fsdpck.diff/1" and doc["exit_code"] == 0 and doc["summary"]["differing"] == 0
    row = next(x for x in doc["rows"] if x["key"] == "optim.state.0.weight.exp_avg")
    assert (row["chunks_a"], row["chunks_b"]) == (2, 3) and row["fingerprint_a"] == row["fingerprint_b"]


def test_diff_different_with_values(tmp_path):
    import torch

    state = cf.plain_state()
    state["nested"]["vol"] = state["nested"]["vol"] + 0.25
    del state["name"]
    cf.dcp_save(state, tmp_path / "b")
    r = invoke("diff", str(cf.plain_ckpt()), str(tmp_path / "b"), "--values", "--json", "-")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    rows = {x["key"]: x for x in doc["rows"] if x["status"] != "same"}
    assert set(rows) == {"nested.vol", "name"}
    assert rows["name"]["status"] == "only in A" and rows["nested.vol"]["status"] == "DIFFERENT"
    assert rows["nested.vol"]["max_abs_diff"] == pytest.approx(0.25, abs=1e-6)
    assert last_line(r.stderr) == f"fsdpck diff: DIFFERENT — 2 of {n_plain()} keys differ: 1 different, 1 only in A (exit 1)"
    assert torch.is_tensor(state["nested"]["vol"])


def test_diff_table_lists_differences_first(tmp_path):
    state = cf.plain_state()
    state["step"] = 99
    cf.dcp_save(state, tmp_path / "b")
    r = invoke("diff", str(cf.plain_ckpt()), str(tmp_path / "b"))
    assert r.exit_code == 1
    body = [ln for ln in r.output.splitlines() if ln.startswith("│")]
    assert "step" in body[0] and "DIFFERENT" in body[0]
    assert len(body) == n_plain()  # few enough keys to list the same ones too


# --- as users run it -------------------------------------------------------------------


def test_inspect_and_diff_fsdpck_own_checkpoint(tmp_path):
    """A checkpoint and manifest written by `fsdpck save`: every key verified against its fingerprint."""
    ckpt = cf.fsdpck_save_ckpt()
    r = invoke("inspect", str(ckpt), "--verify-data", "--json", str(tmp_path / "i.json"))
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "i.json").read_text())
    n = doc["summary"]["keys"]
    assert n > 0 and doc["manifest"]["keys"] == n and {k["status"] for k in doc["keys"]} == {"verified"}
    assert last_line(r.output).endswith(f"data verified against fsdpck.json ({n} of {n} keys)")
    damaged = cf.copy_ckpt(ckpt, tmp_path / "c")
    key = next(k["key"] for k in doc["keys"] if k["key"].endswith("exp_avg_sq") and k["shape"])
    name, offset, length = cf.storage_info(damaged, key)
    data = bytearray((damaged / name).read_bytes())
    data[offset : offset + 4] = b"\0\0\0\0"  # the zip signature of that item's torch.save archive
    (damaged / name).write_bytes(bytes(data))
    r = invoke("inspect", str(damaged), "--verify-data")
    assert r.exit_code == 1 and key in r.output and "UNREADABLE" in r.output
    d = invoke("diff", str(ckpt), str(damaged))
    assert d.exit_code == 1 and f"1 of {n} keys differ: 1 unreadable" in last_line(d.output)



def test_python_m_fsdpck_inspect_subprocess(tmp_path):
    env = cf.worker_env()
    env["COLUMNS"] = "160"
    out = subprocess.run([sys.executable, "-m", "fsdpck", "inspect", str(cf.plain_ckpt())], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert last_line(out.stdout).startswith(f"fsdpck inspect: OK — {n_plain()} keys")
    assert "\x1b[" not in out.stdout  # no colour when stdout is not a terminal
    # A bad path is refused before torch is imported, in the exact code and one line.
    out = subprocess.run([sys.executable, "-m", "fsdpck", "inspect", str(tmp_path / "nope")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"fsdpck: error: DIR {str(tmp_path / 'nope')!r} does not exist"
