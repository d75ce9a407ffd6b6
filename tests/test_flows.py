"""Which flows a launch runs: the default, --planner, --matrix and its narrowing, impossible combinations."""

from __future__ import annotations

import pytest

from fsdpck.errors import UsageError
from fsdpck.flows import Flow, select


def sel(**kw):
    base = dict(matrix=False, fsdp=None, api=None, planner="both", save_mode=None, optimizer="adam", dtype="float32", steps=1)
    base.update(kw)
    return select(**base)


def test_default_is_the_reference_test_with_both_planners():
    assert sel() == [Flow(planner="default"), Flow(planner="none")]


def test_fsdp2_defaults_to_dsd():
    assert {f.api for f in sel(fsdp=2)} == {"dsd"}


def test_impossible_combination_is_a_usage_error():
    with pytest.raises(UsageError, match="only for FSDP1"):
        sel(fsdp=2, api="legacy")
    with pytest.raises(UsageError):
        sel(matrix=True, fsdp=2, api="legacy")


def test_matrix_is_every_valid_combination():
    flows = sel(matrix=True)
    assert len(flows) == 12
    assert {(f.fsdp, f.api) for f in flows} == {(1, "legacy"), (1, "dsd"), (2, "dsd")}
    assert len(set(flows)) == 12 and len({f.name for f in flows}) == 12


def test_matrix_narrowed_and_widened():
    assert len(sel(matrix=True, fsdp=2)) == 4
    assert len(sel(matrix=True, save_mode="sync", planner="default")) == 3
    assert len(sel(matrix=True, optimizer="all", dtype="all")) == 12 * 5 * 2
