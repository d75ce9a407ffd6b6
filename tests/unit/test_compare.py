"""The comparison's pure logic (``fsdpck.state.compare``): rows per DCP key, bitwise by default,
tolerances, missing / unexpected / replica-differs, the self-test's one flipped bit, and the
canonical form objects are compared by.

No process group: the collectives short-circuit at world size 1, so a plain namespace stands
in for the run's context and a state dict of plain tensors for a rank's shards.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
from types import SimpleNamespace

import pytest
import torch

from fsdpck.checkpoint.manifest import KIND_OBJECT, ManifestEntry
from fsdpck.state import compare
from fsdpck.state.canonical import canonical, digest
from fsdpck.state.compare import (
    DIFFERS, MATCH, MISSING, REPLICA_DIFFERS, UNEXPECTED, Tolerance, compare_manifest, compare_round_trip,
    count_differences, flip_one_bit, split_key,
)
from fsdpck.state.summary import flatten, summarize, views

BITWISE = Tolerance()
CTX = SimpleNamespace(world_size=1, rank=0, is_rank0=True)


def trainer_like_state() -> dict:
    """A small state dict shaped like the one verify saves: model, optimizer state, param groups."""
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 4, generator=gen), torch.randn(3, generator=gen)
    return {
        "model": {"net1.0.weight": w, "net1.0.bias": b},
        "optim": {
            "state": {
                "net1.0.weight": {"exp_avg": torch.randn(3, 4, generator=gen), "step": torch.tensor(1.0)},
                "net1.0.bias": {"exp_avg": torch.randn(3, generator=gen), "step": torch.tensor(1.0)},
            },
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": ["net1.0.weight", "net1.0.bias"]}],
        },
    }


def shards(state: dict) -> dict:
    return views(flatten(state), rank=0)


def round_trip(saved_state: dict, loaded_state: dict, *, tol: Tolerance = BITWISE, elementwise: bool = True,
               flip: bool = False):
    before, after = shards(saved_state), shards(loaded_state)
    choice = flip_one_bit(after, ctx=CTX, rank=0, bit=None if tol.bitwise else 62) if flip else None
    rows = compare_round_trip(summarize(before, ctx=CTX), summarize(after, ctx=CTX), ctx=CTX, tol=tol,
                              before=before if elementwise else None, after=after if elementwise else None)
    return {r.key: r for r in rows}, choice


def not_matching(rows: dict) -> dict:
    return {k: r.status for k, r in rows.items() if r.status != MATCH}


# --- compare_round_trip: verify's rows ------------------------------------------------------


def test_identical_states_match_key_by_key():
    state = trainer_like_state()
    rows, _ = round_trip(state, copy.deepcopy(state))
    assert list(rows) == sorted(flatten(state))  # one row per DCP key, model parameters included
    assert "model.net1.0.weight" in rows and "optim.param_groups.0.lr" in rows
    assert not_matching(rows) == {}
    w = rows["optim.state.net1.0.weight.exp_avg"]
    assert (w.group, w.fqn, w.state, w.kind, w.shape, w.dtype) == (
        "optim", "net1.0.weight", "exp_avg", "tensor", [3, 4], "float32")
    assert (w.numel, w.differing, w.max_abs_diff) == (12, 0, 0.0)
    assert w.saved == w.loaded and len(w.saved) == 16
    lr = rows["optim.param_groups.0.lr"]
    assert (lr.kind, lr.saved, lr.numel) == (KIND_OBJECT, "0x1.999999999999ap-4", None)


def test_self_test_flips_one_bit_which_shows_as_exactly_one_row():
    state = trainer_like_state()
    rows, choice = round_trip(state, copy.deepcopy(state), flip=True)
    # The first floating-point key in key order, its lowest mantissa bit: the smallest change there is.
    assert choice == {"rank": 0, "key": "model.net1.0.bias", "bit": 0}
    assert not_matching(rows) == {"model.net1.0.bias": DIFFERS}
    row = rows["model.net1.0.bias"]
    assert row.differing == 1 and row.numel == 3
    assert 0 < row.max_abs_diff < 1e-6
    assert row.saved != row.loaded


def test_tolerance_relaxes_values_but_not_a_self_test_flip():
    state = trainer_like_state()
    loaded = copy.deepcopy(state)
    loaded["model"]["net1.0.weight"][0, 0] += 1e-6
    assert not_matching(round_trip(state, loaded)[0]) == {"model.net1.0.weight": DIFFERS}
    rows, _ = round_trip(state, loaded, tol=Tolerance(atol=1e-4))
    assert not_matching(rows) == {}  # within --atol, although the fingerprints differ
    assert rows["model.net1.0.weight"].saved != rows["model.net1.0.weight"].loaded
    # With a tolerance the self-test flips a high exponent bit: beyond any tolerance.
    rows, choice = round_trip(state, copy.deepcopy(state), tol=Tolerance(atol=1e-4, rtol=1e-3), flip=True)
    assert choice["bit"] == 30  # float32: the exponent's highest bit, below the sign
    assert not_matching(rows) == {choice["key"]: DIFFERS}


def test_fingerprints_alone_judge_when_the_saved_values_moved_on():
    # An async save: the live values changed after the save, only the fingerprints stand for them.
    state = trainer_like_state()
    loaded = copy.deepcopy(state)
    loaded["optim"]["state"]["net1.0.bias"]["exp_avg"][1] += 1e-6
    rows, _ = round_trip(state, loaded, tol=Tolerance(atol=1.0), elementwise=False)
    assert not_matching(rows) == {"optim.state.net1.0.bias.exp_avg": DIFFERS}
    assert rows["optim.state.net1.0.bias.exp_avg"].numel is None  # nothing was counted element by element


def test_missing_unexpected_shape_dtype_and_object_changes():
    state = trainer_like_state()
    loaded = copy.deepcopy(state)
    del loaded["optim"]["state"]["net1.0.bias"]["step"]
    loaded["optim"]["state"]["net1.0.bias"]["exp_avg_sq"] = torch.zeros(3)
    loaded["model"]["net1.0.weight"] = state["model"]["net1.0.weight"].reshape(4, 3).clone()
    loaded["optim"]["state"]["net1.0.weight"]["exp_avg"] = state["optim"]["state"]["net1.0.weight"]["exp_avg"].double()
    loaded["optim"]["param_groups"][0]["lr"] = 0.2
    rows, _ = round_trip(state, loaded)
    assert not_matching(rows) == {
        "optim.state.net1.0.bias.step": MISSING,
        "optim.state.net1.0.bias.exp_avg_sq": UNEXPECTED,
        "model.net1.0.weight": DIFFERS,
        "optim.state.net1.0.weight.exp_avg": DIFFERS,
        "optim.param_groups.0.lr": DIFFERS,
    }
    assert rows["optim.state.net1.0.bias.step"].loaded is None
    assert rows["optim.state.net1.0.bias.exp_avg_sq"].saved is None
    assert rows["model.net1.0.weight"].note.startswith("saved [3, 4] float32, loaded [4, 3] float32")
    assert math.isinf(rows["model.net1.0.weight"].max_abs_diff)  # a shard that changed shape matches nowhere
    assert rows["optim.state.net1.0.weight.exp_avg"].note.startswith("saved [3, 4] float32, loaded [3, 4] float64")
    lr = rows["optim.param_groups.0.lr"]
    assert (lr.saved, lr.loaded) == (canonical(0.1), canonical(0.2))


def test_negative_zero_and_nan_payloads_differ_bitwise():
    saved = {"model": {"z": torch.tensor([0.0, float("nan")])}}
    loaded = {"model": {"z": torch.tensor([-0.0, float("nan")])}}
    loaded["model"]["z"].view(torch.int32)[1] ^= 1  # still a NaN, another payload
    rows, _ = round_trip(saved, loaded)
    row = rows["model.z"]
    assert row.status == DIFFERS and row.differing == 2
    assert math.isinf(row.max_abs_diff)  # a NaN's |Δ| is reported as infinite


def with_partials(summary, partials: list[int], *, fingerprint: str | None = None, replica_ranks=()):
    """A key's summary as a world of len(partials) ranks would hold it: each rank's partial fingerprint."""
    return dataclasses.replace(summary, partials=list(partials), fingerprint=fingerprint or summary.fingerprint,
                               replica_ranks=list(replica_ranks))


def test_ranks_whose_copies_changed_are_named():
    """At the same world size and layout every rank's loaded copy must equal its own saved copy."""
    key = "model.net1.0.bias"
    base = summarize(shards(trainer_like_state()), ctx=CTX)

    def row_for(saved_summary, loaded_summary):
        (row,) = [r for r in compare_round_trip({key: saved_summary}, {key: loaded_summary}, ctx=CTX, tol=BITWISE)]
        return row

    saved = with_partials(base[key], [11, 22, 33, 44])
    # Rank 2's copy changed, the counted whole did not: a replica drifted (its copy no longer equals
    # the counted one it replicates), and the per-rank comparison names it.
    row = row_for(saved, with_partials(base[key], [11, 22, 99, 44], replica_ranks=[2]))
    assert (row.status, row.replica_ranks) == (REPLICA_DIFFERS, [2])
    assert row.saved == row.loaded and row.note == "loaded: rank(s) 2 hold a copy that differs from the replica they copy"
    # The counted copy changed on rank 1: "differs", naming the rank.
    row = row_for(saved, with_partials(base[key], [11, 23, 33, 44], fingerprint="0" * 16))
    assert (row.status, row.replica_ranks) == (DIFFERS, [1])
    assert row.note == "rank(s) 1 hold values that differ from the saved ones"
    # Replicas that already disagreed when the state was saved are named too.
    row = row_for(with_partials(base[key], [11, 22, 33, 44], replica_ranks=[3]), with_partials(base[key], [11, 22, 33, 44]))
    assert (row.status, row.replica_ranks) == (REPLICA_DIFFERS, [3]) and row.note.startswith("saved: rank(s) 3")
    # Nothing changed anywhere: a match, naming nobody.
    row = row_for(saved, with_partials(base[key], [11, 22, 33, 44]))
    assert (row.status, row.replica_ranks, row.note) == (MATCH, [], "")


# --- compare_manifest: load's rows ------------------------------------------------------------


def test_manifest_rows_statuses():
    state = trainer_like_state()
    loaded = summarize(shards(state), ctx=CTX)
    saved = {k: s.manifest_entry() for k, s in loaded.items()}
    # What the manifest says was saved, changed five ways.
    saved["optim.state.net1.0.bias.exp_avg"].fingerprint = "0" * 16
    saved["model.net1.0.weight"].shape = (4, 3)
    saved["optim.param_groups.0.lr"] = ManifestEntry(kind=KIND_OBJECT, canonical=canonical(0.2))
    saved["optim.state.net1.0.bias.exp_avg_sq"] = ManifestEntry(kind="tensor", shape=(3,), dtype="float32",
                                                                fingerprint="1" * 16)
    del saved["optim.state.net1.0.weight.step"]
    loaded["model.net1.0.bias"].replica_ranks = [1]
    rows = {r.key: r for r in compare_manifest(saved, loaded)}
    assert list(rows) == sorted(rows)
    assert not_matching(rows) == {
        "optim.state.net1.0.bias.exp_avg": DIFFERS,
        "model.net1.0.weight": DIFFERS,
        "optim.param_groups.0.lr": DIFFERS,
        "optim.state.net1.0.bias.exp_avg_sq": MISSING,
        "optim.state.net1.0.weight.step": UNEXPECTED,
        "model.net1.0.bias": REPLICA_DIFFERS,
    }
    assert "[4, 3]" in rows["model.net1.0.weight"].note and "[3, 4]" in rows["model.net1.0.weight"].note
    assert rows["optim.state.net1.0.bias.exp_avg"].saved == "0" * 16
    assert rows["optim.param_groups.0.lr"].saved == canonical(0.2) != rows["optim.param_groups.0.lr"].loaded
    assert rows["model.net1.0.bias"].replica_ranks == [1]
    assert rows["optim.state.net1.0.weight.exp_avg"].status == MATCH


# --- flip_one_bit -------------------------------------------------------------------------------


def test_flip_skips_objects_integers_and_empty_pieces():
    state = {"a": {"groups": 0.1, "count": torch.tensor([7]), "empty": torch.zeros(0)},
             "b": {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}}
    local = shards(state)
    choice = flip_one_bit(local, ctx=CTX, rank=0)
    assert choice == {"rank": 0, "key": "b.w", "bit": 0}
    assert local["b.w"].pieces[0][1].tolist() != [1.0, 2.0]  # flipped in place, in the rank's own tensor
    assert state["b"]["w"][1].item() == 2.0  # one element only
    assert flip_one_bit(shards(state), ctx=CTX, rank=0, bit=62)["bit"] == 14  # bfloat16: 16 bits, below the sign
    with pytest.raises(RuntimeError, match="no floating-point state on rank 0"):
        flip_one_bit(shards({"a": {"count": torch.tensor([7]), "lr": 0.1}}), ctx=CTX, rank=0)


# --- split_key ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,parts", [
    ("model.net1.0.weight", ("model", "net1.0.weight", "param")),
    ("optim.state.net1.0.weight.exp_avg", ("optim", "net1.0.weight", "exp_avg")),
    ("optim.state.net3.0.bias.step", ("optim", "net3.0.bias", "step")),
    ("optim.param_groups.0.lr", ("optim", "param_groups.0", "lr")),
    ("trainer.data.epoch", ("trainer", "trainer.data", "epoch")),
])
def test_split_key(key: str, parts: tuple[str, str, str]):
    assert split_key(key) == parts


# --- count_differences ----------------------------------------------------------------------------


def test_identical_tensors_match():
    a = torch.randn(100)
    assert count_differences(a, a.clone(), BITWISE) == (0, 0.0)


def test_one_flipped_bit_is_one_difference():
    a = torch.randn(1000)
    b = a.clone()
    b.view(torch.int32)[417] ^= 1
    n, worst = count_differences(a, b, BITWISE)
    assert n == 1
    assert 0 < worst < 1e-5


def test_negative_zero_differs_bitwise():
    n, _ = count_differences(torch.tensor([0.0]), torch.tensor([-0.0]), BITWISE)
    assert n == 1


def test_nan_payloads_count():
    a = torch.tensor([float("nan")])
    other = a.clone()
    other.view(torch.int32)[0] ^= 1  # still a NaN, another payload
    assert count_differences(a, a.clone(), BITWISE)[0] == 0
    n, worst = count_differences(a, other, BITWISE)
    assert n == 1 and math.isinf(worst)


def test_tolerance_relaxes_small_differences_only():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([1.0 + 1e-7, 2.0, 3.5])
    assert count_differences(a, b, BITWISE)[0] == 2
    n, worst = count_differences(a, b, Tolerance(atol=1e-6))
    assert n == 1 and worst == pytest.approx(0.5)
    n, _ = count_differences(a, b, Tolerance(rtol=0.2))  # 0.5 <= 0.2 * 3.5
    assert n == 0


def test_pieces_cover_the_whole_tensor(monkeypatch):
    monkeypatch.setattr(compare, "PIECE", 7)
    a = torch.arange(100, dtype=torch.float32)
    b = a.clone()
    b[0] += 1
    b[99] += 2
    assert count_differences(a, b, BITWISE) == (2, 2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool])
def test_every_dtype(dtype):
    a = torch.ones(10, dtype=dtype)
    b = a.clone()
    b[3] = 0
    assert count_differences(a, b, BITWISE)[0] == 1


def test_dtype_change_is_a_difference():
    a = torch.ones(4)
    assert count_differences(a, a.to(torch.float64), BITWISE) == (4, math.inf)


def test_shape_change_is_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        count_differences(torch.ones(4), torch.ones(2, 2), BITWISE)


# --- canonical: how objects are compared ------------------------------------------------------------


def test_canonical_is_exact_for_floats():
    nearest = math.nextafter(0.1, 1.0)  # the next float: differs from 0.1 in the last bit only
    assert nearest != 0.1 and repr(nearest) != repr(0.1)
    assert canonical(0.1) == "0x1.999999999999ap-4"
    assert canonical(nearest) == "0x1.999999999999bp-4"
    assert canonical(-0.0) != canonical(0.0)
    assert digest(canonical(0.1)) != digest(canonical(nearest))


def test_canonical_is_order_free_for_dicts_and_tells_containers_apart():
    assert canonical({"b": 1, "a": 2}) == canonical({"a": 2, "b": 1})
    assert canonical({"a": 1}) != canonical({"a": 2})
    assert canonical([1, 2]) != canonical((1, 2))
    assert canonical([1, 2]) != canonical([2, 1])


def test_canonical_of_tensors_holds_values_and_dtype():
    assert canonical(torch.tensor(3.0)) == "tensor(3.0, dtype=torch.float32)"
    assert canonical(torch.tensor(3.0)) != canonical(torch.tensor(3.0, dtype=torch.float64))
    assert canonical(torch.tensor(3.0)) != canonical(torch.tensor(3))
    assert canonical(torch.tensor([1.0, 2.0])) != canonical(torch.tensor([1.0, 2.5]))


def test_canonical_is_the_same_after_a_weights_only_round_trip():
    # What a param group or scheduler state reads back as from a checkpoint must compare equal.
    group = {"lr": 0.1, "betas": (0.9, 0.999), "params": ["net1.0.weight"], "step": torch.tensor(3.0),
             "nested": {"x": [1, 2.5, None, True]}}
    buf = io.BytesIO()
    torch.save(group, buf)
    buf.seek(0)
    assert canonical(torch.load(buf, weights_only=True)) == canonical(group)


def test_canonical_refuses_absurd_nesting():
    deep: list = []
    for _ in range(70):
        deep = [deep]
    with pytest.raises(ValueError, match="64 levels"):
        canonical(deep)
