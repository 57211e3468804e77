"""The C++ decode engine (losa.inference.engine): logits against the model's own forward, generate, fallbacks."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import make_tiny_model, prune_random

from losa.errors import LosaError
from losa.inference import kernel_available, sparsify_for_inference
from losa.inference.decode import LeanDecoder, set_lm_head_dtype
from losa.inference.engine import ENGINE_MODEL_TYPES, DecodeEngine, attach, engine_problem
from losa.models.registry import get_decoder_layers

pytestmark = [pytest.mark.skipif(not kernel_available(), reason="needs the compiled sparse kernel"),
              pytest.mark.usefixtures("no_measured_thresholds")]


def _model(model_type: str, value_dtype: str | None, head: str = "float32", seed: int = 0):
    model = make_tiny_model(model_type, hidden=64, vocab=160, seed=seed)
    if model_type == "qwen2":  # q/k/v biases: nonzero, so that the engine must add them
        for layer in get_decoder_layers(model):
            for name in ("q_proj", "k_proj", "v_proj"):
                torch.nn.init.normal_(getattr(layer.self_attn, name).bias, std=0.5)
    if value_dtype is not None:
        prune_random(model, seed=seed)
        sparsify_for_inference(model, value_dtype=value_dtype)
    set_lm_head_dtype(model, head)
    return model


def _reference_logits(model, seq: torch.Tensor) -> torch.Tensor:
    """The model's own forward over the whole sequence: logits [T, V] (the independent reference)."""
    with torch.inference_mode():
        return model(seq, use_cache=False).logits[0].float()


@pytest.mark.parametrize("model_type", ENGINE_MODEL_TYPES)
@pytest.mark.parametrize("value_dtype,head", [(None, "float32"), ("float32", "float32"), ("bfloat16", "bfloat16")],
                         ids=["dense", "sparse-fp32-values", "sparse-bf16-values-bf16-head"])
def test_engine_logits_match_the_model_forward(model_type, value_dtype, head):
    from transformers import DynamicCache

    model = _model(model_type, value_dtype, head)
    seq = torch.randint(3, 160, (1, 20), generator=torch.Generator().manual_seed(1))
    ref = _reference_logits(model, seq)
    prompt = 6
    engine = DecodeEngine(model, 32)
    with torch.inference_mode():
        out = model(seq[:, :prompt], cache=DynamicCache(config=model.config), use_cache=True)
        assert engine.load_prompt_cache(out.cache) == prompt
        for t in range(prompt, seq.shape[1]):
            got = engine.step(int(seq[0, t]))
            assert got.shape == (160,) and got.dtype == torch.float32
            torch.testing.assert_close(got, ref[t], rtol=1e-4, atol=1e-4 * float(ref[t].abs().max()))
    assert engine.pos == seq.shape[1]


@pytest.mark.parametrize("isa", [0, 1], ids=["scalar", "avx2"])
def test_silu_against_float64(isa):
    """The engine's SiLU (the vector exp on AVX2, std::exp in the scalar form) against x * sigmoid(x) in float64:
    within 4 float32 ulp of it (tiny results, whose exact value is far below float32's normal range, within
    1e-30), NaN where it is NaN (NaN in, and -inf: -inf * 0), +inf for +inf."""
    from losa.inference.kernel import load_kernel

    if isa == 1 and load_kernel().cpu_isa() < 1:
        pytest.skip("needs AVX2")
    special = [0.0, -0.0, 1e-40, -1e-40, 1e-6, -1e-6, 80.0, -80.0, 87.0, -87.0, 89.0, -89.0, 1e30, -1e30,
               float("inf"), float("-inf"), float("nan")]
    x = torch.cat([torch.linspace(-100, 100, 200_001), torch.randn(10_000, generator=torch.Generator().manual_seed(1)) * 3,
                   torch.tensor(special)])
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]  # every value in vector and tail spots
    got = load_kernel().silu_f32(x, isa).double()
    ref = x.double() * torch.sigmoid(x.double())
    nan = ref.isnan()
    assert torch.equal(got.isnan(), nan)
    ok = ~nan
    ulp = 2.0 ** (torch.frexp(ref[ok].float()).exponent.double() - 24)  # float32 ulp of the exact result
    bad = (got[ok] - ref[ok]).abs() > 4 * ulp + 1e-30
    assert not bad.any(), (x[ok][bad][:5].tolist(), got[ok][bad][:5].tolist(), ref[ok][bad][:5].tolist())


def test_engine_on_the_avx2_path_matches_the_model_forward(monkeypatch):
    from losa.inference import kernel as _kernel

    if _kernel._cpu_isa() < 1:
        pytest.skip("the CPU has no AVX2")
    from transformers import DynamicCache

    monkeypatch.setenv("LOSA_SPARSE_ISA", "avx2")  # the engine's row loops and attention run the AVX2 code
    model = _model("llama", "bfloat16", "bfloat16", seed=2)
    seq = torch.randint(3, 160, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = _reference_logits(model, seq)
    engine = DecodeEngine(model, 16)
    with torch.inference_mode():
        engine.load_prompt_cache(model(seq[:, :4], cache=DynamicCache(config=model.config), use_cache=True).cache)
        for t in range(4, 12):
            torch.testing.assert_close(engine.step(int(seq[0, t])), ref[t], rtol=1e-4,
                                       atol=1e-4 * float(ref[t].abs().max()))


def test_rows_and_heads_split_over_more_threads_match_the_model_forward():
    """Five threads for a layer of 4 query heads over 2 KV heads: chunk borders fall inside q/k/v's shared row
    range and inside gate/up, and with 2048 cached positions each query head is a chunk of its own, so one KV
    head's two query heads are attended on different threads. (A float32 model with bf16 values and a bf16 LM
    head: float32 arithmetic on both sides, hence the float32 tolerance of the other logits tests. The tiny config says 256
    positions, but its default rotary embedding computes any position.)"""
    from transformers import DynamicCache

    model = _model("llama", "bfloat16", "bfloat16", seed=5)
    seq = torch.randint(3, 160, (1, 2052), generator=torch.Generator().manual_seed(5))
    ref = _reference_logits(model, seq)
    threads = torch.get_num_threads()
    torch.set_num_threads(5)
    try:
        engine = DecodeEngine(model, 2052)
        with torch.inference_mode():
            engine.load_prompt_cache(model(seq[:, :2048], cache=DynamicCache(config=model.config), use_cache=True).cache)
            for t in range(2048, 2052):
                torch.testing.assert_close(engine.step(int(seq[0, t])), ref[t], rtol=1e-4,
                                           atol=1e-4 * float(ref[t].abs().max()))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_lean_decoder_with_the_engine_generates_what_generate_does(sample):
    model = _model("llama", "bfloat16", "bfloat16", seed=4)
    on, off = LeanDecoder(model), LeanDecoder(model, decode_engine="off")
    assert on.use_engine and on.engine_reason == "on"
    assert not off.use_engine and off.engine_reason == "off (asked)"
    ids = torch.randint(3, 160, (1, 5), generator=torch.Generator().manual_seed(5))
    kw = dict(do_sample=sample, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        torch.manual_seed(0)
        ref = off.generate(ids, 24, **kw)
        torch.manual_seed(0)
        got = on.generate(ids, 24, **kw)
        torch.manual_seed(0)
        again = on.generate(ids, 24, **kw)  # the engine (and its cache) is reused and reloaded per prompt
    assert torch.equal(got, ref) and torch.equal(again, ref)
    assert "forward" not in vars(model)  # attach put the class's forward back


def test_batches_and_compile_take_generates_own_steps():
    model = _model("llama", "bfloat16", "bfloat16", seed=6)
    dec = LeanDecoder(model)
    ids = torch.randint(3, 160, (2, 5), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        ref = LeanDecoder(model, decode_engine="off").generate(ids, 6, do_sample=False, pad_token_id=0)
        got = dec.generate(ids, 6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref) and dec._engine is None  # two sequences: the engine was never built
    assert LeanDecoder(model, compile=True).engine_reason.startswith("off (--compile")
    with pytest.raises(LosaError, match="decode engine 'always' is not supported"):
        LeanDecoder(model, decode_engine="always")


@pytest.mark.parametrize("model_type,reason", [("gemma", "model type 'gemma'"), ("opt", "model type 'opt'"),
                                               ("qwen3", "model type 'qwen3'")])
def test_unsupported_models_are_named(model_type, reason):
    model = make_tiny_model(model_type, hidden=64)
    assert reason in engine_problem(model)
    dec = LeanDecoder(model)
    assert not dec.use_engine and reason in dec.engine_reason
    with pytest.raises(LosaError, match="the decode engine cannot run this model"):
        DecodeEngine(model, 8)


@pytest.mark.parametrize("model_type", ENGINE_MODEL_TYPES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse-bf16-values"])
@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_bf16_model_logits_are_as_close_to_the_model_as_float32_arithmetic_is(model_type, sparse, isa, monkeypatch):
    """A bf16 model: the engine (float32 arithmetic, bf16 rounding where the modules round) against the bf16
    model's own forward, measured against how far the float32 forward of the same weights is from it. Natively
    (the AVX512-BF16 loop where the CPU has it) and on the AVX2 path (float32 loop on the rounded inputs)."""
    from losa.inference import kernel as _kernel

    if isa == "avx2":
        if _kernel._cpu_isa() < 1:
            pytest.skip("the CPU has no AVX2")
        monkeypatch.setenv("LOSA_SPARSE_ISA", "avx2")
    m32 = _model(model_type, None, seed=3)
    if sparse:
        prune_random(m32, seed=3)
    m16 = _model(model_type, None, seed=3)
    if sparse:
        prune_random(m16, seed=3)
    m16.to(torch.bfloat16)
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})  # the same bf16-valued weights
    if sparse:
        sparsify_for_inference(m16, value_dtype="bfloat16")
    _assert_bf16_engine_close(m16, m32)


def _assert_bf16_engine_close(m16, m32) -> DecodeEngine:
    """Decode 14 steps of a bf16 model with the engine; its logits must be about as close to the bf16 model's own
    forward as the float32 forward of the same (bf16-valued) weights ``m32`` is. Returns the engine."""
    from transformers import DynamicCache

    assert engine_problem(m16) is None
    seq = torch.randint(3, 160, (1, 20), generator=torch.Generator().manual_seed(1))
    ref16, ref32 = _reference_logits(m16, seq)[6:], _reference_logits(m32, seq)[6:]
    engine = DecodeEngine(m16, 32)
    assert engine.k_cache.dtype == engine.v_cache.dtype == torch.bfloat16  # half the bytes of a float32 cache
    with torch.inference_mode():
        engine.load_prompt_cache(m16(seq[:, :6], cache=DynamicCache(config=m16.config), use_cache=True).cache)
        got = torch.stack([engine.step(int(seq[0, t])) for t in range(6, 20)])
    scale = float(ref16.abs().max())
    err, err32 = float((got - ref16).abs().max()) / scale, float((ref32 - ref16).abs().max()) / scale
    assert err <= max(2 * err32, 2e-3) and err < 0.02, (err, err32)
    assert bool((got.argmax(-1) == ref16.argmax(-1)).float().mean() >= 0.9)
    assert torch.equal(got, got.bfloat16().float())  # the logits are bf16 values, as the model's
    return engine


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_bf16_dense_rows_of_any_width_and_the_head_in_place(isa, monkeypatch):
    """Dense bf16 layers whose widths are not multiples of 32 or 64 (hidden 72, MLP 144: the masked tail of the
    AVX512-BF16 dense row loop, the 8-input tail of the AVX2 float32-input one) against the bf16 model's forward;
    the engine multiplies them and the LM head in place, with the AVX512-BF16 loop where it runs, else with the
    float32-input loop on the widened weights."""
    from losa.inference import kernel as _kernel

    if isa == "avx2":
        if _kernel._cpu_isa() < 1:
            pytest.skip("the CPU has no AVX2")
        monkeypatch.setenv("LOSA_SPARSE_ISA", "avx2")
    m16 = make_tiny_model("llama", hidden=72, vocab=160, seed=5).to(torch.bfloat16)
    m32 = make_tiny_model("llama", hidden=72, vocab=160, seed=5)
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})
    _assert_bf16_engine_close(m16, m32)
    if set_lm_head_dtype(m16, "bfloat16"):  # the head as `losa generate` sets it there: multiplied in place
        assert m16.get_output_embeddings().in_place and _kernel.native_bf16()
        _assert_bf16_engine_close(m16, m32)
        m16.lm_head.float()  # an in-place head no longer in the model's dtype: named, not a crash
        assert "the LM head's weight is torch.float32" in engine_problem(m16)


def test_a_float16_model_is_not_decoded_by_the_engine():
    model = make_tiny_model("llama", hidden=64).to(torch.float16)
    assert "torch.float16" in engine_problem(model)


def test_engine_misuse_is_a_clear_error():
    from transformers import DynamicCache

    model = _model("llama", "bfloat16", seed=7)
    engine = DecodeEngine(model, 8)
    with pytest.raises(LosaError, match="load the prompt's cache first"):
        engine.step(5)
    ids = torch.randint(3, 160, (1, 10))
    with torch.inference_mode():
        cache = model(ids, cache=DynamicCache(config=model.config), use_cache=True).cache
        with pytest.raises(LosaError, match="10 positions, the engine's cache 8"):
            engine.load_prompt_cache(cache)
        engine.load_prompt_cache(model(ids[:, :7], cache=DynamicCache(config=model.config), use_cache=True).cache)
        engine.step(5)
        with pytest.raises(LosaError, match="cache of 8 positions is full"):
            engine.step(5)
    with pytest.raises(LosaError, match="without padding"), attach(model, engine), torch.inference_mode():
        model.generate(ids, attention_mask=torch.tensor([[0] + [1] * 9]), max_new_tokens=2, pad_token_id=0)
    assert "forward" not in vars(model)


def test_the_prompt_computes_only_the_last_positions_logits(monkeypatch):
    """generate still asks the prompt's forward for the last position only (logits_to_keep) with the engine on."""
    from losa.inference.decode import BF16LMHead

    model = _model("llama", "bfloat16", "bfloat16", seed=8)
    dec = LeanDecoder(model)
    rows = []
    real = BF16LMHead.forward  # counted on the class: a hook on the module would switch the engine off

    def counting(self, x):
        rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return real(self, x)

    monkeypatch.setattr(BF16LMHead, "forward", counting)
    with torch.inference_mode():
        dec.generate(torch.randint(3, 160, (1, 12)), 5, do_sample=False, pad_token_id=0)
    assert dec.last_engine == "on"
    assert rows == [1]  # the prompt's head ran on one row; the four engine steps never call the module


def test_cli_generate_says_whether_the_engine_decodes(tmp_path, capsys, monkeypatch):
    from conftest import make_tiny_tokenizer

    import losa
    from losa.cli import main

    model = make_tiny_model("llama", seed=9, hidden=64)
    prune_random(model)
    losa.save_checkpoint(model, make_tiny_tokenizer(), tmp_path / "m", {"recipe": {}})
    monkeypatch.setenv("LOSA_SPARSE_ISA", "avx2")  # float32 model on every CPU: the engine applies
    args = ["generate", str(tmp_path / "m"), "--prompt", "word5 word17", "--max-new-tokens", "4"]
    assert main(args) == 0
    on = capsys.readouterr()
    assert "decode engine: on; token loop: engine" in on.err  # status lines on stderr, the text alone on stdout
    assert main([*args, "--decode-engine", "off"]) == 0
    off = capsys.readouterr()
    assert "decode engine: off (asked)" in off.err
    assert on.out == off.out and on.out.strip()  # the same greedy text either way
    assert main([*args, "--dtype", "bfloat16"]) == 0
    assert "decode engine: on" in capsys.readouterr().err
    assert main([*args, "--dtype", "float16"]) == 0
    assert "decode engine: off (the model is torch.float16" in capsys.readouterr().err


def test_a_static_prompt_cache_loads_only_its_filled_positions():
    """A StaticCache holds max_cache_len slots; the engine takes the prompt's positions (get_seq_length)."""
    from transformers import StaticCache

    model = _model("llama", "bfloat16", "bfloat16", seed=10)
    seq = torch.randint(3, 160, (1, 10), generator=torch.Generator().manual_seed(10))
    ref = _reference_logits(model, seq)
    engine = DecodeEngine(model, 16)
    with torch.inference_mode():
        cache = StaticCache(config=model.config, max_cache_len=32)
        model(seq[:, :5], cache=cache, use_cache=True)
        assert cache.layers[0].keys.shape[2] == 32
        assert engine.load_prompt_cache(cache) == 5
        for t in range(5, 10):
            torch.testing.assert_close(engine.step(int(seq[0, t])), ref[t], rtol=1e-4,
                                       atol=1e-4 * float(ref[t].abs().max()))



def _greedy(dec, ids, n=8, **kw):
    with torch.inference_mode():
        return dec.generate(ids, n, **{"do_sample": False, "pad_token_id": 0, "eos_token_id": None, **kw})


@pytest.mark.parametrize("option", [dict(num_beams=2), dict(num_return_sequences=2, do_sample=True),
                                    dict(cache_implementation="static"), dict(use_cache=False),
                                    dict(return_dict_in_generate=True), dict(prompt_lookup_num_tokens=3),
                                    dict(output_hidden_states=True, return_dict_in_generate=True)],
                         ids=lambda o: ",".join(o))
def test_generate_options_the_engine_does_not_serve_fall_back(option):
    """Beams, several sequences, other caches, speculative decoding, returned caches: generate's own steps."""
    model = _model("llama", "bfloat16", "bfloat16", seed=11)
    on, off = LeanDecoder(model), LeanDecoder(model, decode_engine="off")
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    kw = option
    torch.manual_seed(0)
    ref = _greedy(off, ids, **kw)
    torch.manual_seed(0)
    got = _greedy(on, ids, **kw)
    ref_ids, got_ids = (ref.sequences, got.sequences) if hasattr(ref, "sequences") else (ref, got)
    assert torch.equal(got_ids, ref_ids)
    assert on.last_engine.startswith("off (") and "forward" not in vars(model)
    assert _greedy(on, ids).shape == (1, 16) and on.last_engine == "on"  # plain calls still use it


def test_a_padded_prompt_falls_back():
    model = _model("llama", "bfloat16", "bfloat16", seed=12)
    dec = LeanDecoder(model)
    ids = torch.tensor([[0, 0, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    ref = _greedy(LeanDecoder(model, decode_engine="off"), ids, attention_mask=mask)
    assert torch.equal(_greedy(dec, ids, attention_mask=mask), ref) and dec.last_engine == \
        "off (the attention mask has padding)"


def test_concurrent_generations_on_one_decoder_are_serialised():
    import threading

    model = _model("llama", "bfloat16", "bfloat16", seed=13)
    dec = LeanDecoder(model)
    prompts = [torch.randint(3, 160, (1, 4 + i), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    refs = [_greedy(LeanDecoder(model, decode_engine="off"), p, 12) for p in prompts]
    outs, errors = [None] * 4, []

    def run(i):
        try:
            outs[i] = _greedy(dec, prompts[i], 12)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(torch.equal(o, r) for o, r in zip(outs, refs))
    assert "forward" not in vars(model)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages: Linux")
def test_the_kv_cache_is_in_huge_page_memory_and_decodes_the_same(monkeypatch):
    """Every step reads the filled cache like a weight: the engine's KV cache sits in huge-page memory (the kernel's
    2 MiB-aligned buffers) when it is 2 MiB or more, in torch's memory with LOSA_HUGEPAGES=0, and both engines
    give the model's own logits."""
    from transformers import DynamicCache

    model = _model("llama", "bfloat16", "bfloat16", seed=3)
    cfg = model.config
    per_position = cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    max_len = -(-(2 << 20) // per_position) + 8  # a float32 cache of just over 2 MiB
    monkeypatch.setenv("LOSA_HUGEPAGES", "0")
    plain = DecodeEngine(model, max_len)
    monkeypatch.setenv("LOSA_HUGEPAGES", "1")
    huge = DecodeEngine(model, max_len)
    assert huge.k_cache.nbytes >= 2 << 20
    assert huge.k_cache.data_ptr() % (2 << 20) == 0 and huge.v_cache.data_ptr() % (2 << 20) == 0
    assert not huge.k_cache.any() and not huge.v_cache.any()
    if not os.environ.get("THP_MEM_ALLOC_ENABLE"):  # (torch's own allocator would align to 2 MiB then)
        assert plain.k_cache.data_ptr() % (2 << 20) != 0
    seq = torch.randint(3, 160, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = _reference_logits(model, seq)
    with torch.inference_mode():
        for engine in (plain, huge):
            out = model(seq[:, :5], cache=DynamicCache(config=cfg), use_cache=True)
            engine.load_prompt_cache(out.cache)
            for t in range(5, 12):
                torch.testing.assert_close(engine.step(int(seq[0, t])), ref[t], rtol=1e-4,
                                           atol=1e-4 * float(ref[t].abs().max()))
    assert torch.equal(huge.k_cache, plain.k_cache) and torch.equal(huge.v_cache, plain.v_cache)


def test_an_engine_built_in_inference_mode_works_outside_it():
    model = _model("llama", "bfloat16", "bfloat16", seed=14)
    dec = LeanDecoder(model)
    ids = torch.randint(3, 160, (1, 5))
    inside = _greedy(dec, ids)  # builds the engine under inference_mode
    with torch.no_grad():
        outside = dec.generate(ids, 8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(inside, outside) and dec.last_engine == "on"


def test_a_changed_model_is_checked_again():
    model = _model("llama", None, seed=15)
    dec = LeanDecoder(model)
    ids = torch.randint(3, 160, (1, 5))
    _greedy(dec, ids)
    assert dec._engine.k_cache.dtype == torch.float32
    model.to(torch.bfloat16)
    ref = _greedy(LeanDecoder(model, decode_engine="off"), ids)
    got = _greedy(dec, ids)
    assert dec.last_engine == "on" and dec._engine.k_cache.dtype == torch.bfloat16  # rebuilt for the bf16 model
    assert got.shape == ref.shape
    handle = model.model.layers[0].mlp.register_forward_hook(lambda m, a, o: o)
    try:
        _greedy(dec, ids)
        assert dec.last_engine.startswith("off (") and "forward hooks" in dec.last_engine
    finally:
        handle.remove()
    _greedy(dec, ids)
    assert dec.last_engine == "on"  # the hook is gone: the engine is back


def test_sliding_window_bounds_the_engine():
    model = make_tiny_model("mistral", hidden=64, vocab=160, seed=16)
    model.config.sliding_window = 16
    dec, off = LeanDecoder(model), LeanDecoder(model, decode_engine="off")
    ids = torch.randint(3, 160, (1, 6), generator=torch.Generator().manual_seed(16))
    assert torch.equal(_greedy(dec, ids, 10), _greedy(off, ids, 10)) and dec.last_engine == "on"
    assert torch.equal(_greedy(dec, ids, 11), _greedy(off, ids, 11))
    assert dec.last_engine == "off (prompt + new tokens (17) exceed the sliding window (16))"
    with pytest.raises(LosaError, match="exceeds the model's sliding window"):
        DecodeEngine(model, 32)


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0},
                                  {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [3.0] * 8,
                                   "original_max_position_embeddings": 24}], ids=["dynamic", "longrope"])
def test_position_dependent_rope_matches_generate(rope):
    """Rope types whose frequencies follow the largest position seen: the engine's tables are per position,
    as generate's one-token steps compute them, and building them leaves the model's rotary module as it was."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(17)
    cfg = LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      rope_scaling=rope)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 160, (1, 10), generator=torch.Generator().manual_seed(17))
    ref = _greedy(LeanDecoder(model, decode_engine="off"), ids, 40)  # 50 positions: past 24 / the original 64 // 2
    dec = LeanDecoder(model)
    got = _greedy(dec, ids, 40)
    assert dec.last_engine == "on" and torch.equal(got, ref)
