"""The decode engine's own token loop (losa.inference.engine_loop) against ``generate`` with the engine attached.

Both decode with the same engine, so the logits are the same; the reference is transformers' own loop (its
warpers, sampling, stopping criteria and streamer calls), run by ``LeanDecoder(token_loop="generate")``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, prune_random

from losa.errors import LosaError
from losa.inference import kernel_available, sparsify_for_inference
from losa.inference.decode import LeanDecoder, set_lm_head_dtype

pytestmark = [pytest.mark.skipif(not kernel_available(), reason="needs the compiled sparse kernel"),
              pytest.mark.usefixtures("no_measured_thresholds")]

VOCAB = 160


def _model(seed: int = 0, dtype: torch.dtype = torch.float32):
    model = make_tiny_model("llama", hidden=64, vocab=VOCAB, seed=seed).to(dtype)
    prune_random(model, seed=seed)
    sparsify_for_inference(model, value_dtype="bfloat16")
    set_lm_head_dtype(model, "bfloat16")  # a copy for a float32 head, in place for a bf16 one
    return model


def _both(model, ids, n, seed=0, **kw):
    """(the loop's ids, generate's ids) for one call, each after the same manual seed."""
    loop, gen = LeanDecoder(model), LeanDecoder(model, token_loop="generate")
    kw = {"pad_token_id": 0, "attention_mask": torch.ones_like(ids), **kw}
    with torch.inference_mode():
        torch.manual_seed(seed)
        got = loop.generate(ids, n, **kw)
        torch.manual_seed(seed)
        ref = gen.generate(ids, n, **kw)
    assert gen.last_loop == "generate (asked)" and gen.last_engine == "on"
    return got, ref, loop


def test_first_argmax_is_torch_argmax():
    from losa.inference import kernel

    k = kernel.load_kernel()
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(n, generator=g) for n in (1, 7, 8, 33, 1000, 49152)]
    tie = torch.zeros(100)
    tie[[17, 40, 99]] = 3.0  # the first of equal maxima
    nan = torch.randn(64, generator=g)
    nan[[9, 30]] = float("nan")  # the first NaN, whatever the maximum
    tail = torch.randn(37, generator=g)
    tail[35] = 9.0  # the maximum past the last full block of lanes
    tail_nan = torch.randn(37, generator=g)
    tail_nan[36] = float("nan")
    late = torch.full((49152,), -1.0)
    late[[40000, 49151]] = 2.0  # the first maximum in a late block
    cases += [tail, tail_nan, late, tie, torch.zeros(50), nan, torch.full((20,), float("-inf")),
              torch.tensor([float("nan")]),
              torch.tensor([1.0, float("inf"), float("inf"), 2.0]), torch.tensor([-5.0, float("-inf"), -7.0])]
    for x in cases:
        for isa in (0, 1):  # the portable loop and the SSE one
            assert k.first_argmax(x, isa) == int(torch.argmax(x)), (isa, x)
    rand = torch.Generator().manual_seed(1)  # short vectors of few distinct values, NaN, +-inf and +-0: brute force
    pool = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0, 1.0, 2.0, 3.0])
    for t in range(2000):
        n = int(torch.randint(1, 40, (1,), generator=rand))
        x = pool[torch.randint(0, 7, (n,), generator=rand)]
        if t % 2:  # half of them with a NaN somewhere
            x[int(torch.randint(0, n, (1,), generator=rand))] = float("nan")
        assert k.first_argmax(x, 0) == k.first_argmax(x, 1) == int(torch.argmax(x)), x
    with pytest.raises(RuntimeError, match="contiguous 1-D float32"):
        k.first_argmax(torch.zeros(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-model", "bf16-model"])
@pytest.mark.parametrize("options", [dict(do_sample=False), dict(do_sample=True),
                                     dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=0),
                                     dict(do_sample=True, temperature=1.5, top_k=5),
                                     dict(do_sample=False, temperature=0.3, top_p=0.5)],
                         ids=["greedy", "sampled-defaults", "temperature-top-p", "temperature-top-k",
                              "greedy-ignores-sampling-options"])
def test_the_loop_generates_what_generate_does(options, dtype):
    from losa.inference import kernel

    if dtype == torch.bfloat16 and not kernel.native_bf16():
        pytest.skip("a bf16 model's engine needs AVX512-BF16 for the in-place head here")
    model = _model(seed=1, dtype=dtype)
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    for seed in range(3):
        got, ref, loop = _both(model, ids, 20, seed=seed, eos_token_id=None, **options)
        assert loop.last_loop == "engine" and loop.last_engine == "on"
        assert got.shape == (1, 26) and torch.equal(got, ref)


@pytest.mark.parametrize("as_list", [False, True], ids=["eos-id", "eos-list"])
def test_the_loop_stops_after_an_end_of_sequence_token_as_generate_does(as_list):
    model = _model(seed=2)
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    free, _, _ = _both(model, ids, 16, eos_token_id=None, do_sample=False)
    eos = int(free[0, 5 + 3])  # the fourth new token ends the sequence (or an earlier copy of it)
    got, ref, loop = _both(model, ids, 16, eos_token_id=[1, eos] if as_list else eos, do_sample=False)
    assert loop.last_loop == "engine" and torch.equal(got, ref)
    assert got.shape[1] <= 5 + 4 and int(got[0, -1]) == eos and eos not in got[0, 5:-1].tolist()


@pytest.mark.parametrize("stop_at,length", [(11, 11), (None, 9)], ids=["criterion-stops", "max-new-tokens-stop"])
def test_stopping_criteria_and_streamers_see_what_generate_shows_them(stop_at, length):
    """Every criterion call (its ids and scores) and every streamer call, in one log, in generate's order."""
    from transformers import StoppingCriteria
    from transformers.generation.streamers import BaseStreamer

    class Watch(StoppingCriteria):
        def __init__(self, log):
            self.log = log

        def __call__(self, input_ids, scores, **kwargs):
            self.log.append(("criterion", tuple(input_ids[0].tolist()), scores))
            return torch.full((1,), stop_at is not None and input_ids.shape[1] >= stop_at, dtype=torch.bool)

    class Recorder(BaseStreamer):
        def __init__(self, log):
            self.log = log

        def put(self, value):
            self.log.append(("put", value.tolist()))

        def end(self):
            self.log.append(("end",))

    model = _model(seed=3)
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    runs = []
    for loop in ("auto", "generate"):
        log = []
        dec = LeanDecoder(model, token_loop=loop)
        with torch.inference_mode():
            torch.manual_seed(0)
            out = dec.generate(ids, 4 if stop_at is None else 20, do_sample=True, pad_token_id=0, eos_token_id=None,
                               stopping_criteria=[Watch(log)], streamer=Recorder(log),
                               attention_mask=torch.ones_like(ids))
        runs.append((out, log, dec.last_loop))
    (got, log, which), (ref, ref_log, _) = runs
    assert which == "engine" and torch.equal(got, ref) and got.shape == (1, length)
    assert log == ref_log and log[0] == ("put", [ids[0].tolist()]) and log[-1] == ("end",)
    assert [e[0] for e in log[1:-1]] == ["criterion", "put"] * (length - 5)  # each token: criteria, then streamer


@pytest.mark.parametrize("option,reason,changes", [
    (dict(repetition_penalty=0.05), "generate option repetition_penalty=0.05", True),  # favours the prompt's tokens
    (dict(no_repeat_ngram_size=2), "generate option no_repeat_ngram_size=2", False),
    (dict(min_new_tokens=4, eos_token_id=7), "generate option min_new_tokens=4", False),
    (dict(do_sample=True, min_p=0.1), "generate option min_p=0.1", False),
    (dict(suppress_tokens=[5, 6]), "generate option suppress_tokens=[5, 6]", False),
    (dict(forced_eos_token_id=0), "generate option forced_eos_token_id=0", True),  # token 0 is not "unset"
    (dict(max_time=0.0), "generate option max_time=0.0", True),  # generate stops after the first token
    (dict(tokenizer=None), "generate option tokenizer", False),
], ids=["repetition-penalty", "no-repeat-ngram", "min-new-tokens", "min-p", "suppress-tokens", "forced-eos-0",
        "max-time-0", "extra-argument"])
def test_options_the_loop_does_not_serve_run_generates_loop(option, reason, changes):
    model = _model(seed=4)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    got, ref, loop = _both(model, ids, 10, **{"eos_token_id": None, "do_sample": False, **option})
    assert loop.last_engine == "on" and loop.last_loop == f"generate ({reason})"
    assert torch.equal(got, ref)
    if changes:  # the option reached generate: the tokens differ from the plain call's (which the loop serves)
        plain, _, plain_loop = _both(model, ids, 10, eos_token_id=None, do_sample=False)
        assert plain_loop.last_loop == "engine" and not torch.equal(got, plain)


def test_options_equal_to_their_defaults_are_served():
    """An integer 1 is the default 1.0 (a generation_config.json may write it so): still the loop's call."""
    model = _model(seed=11)
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(11))
    got, ref, loop = _both(model, ids, 6, eos_token_id=None, do_sample=False, repetition_penalty=1,
                           length_penalty=1, diversity_penalty=0)
    assert loop.last_loop == "engine" and torch.equal(got, ref)


def test_a_stopping_criterion_of_generates_own_type_replaces_generates():
    """generate uses a caller's EosTokenCriteria instead of its own (so it stops only at the caller's ids)."""
    from transformers.generation.stopping_criteria import EosTokenCriteria

    model = _model(seed=7)
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(7))
    free, _, _ = _both(model, ids, 12, eos_token_id=None, do_sample=False)
    config_eos, caller_eos = int(free[0, 5 + 1]), int(free[0, 5 + 6])
    got, ref, loop = _both(model, ids, 12, eos_token_id=config_eos, do_sample=False,
                           stopping_criteria=[EosTokenCriteria(eos_token_id=caller_eos)])
    assert loop.last_loop == "generate (a stopping criterion of generate's own type EosTokenCriteria)"
    assert torch.equal(got, ref)


def test_a_prompt_with_the_pad_token_and_no_mask_is_left_to_generate():
    """generate infers padding from the pad token when no mask is given (the engine then refuses the padded
    prompt, as before the loop); without a pad token in the prompt the loop runs."""
    model = _model(seed=8)
    dec, gen = LeanDecoder(model), LeanDecoder(model, token_loop="generate")
    padded = torch.tensor([[0, 0, 9, 10, 11]])
    with torch.inference_mode(), pytest.raises(LosaError, match="without padding"):
        dec.generate(padded, 4, pad_token_id=0, eos_token_id=None, do_sample=False)
    assert dec.last_loop == "generate (the prompt holds the pad token and no attention mask says whether it is padding)"
    plain = torch.tensor([[8, 9, 10, 11]])
    with torch.inference_mode():
        got = dec.generate(plain, 4, pad_token_id=0, eos_token_id=None, do_sample=False)
        ref = gen.generate(plain, 4, pad_token_id=0, eos_token_id=None, do_sample=False)
    assert dec.last_loop == "engine" and torch.equal(got, ref)


def test_the_loop_keeps_no_autograd_graph():
    """Outside inference mode (direct API use) the prompt's graph must not stay alive in the engine's cache (a dense
    model: its linears record autograd, the sparse kernels' outputs do not)."""
    model = make_tiny_model("llama", hidden=64, vocab=VOCAB, seed=9)
    assert any(p.requires_grad for p in model.parameters())
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(9))
    dec = LeanDecoder(model)
    ref = LeanDecoder(model, token_loop="generate").generate(ids, 6, pad_token_id=0, eos_token_id=None,
                                                             do_sample=False, attention_mask=torch.ones_like(ids))
    got = dec.generate(ids, 6, pad_token_id=0, eos_token_id=None, do_sample=False, attention_mask=torch.ones_like(ids))
    assert dec.last_loop == "engine" and torch.equal(got, ref) and not got.requires_grad
    assert dec._engine.k_cache.grad_fn is None and not dec._engine.k_cache.requires_grad


def test_the_models_own_generation_config_counts_and_a_custom_processor_is_not_skipped():
    from transformers import LogitsProcessor

    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.index_fill(1, torch.arange(VOCAB // 2), float("-inf"))

    model = _model(seed=5)
    ids = torch.tensor([[9, 8, 7, 6]])
    got, ref, loop = _both(model, ids, 8, eos_token_id=None, do_sample=False, logits_processor=[Ban()])
    assert loop.last_loop == "generate (generate option logits_processor)" and torch.equal(got, ref)
    assert (got[0, 4:] >= VOCAB // 2).all()
    model.generation_config.repetition_penalty = 2.0
    got, ref, loop = _both(model, ids, 8, eos_token_id=None, do_sample=False)
    assert loop.last_loop == "generate (generate option repetition_penalty=2.0)" and torch.equal(got, ref)


def test_an_unknown_token_loop_is_a_clear_error():
    with pytest.raises(LosaError, match="token loop 'fast' is not supported; use one of auto, generate"):
        LeanDecoder(_model(seed=6), token_loop="fast")


def test_a_transformers_without_the_option_merge_runs_generates_loop(monkeypatch):
    """transformers >= 4.56 is allowed; where its private option merge is missing or differs, the loop steps aside."""
    from losa.inference import engine_loop

    def older(model, options):
        raise TypeError("update() got an unexpected keyword argument 'defaults_only'")

    model = _model(seed=10)
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(10))
    dec = LeanDecoder(model)
    kw = dict(pad_token_id=0, eos_token_id=None, do_sample=False, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        ref = dec.generate(ids, 6, **kw)
        assert dec.last_loop == "engine"
        monkeypatch.setattr(engine_loop, "_merged_options", older)
        got = dec.generate(ids, 6, **kw)
    assert dec.last_loop == "generate (transformers' generation options could not be read (TypeError))"
    assert torch.equal(got, ref)
