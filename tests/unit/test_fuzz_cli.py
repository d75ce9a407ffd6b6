"""Hostile command lines: every command's options fuzzed with hypothesis.

Each generated command line holds exactly one thing that is certainly wrong (an unknown
option, a typed option with a value outside its type, choice or range, an option left
without its value, an extra argument) among valid options, and must end with exit 2, a
message naming the offending option, and no traceback. The options are read from the
click commands themselves, so a new option is fuzzed without touching this file.

Nothing here can start a run: the per-rank runner, the worker launcher, the process group and
the checkpoint readers are replaced by stubs (``cli_stubs``), so a case that slipped through
parsing fails the test at once instead of training a model. In-process through CliRunner:
~100 cases, seconds.
"""

from __future__ import annotations

import math
import string
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fsdpck.cli
from cli_stubs import Started, nothing_can_run
from fsdpck.state.model import parse_size

COMMANDS = ("verify", "save", "load", "inspect", "show", "diff")
EXAMPLES_PER_COMMAND = 20

# Positional arguments: a path that is never used (nothing runs) but keeps "missing argument" away.
ARGS = {"verify": [], "save": ["/nonexistent/fsdpck-fuzz"], "load": ["/nonexistent/fsdpck-fuzz"],
        "inspect": ["/nonexistent/fsdpck-fuzz"], "show": ["/nonexistent/fsdpck-fuzz", "model.w"],
        "diff": ["/nonexistent/a", "/nonexistent/b"]}


def options(command: str) -> list[click.Option]:
    return [p for p in fsdpck.cli.command(command).params if isinstance(p, click.Option)]


def known_names(command: str) -> set[str]:
    names = {"-h", "--help"}
    for p in options(command):
        names |= set(p.opts) | set(p.secondary_opts)
    return names


def _as_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


JUNK = st.sampled_from(["", "abc", "1.5", "1e3", "0x10", "--", "--keep", "-", "ten", "1,5", "∞", "1 2", "\t"]) | st.text(
    alphabet=string.printable, max_size=6)


def invalid_values(p: click.Option) -> st.SearchStrategy[str] | None:
    """Values certainly invalid for option ``p`` (None: it takes any string)."""
    t = p.type
    if isinstance(t, click.IntRange):
        lo, hi = t.min, t.max
        out_of_range = st.integers(max_value=lo - 1) if lo is not None else st.nothing()
        if hi is not None:
            out_of_range |= st.integers(min_value=hi + 1)
        return out_of_range.map(str) | JUNK.filter(lambda s: _as_int(s) is None)
    if isinstance(t, click.FloatRange):
        lo, hi = t.min, t.max

        def bad(s: str) -> bool:
            v = _as_float(s)
            # NaN slips through click's FloatRange: tested on its own below (test_nan_is_refused).
            return v is None or (not math.isnan(v) and not ((lo is None or v >= lo) and (hi is None or v <= hi)))

        numbers = st.floats(allow_nan=False).filter(lambda v: not ((lo is None or v >= lo) and (hi is None or v <= hi)))
        return numbers.map(repr) | JUNK.filter(bad)
    if isinstance(t, click.Choice):
        choices = set(map(str, t.choices))
        return (st.sampled_from(sorted(choices)).map(str.upper).filter(lambda s: s not in choices)
                | st.sampled_from(["7", "0", "all ", " 1", "FSDP1", "none2"]) | st.text(max_size=6)).filter(
            lambda s: s not in choices)
    if p.name == "size":
        def not_a_size(s: str) -> bool:
            try:
                parse_size(s)
            except ValueError:
                return True
            return False

        return (st.sampled_from(["2XB", "GB", "-1GB", "1.2.3GB", "0", "nanGB", "1e400GB", "8 G B", "MB8"])
                | st.text(max_size=6)).filter(not_a_size)
    if getattr(p.callback, "__name__", "") in ("_json_target", "check_json_target"):  # --json: a file path or "-"
        return st.sampled_from(["", "/", "/tmp"])
    if p.name == "slice_expr":  # --slice: a strict expression, its syntax checked at parse time
        return st.sampled_from(["", "1:2:3", "...", "a", "1,,2", "::", "9" * 30, "0 : 1 : 2", "[0]", "1;2"])
    if p.name in ("atol", "rtol"):  # FLOAT, must be zero or more
        return (st.floats(max_value=-1e-300, allow_nan=False).map(repr)
                | JUNK.filter(lambda s: _as_float(s) is None))
    return None


def valid_value(p: click.Option) -> st.SearchStrategy[list[str]] | None:
    """A valid occurrence of option ``p`` as tokens (None: leave it out)."""
    flag = max(p.opts, key=len)
    if p.is_flag:
        return st.sampled_from([[o] for o in (*p.opts, *p.secondary_opts)])
    t = p.type
    if isinstance(t, click.IntRange):
        return st.integers(t.min, min(t.max, (t.min or 0) + 100)).map(lambda v: [flag, str(v)])
    if isinstance(t, click.FloatRange):
        return st.floats(t.min, t.max, allow_nan=False).map(lambda v: [flag, repr(v)])
    if isinstance(t, click.Choice):
        return st.sampled_from([[flag, str(c)] for c in t.choices])
    if p.name in ("key_glob",):
        return st.just([flag, "optim.*"])
    if p.name == "slice_expr":
        return st.sampled_from([[flag, "0:4,:8"], [flag, "-1"], [flag, ":"]])
    return None  # paths, --json, --size, tolerances: not needed to make noise


@st.composite
def bad_command_line(draw, command: str) -> tuple[list[str], str]:
    """(argv, the name the error message must hold)."""
    opts = options(command)
    kinds = ["unknown", "value", "missing"] + ([] if command in ("verify", "load") else ["extra"])
    kind = draw(st.sampled_from(kinds))
    tail: list[str] = []
    if kind == "unknown":
        known = known_names(command)
        name = draw(st.from_regex(r"--[a-z][a-z0-9-]{0,14}", fullmatch=True)
                    | st.sampled_from(string.ascii_letters).map(lambda c: "-" + c)).strip()
        if name in known:
            name = "--no-such-" + name.lstrip("-")
        bad, culprit, offender = [name], name, None
    elif kind == "value":
        typed = [p for p in opts if invalid_values(p) is not None]
        offender = draw(st.sampled_from(typed))
        spelled = draw(st.sampled_from(offender.opts))
        bad, culprit = [spelled, draw(invalid_values(offender))], spelled
    elif kind == "missing":
        offender = draw(st.sampled_from([p for p in opts if not p.is_flag]))
        spelled = draw(st.sampled_from(offender.opts))
        bad, culprit = [], spelled
        tail = [spelled]  # last on the line: nothing left to be its value
    else:  # an argument too many for a command with a fixed number of them
        extra = draw(st.from_regex(r"[a-z][a-z0-9_.]{0,8}", fullmatch=True))
        bad, culprit, offender = [extra], extra, None
    # Valid options around it (never the offending one: a later valid occurrence would win).
    noise = [p for p in opts if p is not offender and valid_value(p) is not None]
    chunks = [draw(valid_value(p)) for p in draw(st.lists(st.sampled_from(noise), max_size=3, unique=True))] if noise else []
    position = draw(st.integers(0, len(chunks)))
    chunks.insert(position, bad)
    argv = [command, *ARGS[command], *[tok for chunk in chunks for tok in chunk], *tail]
    return argv, culprit


def invoke(argv: list[str]):
    return CliRunner().invoke(fsdpck.cli.cli, argv, catch_exceptions=False)


def assert_usage_error(argv: list[str], culprit: str) -> None:
    try:
        r = invoke(argv)
    except Started as e:
        pytest.fail(f"$ fsdpck {' '.join(map(repr, argv))}\ngot past parsing and its checks: it reached {e.stage}")
    shown = f"$ fsdpck {' '.join(map(repr, argv))}\nexit {r.exit_code}\n{r.output}"
    assert r.exit_code == 2, shown
    assert culprit in r.output, shown
    assert "Traceback" not in r.output, shown


@pytest.mark.parametrize("command", COMMANDS)
@settings(max_examples=EXAMPLES_PER_COMMAND, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_bad_command_lines_are_usage_errors(command: str, data):
    argv, culprit = data.draw(bad_command_line(command))
    with nothing_can_run():
        assert_usage_error(argv, culprit)


# The examples users actually type, spelled out (and kept even where hypothesis would not draw them).
@pytest.mark.parametrize("argv,culprit", [
    (["verify", "--steps", "-3"], "--steps"),
    (["verify", "--timeout", "abc"], "--timeout"),
    (["verify", "--fsdp", "7"], "--fsdp"),
    (["verify", "--size", "2XB"], "--size"),
    (["verify", "--json"], "--json"),
    (["verify", "-n", "0"], "-n"),
    (["verify", "--atol", "-1"], "--atol"),
    (["verify", "--save-mode", "async-gpu"], "--save-mode"),
    (["verify", "--replicate", "0"], "--replicate"),
    (["verify", "--tp", "-2"], "--tp"),
    (["verify", "--self-test-rank", "-1"], "--self-test-rank"),
    (["verify", "--optimizer", "Adam"], "--optimizer"),
    (["save", "/nonexistent/x", "--optimizer", "lion"], "--optimizer"),
    (["save", "/nonexistent/x", "--optimizer", "all"], "--optimizer"),  # "all" is verify's, for several flows
    (["load", "/nonexistent/x", "--planner", "both"], "--planner"),
    (["load", "/nonexistent/x", "--nproc-per-node", "1025"], "--nproc-per-node"),
    (["inspect", "/nonexistent/x", "--key"], "--key"),
    (["inspect", "/nonexistent/x", "--json", "/"], "--json"),
    (["diff", "/nonexistent/a", "/nonexistent/b", "--frobnicate"], "--frobnicate"),
    (["diff", "/nonexistent/a", "/nonexistent/b", "--json", ""], "--json"),
    (["diff", "/nonexistent/a", "/nonexistent/b", "--atol", "-1e-3"], "--atol"),
    (["show", "/nonexistent/x", "k", "--slice", "0:4:2"], "--slice"),
    (["show", "/nonexistent/x"], "KEY"),
])
def test_typical_mistakes(argv: list[str], culprit: str):
    with nothing_can_run():
        assert_usage_error(argv, culprit)


@pytest.mark.parametrize("argv,option", [(["verify"], "--timeout"), (["verify"], "--atol"), (["verify"], "--rtol"),
                                         (["diff", "/nonexistent/a", "/nonexistent/b"], "--atol"),
                                         (["diff", "/nonexistent/a", "/nonexistent/b"], "--rtol")])
def test_nan_is_refused(argv: list[str], option: str):
    with nothing_can_run():
        assert_usage_error([*argv, option, "nan"], option)


@pytest.mark.parametrize("command", ["verify", "save", "load"])
@pytest.mark.parametrize("value", ["dir", "empty"])
def test_json_target_is_checked_before_the_run(command: str, value: str, tmp_path: Path):
    target = str(tmp_path) if value == "dir" else ""
    with nothing_can_run():
        assert_usage_error([command, *ARGS[command], "--json", target], "--json")
