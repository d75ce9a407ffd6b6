"""The command line before any process group: help, version, examples, usage errors, -n's rules,
and the failure-drill spec. Through click's CliRunner in this process; nothing here can train a
model (``cli_stubs``): a command line that gets past its checks stops at a stub."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli_stubs import Started, nothing_can_run
from conftest import fresh_python
from fsdpck import __version__
from fsdpck.cli import cli
from fsdpck.runtime import faults, launch

COMMANDS = ("verify", "save", "load", "inspect", "show", "diff")


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def help_text(*command: str) -> str:
    r = invoke(*command, "--help")
    assert r.exit_code == 0, r.output
    return r.output


def examples(text: str) -> list[str]:
    """The example lines of a help text: the indented lines after "Examples:" up to a blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "Examples:")
    out = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        out.append(line.strip())
    return out


# --- help and version ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", [(), *[(c,) for c in COMMANDS]], ids=["fsdpck", *COMMANDS])
def test_help_has_examples_and_every_torchrun_line_uses_the_module_form(command: tuple[str, ...]):
    text = help_text(*command)
    lines = examples(text)
    assert lines, text
    for line in lines:
        if line.startswith("torchrun"):
            # `torchrun ... fsdpck` only works from the repository root (DESIGN.md, launch forms).
            assert re.search(r"\s(-m|--no-python) fsdpck\s", line), line
    assert "-h, --help" in text


def help_examples() -> list[tuple[str, str]]:
    out = []
    for command in COMMANDS:
        for line in examples(help_text(command)) + examples(help_text()):
            if f"fsdpck {command}" in line:
                out.append((command, line))
    return sorted(set(out))


@pytest.mark.parametrize("command,line", help_examples())
def test_every_help_example_is_a_valid_command_line(command: str, line: str, tmp_path: Path, monkeypatch):
    """Each example parses, passes its checks and reaches the point where it would start work.

    It runs in an empty dir where the example's ./paths exist as empty dirs (a missing one is
    refused before any work, which is a check of its own)."""
    words = shlex.split(line.split("#", 1)[0].split("|", 1)[0])
    argv = words[words.index("fsdpck") + 1:]
    monkeypatch.chdir(tmp_path)
    for word in argv:
        if word.startswith("./"):
            (tmp_path / word).mkdir(parents=True, exist_ok=True)
    stage = "workers" if "-n" in argv else {"inspect": "inspect", "diff": "diff", "show": "show"}.get(command, "ranks")
    with nothing_can_run(), pytest.raises(Started) as started:
        r = invoke(*argv)
        pytest.fail(f"exit {r.exit_code} before starting anything:\n{r.output}")
    assert started.value.stage == stage


def test_version():
    for flag in ("--version", "-V"):
        r = invoke(flag)
        assert r.exit_code == 0 and r.output == f"fsdpck, version {__version__}\n"


def test_help_does_not_import_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom fsdpck.cli import cli\n"
            "for c in ([], ['verify'], ['save'], ['load'], ['inspect'], ['show'], ['diff']):\n"
            "    assert CliRunner().invoke(cli, c + ['--help']).exit_code == 0\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = fresh_python(code)
    assert out.strip() == "[]", out


# --- usage errors ----------------------------------------------------------------------------------


def test_unknown_option_is_a_usage_error():
    r = invoke("verify", "--no-such-option")
    assert r.exit_code == 2
    assert "--no-such-option" in r.output
    assert "Traceback" not in r.output


IMPOSSIBLE = [
    (["verify", "--fsdp", "2", "--api", "legacy"], "only for FSDP1"),
    (["verify", "--fsdp", "1", "--replicate", "2"], "need --fsdp 2"),
    (["verify", "--fsdp", "1", "--tp", "2"], "need --fsdp 2"),
    (["save", "/nonexistent/ck", "--fsdp", "2", "--api", "legacy"], "only for FSDP1"),
    (["save", "/nonexistent/ck", "--fsdp", "1", "--tp", "2"], "need --fsdp 2"),
    (["load", "/nonexistent/ck", "--fsdp", "2", "--api", "legacy"], "only for FSDP1"),
    (["load", "/nonexistent/ck", "--fsdp", "1", "--replicate", "2"], "need --fsdp 2"),
]


@pytest.mark.parametrize("nproc", [None, "2"], ids=["plain", "dash-n"])
@pytest.mark.parametrize("argv,message", IMPOSSIBLE, ids=[" ".join(a[:1] + a[-4:]) for a, _ in IMPOSSIBLE])
def test_impossible_flow_is_refused_before_anything_starts(argv: list[str], message: str, nproc: str | None):
    """A combination that cannot exist at any world size is refused at once, in one line: with -n
    before any worker is started (each would import torch only to refuse it)."""
    argv = argv[:1] + (["-n", nproc] if nproc else []) + argv[1:]
    with nothing_can_run():
        try:
            r = invoke(*argv)
        except Started as e:
            pytest.fail(f"`fsdpck {' '.join(argv)}` reached {e.stage} before refusing the combination")
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("argv,message", [
    (["verify", "--width", "2", "--size", "1MB"], "--width and --size"),
    (["save", "/nonexistent/ck", "--width", "2", "--size", "1MB"], "--width and --size"),
    (["verify", "--self-test", "--atol", "inf"], "could not fail"),
    (["verify", "--self-test", "--rtol", "inf"], "could not fail"),
])
def test_contradictory_options_are_usage_errors(argv: list[str], message: str):
    with nothing_can_run():
        r = invoke(*argv)
    assert r.exit_code == 2 and message in r.output, r.output


@pytest.mark.parametrize("command", [["verify"], ["save", "/nonexistent/ck"], ["load", "/nonexistent/ck"]])
def test_dash_n_under_torchrun_is_refused(command: list[str], monkeypatch):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(launch.WORKER_ENV, raising=False)
    with nothing_can_run():
        r = invoke(command[0], "-n", "2", *command[1:])
    assert r.exit_code == 2 and "cannot be used under torchrun" in r.output, r.output


def test_dash_n_in_a_worker_runs_the_command_itself(monkeypatch):
    # The workers re-run the very command line, -n included: there it means "you are a rank".
    monkeypatch.setenv(launch.WORKER_ENV, "1")
    with nothing_can_run(), pytest.raises(Started) as started:
        invoke("verify", "-n", "2", "--planner", "none")
    assert started.value.stage == "ranks"


# --- failure drills: the spec -------------------------------------------------------------------------


def test_bad_drill_spec_is_a_usage_error_before_any_process_group(monkeypatch, tmp_path: Path):
    monkeypatch.setenv(faults.ENV, "sav:1")
    out = tmp_path / "r.json"
    with nothing_can_run(runner=False):  # the runner runs; a process group would be a stub that raises
        r = invoke("verify", "--json", str(out))
    assert r.exit_code == 2, r.output
    assert "FSDPCK_FAULT='sav:1' is not PHASE:RANK[:KIND]" in r.output and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("fsdpck verify: FAILED (exit 2)")
    doc = json.loads(out.read_text())
    assert (doc["schema"], doc["exit_code"], doc["outcome"]) == ("fsdpck.verify/1", 2, "usage or set-up error")
    assert "FSDPCK_FAULT" in doc["error"] and doc["verdict"] == r.output.strip().splitlines()[-1]


@pytest.mark.parametrize("text,fault", [
    ("save:1", faults.Fault("save", 1, "raise")),
    ("init:0:exit", faults.Fault("init", 0, "exit")),
    ("compare:12:hang", faults.Fault("compare", 12, "hang")),
    ("load:3:kill", faults.Fault("load", 3, "kill")),
    ("", None),
])
def test_drill_spec_parses(text: str, fault):
    assert faults.parse(text) == fault


@pytest.mark.parametrize("text", ["sav:1", "save", "save:x", "save:-1", "save:1:explode", "save:1:raise:2", ":1"])
def test_drill_spec_refuses_anything_else(text: str):
    from fsdpck.errors import UsageError

    with pytest.raises(UsageError, match="PHASE:RANK"):
        faults.parse(text)


def test_a_drill_fires_only_on_its_phase_and_rank(monkeypatch):
    monkeypatch.setenv(faults.ENV, "step:1:raise")
    faults.maybe_inject("step", 0)
    faults.maybe_inject("save", 1)
    with pytest.raises(faults.InjectedFault, match="step:1:raise"):
        faults.maybe_inject("step", 1)


# --- -n: the exit code across ranks ------------------------------------------------------------------


@pytest.mark.parametrize("codes,expected", [
    ([0, 0], 0), ([1, 0], 1), ([0, 2], 2), ([1, 3, 2], 3),
    ([-9, 0], 3),  # a rank killed by a signal says nothing itself: a runtime failure
    ([-15, 1], 1),  # the others ended by the launcher after one rank's own code
    ([7], 3),  # not one of fsdpck's codes
])
def test_dash_n_exit_code_is_the_most_severe_fsdpck_code(codes: list[int], expected: int):
    assert launch.exit_code_from(codes) == expected


def test_the_launchers_own_module_loggers_are_silenced(monkeypatch):
    # torch gives each elastic module's logger a level of its own: setting the parents' is not enough
    # (a rank's half-written error file once put the launcher's traceback into fsdpck's output).
    import logging

    import torch.distributed.elastic.multiprocessing.errors  # noqa: F401 (creates its logger)

    from fsdpck.runtime import launch

    errors_log = logging.getLogger("torch.distributed.elastic.multiprocessing.errors")
    monkeypatch.setattr(errors_log, "level", logging.WARNING)
    launch.quiet_launcher_logs()
    assert not errors_log.isEnabledFor(logging.CRITICAL)


def test_the_elastic_error_file_is_written_whole(tmp_path, monkeypatch):
    import json

    from fsdpck.runtime import launch

    target = tmp_path / "error.json"
    target.write_text("")  # what a rank ended mid-write used to leave
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(target))
    launch.write_elastic_error_file("rank 1 during save: boom")
    assert json.loads(target.read_text())["message"] == "rank 1 during save: boom"
    assert [p.name for p in tmp_path.iterdir()] == ["error.json"]  # no temporary left behind


def test_the_envelope_names_the_installed_torch_without_importing_it(tmp_path, monkeypatch):
    # Read from torch's version.py: the same answer as the installed distribution's metadata, with
    # neither torch nor importlib.metadata imported (an offline command's start-up is 0.2 s).
    from importlib import metadata

    from fsdpck.report import envelope

    code = ("import sys\nfrom fsdpck.report.envelope import torch_version\nprint(torch_version())\n"
            "print('torch' in sys.modules, 'importlib.metadata' in sys.modules)")
    out = fresh_python(code)
    assert out.split() == [metadata.version("torch"), "False", "False"], out
    # A torch whose version.py says nothing readable: the distribution's metadata answers.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")
    (tmp_path / "torch" / "version.py").write_text("__version__ = compute()\n")
    monkeypatch.setattr(envelope.importlib.util, "find_spec", lambda name: type("S", (), {"origin": str(tmp_path / "torch" / "__init__.py")})())
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert envelope.torch_version() == metadata.version("torch")
    # A namespace package (no origin) or a finder that fails: the same fallback, no traceback.
    monkeypatch.setattr(envelope.importlib.util, "find_spec", lambda name: type("S", (), {"origin": None})())
    assert envelope.torch_version() == metadata.version("torch")

    def broken(name):
        raise ValueError("torch.__spec__ is None")

    monkeypatch.setattr(envelope.importlib.util, "find_spec", broken)
    assert envelope.torch_version() == metadata.version("torch")
