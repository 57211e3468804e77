"""Cubic sparsity schedule, linear rank budget, sparsity-aware rank allocation."""

from __future__ import annotations

import numpy as np
import pytest

from losa.allocation.schedule import rank_budget_at, sparsity_at
from losa.errors import LosaError
from losa.lora.ranks import allocate_ranks


def test_cubic_schedule_values():
    # S=0.7, T=5: S_t = 0.7·(1 − (1 − t/5)³)
    expected = [0.7 * (1 - 0.8**3), 0.7 * (1 - 0.6**3), 0.7 * (1 - 0.4**3), 0.7 * (1 - 0.2**3), 0.7]
    got = [sparsity_at(t, 5, 0.7) for t in range(1, 6)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
    assert got[0] == pytest.approx(0.3416)
    assert sparsity_at(1, 1, 0.5) == 0.5


def test_rank_budget_linear():
    assert [rank_budget_at(t, 5) for t in range(1, 6)] == [6, 7, 8, 9, 10]
    assert rank_budget_at(1, 1) == 10
    assert rank_budget_at(2, 3, 4, 8) == 6


def test_schedule_errors():
    with pytest.raises(LosaError):
        sparsity_at(0, 5, 0.5)
    with pytest.raises(LosaError):
        rank_budget_at(1, 0)


def test_ranks_proportional_when_no_clipping():
    # errors ∝ [1, 2, 3, 2] -> mean 2 -> ideal Ω·[0.5, 1, 1.5, 1] with Ω=8 -> [4, 8, 12, 8], sum 32
    assert allocate_ranks([1, 2, 3, 2], 8, 1, 16) == [4, 8, 12, 8]


def test_ranks_sum_to_budget_with_r_max_honoured():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 40))
        errs = rng.exponential(size=n) ** 3
        omega = float(rng.integers(2, 12))
        r_min, r_max = 1, int(rng.integers(int(omega), 24))
        r = allocate_ranks(errs, omega, r_min, r_max)
        assert sum(r) == round(n * omega)
        assert min(r) >= r_min and max(r) <= r_max
    # one dominant layer is capped at r_max and the rest absorb the budget
    r = allocate_ranks([100, 1, 1, 1], 8, 2, 12)
    assert r == [12, 7, 7, 6]  # clipped [12, 2, 2, 2] + 14 spread over the three ties


def test_ranks_zero_errors_uniform():
    assert allocate_ranks([0, 0, 0], 6, 1, 16) == [6, 6, 6]


def test_ranks_infeasible():
    with pytest.raises(LosaError, match="r_min"):
        allocate_ranks([1, 2], 4, 8, 4)
    with pytest.raises(LosaError, match="outside"):
        allocate_ranks([1, 2], 10, 1, 8)
    with pytest.raises(LosaError, match="finite"):
        allocate_ranks([1, float("nan")], 4, 1, 8)
