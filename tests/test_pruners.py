"""Pruners and masks against independent expectations (brute force, hand counts, reconstruction)."""

from __future__ import annotations

import itertools

import pytest
import torch

from losa.errors import LosaError
from losa.pruning import Target, get_pruner, nm_mask, sparsegpt, unstructured_mask
from losa.pruning.sparsegpt import inverse_hessian_cholesky, sparsegpt_prune
from losa.pruning.stats import HessianStat, InputNormStat


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_wanda_mask_equals_brute_force():
    W, X = _rand(3, 5, seed=1), _rand(40, 5, seed=2)
    stat = InputNormStat(5)
    stat.update(X[:17])
    stat.update(X[17:])  # accumulation over chunks
    res = get_pruner("wanda").prune(W, stat, Target(sparsity=0.4))  # floor(5*0.4)=2 pruned per row
    norms = [sum(float(X[t, j]) ** 2 for t in range(40)) ** 0.5 for j in range(5)]
    for r in range(3):
        best = None
        for keep in itertools.combinations(range(5), 3):  # every way to keep 3 of 5
            score = sum(abs(float(W[r, j])) * norms[j] for j in keep)
            if best is None or score > best[0]:
                best = (score, set(keep))
        assert set(torch.nonzero(res.mask[r]).flatten().tolist()) == best[1]
    assert torch.equal(res.weight, W * res.mask)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_wanda_exact_per_row(sparsity):
    W, X = _rand(16, 50), _rand(64, 50, seed=5)
    stat = InputNormStat(50)
    stat.update(X)
    res = get_pruner("wanda").prune(W, stat, Target(sparsity=sparsity))
    zeros = (res.weight == 0).sum(1)
    total = round(16 * 50 * sparsity)  # the matrix hits the target to one weight ...
    assert int(zeros.sum()) == total
    assert set(zeros.tolist()) <= {total // 16, total // 16 + 1}  # ... with per-row counts that differ by <= 1
    # within each row the pruned weights are the lowest |W|·‖X‖
    scores = W.abs() * stat.norm
    for r in range(16):
        pruned = res.weight[r] == 0
        if pruned.any() and (~pruned).any():
            assert scores[r][pruned].max() <= scores[r][~pruned].min()


def test_per_row_remainder_goes_to_the_cheapest_rows():
    scores = torch.tensor([[1.0, 2.0, 9.0, 10.0], [1.0, 8.0, 9.0, 10.0], [1.0, 3.0, 9.0, 10.0]])
    keep = unstructured_mask(scores, 5 / 12, per_row=True)  # 5 of 12: one per row, then 2 extra
    assert (~keep).sum().item() == 5
    assert (~keep).sum(1).tolist() == [2, 1, 2]  # rows 0 and 2 have the cheapest second weights


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_every_group_exactly_n(n, m, method):
    W, X = _rand(12, 32), _rand(100, 32, seed=7)
    pruner = get_pruner(method)
    stat = pruner.stat(32) if pruner.stat else None
    if stat is not None:
        stat.update(X)
    res = pruner.prune(W, stat, Target(n=n, m=m))
    nz = (res.weight != 0).reshape(12, 32 // m, m).sum(-1)
    assert (nz == n).all()


def test_nm_mask_keeps_largest():
    scores = torch.tensor([[1.0, 4.0, 2.0, 3.0, 9.0, 8.0, 7.0, 6.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, True, False, True, True, True, False, False]]


def test_magnitude_per_matrix_threshold():
    W = torch.arange(1, 13, dtype=torch.float32).reshape(3, 4)
    res = get_pruner("magnitude").prune(W, None, Target(sparsity=0.5))
    assert torch.equal(res.mask, W > 6)


def test_sparsegpt_beats_magnitude_reconstruction():
    torch.manual_seed(0)
    # inputs with uneven feature scales and some correlation, as in LLM activations
    X = (_rand(512, 64, seed=3) + 0.3 * _rand(512, 1, seed=4)) * (0.2 + 3 * _rand(64, seed=5).abs())
    W = _rand(32, 64, seed=6)
    hs = HessianStat(64)
    hs.update(X)
    for target in (Target(sparsity=0.5), Target(sparsity=0.7), Target(n=2, m=4)):
        sg = sparsegpt_prune(W, hs.hessian, target, blocksize=16)
        mg = get_pruner("magnitude").prune(W, None, target)
        err_sg = torch.linalg.norm(X @ W.T - X @ sg.weight.T)
        err_mg = torch.linalg.norm(X @ W.T - X @ mg.weight.T)
        assert err_sg < err_mg, (target, err_sg, err_mg)
        # the OBS updates get close to the least-squares optimum for the chosen mask
        opt = torch.zeros_like(W)
        for r in range(W.shape[0]):
            k = sg.mask[r]
            opt[r, k] = torch.linalg.lstsq(X[:, k], X @ W[r]).solution
        assert err_sg < 1.3 * torch.linalg.norm(X @ W.T - X @ opt.T)
        assert abs(float((sg.weight == 0).float().mean()) - target.sparsity) < 1 / 64 + 1e-6
        assert torch.equal(sg.weight == 0, ~sg.mask)


@pytest.mark.parametrize("shape,sparsity,blocksize", [((7, 64), 0.63, 16), ((5, 70), 0.63, 16), ((9, 48), 0.55, 128)])
def test_sparsegpt_prunes_exactly_round_numel_times_s_per_matrix(shape, sparsity, blocksize):
    """The README's exact target holds for SparseGPT too: round(numel·s) zeros per matrix, whatever the blocks
    (each block rounded its own count: 7x64 at 0.63 in blocks of 16 gave 4 x round(70.56) = 284, not 282)."""
    rows, cols = shape
    W = _rand(rows, cols, seed=7)
    hs = HessianStat(cols)
    hs.update(_rand(256, cols, seed=8))
    res = sparsegpt_prune(W, hs.hessian, Target(sparsity=sparsity), blocksize=blocksize)
    want = int(rows * cols * sparsity + 0.5)  # by hand: 282, 221, 238 (one block)
    assert int((~res.mask).sum()) == want and int((res.weight == 0).sum()) == want


def _naive_obs_nm(W, H, n, m, percdamp=0.01):
    """Column-by-column OBS, no blocks, no lazy updates: the textbook form SparseGPT batches."""
    W = W.double().clone()
    H = H.double().clone()
    H += percdamp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i in range(W.shape[1]):
        if i % m == 0:
            sal = W[:, i:i + m] ** 2 / U.diagonal()[i:i + m] ** 2
            for r in range(W.shape[0]):
                for j in sorted(range(m), key=lambda j: float(sal[r, j]))[:m - n]:
                    pruned[r, i + j] = True
        err = torch.where(pruned[:, i], W[:, i], 0.0) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
        W[pruned[:, i], i] = 0.0
    return W


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("blocksize", [4, 16, 128])
def test_sparsegpt_nm_equals_naive_obs(blocksize, kernel, monkeypatch):
    if not kernel:  # the pure-torch column loop (the fallback without a compiler)
        monkeypatch.setattr(sparsegpt, "obs_kernel", lambda: None)
    elif sparsegpt.obs_kernel() is None:
        pytest.skip("no C++ compiler here")
    X = (_rand(400, 32, seed=7) + 0.5 * _rand(400, 1, seed=8)) * (0.3 + _rand(32, seed=9).abs())
    W = _rand(12, 32, seed=10)
    hs = HessianStat(32)
    hs.update(X)
    got = sparsegpt_prune(W, hs.hessian, Target(n=2, m=4), blocksize=blocksize).weight
    torch.testing.assert_close(got.double(), _naive_obs_nm(W, hs.hessian, 2, 4), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(7, 13), (33, 64), (5, 1)])
@pytest.mark.parametrize("nm", [None, (2, 4), (1, 3)])
def test_obs_block_kernel_equals_torch_loop(shape, nm):
    if sparsegpt.obs_kernel() is None:
        pytest.skip("no C++ compiler here")
    rows, cols = shape
    m, n_prune = (0, 0) if nm is None else (nm[1], nm[1] - nm[0])
    A = _rand(cols, cols, seed=11)
    U = torch.linalg.cholesky(torch.linalg.inv(A @ A.T + cols * torch.eye(cols)), upper=True)
    W = _rand(rows, cols, seed=12)
    prune = (_rand(rows, cols, seed=13) > 0.3) if nm is None else torch.zeros(rows, cols, dtype=torch.bool)
    outs = []
    for fn in (sparsegpt._obs_block_torch, sparsegpt.obs_kernel().obs_block):
        w, p, e = W.clone(), prune.clone(), torch.empty_like(W)
        fn(w, U.contiguous(), p, e, m, n_prune)
        outs.append((w, p, e))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[0][2], outs[1][2], atol=1e-5, rtol=1e-5)
    assert not outs[1][0][outs[1][1]].any()  # pruned weights are exactly zero


def test_inverse_hessian_cholesky_is_the_upper_factor_of_the_inverse():
    X = _rand(300, 24, seed=14)
    X[:, 5] = 0  # a dead input
    H = 2 * X.T @ X / 300
    U, dead = inverse_hessian_cholesky(H, 0.01)
    assert dead.tolist() == [i == 5 for i in range(24)]
    Hd = H.clone().double()
    Hd[5, 5] = 1.0
    Hd += 0.01 * Hd.diagonal().mean() * torch.eye(24, dtype=Hd.dtype)
    assert torch.equal(U, U.triu())
    torch.testing.assert_close((U.T @ U).double(), torch.linalg.inv(Hd), atol=1e-4, rtol=1e-4)


def test_hessian_stat_blocked_upper_matches_full_product():
    X = _rand(50, 600, seed=15)  # wide enough for the row-blocked upper-triangle accumulation
    hs = HessianStat(600)
    hs.update(X[:20])
    hs.update(X[20:])
    torch.testing.assert_close(hs.hessian, 2 * X.T @ X / 50, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hs.sq_norm, X.double().square().sum(0), rtol=1e-5, atol=1e-4)


def test_unstructured_per_row_exact_count_with_ties():
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 2.0], [3.0, 1.0, 1.0, 1.0, 5.0, 0.5]])
    keep = unstructured_mask(scores, 0.5, per_row=True)
    assert (~keep).sum(1).tolist() == [3, 3]
    assert keep[0, 4:].all() and keep[1, 0] and keep[1, 4] and not keep[1, 5]


def test_hessian_stat_matches_hand():
    X = _rand(10, 4)
    hs = HessianStat(4)
    hs.update(X[:3])
    hs.update(X[3:])
    torch.testing.assert_close(hs.hessian, 2 * X.T @ X / 10)


def test_unstructured_per_matrix_count():
    scores = _rand(7, 9).abs()
    keep = unstructured_mask(scores, 0.6, per_row=False)
    assert int((~keep).sum()) == round(63 * 0.6)
    assert float(scores[~keep].max()) <= float(scores[keep].min())


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_sparsity(bad):
    with pytest.raises(LosaError, match=r"outside \[0, 1\)"):
        Target(sparsity=bad)


@pytest.mark.parametrize("n,m", [(4, 4), (5, 4), (0, 4)])
def test_bad_nm(n, m):
    with pytest.raises(LosaError, match="1 <= N < M"):
        Target(n=n, m=m)


def test_unknown_pruner():
    with pytest.raises(LosaError, match="unknown pruning method 'foo'"):
        get_pruner("foo")


def test_inverse_hessian_overwrite_and_in_place_hessian_are_exact():
    """The memory-saving paths (in-place scaling of the Hessian, overwriting it during the factorisation)
    give the bits of the out-of-place computation, against an independent 2/n XᵀX."""
    from losa.pruning.sparsegpt import inverse_hessian_cholesky
    from losa.pruning.stats import HessianStat

    x = torch.randn(300, 40, generator=torch.Generator().manual_seed(0))
    st = HessianStat(40)
    st.update(x[:100])
    st.update(x[100:])
    torch.testing.assert_close(st.hessian, 2.0 / 300 * x.t() @ x, rtol=1e-5, atol=1e-5)
    h = st.hessian
    u0, d0 = inverse_hessian_cholesky(h, 0.01)
    assert torch.equal(h, st.hessian)  # not overwritten by default
    u1, d1 = inverse_hessian_cholesky(st.hessian, 0.01, overwrite=True)
    assert torch.equal(u0, u1) and torch.equal(d0, d1)
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(40)
    torch.testing.assert_close(u0.t() @ u0, torch.linalg.inv(damped), rtol=1e-3, atol=1e-4)


def _indefinite_hessian(eps_frac: float = 0.05) -> tuple[torch.Tensor, float]:
    """2XᵀX/n of rank-deficient inputs (rank 8 of 16) minus ε·vvᵀ along a null direction v: what float32
    accumulation leaves in the null space, exaggerated to ε = eps_frac·mean(diag) so that H + λI is not
    positive definite for λ = 0.01·mean(diag). Returns (H, ε)."""
    Z, P = _rand(300, 8, seed=30), _rand(8, 16, seed=31)
    X = Z @ P
    H = (2 * X.T @ X / 300).double()
    v = torch.linalg.svd(P.double()).Vh[-1]  # P v = 0, so X v = 0: a null direction of H
    eps = eps_frac * float(H.diagonal().mean())
    return (H - eps * torch.outer(v, v)).float(), eps


class _FixedHessian:
    """An input statistic holding a given Hessian (what the pruner reads from a HessianStat)."""

    def __init__(self, h: torch.Tensor) -> None:
        self.hessian, self.tokens = h, 300


def _dampening_in(message: str) -> float:
    import re

    m = re.search(r"raised the dampening to ([0-9.eE+-]+) ", message)
    assert m, message
    return float(m.group(1))


def test_sparsegpt_warns_when_it_raises_the_dampening():
    import warnings

    H, eps = _indefinite_hessian()
    mean_diag = float(H.double().diagonal().mean())
    lam = 0.01 * mean_diag
    # by hand: the escalation tries λ, 2λ, 12λ, 112λ, ...; the first total above ε (= about 5λ) is 12λ
    assert 2 * lam < eps < 12 * lam
    with pytest.warns(RuntimeWarning, match=r"SparseGPT \(layer 3 mlp\.up_proj\): Hessian not positive definite "
                                            r"with percdamp 0\.01; raised the dampening") as rec:
        U, _ = inverse_hessian_cholesky(H, 0.01, label="layer 3 mlp.up_proj")
    (w,) = [r for r in rec if "SparseGPT" in str(r.message)]
    msg = str(w.message)
    assert "\n" not in msg
    named = _dampening_in(msg)
    assert named == pytest.approx(12 * lam, rel=1e-4)
    # the value it names is the one it used: UᵀU = (H + named·I)⁻¹ (float64 reference)
    ref = torch.linalg.inv(H.double() + named * torch.eye(16, dtype=torch.float64))
    torch.testing.assert_close((U.T @ U).double(), ref, rtol=2e-3, atol=2e-3 * float(ref.abs().max()))

    # through the pruner: the module label from the call site reaches the warning
    W = _rand(6, 16, seed=32)
    with pytest.warns(RuntimeWarning, match=r"\(layer 0 self_attn\.q_proj\).*raised the dampening to"):
        get_pruner("sparsegpt").prune(W, _FixedHessian(H), Target(sparsity=0.5), label="layer 0 self_attn.q_proj")

    # a positive definite Hessian (and a singular one with zero rows/columns, handled as dead inputs) is silent
    X = _rand(300, 16, seed=33)
    X[:, 3] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inverse_hessian_cholesky(2 * X.T @ X / 300, 0.01, label="quiet")

    # hopeless: indefinite far beyond any dampening
    bad, _ = _indefinite_hessian(eps_frac=100.0)
    with pytest.raises(LosaError, match=r"SparseGPT \(layer 5 o_proj\): the calibration Hessian is not positive "
                                        "definite even with dampening"):
        inverse_hessian_cholesky(bad, 0.01, label="layer 5 o_proj")


def test_pruning_call_sites_pass_the_module_label(monkeypatch):
    from conftest import make_tiny_model

    import losa

    seen: list[str | None] = []
    real = sparsegpt.inverse_hessian_cholesky

    def spy(h, percdamp, overwrite=False, label=None):
        seen.append(label)
        return real(h, percdamp, overwrite=overwrite, label=label)

    monkeypatch.setattr(sparsegpt, "inverse_hessian_cholesky", spy)
    model = make_tiny_model("llama", layers=2)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    losa.prune(model, None, losa.PruneConfig(method="sparsegpt", sparsity=0.5), calib_ids=ids, progress=False)
    # q/k/v and gate/up share one factorisation: one label per distinct input, named after its first module
    assert "layer 0 self_attn.q_proj" in seen and "layer 1 mlp.down_proj" in seen
