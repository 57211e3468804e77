"""Sparse (masked) LoRA: gradients vs a dense-masked reference, ranks, merge/unmerge, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from losa.errors import LosaError
from losa.lora import (
    SparseLoRAConfig,
    SparseLoRALinear,
    add_sparse_lora,
    load_adapters,
    merge_and_unload,
    save_adapters,
    set_layer_ranks,
    sparse_lora_modules,
)
from losa.pruning.masks import nm_mask


def _module(d_out=12, d_in=16, r_max=6, rank=4, sparsity=0.5, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    mask = torch.rand(d_out, d_in) >= sparsity
    with torch.no_grad():
        base.weight.mul_(mask)
    mod = SparseLoRALinear(base, r_max=r_max, alpha=12.0, rank=rank, mask=mask)
    with torch.no_grad():
        mod.lora_B.normal_()  # non-zero B so the update is non-trivial
    return mod, mask


def test_forward_and_gradients_match_dense_masked_reference():
    mod, mask = _module()
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = mod(x)
    y.sin().sum().backward()
    # independent reference: plain autograd through the dense masked matrix with the first 4 ranks
    a = mod.lora_A.detach().clone().requires_grad_()
    b = mod.lora_B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    w_eff = mod.base.weight + (12.0 / 6) * (b[:, :4] @ a[:4]) * mask
    y_ref = x2 @ w_eff.T + mod.base.bias
    y_ref.sin().sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(mod.lora_A.grad, a.grad)
    torch.testing.assert_close(mod.lora_B.grad, b.grad)
    torch.testing.assert_close(x.grad, x2.grad)
    # ranks beyond the active rank get exactly zero gradient; the base never gets one
    assert torch.all(mod.lora_A.grad[4:] == 0) and torch.all(mod.lora_B.grad[:, 4:] == 0)
    assert mod.base.weight.grad is None and not mod.base.weight.requires_grad


def test_masked_lora_function_gradients_vs_dense_reference_and_finite_differences():
    """The autograd function's dA, dB, dx against (1) plain autograd through an independently written dense
    masked map and (2) finite differences (gradcheck, float64); the mask must act on the gradient."""
    from losa.lora.function import masked_lora_linear

    g = torch.Generator().manual_seed(3)
    f64 = torch.float64
    d_out, d_in, r, s = 6, 8, 3, 1.7
    mask = torch.rand(d_out, d_in, generator=g) >= 0.5
    weight = torch.randn(d_out, d_in, generator=g, dtype=f64) * mask
    bias = torch.randn(d_out, generator=g, dtype=f64)
    a0 = torch.randn(r, d_in, generator=g, dtype=f64)
    b0 = torch.randn(d_out, r, generator=g, dtype=f64)
    x0 = torch.randn(2, 5, d_in, generator=g, dtype=f64)
    gy = torch.randn(2, 5, d_out, generator=g, dtype=f64)  # an arbitrary upstream gradient

    a, b, x = (t.clone().requires_grad_() for t in (a0, b0, x0))
    y = masked_lora_linear(x, weight, bias, a, b, mask, s)
    got = torch.autograd.grad(y, (a, b, x), gy)

    def dense(x, a, b, m):  # plain tensors, plain autograd: x·(W + s·((B A) ⊙ M))ᵀ + bias
        return x @ (weight + s * ((b @ a) * m)).T + bias

    a2, b2, x2 = (t.clone().requires_grad_() for t in (a0, b0, x0))
    y_ref = dense(x2, a2, b2, mask.to(f64))
    ref = torch.autograd.grad(y_ref, (a2, b2, x2), gy)
    torch.testing.assert_close(y, y_ref)
    for name, got_g, ref_g in zip(("A", "B", "x"), got, ref):
        torch.testing.assert_close(got_g, ref_g, msg=f"d{name}")

    # the mask is visible in the gradients: an unmasked update has different dA/dB, so a backward that
    # forgot the mask would fail the comparison above
    a3, b3 = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    unmasked = torch.autograd.grad(dense(x0, a3, b3, torch.ones_like(weight)), (a3, b3), gy)
    assert all((u - r_).abs().max() > 1e-3 for u, r_ in zip(unmasked, ref[:2]))

    # finite differences of the function itself (float64), for x, A and B together
    assert torch.autograd.gradcheck(lambda x, a, b: masked_lora_linear(x, weight, bias, a, b, mask, s),
                                    (x0.clone().requires_grad_(), a0.clone().requires_grad_(),
                                     b0.clone().requires_grad_()))
    # the adapter's effective update ((BA)⊙M) is zero on masked positions, whatever A and B are
    mod, m = _module()
    assert torch.all(mod.delta()[~m] == 0)


def test_lowering_the_rank_folds_the_dropped_update_into_w_under_the_mask():
    mod, _ = _module(rank=6)
    with torch.no_grad():
        mod.lora_B.normal_()  # a trained-looking adapter: B != 0 on every component
    x = torch.randn(4, 16)
    w0 = mod.base.weight.detach().clone()
    b_all, a_all = mod.lora_B.detach().clone(), mod.lora_A.detach().clone()
    full = mod(x)
    mod.set_rank(2)
    assert mod.rank == 2
    # the function is unchanged: hand-computed W + s·(B[:, 2:6] A[2:6]) ⊙ M plus the kept 2 ranks
    folded = w0 + (2.0 * b_all[:, 2:6] @ a_all[2:6]) * mod.mask
    torch.testing.assert_close(mod.base.weight, folded, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mod(x), full, rtol=1e-5, atol=1e-5)
    assert torch.all(mod.base.weight[~mod.mask] == 0)  # W stays exactly sparse
    assert torch.all(mod.lora_B[:, 2:] == 0)  # dropped ranks reset: growing back starts from zero update
    torch.testing.assert_close(mod.lora_A[:2], a_all[:2])
    torch.testing.assert_close(mod.lora_B[:, :2], b_all[:, :2])
    out2 = mod(x)
    mod.set_rank(5)
    torch.testing.assert_close(mod(x), out2)  # new ranks contribute nothing yet
    with pytest.raises(LosaError, match="r_max"):
        mod.set_rank(7)


def test_merge_leaves_exactly_mask_zeros_and_matches_forward():
    mod, mask = _module()
    x = torch.randn(4, 16)
    before = mod(x)
    mod.merge()
    w = mod.base.weight
    assert torch.equal(w == 0, ~mask | (w == 0))  # no new non-zeros outside M
    assert torch.all(w[~mask] == 0)
    torch.testing.assert_close(mod(x), before)
    mod.unmerge()
    torch.testing.assert_close(mod(x), before)


def _groups_ok(w: torch.Tensor, n: int, m: int) -> bool:
    """Independent N:M check: at most n non-zeros in every group of m consecutive inputs."""
    return bool(((w.reshape(w.shape[0], -1, m) != 0).sum(-1) <= n).all())


def test_nm_after_merge():
    from losa.pruning.masks import check_nm

    torch.manual_seed(1)
    base = nn.Linear(32, 8, bias=False)
    mask = nm_mask(base.weight.abs(), 2, 4)
    with torch.no_grad():
        base.weight.mul_(mask)
    mod = SparseLoRALinear(base, r_max=4, alpha=8, rank=4, mask=mask)
    with torch.no_grad():
        mod.lora_B.normal_()
    assert (mod.lora_B @ mod.lora_A != 0).all()  # the unmasked update is dense
    mod.merge(keep_original=False)
    assert _groups_ok(mod.base.weight, 2, 4)
    assert check_nm(mod.base.weight, 2, 4)
    # but a dense (unmasked) merge would break it - the check can fail
    assert not _groups_ok(mod.base.weight + mod.lora_B @ mod.lora_A, 2, 4)


def test_unmerge_after_pruning_keeps_w_on_survivors_and_drops_new_pruned():
    mod, mask = _module(sparsity=0.3)
    w_old = mod.base.weight.detach().clone()
    mod.merge()
    w_merged = mod.base.weight.detach().clone()
    new_mask = mask & (torch.rand_like(w_merged) > 0.4)  # prune further
    mod.unmerge(w_merged * new_mask, new_mask)
    assert torch.equal(mod.mask, new_mask)
    assert torch.equal(mod.base.weight, w_old * new_mask)  # bit-exact W on survivors, 0 elsewhere
    x = torch.randn(5, 16)
    torch.testing.assert_close(mod(x), x @ (w_merged * new_mask).T + mod.base.bias)


def test_model_wrap_ranks_save_load_merge(tmp_path, tiny_model):
    model = tiny_model("llama", seed=0, layers=2)
    ids = torch.randint(3, 128, (2, 10))
    dense_logits = model(ids).logits
    mods = add_sparse_lora(model, SparseLoRAConfig(r_max=8, rank=4, alpha=16))
    assert len(mods) == 14 and all(m.rank == 4 for m in mods.values())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    torch.testing.assert_close(model(ids).logits, dense_logits)  # B = 0: identity at init
    set_layer_ranks(model, [3, 8])
    assert [m.rank for m in mods.values()] == [3] * 7 + [8] * 7
    with torch.no_grad():
        for m in mods.values():
            m.lora_B.normal_(std=0.02)
            m.set_mask(torch.rand_like(m.mask, dtype=torch.float) > 0.5)
    logits = model(ids).logits
    save_adapters(model, tmp_path / "ad")
    other = tiny_model("llama", seed=0, layers=2)
    add_sparse_lora(other, SparseLoRAConfig(r_max=8, rank=1, alpha=16, init_seed=5))
    load_adapters(other, tmp_path / "ad")
    torch.testing.assert_close(other(ids).logits, logits)
    merge_and_unload(other)
    assert not sparse_lora_modules(other)
    torch.testing.assert_close(other(ids).logits, logits, rtol=1e-4, atol=1e-5)


def test_bad_inputs(tiny_model):
    with pytest.raises(LosaError, match="r_max"):
        SparseLoRAConfig(r_max=4, rank=8)
    mod, _ = _module()
    with pytest.raises(LosaError, match="mask shape"):
        mod.set_mask(torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(LosaError, match="not merged"):
        mod.unmerge()
    model = tiny_model("llama", layers=1)
    add_sparse_lora(model, SparseLoRAConfig())
    with pytest.raises(LosaError, match="already has"):
        add_sparse_lora(model, SparseLoRAConfig())


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_merge_equals_adapter_forward_other_families(tiny_model, family):
    """GPT-2 (Conv1D, transposed weights) and OPT (biases): merged model == model with adapters."""
    model = tiny_model(family, seed=0, layers=1)
    ids = torch.randint(3, 128, (2, 8))
    mods = add_sparse_lora(model, SparseLoRAConfig(r_max=4, rank=3, alpha=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in mods.values():
            m.lora_B.normal_(std=0.05, generator=g)
            m.set_mask(torch.rand(m.mask.shape, generator=g) > 0.5)
            m.base.weight.mul_(m.mask if family != "gpt2" else m.mask.T)  # pruned base: zeros where M is False
    before = model(ids).logits
    masks = {q: m.mask.clone() for q, m in mods.items()}
    merge_and_unload(model)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-5)
    for q, mask in masks.items():
        w = model.get_submodule(q).weight
        w = w.T if family == "gpt2" else w
        assert torch.all(w[~mask] == 0)


def test_freeze_adapters_keeps_untrained_ones_as_drawn_and_folds_trained_ones(tiny_model):
    """freeze_adapters: adapters outside the patterns go to rank 0 without a gradient and stay there through
    set_layer_ranks; an untrained one keeps its A (no draw from the global RNG), a trained one's update is folded
    into W, so the model computes the same function; lora_parameters lists only the trainable ones."""
    from losa.lora import freeze_adapters, lora_parameters

    model = tiny_model("llama", seed=0, layers=2)
    mods = add_sparse_lora(model, SparseLoRAConfig(r_max=8, rank=4, alpha=16))
    q0 = mods["model.layers.0.self_attn.q_proj"]
    a_before = q0.lora_A.detach().clone()
    k1 = mods["model.layers.1.self_attn.k_proj"]
    with torch.no_grad():
        k1.lora_B.normal_(generator=torch.Generator().manual_seed(1))  # as if trained
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
    assert freeze_adapters(model, ["mlp.*"]) == 8  # 4 attention projections x 2 layers
    assert torch.equal(q0.lora_A, a_before) and q0.rank == 0 and not q0.lora_A.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)  # k1 folded into W
    set_layer_ranks(model, [6, 6])
    assert {q for q, m in mods.items() if m.rank == 6} == {q for q in mods if ".mlp." in q}
    assert len(lora_parameters(model)) == 2 * 6  # A and B of the 3 MLP projections in 2 layers
    with pytest.raises(LosaError, match=r"^target_modules attn\.\* matches no linear"):
        freeze_adapters(model, ["attn.*"])
