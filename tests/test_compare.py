"""The comparison's pure logic: bitwise by default, tolerances, param groups, canonical forms."""

from __future__ import annotations

import math

import pytest
import torch

from fsdpck.compare import Tolerance, canonical, count_differences, param_group_differences

BITWISE = Tolerance()


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
    same = a.clone()
    other = a.clone()
    other.view(torch.int32)[0] ^= 1  # still a NaN, another payload
    assert count_differences(a, same, BITWISE)[0] == 0
    n, worst = count_differences(a, other, BITWISE)
    assert n == 1 and math.isinf(worst)


def test_tolerance_relaxes_small_differences_only():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([1.0 + 1e-7, 2.0, 3.5])
    assert count_differences(a, b, BITWISE)[0] == 2
    n, worst = count_differences(a, b, Tolerance(atol=1e-6))
    assert n == 1 and worst == pytest.approx(0.5)


def test_pieces_cover_the_whole_tensor(monkeypatch):
    import fsdpck.compare as compare

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
    assert count_differences(a, a.to(torch.float64), BITWISE)[0] == 4


def test_param_groups_name_the_differing_entry():
    before = {"lr": 0.1, "betas": (0.9, 0.999), "params": ["a", "b"]}
    after = {"lr": 0.1, "betas": (0.9, 0.99), "params": ["a", "b"]}
    assert param_group_differences(before, before) == (3, [])
    assert param_group_differences(before, after) == (3, ["betas"])
    assert param_group_differences(before, {"lr": 0.1, "params": ["a", "b"]}) == (3, ["betas"])


def test_canonical_is_exact_for_floats_and_order_free_for_dicts():
    assert canonical(0.1) != canonical(0.1 + 1e-17) or 0.1 == 0.1 + 1e-17
    assert canonical({"b": 1, "a": 2}) == canonical({"a": 2, "b": 1})
    assert canonical([1, 2]) != canonical((1, 2))
    assert canonical(torch.tensor(3.0)) == canonical(torch.tensor(3.0))
