"""Layer-wise sparsity allocators: the RMI LP against scipy, constraints, OWL, mixed N:M."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linprog

from losa.allocation.allocators import allocate, default_delta, outlier_ratio, rmi_importance
from losa.allocation.mixed_nm import allocate_mixed_nm
from losa.errors import LosaError


def _random_cka(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.2, 1.0, size=(n, n))
    c = (a + a.T) / 2
    np.fill_diagonal(c, 1.0)
    return c


@pytest.mark.parametrize("seed,target,sizes", [
    (0, 0.5, [1] * 8),
    (1, 0.7, [1] * 12),
    (2, 0.6, [3, 1, 2, 5, 1, 4, 2]),
    (3, 0.34, [10, 10, 20, 20, 40]),
])
def test_rmi_lp_equals_scipy_and_satisfies_constraints(seed, target, sizes):
    n = len(sizes)
    cka = _random_cka(n, seed)
    s = allocate("rmi", target, sizes, cka=cka, beta=3.0)
    delta = default_delta(target)
    # constraints, exactly
    w = np.asarray(sizes, float) / sum(sizes)
    assert w @ s == pytest.approx(target, abs=1e-12)
    assert np.all(s >= target - delta - 1e-12) and np.all(s <= target + delta + 1e-12)
    # same optimum as scipy's LP solver (independent reference)
    r = cka.sum(1) - 1.0
    imp = np.exp(-3.0 * r / r.sum())
    ref = linprog(imp, A_eq=w[None, :], b_eq=[target], bounds=[(target - delta, target + delta)] * n,
                  method="highs")
    assert ref.status == 0
    assert imp @ s == pytest.approx(ref.fun, abs=1e-10)
    np.testing.assert_allclose(s, ref.x, atol=1e-9)


def test_rmi_more_redundant_layer_gets_more_sparsity():
    cka = np.array([[1, .9, .9, .1], [.9, 1, .9, .1], [.9, .9, 1, .1], [.1, .1, .1, 1.]])
    s = allocate("rmi", 0.5, [1] * 4, cka=cka)
    assert s[3] == pytest.approx(0.49)  # least redundant -> most important -> lowest sparsity
    # LP optimum is bang-bang: budget δ·L/2 -> two of the three redundant layers at the top bound
    assert sorted(s[:3]) == pytest.approx([0.49, 0.51, 0.51])


def test_rmi_importance_formula():
    cka = np.array([[1.0, 0.5, 0.3], [0.5, 1.0, 0.2], [0.3, 0.2, 1.0]])
    # R = [0.8, 0.7, 0.5], sum 2.0
    np.testing.assert_allclose(rmi_importance(cka, beta=2.0), np.exp(-2.0 * np.array([0.4, 0.35, 0.25])))


def test_default_delta_schedule():
    assert [default_delta(s) for s in (0.3, 0.5, 0.55, 0.6, 0.65, 0.7)] == [0.01, 0.01, 0.02, 0.02, 0.03, 0.03]
    assert default_delta(0.8) == pytest.approx(0.03)
    assert default_delta(0.9) == pytest.approx(0.025)
    assert default_delta(0.98) == pytest.approx(0.005)


def test_uniform():
    np.testing.assert_array_equal(allocate("uniform", 0.6, [1, 2, 3]), [0.6, 0.6, 0.6])


def test_owl_lower_sparsity_for_more_outliers_exact_mean_within_band():
    sizes = [2, 1, 1, 3]
    ratios = [0.01, 0.05, 0.02, 0.03]
    s = allocate("owl", 0.6, sizes, outlier_ratios=ratios, lam=0.05)
    w = np.asarray(sizes, float) / sum(sizes)
    assert w @ s == pytest.approx(0.6, abs=1e-12)
    assert np.max(np.abs(s - 0.6)) == pytest.approx(0.05)
    assert list(np.argsort(s)) == list(np.argsort(-np.asarray(ratios)))
    # linear in the ratio: equal gaps in ratio give equal gaps in sparsity
    assert (s[0] - s[2]) / (s[2] - s[3]) == pytest.approx((0.02 - 0.01) / (0.03 - 0.02))


def test_outlier_ratio_hand():
    scores = np.array([1.0] * 9 + [100.0])  # mean 10.9; only 100 > 5*10.9
    assert outlier_ratio(scores, m=5.0) == pytest.approx(0.1)


def test_allocator_errors():
    with pytest.raises(LosaError, match="unknown sparsity allocator"):
        allocate("nope", 0.5, [1])
    with pytest.raises(LosaError, match=r"\[0, 1\)"):
        allocate("uniform", 1.0, [1])
    with pytest.raises(LosaError, match="CKA matrix"):
        allocate("rmi", 0.5, [1, 1], cka=np.eye(3))
    with pytest.raises(LosaError, match="lower lam"):
        allocate("owl", 0.95, [1, 1], outlier_ratios=[0.1, 0.2], lam=0.08)


def _brute_force_nm(mean_n, m, imp, sizes, dev):
    import itertools
    lo, hi = max(1, int(np.ceil(mean_n - dev))), min(m, int(np.floor(mean_n + dev)))
    best = None
    for combo in itertools.product(range(lo, hi + 1), repeat=len(imp)):
        if sum(p * n for p, n in zip(sizes, combo)) * 1.0 != mean_n * sum(sizes):
            continue
        val = sum(i * n for i, n in zip(imp, combo))
        if best is None or val > best[0] + 1e-12:
            best = (val, list(combo))
    return best


@pytest.mark.parametrize("mean_n,m,sizes", [(2, 8, [1] * 6), (2, 4, [1] * 5), (3.2, 8, [1] * 5), (2, 8, [2, 1, 3, 2, 2])])
def test_mixed_nm_exact_mean_and_optimal(mean_n, m, sizes):
    rng = np.random.default_rng(int(mean_n * 10) + len(sizes))
    imp = rng.uniform(0.5, 1.0, size=len(sizes))
    n = allocate_mixed_nm(mean_n, m, imp, sizes, max_dev=1)
    assert sum(p * k for p, k in zip(sizes, n)) == pytest.approx(mean_n * sum(sizes), abs=1e-12)
    assert all(abs(k - mean_n) <= 1 for k in n)
    ref = _brute_force_nm(mean_n, m, imp, sizes, 1)
    assert sum(i * k for i, k in zip(imp, n)) == pytest.approx(ref[0])


def test_mixed_nm_more_important_keeps_more():
    n = allocate_mixed_nm(2, 8, [0.9, 0.1, 0.5, 0.6], max_dev=1)
    assert n == [3, 1, 1, 3]  # Σ imp·N = 5.1 beats [3, 1, 2, 2] (5.0)


def test_mixed_nm_unreachable():
    with pytest.raises(LosaError, match="integer"):
        allocate_mixed_nm(2.5, 8, [1, 2, 3])  # 7.5 total N over 3 equal layers
    with pytest.raises(LosaError, match="cannot be reached exactly"):
        allocate_mixed_nm(2.2, 8, [1, 2], sizes=[2, 3], max_dev=1)  # 2a+3b=11, a,b∈{2,3}


def test_mixed_nm_capped_pairs_is_the_optimum_under_the_cap():
    """max_pairs=k: exactly the k most important layers gain one kept weight per group and the k least
    important lose one; brute force over all allocations with at most k layers up and k down agrees."""
    import itertools

    imp = [0.3, 0.9, 0.1, 0.6, 0.5, 0.2]
    for k in (0, 1, 2):
        n = allocate_mixed_nm(4, 8, imp, max_pairs=k)
        assert sum(n) == 4 * len(imp) and sum(x != 4 for x in n) == 2 * k
        best = max((c for c in itertools.product((3, 4, 5), repeat=len(imp))
                    if sum(c) == 4 * len(imp) and sum(x == 5 for x in c) <= k),
                   key=lambda c: sum(i * x for i, x in zip(imp, c)))
        assert n == list(best)
    assert allocate_mixed_nm(1, 4, imp, max_pairs=3) == [1] * 6  # N cannot go below 1
    # 3 pairs at N = 2 of M = 4: the three most important layers (0.9, 0.6, 0.5) up, the rest down
    assert allocate_mixed_nm(2, 4, imp, max_pairs=3) == [1, 3, 1, 3, 3, 1]
    with pytest.raises(LosaError, match="integer mean N"):
        allocate_mixed_nm(2.5, 8, [1, 2], max_pairs=1)


def test_pairs_for_delta_keeps_the_mean_deviation_within_delta():
    from losa.allocation.mixed_nm import pairs_for_delta

    for delta, m, layers in ((0.01, 4, 30), (0.01, 8, 30), (0.03, 8, 30), (0.02, 8, 32)):
        k = pairs_for_delta(delta, m, layers)
        assert 2 * k / (layers * m) <= delta + 1e-12 < 2 * (k + 1) / (layers * m)
