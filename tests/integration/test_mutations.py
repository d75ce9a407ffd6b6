"""verify must notice when PyTorch's checkpoint path is broken: mutation tests, in one process.

Each test patches one piece of DCP (or of the optimizer) the way a real bug would break it, runs
``verify`` (and ``load``) at world size 1 in this process, and requires exit 1 naming the key; the
control without a patch verifies. World size 1 runs FSDP1 and FSDP2 for real (a one-rank gloo group),
which is what these bugs need: they are in the save and load paths, not in the collectives.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs
import torch.distributed.checkpoint.staging as staging
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

from fsdpck.commands.load import LoadOptions, run_load
from fsdpck.commands.save import SaveOptions, run_save
from fsdpck.commands.verify import VerifyOptions, run_verify
from fsdpck.runtime import dist

FLOWS = {"fsdp1-legacy": {"fsdp": 1, "api": "legacy"}, "fsdp2-dsd": {"fsdp": 2, "api": "dsd"}}


@pytest.fixture(scope="module")
def ctx():
    context = dist.setup(device="cpu", timeout_s=120)
    yield context
    dist.teardown()


COPIES = pytest.mark.parametrize("copy", [None, 0], ids=["saved-copy", "fingerprints-only"])


def verify(ctx, flow: dict, copy: int | None = None, **selection) -> list[tuple[str, str]]:
    """Run verify through one flow; return (key, status) of every row that is not a match.

    ``copy``: the saved-copy limit; 0 compares the loaded state with the saved state's fingerprints
    only, as verify does for a large state (None: the default, which keeps this small state)."""
    opts = VerifyOptions(selection={"matrix": False, "planner": "default", **flow, **selection})
    if copy is not None:
        opts.saved_copy_limit = copy
    result = run_verify(opts, ctx=ctx)
    assert all(r.error is None for r in result.results), [r.error for r in result.results]
    if copy == 0:  # the path really taken: no saved tensors were there to compare
        assert not any(r.elementwise for r in result.results)
    return [(row.key, row.status) for r in result.results for row in r.differing_rows]


@contextlib.contextmanager
def patched(target, name, replacement):
    original = getattr(target, name)
    setattr(target, name, replacement(original))
    try:
        yield
    finally:
        setattr(target, name, original)


def drop_read(key: str):
    """A reader that silently skips the reads of one DCP key."""
    def wrap(original):
        def read_data(self, plan, planner):
            plan.items = [i for i in plan.items if i.dest_index.fqn != key]
            return original(self, plan, planner)
        return read_data
    return wrap


@COPIES
@pytest.mark.parametrize("flow", FLOWS)
def test_control_verifies(ctx, flow, copy):
    assert verify(ctx, FLOWS[flow], copy) == []


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("key", ["model.net3.0.weight", "model.net1.0.bias", "optim.state.net2.0.weight.exp_avg",
                                 "optim.state.net3.0.bias.exp_avg_sq"])
@COPIES
def test_a_read_that_drops_one_tensor_is_caught(ctx, flow, key, copy):
    with patched(dcp_fs.FileSystemReader, "read_data", drop_read(key)):
        bad = verify(ctx, FLOWS[flow], copy)
    assert bad == [(key, "differs")]


@pytest.mark.parametrize("flow", FLOWS)
def test_a_load_that_does_nothing_is_caught(ctx, flow):
    # dcp.load itself a no-op: whatever the fresh model and optimizer held stays, and must not pass.
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.optimizer as dcp_optim

    def nothing(original):
        return lambda *args, **kwargs: None

    with patched(dcp, "load", nothing), patched(dcp_optim, "load_state_dict", nothing):
        try:
            bad = verify(ctx, FLOWS[flow])
        except ValueError as e:
            # The legacy path lays the optimizer state out from what was read: with nothing read, FSDP
            # may refuse the uninitialised values (a runtime failure, exit 3): not a verified run either.
            assert flow == "fsdp1-legacy" and "must have scalar state with the same value" in str(e)
            return
    keys = {k for k, _ in bad}
    assert "model.net1.0.weight" in keys and any(k.startswith("optim.state.") for k in keys), bad


@pytest.mark.parametrize("flow", FLOWS)
@COPIES
def test_a_save_that_writes_one_wrong_element_is_caught(ctx, flow, copy):
    key = "optim.state.net1.0.weight.exp_avg"

    def wrap(original):
        def resolve_data(self, write_item):
            data = original(self, write_item)
            if write_item.index.fqn == key and isinstance(data, torch.Tensor) and data.numel():
                data = data.clone()
                data.view(-1)[0] += 1.0
            return data
        return resolve_data
    with patched(DefaultSavePlanner, "resolve_data", wrap):
        bad = verify(ctx, FLOWS[flow], copy)
    assert bad == [(key, "differs")]


@pytest.mark.parametrize("flow", FLOWS)
def test_moments_swapped_on_load_are_caught(ctx, flow):
    def wrap(original):
        def load_state_dict(self, state_dict):
            for st in state_dict["state"].values():
                if "exp_avg" in st:
                    st["exp_avg"], st["exp_avg_sq"] = st["exp_avg_sq"], st["exp_avg"]
            return original(self, state_dict)
        return load_state_dict
    with patched(torch.optim.Optimizer, "load_state_dict", wrap):
        bad = dict(verify(ctx, FLOWS[flow]))
    moments = {k for k in bad if k.endswith((".exp_avg", ".exp_avg_sq"))}
    assert moments and all(bad[k] == "differs" for k in moments), bad


@pytest.mark.parametrize("flow", FLOWS)
def test_step_reset_and_lr_drift_on_load_are_caught(ctx, flow):
    def wrap(original):
        def load_state_dict(self, state_dict):
            for st in state_dict["state"].values():
                if "step" in st:
                    st["step"] = torch.zeros_like(st["step"]) if isinstance(st["step"], torch.Tensor) else 0
            for group in state_dict["param_groups"]:
                group["lr"] = group["lr"] * (1 + 1e-6)
            return original(self, state_dict)
        return load_state_dict
    with patched(torch.optim.Optimizer, "load_state_dict", wrap):
        bad = dict(verify(ctx, FLOWS[flow]))
    assert bad.get("optim.param_groups.0.lr") == "differs", bad
    assert any(k.endswith(".step") for k in bad), bad


def test_a_stager_that_does_not_copy_is_caught_in_async_as_training_runs_it(ctx):
    # The live state moves on (one optimizer step) while the write runs: a stager that hands the
    # live tensors to the writer writes the moved state, not the one the save was called with.
    def no_copy(original):
        return lambda self, state_dict, **kwargs: state_dict

    flow = {**FLOWS["fsdp2-dsd"], "save_mode": "async"}
    assert verify(ctx, flow) == []  # DCP's real stager copies
    with patched(staging.BlockingAsyncStager, "stage", no_copy):
        bad = verify(ctx, flow)
    assert bad and all(status == "differs" for _, status in bad)
    assert any(k.startswith("model.") for k, _ in bad) and any(k.startswith("optim.state.") for k, _ in bad)


def test_the_steps_during_the_save_must_change_something(ctx):
    # A step that changes nothing (lr 0 and no momentum: SGD) would make the async check vacuous.
    from fsdpck.state import registry

    spec = registry.OPTIMIZERS["sgd"]
    frozen = registry.OptimizerSpec("sgd-frozen", spec.factory, {"lr": 0.0}, ("momentum_buffer",), 1)
    registry.register_optimizer(frozen)
    try:
        with pytest.raises(RuntimeError, match="changed no tensor"):
            run_verify(VerifyOptions(selection={"matrix": False, "planner": "default", **FLOWS["fsdp2-dsd"],
                                                "save_mode": "async", "optimizer": "sgd-frozen"}), ctx=ctx)
    finally:
        registry.OPTIMIZERS.pop("sgd-frozen")


@pytest.mark.parametrize("flow", FLOWS)
def test_verify_and_load_agree_on_a_dropped_read(ctx, tmp_path, flow):
    key = "model.net2.0.weight"
    run_save(SaveOptions(location=str(tmp_path / "ck"), selection=dict(FLOWS[flow])), ctx=ctx)
    assert run_load(LoadOptions(locations=[str(tmp_path / "ck")]), ctx=ctx).exit_code == 0
    with patched(dcp_fs.FileSystemReader, "read_data", drop_read(key)):
        run = run_load(LoadOptions(locations=[str(tmp_path / "ck")]), ctx=ctx)
        bad_verify = verify(ctx, FLOWS[flow])
    assert [(r.key, r.status) for r in run.results[0].differing] == [(key, "differs")]
    assert bad_verify == [(key, "differs")]


def test_a_planner_that_alters_a_loaded_element_is_caught(ctx):
    key = "optim.state.net3.0.weight.exp_avg"

    def wrap(original):
        def commit_tensor(self, read_item, tensor):
            if read_item.dest_index.fqn == key and tensor.numel():
                tensor.view(-1)[-1] += 0.5
            return original(self, read_item, tensor)
        return commit_tensor
    with patched(DefaultLoadPlanner, "commit_tensor", wrap):
        bad = verify(ctx, FLOWS["fsdp2-dsd"])
    assert bad == [(key, "differs")]
