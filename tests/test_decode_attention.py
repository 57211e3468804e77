"""Decode attention (losa.inference.attention): transformers' sdpa attention is the reference."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import losa.inference.attention as attention
from losa.inference.attention import ATTENTION_NAME, decode_attention, use_decode_attention
from losa.inference.decode import LeanDecoder


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail if a call that should take the decode path falls back to transformers' sdpa."""

    def fail(*a, **kw):
        raise AssertionError("decode_attention fell back to sdpa")

    monkeypatch.setattr(attention, "_sdpa", lambda: fail)


@pytest.fixture(params=["kernel", "kernel-avx2", "kernel-scalar", "torch"])
def float32_path(request, monkeypatch):
    """The decode path under test: the compiled kernel (at the CPU's best level: AVX-512 where it has it, else
    AVX2), its AVX2 level (forced, so AVX-512 machines test it too), its portable scalar loop, or torch's (two
    products for float32, SDPA for bf16)."""
    from losa.inference import kernel

    if request.param == "torch":
        monkeypatch.setitem(attention._KERNEL, "isa", None)
    else:
        if not kernel.kernel_available():
            pytest.skip("needs the compiled kernel")
        isa = {"kernel-scalar": 0, "kernel-avx2": min(1, kernel.best_isa())}.get(request.param, kernel.best_isa())
        monkeypatch.setitem(attention._KERNEL, "isa", isa)
    return request.param


def _no_products(monkeypatch):
    """Fail if torch's matrix products run (the kernel path must not fall back to them)."""

    def fail(*a, **kw):
        raise AssertionError("the kernel decode path used torch.matmul")

    monkeypatch.setattr(torch, "matmul", fail)


class _Attn(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _qkv(hq: int, hkv: int, t: int, s: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, t, 16, generator=g).to(dtype)
    k = torch.randn(2, hkv, s, 16, generator=g).to(dtype)
    v = torch.randn(2, hkv, s, 16, generator=g).to(dtype)
    return q, k, v


def _bool_mask(t: int, s: int, seed: int = 1) -> torch.Tensor:
    m = torch.rand(2, 1, t, s, generator=torch.Generator().manual_seed(seed)) > 0.4
    m[..., 0] = True  # every query attends to something
    return m


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (9, 3)], ids=["mha", "gqa2", "gqa3"])
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_one_token_matches_sdpa(hq, hkv, mask, no_fallback, float32_path, monkeypatch):
    q, k, v = _qkv(hq, hkv, 1, 37)
    m = None if mask == "none" else _bool_mask(1, 37)
    if mask == "float":
        m = torch.zeros(m.shape).masked_fill(~m, float("-inf")) + 0.1 * torch.randn(m.shape)
    mod = _Attn(hq // hkv)
    ref, _ = sdpa_attention_forward(mod, q, k, v, m, scaling=0.3)
    if float32_path != "torch" and mask != "float":  # additive masks take the products
        _no_products(monkeypatch)
    out, weights = decode_attention(mod, q, k, v, m, scaling=0.3)
    assert weights is None and out.shape == ref.shape == (2, 1, hq, 16) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _reference64(q, k, v, mask, scale):
    """Attention in float64 with the KV heads repeated as transformers' repeat_kv (query head h -> h // G)."""
    g = q.shape[1] // k.shape[1]
    k64, v64 = (t.double().repeat_interleave(g, dim=1) for t in (k, v))
    s = q.double() @ k64.transpose(-1, -2) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ v64).transpose(1, 2)


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 0.012), (torch.float16, 0.0016)], ids=["bf16", "fp16"])
def test_half_precision_keeps_float32_scores(dtype, bound, no_fallback, float32_path, monkeypatch):
    """Large logits (std ~9) against a float64 reference: float32 scores and probabilities stay within the output's
    own rounding (bf16 <= 0.008, fp16 <= 0.001 here); rounding them to the input dtype misses by 0.017-0.037 (bf16)
    and 0.0027-0.0039 (fp16) on these seeds. bf16 runs the compiled kernel where it is built (no SDPA call), fp16
    and bf16 without the kernel torch's SDPA."""
    if dtype == torch.float16 and float32_path != "torch":
        pytest.skip("fp16 always takes torch's SDPA: checked once, under the 'torch' path")
    if dtype == torch.bfloat16 and float32_path != "torch":
        def fail(*a, **kw):
            raise AssertionError("bf16 decode attention used torch's SDPA although the kernel is built")

        monkeypatch.setattr(attention.F, "scaled_dot_product_attention", fail)
    err = 0.0
    for seed in range(3):
        q, k, v = _qkv(9, 3, 1, 50, torch.float32, seed=seed)
        q, k, v = (q * 3).to(dtype), (k * 3).to(dtype), v.to(dtype)
        m = _bool_mask(1, 50)
        out, _ = decode_attention(_Attn(3), q, k, v, m)  # default scale 1 / sqrt(16)
        assert out.dtype == dtype
        err = max(err, float((out.double() - _reference64(q, k, v, m, 0.25)).abs().max()))
    assert err < bound


def test_fully_masked_row_gives_zeros_like_sdpa(no_fallback, float32_path):
    q, k, v = _qkv(6, 2, 1, 12)
    m = _bool_mask(1, 12)
    m[1] = False  # the second sequence attends to nothing
    out, _ = decode_attention(_Attn(3), q, k, v, m)
    assert torch.isfinite(out).all() and not out[1].any()
    ref, _ = sdpa_attention_forward(_Attn(3), q, k, v, m)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [64, 80, 24, 20, 5], ids=["d64", "d80-chunk+tail", "d24-8wide", "d20-tail", "d5"])
def test_kernel_static_cache_mask_and_head_sizes(d, float32_path, monkeypatch):
    """A static cache's mask ([B, 1, 1, S], broadcast over heads, most slots unused), a non-contiguous key
    cache, head sizes with a vector tail, against a float64 reference."""
    g = torch.Generator().manual_seed(d)
    q = torch.randn(2, 9, 1, d, generator=g)
    k = torch.randn(2, 3, d, 256, generator=g).transpose(-1, -2)  # [B, H_kv, S, D], not contiguous
    v = torch.randn(2, 3, 256, d, generator=g)
    m = torch.zeros(2, 1, 1, 256, dtype=torch.bool)
    m[0, ..., :40] = True
    m[1, ..., 3:77] = True
    ref = _reference64(q, k, v, m, 0.2)
    if float32_path != "torch":
        _no_products(monkeypatch)
    out, _ = decode_attention(_Attn(3), q, k, v, m, scaling=0.2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3), (8, 2)], ids=["mha", "gqa3", "gqa4"])
@pytest.mark.parametrize("d", [32, 40, 80], ids=["d32", "d40-8wide-tail", "d80-16wide-tail"])
@pytest.mark.parametrize("spread", [False, True], ids=["moderate", "spread"])
def test_kernel_long_caches_and_far_below_the_maximum(hq, hkv, d, spread, float32_path, monkeypatch):
    """1003 cached positions (several position blocks, passes of four with a tail of 3, exp in whole vectors with a
    tail), query heads in pairs with an odd one out, head sizes in whole and partial output chunks of four vectors
    (d40: 8 lanes only, the AVX2 loop even at the AVX-512 level; d80: 64 + 16 at 16 lanes, 64 + 16 at 8), against
    a float64 reference. `spread`: scores spread over hundreds, so exp of a difference falls below -80 (those weights must
    be exactly 0, not the garbage of an out-of-range 2^n); `moderate`: scores of a few units, every position
    weighs."""
    g = torch.Generator().manual_seed(hq + d)
    mult = 6.0 if spread else 1.0
    q = torch.randn(1, hq, 1, d, generator=g) * mult
    k = torch.randn(1, hkv, 1003, d, generator=g) * mult
    v = torch.randn(1, hkv, 1003, d, generator=g)
    m = torch.ones(1, 1, 1, 1003, dtype=torch.bool)
    scale = 1.0 if spread else d ** -0.5
    ref = _reference64(q, k, v, m, scale)
    s = (q.double() @ k.double().repeat_interleave(hq // hkv, dim=1).transpose(-1, -2)) * scale
    if spread:
        assert float((s.amax(-1) - s.amin(-1)).min()) > 200  # the spread the docstring promises
    else:
        assert float(torch.softmax(s, -1)[..., -3:].sum(-1).min()) > 1e-4  # the tail positions weigh
    if float32_path != "torch":
        _no_products(monkeypatch)
    out, _ = decode_attention(_Attn(hq // hkv), q, k, v, m, scaling=scale)
    # float32 scores of a few hundred carry errors of about 1e-5 each, which the softmax passes on: torch's own
    # float32 products miss the float64 reference by up to 1e-4 there
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-4 if spread else 1e-5)


@pytest.mark.parametrize("where", ["key", "key-tail", "query"])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
def test_kernel_passes_a_nan_score_on_like_sdpa(where, masked, float32_path):
    """NaN scores give NaN outputs, as torch's SDPA does: a NaN key (inside the vectorised part or in the last
    positions) for every query head of its KV head; a NaN query element (every score of that row NaN) for that
    head alone, the other head of its pair staying exact. The other heads stay exact."""
    q, k, v = _qkv(6, 2, 1, 41)
    if where == "query":
        q[:, 1, 0, 3] = float("nan")  # query head 1: the second row of KV head 0's first pair
        nan_heads, exact = [1], [0, 2, 3, 4, 5]
    else:
        k[:, 0, 5 if where == "key" else 40, 3] = float("nan")
        nan_heads, exact = [0, 1, 2], [3, 4, 5]
    m = torch.ones(2, 1, 1, 41, dtype=torch.bool) if masked else None
    out, _ = decode_attention(_Attn(3), q, k, v, m)
    assert torch.isnan(out[:, :, nan_heads]).all()
    ref = _reference64(q, k, v, torch.ones(2, 1, 1, 41, dtype=torch.bool), 0.25)
    torch.testing.assert_close(out[:, :, exact].double(), ref[:, :, exact], rtol=1e-5, atol=1e-5)


def test_prompts_and_unsupported_options_go_to_sdpa_unchanged():
    q, k, v = _qkv(6, 2, 5, 5)
    mod = _Attn(3)
    ref, _ = sdpa_attention_forward(mod, q, k, v, None)
    out, _ = decode_attention(mod, q, k, v, None)
    assert torch.equal(out, ref)  # the same function ran
    q1, k1, v1 = _qkv(6, 2, 1, 9)
    v8 = v1[..., :8].contiguous()  # value heads narrower than key heads
    assert torch.equal(decode_attention(mod, q1, k1, v8, None)[0], sdpa_attention_forward(mod, q1, k1, v8, None)[0])
    with pytest.raises(ValueError, match="softcap"):  # sdpa's own error, not a silently ignored option
        decode_attention(mod, q1, k1, v1, None, softcap=30.0)


def test_lean_decoder_switches_sdpa_models_only_and_keeps_greedy_tokens(monkeypatch):
    model = make_tiny_model("llama", hidden=64, seed=5)  # 4 query heads, 2 KV heads
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(3, 128, (1, 8))
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        ref_logits = model(ids).logits
    sdpa_copy = copy.deepcopy(model)
    lean = LeanDecoder(model)
    real = attention._sdpa()
    seen = []

    def sdpa_for_prompts_only(module, query, *a, **kw):
        seen.append(query.shape[2])
        assert query.shape[2] > 1, "a one-token step fell back to sdpa"
        return real(module, query, *a, **kw)

    monkeypatch.setattr(attention, "_sdpa", lambda: sdpa_for_prompts_only)
    assert lean.decode_attention and model.config._attn_implementation == ATTENTION_NAME
    with torch.inference_mode():
        out = lean.generate(ids, 12, do_sample=False, pad_token_id=0)
        # a decode step (1 token after an 8-token cache) gives sdpa's logits
        kv = model(ids[:, :-1], use_cache=True).cache
        step = model(ids[:, -1:], cache=kv).logits[:, -1]
    assert torch.equal(out, ref) and seen and set(seen) == {8, 7}  # the prompts only (8 and 7 tokens)
    torch.testing.assert_close(step, ref_logits[:, -1], rtol=1e-4, atol=1e-4)
    assert not LeanDecoder(sdpa_copy, decode_attention=False).decode_attention
    assert sdpa_copy.config._attn_implementation == "sdpa"
    eager = make_tiny_model("llama", hidden=64)
    eager.set_attn_implementation("eager")
    assert not use_decode_attention(eager) and eager.config._attn_implementation == "eager"


@pytest.mark.parametrize("d", [128, 24, 20, 5], ids=["d128", "d24-8wide", "d20-tail", "d5"])
def test_kernel_bf16_static_cache_matches_float64(d, float32_path, monkeypatch):
    """bf16 q/k/v through the kernel (or SDPA without it): the float64 attention of the same bf16 numbers, within
    one bf16 rounding of the output; the static cache's unused slots and a non-contiguous key cache included."""
    g = torch.Generator().manual_seed(d)
    q = torch.randn(2, 8, 1, d, generator=g).bfloat16()
    k = torch.randn(2, 2, d, 200, generator=g).bfloat16().transpose(-1, -2)  # [B, H_kv, S, D], not contiguous
    v = torch.randn(2, 2, 200, d, generator=g).bfloat16()
    m = torch.zeros(2, 1, 1, 200, dtype=torch.bool)
    m[0, ..., :33] = True
    m[1, ..., 5:150] = True
    ref = _reference64(q, k, v, m, 0.1)
    if float32_path != "torch":
        _no_products(monkeypatch)
    out, _ = decode_attention(_Attn(4), q, k, v, m, scaling=0.1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=1e-6)
