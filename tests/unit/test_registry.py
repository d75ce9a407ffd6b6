"""One registry: an optimizer registered in one place is a choice of the CLI, part of the matrix and
of the benchmark, with no other file touched; and the README's tables say what the registry holds."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
import torch
from conftest import REPO, invoke

from fsdpck.state import registry
from fsdpck.state.flows import select


@pytest.fixture
def fake_optimizer():
    spec = registry.OptimizerSpec("fakeopt", lambda params, **hyper: torch.optim.SGD(params, **hyper), {"lr": 0.05},
                                  ("momentum_buffer",), 1)
    registry.register_optimizer(spec)
    yield spec
    registry.OPTIMIZERS.pop("fakeopt")


def test_a_registered_optimizer_is_a_choice_everywhere(fake_optimizer):
    assert "fakeopt" in invoke("verify", "--help").output
    assert "fakeopt" in invoke("save", "--help").output
    flows = select(matrix=True, world_size=2, cuda=False, optimizer="all")
    assert {f.optimizer for f in flows} == set(registry.OPTIMIZERS) and any(f.optimizer == "fakeopt" for f in flows)
    built = fake_optimizer.build(torch.nn.Linear(2, 2).parameters())
    assert isinstance(built, torch.optim.SGD) and built.defaults["lr"] == 0.05
    spec = importlib.util.spec_from_file_location("bench_for_registry", REPO / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules.pop("bench_for_registry", None)
    sys.path.insert(0, str(REPO / "scripts"))  # bench.py imports its sibling bench_report, as when run as a script
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert bench.parse_args(["--optimizer", "fakeopt", "--width", "1"]).optimizer == "fakeopt"
    # ... and gone again when it is unregistered (the choices are read when the line is parsed).


def test_unregistered_is_refused(fake_optimizer):
    registry.OPTIMIZERS.pop("fakeopt")
    try:
        r = invoke("verify", "--optimizer", "fakeopt")
        assert r.exit_code == 2 and "fakeopt" in r.output
    finally:
        registry.register_optimizer(fake_optimizer)


def readme_table(header: str) -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    block = text.split(header, 1)[1].split("\n\n", 2)[1]
    rows = [ln for ln in block.splitlines() if ln.startswith("|")][2:]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_the_readme_optimizer_table_is_the_registry():
    rows = readme_table("**Optimizers**")
    names = [re.match(r"`(\w+)`", r[0]).group(1) for r in rows]
    assert names == list(registry.OPTIMIZERS)
    for (name, hyper, state), spec in zip(rows, registry.OPTIMIZERS.values()):
        assert hyper == ", ".join(f"{k} {v}" for k, v in spec.hyper.items())
        assert state == ", ".join(spec.state)


def test_the_readme_save_mode_table_is_the_registry():
    rows = readme_table("**Save modes**")
    assert [re.match(r"`([\w-]+)`", r[0]).group(1) for r in rows] == list(registry.SAVE_MODES)
    for row, mode in zip(rows, registry.SAVE_MODES.values()):
        assert ("CUDA" in row[1]) == mode.needs_cuda and ("FSDP2 only" in row[1]) == (not mode.fsdp1)
