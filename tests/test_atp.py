"""ATP layer-wise sparsity (Huang et al., ICML 2025): the formula, its bounds, and the β grid search."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

import losa
from losa.allocation.allocators import allocate, atp_beta_max, atp_grid
from losa.errors import LosaError


def test_equal_layers_follow_the_paper_formula():
    s_target, n, beta = 0.7, 30, 0.01
    got = allocate("atp", s_target, [100] * n, beta=beta)
    paper = [s_target - beta * (n - 1) / 2 + beta * (l - 1) for l in range(1, n + 1)]  # noqa: E741
    np.testing.assert_allclose(got, paper, rtol=0, atol=1e-12)
    assert np.all(np.diff(got) > 0)  # deeper layers are pruned more


@pytest.mark.parametrize("sizes", [[10, 20, 30, 40], [5, 5, 5], [1, 100, 1, 100, 7]])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.7, 0.9])
def test_weighted_mean_is_exact_and_bounds_hold(sizes, target):
    bmax = atp_beta_max(target, sizes)
    for beta in (0.0, bmax / 3, bmax):
        s = allocate("atp", target, sizes, beta=beta)
        assert float(np.dot(s, sizes) / np.sum(sizes)) == pytest.approx(target, abs=1e-12)
        assert s.min() >= 0.0 and s.max() < 1.0
        if beta > 0:
            assert np.all(np.diff(s) > 0)
    # at beta_max one end of the progression touches its bound
    s = allocate("atp", target, sizes, beta=bmax)
    assert min(s.min(), 1 - s.max()) < 1e-5
    with pytest.raises(LosaError, match="outside"):
        allocate("atp", target, sizes, beta=bmax * 1.01 + 1e-9)
    grid = atp_grid(target, sizes, 5)
    assert grid[0] == 0.0 and grid[-1] == pytest.approx(bmax) and len(grid) == 5


def _nll(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def test_grid_search_picks_the_beta_with_the_lowest_calibration_loss():
    torch.manual_seed(0)
    base = make_tiny_model("llama", layers=4, seed=3)
    ids = torch.randint(4, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    model = copy.deepcopy(base)
    rep = losa.prune(model, None, losa.PruneConfig(method="wanda", sparsity=0.6, allocator="atp", atp_grid_points=4),
                     calib_ids=ids, progress=False)
    sizes = [sum(p.numel() for n, p in layer.named_parameters() if n.endswith("proj.weight"))
             for layer in base.model.layers]
    # equal layers: offsets -1.5 .. 1.5; the deepest layer keeps one weight in 64 (hidden 64: the narrowest
    # linears' inputs), so that no row of it loses every weight
    bmax = min((1 - 1 / 64 - 0.6) / 1.5, 0.6 / 1.5)
    expected = {}
    for beta in np.linspace(0, bmax, 4):  # independent: the paper's formula, a fresh copy, a hand-written NLL
        trial = copy.deepcopy(base)
        s = [0.6 - beta * 1.5 + beta * l for l in range(4)]  # noqa: E741
        losa.prune(trial, None, losa.PruneConfig(method="wanda", sparsity=s), calib_ids=ids, progress=False)
        expected[float(beta)] = _nll(trial, ids)
    best = min(expected, key=expected.get)
    assert rep.allocation["beta"] == pytest.approx(best)
    got = {float(k): v for k, v in rep.allocation["grid"].items()}
    for beta, loss in expected.items():
        match = min(got, key=lambda b: abs(b - beta))
        assert got[match] == pytest.approx(loss, rel=1e-5)
    assert float(np.dot(rep.targets, sizes) / sum(sizes)) == pytest.approx(0.6, abs=1e-9)
    assert max(float(b) for b in rep.allocation["grid"]) == pytest.approx(bmax, rel=1e-5)
    top = copy.deepcopy(base)  # the grid's last point prunes the deepest layer to 63 of 64 inputs, not all of them
    losa.prune(top, None, losa.PruneConfig(method="wanda", sparsity=[0.6 - bmax * 1.5 + bmax * i for i in range(4)]),
               calib_ids=ids, progress=False)
    assert all((m.weight != 0).sum(1).min() >= 1 for m in top.model.layers[3].modules()
               if isinstance(m, torch.nn.Linear))
    # the trial prunes were undone: the final model equals pruning a fresh copy at the chosen beta
    fresh = copy.deepcopy(base)
    losa.prune(fresh, None, losa.PruneConfig(method="wanda", sparsity=0.6, allocator="atp", atp_beta=best),
               calib_ids=ids, progress=False)
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n


def test_atp_refuses_nm_and_per_layer_lists():
    with pytest.raises(LosaError, match="cannot be combined with nm"):
        losa.PruneConfig(nm="2:4", allocator="atp")
    with pytest.raises(LosaError, match="cannot be combined"):
        losa.PruneConfig(sparsity=[0.5, 0.6], allocator="atp")
