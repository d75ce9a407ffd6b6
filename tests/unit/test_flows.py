"""Which flows a launch runs (``fsdpck.state.flows.select``): the default, --planner, layouts, save
modes, --matrix and its narrowing, and the combinations that cannot exist. No process group."""

from __future__ import annotations

import pytest

from fsdpck.errors import UsageError
from fsdpck.state import registry
from fsdpck.state.flows import select
from fsdpck.state.registry import SAVE_MODES, Flow, Layout

CPU_MODES_FSDP1 = {"sync", "async", "async-process", "async-blocking"}  # shm and pinned cannot stage ShardedTensor
CPU_MODES_FSDP2 = CPU_MODES_FSDP1 | {"async-shm"}  # pinned needs CUDA


def sel(**kw) -> list[Flow]:
    base = dict(matrix=False, world_size=2, cuda=False)
    base.update(kw)
    return select(**base)


def test_default_is_the_reference_test_with_both_planners():
    assert sel() == [Flow(planner="default"), Flow(planner="none")]
    assert sel(planner="none") == [Flow(planner="none")]
    (flow,) = sel(planner="default")
    assert (flow.fsdp, flow.api, flow.save_mode, flow.optimizer, flow.dtype, flow.layout) == (
        1, "legacy", "sync", "adam", "float32", registry.PLAIN)


def test_fsdp2_defaults_to_dsd_and_a_layout_implies_fsdp2():
    assert {(f.fsdp, f.api) for f in sel(fsdp=2)} == {(2, "dsd")}
    flows = sel(world_size=4, layout=Layout(replicate=2))
    assert {(f.fsdp, f.api, f.layout.name) for f in flows} == {(2, "dsd", "hsdp2")}
    assert {f.layout.name for f in sel(world_size=4, layout=Layout(tp=2))} == {"tp2"}


def test_impossible_combinations_are_usage_errors_naming_the_options():
    with pytest.raises(UsageError, match="only for FSDP1"):
        sel(fsdp=2, api="legacy")
    with pytest.raises(UsageError, match="only for FSDP1"):
        sel(matrix=True, fsdp=2, api="legacy")
    with pytest.raises(UsageError, match="need --fsdp 2"):
        sel(world_size=4, fsdp=1, layout=Layout(replicate=2))
    with pytest.raises(UsageError, match="need --fsdp 2"):
        sel(matrix=True, world_size=4, fsdp=1, layout=Layout(tp=2))
    with pytest.raises(UsageError, match="not divisible by --replicate 1 × --tp 3"):
        sel(world_size=4, layout=Layout(tp=3))


def test_safetensors_with_fsdp1_needs_an_optimizer_without_a_step():
    # FSDP1's optimizer state dict shares one 'step' tensor among a flat parameter's parameters, which
    # the safetensors writer refuses (tests/integration/test_formats.py holds PyTorch to it).
    with pytest.raises(UsageError, match="shared 'step' tensor"):
        sel(format="safetensors", api="dsd")
    with pytest.raises(UsageError, match="shared 'step' tensor"):
        sel(matrix=True, fsdp=1, api="dsd", optimizer="rmsprop", format="safetensors")
    flows = sel(matrix=True, api="dsd", optimizer="all", format="safetensors")  # the matrix skips them
    assert {(f.fsdp, f.optimizer) for f in flows} == {(1, "sgd")} | {(2, o) for o in registry.OPTIMIZERS}
    assert {f.optimizer for f in sel(fsdp=1, api="dsd", optimizer="sgd", format="safetensors")} == {"sgd"}
    assert Flow(fsdp=1, api="dsd", format="safetensors").problem(2) is not None
    assert Flow(fsdp=2, api="dsd", format="safetensors").problem(2) is None


def test_save_modes_that_cannot_run_here_are_refused_when_asked_for():
    with pytest.raises(UsageError, match="ShardedTensor"):
        sel(save_mode="async-shm")  # FSDP1 by default
    with pytest.raises(UsageError, match="ShardedTensor"):
        sel(matrix=True, fsdp=1, save_mode="async-shm")
    with pytest.raises(UsageError, match="needs GPUs"):
        sel(fsdp=2, save_mode="async-pinned")
    (flow,) = sel(fsdp=2, save_mode="async-pinned", cuda=True, planner="none")
    assert flow.mode.stager == "pinned" and flow.mode.asynchronous
    # In a matrix that did not name the wrapper, a mode narrows it to the wrappers that can run it.
    assert {(f.fsdp, f.save_mode) for f in sel(matrix=True, save_mode="async-shm")} == {(2, "async-shm")}


@pytest.mark.parametrize("world_size,cuda,layouts", [
    (2, False, ["plain"]),
    (3, False, ["plain"]),
    (2, True, ["plain"]),
    (4, False, ["plain", "hsdp2", "tp2"]),
    (8, False, ["plain", "hsdp2", "tp2", "hsdp2-tp2"]),
])
def test_matrix_is_every_valid_combination(world_size: int, cuda: bool, layouts: list[str]):
    flows = sel(matrix=True, world_size=world_size, cuda=cuda)
    fsdp2_modes = CPU_MODES_FSDP2 | ({"async-pinned"} if cuda else set())
    expected = {(1, api, "plain", mode, planner) for api in ("legacy", "dsd") for mode in CPU_MODES_FSDP1
                for planner in ("default", "none")}
    expected |= {(2, "dsd", layout, mode, planner) for layout in layouts for mode in fsdp2_modes
                 for planner in ("default", "none")}
    assert {(f.fsdp, f.api, f.layout.name, f.save_mode, f.planner) for f in flows} == expected
    assert len(flows) == len(expected)  # nothing twice
    assert len({f.name for f in flows}) == len(flows)  # one subdirectory each
    assert {f.save_mode for f in flows} == set(SAVE_MODES) - ({"async-pinned"} if not cuda else set())


def test_matrix_narrowed_and_widened():
    assert len(sel(matrix=True, fsdp=2)) == len(CPU_MODES_FSDP2) * 2
    assert {(f.fsdp, f.api) for f in sel(matrix=True, save_mode="sync", planner="default")} == {
        (1, "legacy"), (1, "dsd"), (2, "dsd")}
    widened = sel(matrix=True, optimizer="all", dtype="all")
    assert len(widened) == 26 * len(registry.OPTIMIZERS) * len(registry.DTYPES)
    assert {f.optimizer for f in widened} == set(registry.OPTIMIZERS)
    assert {f.dtype for f in widened} == set(registry.DTYPES)
    # A layout given to --matrix keeps the wrappers that can hold it.
    tp = sel(matrix=True, world_size=4, layout=Layout(tp=2))
    assert {(f.fsdp, f.layout.name) for f in tp} == {(2, "tp2")} and len(tp) == len(CPU_MODES_FSDP2) * 2


def test_options_reach_every_flow():
    flows = sel(matrix=True, fsdp=2, steps=3, trainer_state=True, steps_during_save=2, optimizer="sgd",
                dtype="bfloat16")
    assert {(f.steps, f.trainer_state, f.steps_during_save, f.optimizer, f.dtype) for f in flows} == {
        (3, True, 2, "sgd", "bfloat16")}


def test_flow_name_and_record():
    flow = Flow(fsdp=2, api="dsd", planner="none", save_mode="async-shm", layout=Layout(replicate=2, tp=2),
                trainer_state=True)
    assert flow.name == "fsdp2-dsd-planner_none-async-shm-adam-float32-hsdp2-tp2-trainer"
    assert "/" not in flow.name and " " not in flow.name
    record = flow.as_dict()
    assert (record["replicate"], record["tp"], record["steps_during_save"]) == (2, 2, 1)
    assert Flow().as_dict()["steps_during_save"] == 0  # a sync save takes no steps during the write
    assert Flow().name == "fsdp1-legacy-planner_default-sync-adam-float32"


def test_layout_meshes():
    assert Layout(replicate=2).mesh_shape(8) == (2, 4) and Layout(replicate=2).mesh_dim_names() == ("replicate", "shard")
    assert Layout(tp=2).mesh_shape(8) == (4, 2) and Layout(tp=2).mesh_dim_names() == ("shard", "tp")
    assert Layout(replicate=2, tp=2).mesh_shape(8) == (2, 2, 2)
    assert registry.PLAIN.mesh_shape(3) == (3,) and registry.PLAIN.problem(3, 1) is None
    assert [lay.name for lay in registry.matrix_layouts(6)] == ["plain", "hsdp2", "tp2"]
    assert [lay.name for lay in registry.matrix_layouts(2)] == ["plain"]
