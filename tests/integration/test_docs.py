"""Claims are tests: every command line in the README's code blocks, every example of every
``--help`` and every command of docs/debugging.md is run, word for word, and must end with the
exit code the docs give it.

The commands run through bash, in order (README first, then the help of the group and of each
command), in one temporary dir that is not the repository (so ``torchrun ... -m fsdpck`` is shown
to work from anywhere), with this environment's ``fsdpck``, ``torchrun`` and ``python3`` first on
PATH. A line's comment ``(exit N)`` or ``exit N`` states its code; otherwise 0. A line that appears
twice runs once. The README's first two commands are what CI itself runs (`.ci/run`), so they are
not run again here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO, invoke, run, worker_env

pytestmark = pytest.mark.slow
RUN_BY_CI = {"bash scripts/verify.sh", "bash scripts/test.sh", "bash scripts/test.sh tests/unit"}
COMMANDS = ["", "verify", "save", "load", "inspect", "show", "diff"]


def split(line: str) -> tuple[str, int]:
    """A documented line as (the command, its stated exit code)."""
    command, _, comment = line.partition("  #")
    stated = re.search(r"\bexit (\d)\b", comment)
    return command.strip(), int(stated.group(1)) if stated else 0


def readme_lines() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [ln.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S) for ln in block.splitlines()
            if ln.strip() and not ln.strip().startswith("#")]


def help_lines(command: str) -> list[str]:
    r = invoke(*([command] if command else []), "--help")
    assert r.exit_code == 0, r.output
    examples = r.output.split("Examples:", 1)[1].split("\n\n", 1)[0]
    return [ln.strip() for ln in examples.splitlines() if ln.strip()]


def documented() -> list[tuple[str, str, int]]:
    """(source, command, code) in document order, each command once."""
    seen: set[str] = set()
    out = []
    sources = [("README", readme_lines())] + [(f"fsdpck {c} --help".replace("  ", " "), help_lines(c)) for c in COMMANDS]
    for source, lines in sources:
        for line in lines:
            command, code = split(line)
            if command in seen or command in RUN_BY_CI:
                continue
            seen.add(command)
            out.append((source, command, code))
    return out


DOCUMENTED = documented()


def test_every_help_has_examples_and_torchrun_lines_work_from_anywhere():
    assert {source for source, _, _ in DOCUMENTED} >= {"README", "fsdpck verify --help", "fsdpck load --help"}
    for _, command, _ in DOCUMENTED:
        for part in re.split(r"&&|;", command):
            if "torchrun" in part:
                assert " -m fsdpck " in part or "--no-python fsdpck" in part, part


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docs")


@pytest.mark.parametrize("source, command, code", DOCUMENTED, ids=[f"{s}: {c[:70]}" for s, c, _ in DOCUMENTED])
def test_documented_command(workdir, source, command, code):
    r = run(["bash", "-c", command], cwd=workdir, env=worker_env(), timeout=900)
    assert r.code == code, f"{source}: {command}\n" + r.tail()
    assert "Traceback" not in r.text, r.tail()


# docs/debugging.md: its Python block makes the two checkpoints its commands look at, in a dir of its own.
DEBUGGING = (REPO / "docs" / "debugging.md").read_text()
DEBUGGING_COMMANDS = [split(ln.strip()) for block in re.findall(r"```bash\n(.*?)```", DEBUGGING, re.S)
                      for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]


@pytest.fixture(scope="module")
def debugging_dir(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("debugging")
    (where / "make_checkpoints.py").write_text("\n".join(re.findall(r"```python\n(.*?)```", DEBUGGING, re.S)))
    r = run(["python3", "-W", "ignore", "make_checkpoints.py"], cwd=where, env=worker_env(), timeout=300)
    assert r.code == 0, r.tail()
    return where


@pytest.mark.parametrize("command, code", DEBUGGING_COMMANDS, ids=[c[:70] for c, _ in DEBUGGING_COMMANDS])
def test_debugging_page_command(debugging_dir, command, code):
    r = run(["bash", "-c", command], cwd=debugging_dir, env=worker_env(), timeout=300)
    assert r.code == code, f"docs/debugging.md: {command}\n" + r.tail()
    assert "Traceback" not in r.text, r.tail()
