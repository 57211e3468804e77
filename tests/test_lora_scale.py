"""Masked LoRA at scale: bf16 base weights, gradient checkpointing, and a base layer that is called
(what sharded training needs to gather its parameters)."""

from __future__ import annotations

import copy

import torch
from conftest import make_tiny_model
from torch import nn

from losa.lora import (
    SparseLoRAConfig,
    SparseLoRALinear,
    add_sparse_lora,
    lora_parameters,
    sparse_lora_modules,
)


def test_a_bf16_update_below_ws_ulp_still_changes_the_output():
    torch.manual_seed(0)
    d_in = 4096
    base = nn.Linear(d_in, 8, bias=False)
    with torch.no_grad():  # |W| = 0.02: one bf16 ulp is 2**-13 ≈ 1.2e-4
        base.weight.copy_(0.02 * torch.sign(torch.randn(8, d_in)))
    base = base.to(torch.bfloat16)
    mod = SparseLoRALinear(base, r_max=1, alpha=1.0, rank=1)
    with torch.no_grad():  # s·(B A) = 5e-5 everywhere: below half an ulp of every W entry
        mod.lora_A.fill_(1.0)
        mod.lora_B.fill_(5e-5)
    w_eff = (base.weight.float() + 5e-5).to(torch.bfloat16)
    assert torch.equal(w_eff, base.weight)  # folded into W, the update vanishes entirely
    x = torch.ones(2, d_in, dtype=torch.bfloat16)
    y = mod(x)
    base_y = base(x).float()
    expected = base_y + 5e-5 * d_in  # independent: the update's exact contribution, 0.2048 per output
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), expected, atol=2 * 0.0078)  # within bf16 rounding of the output
    assert (y.float() - base_y).abs().min() > 0.15


def test_split_forward_calls_the_base_layer_so_its_hooks_gather_parameters():
    """A stand-in for ZeRO-3 / FSDP: the base weight is only materialised by a pre-forward hook of the
    base module (empty until then); the adapter must call the base layer, never read W behind its back."""
    torch.manual_seed(0)
    full = torch.randn(6, 10)
    base = nn.Linear(10, 6, bias=False)
    mod = SparseLoRALinear(base, r_max=4, alpha=4.0, rank=2)
    with torch.no_grad():
        mod.lora_B.normal_()
    ref = torch.nn.functional.linear(torch.ones(3, 10), full + mod.delta().detach())
    placeholder = torch.empty(0)  # what a partitioned parameter looks like outside its module's forward
    base.weight = nn.Parameter(placeholder, requires_grad=False)
    calls = []

    def gather(module, args):
        calls.append(1)
        module.weight = nn.Parameter(full.clone(), requires_grad=False)

    def release(module, args, out):
        module.weight = nn.Parameter(placeholder, requires_grad=False)

    base.register_forward_pre_hook(gather)
    base.register_forward_hook(release)
    assert SparseLoRALinear.split_forward(base.weight)
    y = mod(torch.ones(3, 10))
    assert calls == [1]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    ids = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = make_tiny_model("llama", layers=2, seed=1)
        add_sparse_lora(model, SparseLoRAConfig(r_max=4, rank=4, init_seed=0), mask_from_weights=False)
        with torch.no_grad():
            for m in sparse_lora_modules(model).values():
                m.lora_B.normal_(generator=torch.Generator().manual_seed(2))
        model.train()
        if checkpointing:
            from losa.finetune.train import _checkpointing

            _checkpointing(model, True)
            model.config.use_cache = False
            assert model.model.gradient_checkpointing  # the decoder really recomputes its layers
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append([p.grad.clone() for p in lora_parameters(model)])
    assert len(grads[0]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_model_trains_adapters_in_float32():
    model = make_tiny_model("llama", layers=1).to(torch.bfloat16)
    add_sparse_lora(model, SparseLoRAConfig(r_max=4, rank=4), mask_from_weights=False)
    frozen = copy.deepcopy({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    ids = torch.randint(4, 128, (2, 8))
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    for k, v in model.state_dict().items():  # the bf16 base weights are untouched
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
