"""Bit-packed keep-masks: the packing itself and SparseLoRALinear storing its mask with 1 bit per weight."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from losa.errors import LosaError
from losa.lora import SparseLoRAConfig, SparseLoRALinear, add_sparse_lora, sparse_lora_modules
from losa.lora.bitmask import bits_at, count_bits, pack_bits, packed_width, unpack_bits
from losa.lora.model import adapter_state_dict, load_adapter_state_dict

ODD_SHAPES = [(3, 5), (4, 13), (1, 1), (7, 9), (2, 8), (5, 17), (6, 24), (3, 0)]


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_pack_matches_numpy_packbits_and_round_trips(shape):
    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) < 0.4
    packed = pack_bits(mask)
    expected = np.packbits(mask.numpy(), axis=-1)  # independent reference: numpy's big-endian bit order
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == expected.shape
    assert packed.shape[-1] == math.ceil(shape[-1] / 8)
    assert np.array_equal(packed.numpy(), expected)
    assert torch.equal(unpack_bits(packed, shape[-1]), mask)
    assert np.array_equal(unpack_bits(packed, shape[-1]).numpy(),
                          np.unpackbits(expected, axis=-1, count=shape[-1]).astype(bool))
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(unpack_bits(packed, shape[-1], dtype), mask.to(dtype))
    assert count_bits(packed) == int(mask.numpy().sum())
    assert pack_bits(mask.to(torch.float32) * 3).equal(packed)  # nonzero = set, any dtype


def test_pack_by_hand():
    """One row written out bit by bit: positions 0, 2 and 9 of 11 set."""
    row = torch.zeros(1, 11, dtype=torch.bool)
    row[0, [0, 2, 9]] = True
    assert pack_bits(row).tolist() == [[0b10100000, 0b01000000]]


def test_bits_at_reads_single_positions():
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(9, 21, generator=g) < 0.5
    rows, cols = torch.meshgrid(torch.arange(9), torch.arange(21), indexing="ij")
    assert torch.equal(bits_at(pack_bits(mask), rows.reshape(-1), cols.reshape(-1)), mask.reshape(-1))


def test_unpack_refuses_a_mask_of_another_width():
    with pytest.raises(LosaError, match="does not hold 17 positions per row"):
        unpack_bits(torch.zeros(2, 2, dtype=torch.uint8), 17)
    with pytest.raises(LosaError, match="does not hold"):
        unpack_bits(torch.zeros(2, 3, dtype=torch.int32), 17)


def _module(d_out: int = 6, d_in: int = 13, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=True)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=g))
        base.bias.copy_(torch.randn(d_out, generator=g))
    mask = torch.rand(d_out, d_in, generator=g) < 0.5
    with torch.no_grad():
        base.weight.mul_(mask)
    base.to(dtype)
    m = SparseLoRALinear(base, r_max=4, alpha=8.0, rank=3, mask=mask, generator=g)
    with torch.no_grad():
        m.lora_B.copy_(torch.randn(d_out, 4, generator=g))
    return m, mask


@pytest.mark.parametrize("d_in", [13, 16, 1])
def test_module_stores_one_bit_per_weight(d_in):
    m, mask = _module(d_in=d_in)
    d_out = mask.shape[0]
    buffers = dict(m.named_buffers())
    assert set(buffers) == {"mask_bits", "active_rank"}
    assert m.mask_bits.dtype == torch.uint8 and tuple(m.mask_bits.shape) == (d_out, math.ceil(d_in / 8))
    assert m.mask_bits.nbytes == d_out * math.ceil(d_in / 8)  # one bit per weight, each row rounded up to whole bytes
    assert not any(t.shape == (d_out, d_in) and t.dtype == torch.bool for t in m.state_dict().values())
    assert m.mask.dtype == torch.bool and torch.equal(m.mask, mask)
    assert packed_width(d_in) == m.mask_bits.shape[1]


def test_forward_backward_and_merge_equal_the_bool_mask_reference():
    """Fused form (float32 W): y, ∂x, ∂A, ∂B and the merged weight against ``W + s·(B A) ⊙ M`` in plain torch."""
    m, mask = _module()
    r, s = m.rank, m.scale
    x = torch.randn(2, 5, 13, generator=torch.Generator().manual_seed(9), requires_grad=True)
    y = m(x)
    a = m.lora_A.detach()[:r].clone().requires_grad_(True)
    b = m.lora_B.detach()[:, :r].clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    w_ref = m.base.weight.detach() + (b @ a) * s * mask.float()
    y_ref = torch.nn.functional.linear(xr, w_ref, m.base.bias.detach())
    assert torch.allclose(y, y_ref, atol=1e-5)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(10))
    (y * up).sum().backward()
    (y_ref * up).sum().backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-5)
    assert torch.allclose(m.lora_A.grad[:r], a.grad, atol=1e-5)
    assert torch.allclose(m.lora_B.grad[:, :r], b.grad, atol=1e-5)
    assert not m.lora_A.grad[r:].any() and not m.lora_B.grad[:, r:].any()

    w0 = m.base.weight.detach().clone()
    with torch.no_grad():
        exact = torch.addcmul(w0, (m.lora_B[:, :r] @ m.lora_A[:r]).mul(s), mask.float())
    m.merge()
    assert torch.equal(m.base.weight, exact)  # bit for bit: the same arithmetic as the bool mask
    assert torch.all(m.base.weight[~mask] == 0)
    m.unmerge()
    assert torch.equal(m.base.weight, w0)


def test_split_form_bf16_equals_the_reference():
    m, mask = _module(dtype=torch.bfloat16, seed=4)
    r, s = m.rank, m.scale
    x = torch.randn(3, 13, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    with torch.no_grad():
        delta = (m.lora_B[:, :r] @ m.lora_A[:r]) * s * mask.float()
        ref = (m.base(x).float() + torch.nn.functional.linear(x.float(), delta)).to(torch.bfloat16)
        assert torch.equal(m(x), ref)


def test_rank_fold_and_set_mask_keep_the_mask_semantics():
    m, mask = _module(seed=2)
    s = m.scale
    w0 = m.base.weight.detach().clone()
    with torch.no_grad():
        folded = w0 + (m.lora_B[:, 1:3] @ m.lora_A[1:3]).mul(s) * mask
    m.set_rank(1)
    assert torch.equal(m.base.weight, folded) and m.base_edited
    grown = mask.clone()
    grown[0] = True
    fresh, _ = _module(seed=2)
    assert not fresh.base_edited
    fresh.set_mask(mask & False)  # only shrinks
    assert not fresh.base_edited and not fresh.mask.any()
    fresh.set_mask(grown)
    assert fresh.base_edited and torch.equal(fresh.mask, grown)
    with pytest.raises(LosaError, match="does not match the weight"):
        fresh.set_mask(torch.ones(6, 16, dtype=torch.bool))


def test_set_mask_bits_clears_padding():
    m, mask = _module()
    packed = pack_bits(mask)
    packed[:, -1] |= 0b111  # garbage in the padding bits of the rows
    m.set_mask_bits(packed)
    assert torch.equal(m.mask, mask) and torch.equal(m.mask_bits, pack_bits(mask))
    assert count_bits(m.mask_bits) == int(mask.sum())


def test_old_state_dict_with_a_bool_mask_still_loads():
    m, mask = _module(seed=7)
    old = {k: v for k, v in m.state_dict().items() if k != "mask_bits"}
    old["mask"] = mask.clone()  # the layout before packing: bool [out, in]
    other, _ = _module(seed=8)
    other.load_state_dict(old)
    assert torch.equal(other.mask, mask) and torch.equal(other.mask_bits, m.mask_bits)
    bad = dict(old, mask=torch.ones(6, 12, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="size mismatch for mask"):
        other.load_state_dict(bad)


def test_adapter_file_is_packed_and_an_old_bool_mask_file_loads():
    from conftest import make_tiny_model

    model = make_tiny_model("llama", layers=1)
    add_sparse_lora(model, SparseLoRAConfig(r_max=4, rank=2, init_seed=0))
    g = torch.Generator().manual_seed(0)
    for mod in sparse_lora_modules(model).values():
        mod.set_mask(torch.rand(mod.mask.shape, generator=g) > 0.5)
    state = adapter_state_dict(model)
    mods = sparse_lora_modules(model)
    for q, mod in mods.items():
        assert f"{q}.mask" not in state
        assert np.array_equal(state[f"{q}.mask_bits"].numpy(), np.packbits(mod.mask.numpy(), axis=-1))
    old = {k: v for k, v in state.items() if not k.endswith(".mask_bits")}
    old.update({f"{q}.mask": mod.mask for q, mod in mods.items()})
    for stored in (state, old):
        fresh = make_tiny_model("llama", layers=1)
        add_sparse_lora(fresh, SparseLoRAConfig(r_max=4, rank=2, init_seed=1))
        load_adapter_state_dict(fresh, stored)
        for q, mod in sparse_lora_modules(fresh).items():
            assert torch.equal(mod.mask, mods[q].mask) and torch.equal(mod.lora_A, mods[q].lora_A), q


@pytest.mark.parametrize("d_in", [13, 16])
def test_resume_state_bytes_are_the_flat_numpy_layout(d_in):
    """The resume state stores the row-major flat packing; for whole-byte rows it reuses the module's buffer."""
    from losa.pipelines.losa.state import _module_mask_bits, unpack_mask

    m, mask = _module(d_in=d_in)
    flat = _module_mask_bits(m)
    assert np.array_equal(flat.numpy(), np.packbits(mask.numpy().reshape(-1)))
    assert torch.equal(unpack_mask(flat, tuple(mask.shape)), mask)
