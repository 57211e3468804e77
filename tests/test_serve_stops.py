"""Stop strings made of multi-byte characters (issue 16.2).

With byte-level BPE or SentencePiece byte fallback, a CJK character is three tokens that decode to U+FFFD
until the last arrives. The old criterion decoded only the last ``len(stop) + 1`` tokens, which never
hold a two-character CJK stop string (six tokens), so generation ran on to ``max_tokens`` and the stop
was only cut from the text afterwards. Here the tokenizers are built offline with one token per byte and
the tiny model's greedy output is forced to a script, so the token that completes the stop is known.
"""

from __future__ import annotations

import pytest
from conftest import make_tiny_model

from losa.serve import CompletionRequest, GenerationService
from losa.serve.schema import parse_request
from losa.serve.stops import IncrementalDecoder

PROMPT = "Q?"
SCRIPT = "答：你好世界！再见世界。" * 3  # what the forced model generates after PROMPT
STOP = "世界"
BEFORE_STOP = "答：你好"
#: tokens up to and including the one that completes STOP: one per UTF-8 byte of "答：你好世界"
TOKENS_TO_STOP = len((BEFORE_STOP + STOP).encode())  # 18


def byte_level_tokenizer():
    """GPT-2 style byte-level BPE without merges: one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: 3 + i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def byte_fallback_tokenizer():
    """SentencePiece style BPE with byte fallback and no characters: every character becomes <0xNN> tokens."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"<0x{b:02X}>": 4 + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


TOKENIZERS = {"byte_level": byte_level_tokenizer, "byte_fallback": byte_fallback_tokenizer}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def forced(request):
    """A service whose greedy continuation of PROMPT is SCRIPT, token by token (then EOS)."""
    tok = TOKENIZERS[request.param]()
    script = tok(SCRIPT, add_special_tokens=False).input_ids
    assert len(script) == len(SCRIPT.encode())  # one token per byte: CJK characters are split
    n_prompt = len(tok(PROMPT).input_ids)
    model = make_tiny_model("llama", seed=1, vocab=260)
    model.generation_config.eos_token_id = 2

    def force(module, args, kwargs, out):  # a hand-made logits processor: the script wins by far
        step = int(kwargs["position_ids"][0, -1]) + 1 - n_prompt  # index of the token being predicted
        out.logits[0, -1, script[step] if step < len(script) else 2] += 1e4

    model.register_forward_hook(force, with_kwargs=True)
    return GenerationService(model, tok, "forced")


def test_the_forced_model_generates_the_script(forced):
    res = forced.completion(parse_request(CompletionRequest, {"prompt": PROMPT, "max_tokens": 40, "temperature": 0}))
    # 40 bytes: 13 characters and the first byte of the 14th, which can only show as U+FFFD
    assert res["choices"][0]["text"] == SCRIPT[:13] + "\ufffd"
    assert res["usage"]["completion_tokens"] == 40 and res["choices"][0]["finish_reason"] == "length"


def test_cjk_stop_string_stops_at_the_completing_token(forced):
    req = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stop": STOP}
    res = forced.completion(parse_request(CompletionRequest, req))
    choice = res["choices"][0]
    assert choice["text"] == BEFORE_STOP and choice["finish_reason"] == "stop"
    assert res["usage"]["completion_tokens"] == TOKENS_TO_STOP == 18  # was 40 (max_tokens)


def test_cjk_stop_string_in_a_stream(forced):
    req = parse_request(CompletionRequest, {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stop": [STOP],
                                            "stream": True, "stream_options": {"include_usage": True}})
    chunks = list(forced.completion_chunks(req))
    pieces = [c["choices"][0]["text"] for c in chunks[:-1]]
    assert "".join(pieces) == BEFORE_STOP and all("\ufffd" not in p for p in pieces)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == TOKENS_TO_STOP


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_incremental_decoder_waits_for_whole_characters(name):
    tok = TOKENIZERS[name]()
    text = "a 你好, x世界!"
    dec = IncrementalDecoder(tok)
    pieces = [dec.add([i]) for i in tok(text, add_special_tokens=False).input_ids]
    assert "".join(pieces) == dec.text == text and dec.flush() == ""
    # a CJK character's first two byte tokens give nothing, the third gives the character
    assert pieces[2:5] == ["", "", "你"]
    # an incomplete character at the end comes out (as the tokenizer decodes it: U+FFFD) only when flushed
    half = tok("界", add_special_tokens=False).input_ids[:2]
    dec = IncrementalDecoder(tok)
    assert dec.add(half) == ""
    tail = dec.flush()
    assert tail == tok.decode(half) and set(tail) == {"\ufffd"}
    # byte fallback replaces a whole run of byte tokens that ends in a split character: not the finished ones
    dec = IncrementalDecoder(tok)
    ids = tok("你好世", add_special_tokens=False).input_ids
    assert "".join(dec.add([i]) for i in ids[:7]) == "你好" and dec.flush() == "\ufffd"
