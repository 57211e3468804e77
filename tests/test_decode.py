"""Lean decode (losa.inference.decode): bf16 LM head copy, static cache + compiled step, the CLI flags."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import make_tiny_model, prune_random

from losa.errors import LosaError
from losa.inference import kernel_available, sparsify_for_inference
from losa.inference.decode import (
    BF16LMHead,
    LeanDecoder,
    cache_length,
    normalize_lm_head_dtype,
    resolve_lm_head_dtype,
    set_lm_head_dtype,
)
from losa.inference.kernel import native_bf16

needs_kernel = pytest.mark.skipif(not kernel_available(), reason="needs the compiled sparse kernel")


pytestmark = pytest.mark.usefixtures("no_measured_thresholds")


def _spy_kernel(mp: pytest.MonkeyPatch, name: str) -> list:
    """Patch ``load_kernel`` (through ``mp``) so that calls of the kernel's entry point ``name`` are recorded (the
    shape of their first argument) and run as before; the rest of the kernel as it is. Returns the record."""
    from losa.inference import kernel as _kernel

    real, calls = _kernel.load_kernel(), []

    def recorded(*a):
        calls.append(tuple(a[0].shape))
        return getattr(real, name)(*a)

    class Spy:
        def __getattr__(self, attr):
            return recorded if attr == name else getattr(real, attr)

    mp.setattr(_kernel, "load_kernel", lambda: Spy())
    return calls


def _tied_llama():
    model = make_tiny_model("llama", hidden=64, vocab=160)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_lean_decoder_without_compile_is_plain_generate():
    model = make_tiny_model("llama", hidden=64)
    ids = torch.randint(3, 128, (1, 7))
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        out = LeanDecoder(model).generate(ids, 10, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    with pytest.raises(LosaError, match="max_new_tokens"):
        LeanDecoder(model).generate(ids, 0)


@needs_kernel
@pytest.mark.parametrize("sparse", [False, True], ids=["dense-fp32", "sparse-fp32-values"])
def test_compiled_static_cache_greedy_matches_generate(sparse):
    model = make_tiny_model("llama", hidden=64, seed=3)
    if sparse:
        prune_random(model)
        sparsify_for_inference(model, value_dtype="float32")
    ids = torch.randint(3, 128, (1, 9))
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        ref_again = model.generate(ids[:, :5], max_new_tokens=12, do_sample=False, pad_token_id=0)
        lean = LeanDecoder(model, compile=True)  # from here on the model uses losa's decode attention
        assert lean.generate_kwargs(ids, 12)["cache_implementation"] == "static"
        out = lean.generate(ids, 12, do_sample=False, pad_token_id=0)
        again = lean.generate(ids[:, :5], 12, do_sample=False, pad_token_id=0)  # same cache size: no recompile
    assert torch.equal(out, ref)
    assert torch.equal(again, ref_again)


@needs_kernel
@pytest.mark.parametrize("wrapper", ["cpp", "python"])
def test_compile_wrapper_is_the_one_asked_for_and_keeps_greedy_tokens(monkeypatch, wrapper):
    """``compile_wrapper="cpp"`` builds Inductor's C++ wrapper (``"python"`` does not); same tokens as eager."""
    import torch._inductor.codecache as cc
    import torch._inductor.config as ic

    model = make_tiny_model("llama", hidden=64, seed=7)
    prune_random(model, seed=6)
    sparsify_for_inference(model, value_dtype="bfloat16")
    ids = torch.randint(3, 128, (1, 6))
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    builds = []
    real = cc.CppWrapperCodeCache.load_pybinding_async.__func__
    monkeypatch.setattr(cc.CppWrapperCodeCache, "load_pybinding_async",
                        classmethod(lambda cls, *a, **k: builds.append(1) or real(cls, *a, **k)))
    lean = LeanDecoder(model, compile=True, compile_wrapper=wrapper)
    with torch.inference_mode(), ic.patch(fx_graph_cache=False):  # compile here, not from an earlier test's cache
        out = lean.generate(ids, 6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    assert bool(builds) == (wrapper == "cpp"), builds
    with pytest.raises(LosaError, match="compile wrapper"):
        LeanDecoder(model, compile=True, compile_wrapper="c++")


@needs_kernel
def test_cpp_wrapper_build_failure_names_the_fallback(monkeypatch):
    import torch._inductor.codecache as cc
    import torch._inductor.config as ic

    def broken(cls, *a, **k):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(cc.CppWrapperCodeCache, "load_pybinding_async", classmethod(broken))
    model = make_tiny_model("llama", hidden=64, layers=1, seed=8)
    ids = torch.randint(3, 128, (1, 5))
    with torch.inference_mode(), ic.patch(fx_graph_cache=False), \
            pytest.raises(LosaError, match="--compile-wrapper python"):
        LeanDecoder(model, compile=True).generate(ids, 3, do_sample=False, pad_token_id=0)


@needs_kernel
@pytest.mark.parametrize("compile_step", [False, True], ids=["eager", "compiled"])
def test_planned_decode_skips_the_python_dispatch_and_matches_generate(monkeypatch, compile_step):
    """Decode steps (1 row) run the planned row loop: no Python dispatch, eager or compiled; same tokens."""
    import losa.inference.sparse_linear as sl
    from losa.inference import SparseLinear

    model = _tied_llama()
    prune_random(model, seed=2)
    sparsify_for_inference(model, value_dtype="bfloat16")
    set_lm_head_dtype(model, "bfloat16")
    ids = torch.randint(3, 160, (1, 20))  # a prompt above the row-loop threshold: the full dispatch
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)  # not planned yet
    lean = LeanDecoder(model, compile=compile_step, decode_engine="off")  # the planned module path, not the engine
    layers = [m for m in model.modules() if isinstance(m, (SparseLinear, BF16LMHead))]
    assert layers and all(m.decode_plan is not None for m in layers)
    calls = []
    real = sl.sparse_matmul
    monkeypatch.setattr(sl, "sparse_matmul", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr("losa.inference.decode.sparse_matmul", sl.sparse_matmul)
    with torch.inference_mode():
        out = lean.generate(ids, 10, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    # the prompt's 20 rows take the dispatch in every decoder linear (the head sees only the last position);
    # none of the 9 single-token steps does (compiled: the graph calls losa_sparse_kernels::spmm itself)
    assert calls == [20] * (len(layers) - 1), calls


@needs_kernel
@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("qwen2", torch.float32),
                                          ("qwen2", torch.bfloat16)], ids=["llama-fp32", "qwen2-bias-fp32",
                                                                           "qwen2-bias-bf16"])
def test_planned_layers_give_the_same_logits_as_the_full_dispatch(family, dtype):
    """Bit-identical logits with and without decode plans: 1-row steps and a prompt, biases, bf16 activations."""
    from losa.inference import SparseLinear

    model = make_tiny_model(family, hidden=64, seed=5)
    prune_random(model, seed=4)
    model.to(dtype)
    sparsify_for_inference(model, value_dtype="bfloat16")
    assert any(m.bias is not None for m in model.modules() if isinstance(m, SparseLinear)) == (family == "qwen2")
    ids = torch.randint(3, 128, (2, 17))
    with torch.inference_mode():
        full = model(ids).logits
        steps = [model(ids[:, i:i + 1]).logits for i in range(3)]
        LeanDecoder(model)
        assert all(m.decode_plan is not None for m in model.modules() if isinstance(m, SparseLinear))
        assert torch.equal(model(ids).logits, full)
        for i in range(3):
            assert torch.equal(model(ids[:, i:i + 1]).logits, steps[i])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spmm_dispatcher_op_passes_opcheck_and_rounds_to_the_input_dtype(dtype):
    from losa.inference import SparseLinear
    from losa.inference import kernel as kmod
    from losa.inference.formats import FORMAT_CODES

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=gen) * (torch.rand(24, 40, generator=gen) > 0.6)
    layer = SparseLinear.from_dense(w, bias=torch.randn(24, generator=gen), value_dtype="bfloat16")
    b = layer._buffers
    x = torch.randn(3, 40, generator=gen).to(dtype)
    args = (x, b["meta"], b["values"], b["row_ptr"], b["bias"], 24, 40, FORMAT_CODES[layer.fmt], kmod.best_isa())
    torch.library.opcheck(kmod.spmm_op(), args)
    y = kmod.spmm_op()(*args)
    assert y.dtype == dtype
    want = x.double() @ w.bfloat16().double().T + b["bias"].double()
    torch.testing.assert_close(y.double(), want.to(dtype).double(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@needs_kernel
def test_bf16_lm_head_rounds_only_the_head_and_keeps_the_embedding(monkeypatch):
    model = _tied_llama()
    prune_random(model)
    sparsify_for_inference(model, value_dtype="bfloat16")
    emb = model.model.embed_tokens.weight
    before = emb.detach().clone()
    keys = set(model.state_dict())
    ids = torch.randint(3, 160, (2, 11))
    with torch.inference_mode():
        hidden = model.model(ids).last_hidden_state
        ref = model.lm_head(hidden)
        want = hidden @ emb.detach().bfloat16().float().T  # the bf16-rounded weight, float32 arithmetic
        assert set_lm_head_dtype(model, "bfloat16")
        assert not set_lm_head_dtype(model, "bfloat16")  # already done
        head = model.get_output_embeddings()
        assert isinstance(head, BF16LMHead) and head.weight is emb
        got = head(hidden)
        with monkeypatch.context() as mp:
            calls = _spy_kernel(mp, "dense_gemv_f32x")
            one = head(hidden[:1, -1:])  # a decode step's one row: the dense row loop over the copy
        assert calls == [(1, 64)]
        logits = model(ids).logits
    assert torch.equal(head.dense_copy(), emb.detach().bfloat16())  # the copy as a dense matrix: the rounded weight
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one, want[:1, -1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)  # bf16 rounding of the weights only
    torch.testing.assert_close(logits, got)
    assert emb.dtype == torch.float32 and torch.equal(emb.detach(), before)
    assert model.model.embed_tokens.weight is emb and set(model.state_dict()) == keys
    assert not set_lm_head_dtype(make_tiny_model("llama"), "float32")
    with pytest.raises(LosaError, match="not supported"):
        set_lm_head_dtype(model, "int8")


_HUGE_PAGE = 2 << 20  # hugepage_copy's alignment
needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages: Linux")
needs_native_bf16 = pytest.mark.skipif(not kernel_available() or not native_bf16(),
                                       reason="an in-place bf16 head needs a CPU with AVX512-BF16")


@needs_kernel
@needs_linux
def test_bf16_lm_head_copy_is_made_in_huge_page_memory(monkeypatch):
    """Decode streams the whole head every token: a float32 head's bf16 copy sits in huge-page memory (the
    kernel's hugepage_copy: 2 MiB-aligned), in torch's memory with LOSA_HUGEPAGES=0; logits do not change."""
    lin = torch.nn.Linear(1024, 1100)  # its bf16 copy is 2.2 MB: above hugepage_copy's 2 MiB minimum
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("LOSA_HUGEPAGES", "0")
    plain = BF16LMHead(lin)
    monkeypatch.setenv("LOSA_HUGEPAGES", "1")
    huge = BF16LMHead(lin)
    assert huge.values.data_ptr() % _HUGE_PAGE == 0 and huge.weight is lin.weight
    if not os.environ.get("THP_MEM_ALLOC_ENABLE"):  # (torch's own allocator would align to 2 MiB then)
        assert plain.values.data_ptr() % _HUGE_PAGE != 0
    assert torch.equal(huge.values, plain.values)
    with torch.inference_mode():
        torch.testing.assert_close(huge(x), x.double().matmul(lin.weight.detach().bfloat16().double().T).float()
                                   + lin.bias.detach(), rtol=1e-5, atol=1e-5)
        assert torch.equal(huge(x), plain(x))


@needs_kernel
@needs_linux
@needs_native_bf16
@pytest.mark.parametrize("inference_mode", [False, True])
def test_in_place_bf16_head_moves_into_huge_page_memory(monkeypatch, inference_mode):
    """An in-place bf16 head's storage moves into huge-page memory: the same parameter (a tied embedding
    follows it, requires_grad kept), the same values, a normal tensor even when the head is made in inference
    mode (so the model still trains); LOSA_HUGEPAGES=0 leaves it where it was."""
    emb = torch.nn.Embedding(1100, 1024, dtype=torch.bfloat16)
    tied = torch.nn.Linear(1024, 1100, bias=False, dtype=torch.bfloat16)
    tied.weight = emb.weight
    values, where = emb.weight.detach().clone(), emb.weight.data_ptr()
    monkeypatch.setenv("LOSA_HUGEPAGES", "0")
    assert BF16LMHead(tied).weight.data_ptr() == where  # off: left in place
    monkeypatch.setenv("LOSA_HUGEPAGES", "1")
    with torch.inference_mode(inference_mode):
        head = BF16LMHead(tied)
    assert head.weight is emb.weight and emb.weight.data_ptr() % _HUGE_PAGE == 0 and emb.weight.data_ptr() != where
    assert torch.equal(emb.weight.detach(), values) and emb.weight.requires_grad
    assert not emb.weight.is_inference()
    x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(head(x[:1]), torch.nn.functional.linear(x[:1], values), rtol=1e-2, atol=1e-2)
    head(x).float().sum().backward()  # several rows: F.linear, with a gradient for the moved weight
    torch.testing.assert_close(emb.weight.grad.float(), x.float().sum(0).expand(1100, -1), rtol=1e-2, atol=1e-2)


@needs_kernel
@needs_linux
@needs_native_bf16
def test_a_decoder_follows_a_head_moved_into_huge_pages():
    """A LeanDecoder whose engine was built on the bf16 head as loaded rebuilds it after set_lm_head_dtype moved
    the tied head into huge-page memory (the engine would otherwise hold the old storage), and decodes the same
    tokens as decoding without the engine."""
    model = make_tiny_model("llama", hidden=64, vocab=17000, seed=4)  # a 2.2 MB bf16 head: above 2 MiB
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model = model.to(torch.bfloat16)
    dec = LeanDecoder(model)
    ids = torch.randint(3, 17000, (1, 5), generator=torch.Generator().manual_seed(0))
    kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.inference_mode():
        before = dec.generate(ids, 6, **kw)
        built, where = dec._engine, model.lm_head.weight.data_ptr()
        assert dec.last_engine == "on" and set_lm_head_dtype(model, "bfloat16")
        assert model.lm_head.weight.data_ptr() != where and model.lm_head.weight.data_ptr() % _HUGE_PAGE == 0
        after = dec.generate(ids, 6, **kw)
        ref = LeanDecoder(model, decode_engine="off").generate(ids, 6, **kw)
    assert dec.last_engine == "on" and dec._engine is not built  # rebuilt on the moved head
    assert torch.equal(after, ref) and torch.equal(after, before)


@needs_kernel
def test_bf16_lm_head_greedy_matches_on_a_trained_margin():
    """Greedy tokens with the bf16 head equal the float32 head's where the top logits are well apart."""
    model = make_tiny_model("llama", hidden=64, seed=1)
    ids = torch.randint(3, 128, (1, 6))
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
        set_lm_head_dtype(model, "bfloat16")
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    for a, b in zip(ref.logits, out.logits):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)
    n = 0
    for a in ref.logits:  # the tokens agree up to the first step whose top two logits are within tolerance
        top = a[0].topk(2).values
        if float(top[0] - top[1]) < 0.05:
            break
        n += 1
    assert torch.equal(out.sequences[0, 6:6 + n], ref.sequences[0, 6:6 + n])


@needs_kernel
@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_bf16_model_head_is_multiplied_in_place_where_avx512_bf16_runs(isa, monkeypatch):
    """A bf16 model's tied head: on a CPU with AVX512-BF16 the head keeps its own weight (no copy, the
    embedding still shares it) and one-row logits equal a float64 product of the same bf16 values, rounded
    to bf16 (at most one bf16 step apart where the float32 sums round differently); batches take F.linear.
    Elsewhere (forced AVX2) the head stays an nn.Linear."""
    from losa.inference import kernel as _kernel

    if isa == "avx2":
        if _kernel._cpu_isa() < 1:
            pytest.skip("the CPU has no AVX2")
        monkeypatch.setenv("LOSA_SPARSE_ISA", "avx2")
    model = _tied_llama().to(torch.bfloat16)
    emb = model.model.embed_tokens.weight
    keys = set(model.state_dict())
    if not _kernel.native_bf16():
        assert not set_lm_head_dtype(model, "bfloat16") and isinstance(model.lm_head, torch.nn.Linear)
        return
    assert set_lm_head_dtype(model, "bfloat16") and not set_lm_head_dtype(model, "bfloat16")
    head = model.get_output_embeddings()
    assert isinstance(head, BF16LMHead) and head.in_place and head.weight is emb and head.values is None
    assert set(model.state_dict()) == keys
    calls = _spy_kernel(monkeypatch, "dense_gemv_bf16")
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.inference_mode():
        got = head(x)
        assert calls == [(1, 64)]  # one row: the kernel
        batch = head(x.expand(3, 1, 64))
        assert calls == [(1, 64)]  # several rows: F.linear
    want = (x.double() @ emb.detach().double().T).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (1, 1, 160)
    step = want.double().abs() * 2.0 ** -7  # one bf16 step (8 significant bits)
    assert bool(((got.double() - want.double()).abs() <= step + 1e-30).all())
    torch.testing.assert_close(batch, torch.nn.functional.linear(x.expand(3, 1, 64), emb.detach()))
    wide = BF16LMHead(torch.nn.Linear(2048, 16, dtype=torch.bfloat16))  # wide heads keep F.linear (lm_head.md)
    with torch.inference_mode():
        xw = torch.randn(1, 2048).to(torch.bfloat16)
        torch.testing.assert_close(wide(xw), torch.nn.functional.linear(xw, wide.weight, wide.bias))
    assert len(calls) == 1 and wide.in_place
    # gradients: the kernel has no backward, so a call that needs one takes F.linear
    xg = x.clone().requires_grad_(True)
    assert head(xg).requires_grad and len(calls) == 1
    # cast with the model: the head follows (a float32 F.linear), and asking again gives it a bf16 copy
    model.float()
    assert head.in_place and head.weight.dtype == torch.float32 and "float32 (in place)" in repr(head)
    assert set_lm_head_dtype(model, "bfloat16")
    head = model.get_output_embeddings()
    assert not head.in_place and head.weight is model.model.embed_tokens.weight


@needs_kernel
@pytest.mark.parametrize("k", [1, 31, 32, 33, 63, 64, 65, 96, 100, 129])
def test_dense_bf16_row_loop_against_float64(k):
    """The kernel's dense bf16 row loop (``dense_gemv_bf16``) for widths around its 32- and 64-input steps,
    with and without a bias, against a float64 product of the same bf16 values."""
    from losa.inference import kernel as _kernel

    if not _kernel.native_bf16():
        pytest.skip("the dense bf16 row loop needs AVX512-BF16")
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(37, k, generator=gen).to(torch.bfloat16)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    bias = torch.randn(37, generator=gen)
    for b in (None, bias):
        got = _kernel.load_kernel().dense_gemv_bf16(x, w, b, _kernel.best_isa())
        want = x.double() @ w.double().T + (0 if b is None else b.double())
        assert got.dtype == torch.float32 and got.shape == (1, 37)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@needs_kernel
@pytest.mark.parametrize("k", [1, 7, 8, 9, 31, 32, 33, 72, 100, 576])
def test_dense_row_loop_with_float32_inputs_against_float64(k):
    """The kernel's dense row loop over bf16 weights with float32 inputs (``dense_gemv_f32x``: a float32 model's
    bf16 head copy, a bf16 model's dense layers without AVX512-BF16) at every ISA level this CPU has, widths
    around its 8-, 16- and 32-input steps, with and without a bias, against the float64 product of the same
    values: float32 sums within the recursive-summation bound K * 2^-24 * sum |w x|."""
    from losa.inference import kernel as _kernel

    gen = torch.Generator().manual_seed(k)
    w = torch.randn(37, k, generator=gen).to(torch.bfloat16)
    x = torch.randn(1, k, generator=gen)
    bias = torch.randn(37, generator=gen)
    bound = (k + 1) * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T)
    for isa in range(_kernel._cpu_isa() + 1):
        for b in (None, bias):
            got = _kernel.load_kernel().dense_gemv_f32x(x, w, b, isa)
            want = x.double() @ w.double().T + (0 if b is None else b.double())
            assert got.dtype == torch.float32 and got.shape == (1, 37)
            assert bool(((got.double() - want).abs() <= bound + 2.0 ** -24 * want.abs()).all()), (isa, b is None)


def test_lm_head_dtype_resolution():
    assert normalize_lm_head_dtype("BF16") == "bfloat16" and normalize_lm_head_dtype("fp32") == "float32"
    assert resolve_lm_head_dtype("auto", torch.float32, kernel=True) == "bfloat16"
    assert resolve_lm_head_dtype("auto", torch.float32, kernel=False) == "float32"
    # a bf16 model's head: in place through the dense AVX512-BF16 loop where the CPU has it, else as loaded
    assert resolve_lm_head_dtype("auto", torch.bfloat16, kernel=True, native=True) == "bfloat16"
    assert resolve_lm_head_dtype("auto", torch.bfloat16, kernel=True, native=False) == "float32"
    assert resolve_lm_head_dtype("auto", torch.bfloat16, kernel=False, native=True) == "float32"
    assert resolve_lm_head_dtype("float32", torch.float32, kernel=True) == "float32"
    with pytest.raises(LosaError, match="needs the compiled sparse kernel"):
        resolve_lm_head_dtype("bfloat16", torch.float32, kernel=False)
    with pytest.raises(LosaError, match=r"\(--lm-head-dtype\) 'int4' is not supported"):
        resolve_lm_head_dtype("int4", torch.float32)


def test_cache_length_buckets():
    assert cache_length(1) == 256 and cache_length(256) == 256 and cache_length(257) == 512
    assert cache_length(300, context=400) == 400 and cache_length(500, context=400) == 512
    with pytest.raises(LosaError):
        cache_length(0)


def test_cli_lm_head_flag_errors_are_one_line(tmp_path, capsys):
    from losa.cli import main

    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path / "tiny")
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "tiny"), "--prompt", "hi", "--lm-head-dtype", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "(--lm-head-dtype) 'int8' is not supported" in err and len(err.splitlines()) == 1


@needs_kernel
def test_cli_generate_with_bf16_head_and_compile(tmp_path, capsys):
    from conftest import make_tiny_tokenizer

    import losa
    from losa.cli import main

    model = make_tiny_model("llama", seed=4, hidden=64)
    prune_random(model)
    losa.save_checkpoint(model, make_tiny_tokenizer(), tmp_path / "m", {"recipe": {}})
    path = str(tmp_path / "m")
    assert main(["generate", path, "--prompt", "word5 word17", "--max-new-tokens", "4", "--dtype", "float32"]) == 0
    auto = capsys.readouterr()  # the text alone on stdout; status lines and progress bars on stderr
    import transformers

    shown = transformers.utils.logging.is_progress_bar_enabled()  # off where HF_HUB_DISABLE_PROGRESS_BARS is set
    assert "LM head: bf16 copy" in auto.err and ("Loading weights" in auto.err) == shown  # transformers' bar
    assert len(auto.out.strip().splitlines()) >= 1 and "LM head" not in auto.out and "tokens/s" not in auto.out
    assert main(["generate", path, "--prompt", "word5 word17", "--max-new-tokens", "4", "--dtype", "float32",
                 "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert transformers.utils.logging.is_progress_bar_enabled() == shown  # --quiet is per call
    assert "%|" not in quiet.err and quiet.out == auto.out and "LM head: bf16 copy" in quiet.err
    assert main(["generate", path, "--prompt", "word5 word17", "--max-new-tokens", "4", "--dtype", "float32",
                 "--lm-head-dtype", "float32", "--compile"]) == 0
    err = capsys.readouterr().err
    assert "LM head" not in err and "compiled" in err


def test_cli_generate_sampling_flags(tmp_path, capsys):
    """--top-k 1 samples the greedy token every step; --seed makes a sample repeatable; the flags need --sample
    and their ranges are checked, each in one line."""
    from conftest import make_tiny_tokenizer

    import losa
    from losa.cli import main

    model = make_tiny_model("llama", seed=5, hidden=64)
    prune_random(model)
    losa.save_checkpoint(model, make_tiny_tokenizer(), tmp_path / "m", {"recipe": {}})
    base = ["generate", str(tmp_path / "m"), "--prompt", "word5 word17", "--max-new-tokens", "8", "--dtype",
            "float32", "--quiet"]

    def text(*extra: str) -> str:
        assert main([*base, *extra]) == 0
        return capsys.readouterr().out  # the generated text alone

    greedy = text()
    assert text("--sample", "--top-k", "1", "--seed", "3") == greedy
    assert text("--sample", "--temperature", "1.5", "--seed", "7") == text("--sample", "--temperature", "1.5",
                                                                             "--seed", "7")
    for bad, why in ((["--temperature", "0.5"], "--temperature only applies to sampling; add --sample (greedy "
                                                "decoding ignores it)"),
                     (["--top-k", "3", "--seed", "1"], "--top-k, --seed only apply to sampling"),
                     (["--sample", "--temperature", "0"], "--temperature 0.0 must be above 0"),
                     (["--sample", "--top-k", "0"], "--top-k 0 must be at least 1"),
                     (["--sample", "--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"),
                     (["--prompt", ""], "error: --prompt is empty; give some text"),
                     (["--compile-wrapper", "python"], "--compile-wrapper python only applies to the compiled decode "
                                                       "step; add --compile or drop it")):
        assert main([*base, *bad]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1
