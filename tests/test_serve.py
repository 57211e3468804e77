"""``losa serve``: the generation service against a hand-written greedy loop, request validation, HTTP."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from losa.serve import ChatRequest, CompletionRequest, GenerationService, RequestError, make_server
from losa.serve.schema import parse_request
from losa.serve.service import cut_at_stop

PROMPT = "word5 word17 word33 word8"


def greedy_ids(model, tok, text: str, n: int) -> list[int]:
    """Independent reference: argmax of the full forward, token by token, stopping at EOS."""
    ids = tok(text, return_tensors="pt").input_ids
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.fixture(scope="module")
def service():
    model = make_tiny_model("llama", seed=3)
    model.generation_config.eos_token_id = 2
    tok = make_tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return GenerationService(model, tok, "tiny", default_max_tokens=6)


def completion(svc, **kw):
    return svc.completion(parse_request(CompletionRequest, {"prompt": PROMPT, "temperature": 0, **kw}))


def test_greedy_completion_matches_reference(service):
    ref = greedy_ids(service.model, service.tok, PROMPT, 8)
    res = completion(service, max_tokens=8)
    choice = res["choices"][0]
    assert choice["text"] == service.tok.decode(ref, skip_special_tokens=True)
    n_prompt = len(service.tok(PROMPT).input_ids)
    assert res["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": len(ref),
                            "total_tokens": n_prompt + len(ref)}
    assert choice["finish_reason"] == ("stop" if ref[-1] == 2 else "length")
    assert res["object"] == "text_completion" and res["model"] == "tiny"


def test_default_max_tokens_is_16_for_completions(service):
    ref = greedy_ids(service.model, service.tok, PROMPT, 16)
    assert completion(service)["usage"]["completion_tokens"] == len(ref)


def test_stop_string_cuts_text_and_ends_early(service):
    full = completion(service, max_tokens=8)["choices"][0]["text"]
    words = full.split()
    stop = words[3]
    expected, hit = cut_at_stop(full, [stop])
    assert hit and not expected.endswith(stop)
    res = completion(service, max_tokens=8, stop=stop)
    assert res["choices"][0]["text"] == expected
    assert res["choices"][0]["finish_reason"] == "stop"
    # word-level tokens: generation ends with the token that completes the stop string's first occurrence
    first = next(j for j in range(len(words)) if stop in " ".join(words[:j + 1]))
    assert res["usage"]["completion_tokens"] == first + 1 < 8


def test_several_prompts_give_one_choice_each(service):
    res = service.completion(parse_request(CompletionRequest, {"prompt": [PROMPT, "word9"], "max_tokens": 3,
                                                               "temperature": 0}))
    assert [c["index"] for c in res["choices"]] == [0, 1]
    single = completion(service, prompt="word9", max_tokens=3)
    assert res["choices"][1]["text"] == single["choices"][0]["text"]


def test_seeded_sampling_is_reproducible(service):
    req = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.5, "seed": 11}
    a = service.completion(parse_request(CompletionRequest, req))["choices"][0]["text"]
    b = service.completion(parse_request(CompletionRequest, req))["choices"][0]["text"]
    assert a == b


def test_chat_uses_template_and_default_max_tokens(service):
    res = service.chat(parse_request(ChatRequest, {"messages": [{"role": "user", "content": "word5 word17"}],
                                                   "temperature": 0}))
    # the template renders "word5 word17 "; the tokenizer adds no special tokens to it
    ids = service.tok("word5 word17 ", return_tensors="pt", add_special_tokens=False).input_ids
    ref = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(service.model(ids).logits[0, -1].argmax())
            ref.append(nxt)
            if nxt == 2:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert res["choices"][0]["message"] == {"role": "assistant",
                                            "content": service.tok.decode(ref, skip_special_tokens=True)}
    assert res["usage"]["completion_tokens"] == len(ref)


def test_stream_concatenates_to_the_same_text(service):
    req = parse_request(CompletionRequest, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True})
    chunks = list(service.completion_chunks(req))
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert streamed == completion(service, max_tokens=8)["choices"][0]["text"]


def test_stream_with_stop_string(service):
    full = completion(service, max_tokens=8)["choices"][0]["text"]
    stop = full.split()[2]
    req = parse_request(CompletionRequest, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stop": stop})
    chunks = list(service.completion_chunks(req))
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut_at_stop(full, [stop])[0]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "n": 2}, "n=2 is not supported"),
    ({"prompt": []}, "empty list"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "logprobs": 3}, "logprobs is not supported"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "up to 4"),
    ([1, 2], "JSON object"),
])
def test_bad_completion_requests(body, fragment):
    with pytest.raises(RequestError, match=fragment) as e:
        parse_request(CompletionRequest, body)
    assert e.value.status == 400 and "\n" not in str(e.value)


def test_bad_chat_requests(service):
    with pytest.raises(RequestError, match="messages"):
        parse_request(ChatRequest, {"messages": []})
    with pytest.raises(RequestError, match="role"):
        parse_request(ChatRequest, {"messages": [{"role": "robot", "content": "hi"}]})
    with pytest.raises(RequestError, match="image_url"):
        parse_request(ChatRequest, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    ok = parse_request(ChatRequest, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                              {"type": "text", "text": "b"}]}]})
    assert ok.messages[0].content == "ab"


def test_context_limit_and_missing_chat_template(service):
    with pytest.raises(RequestError, match="exceeds the model's context of 256 tokens"):
        completion(service, max_tokens=300)
    plain = GenerationService(service.model, make_tiny_tokenizer(), "plain")
    with pytest.raises(RequestError, match="no chat template"):
        plain.chat(parse_request(ChatRequest, {"messages": [{"role": "user", "content": "word1"}]}))


# ---------------------------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def server(service):
    srv = make_server(service, "127.0.0.1", 0, {"runtime": "dense"})
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def http(server, path: str, body: object | None = None, raw: bytes | None = None) -> tuple[int, bytes]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_http_routes(server, service):
    status, body = http(server, "/health")
    assert status == 200 and json.loads(body) == {"status": "ok", "model": "tiny", "runtime": "dense"}
    status, body = http(server, "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny"
    status, body = http(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0})
    assert status == 200
    assert json.loads(body)["choices"][0]["text"] == completion(service, max_tokens=5)["choices"][0]["text"]


def test_http_errors_are_json(server):
    cases = [("/v1/completions", None, b"{not json", 400, "not valid JSON"),
             ("/v1/completions", {"prompt": "x", "max_tokens": -1}, None, 400, "max_tokens"),
             ("/v1/completions", {"prompt": "x", "model": "other"}, None, 404, "not served here"),
             ("/v1/embeddings", {"input": "x"}, None, 404, "no route POST /v1/embeddings"),
             ("/nowhere", None, None, 404, "no route GET /nowhere")]
    for path, body, raw, code, fragment in cases:
        status, out = http(server, path, body, raw)
        err = json.loads(out)["error"]
        assert status == code and fragment in err["message"] and err["code"] == code, (path, out)


def test_http_stream_is_server_sent_events(server, service):
    status, body = http(server, "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "word5 word17"}], "max_tokens": 5,
                         "temperature": 0, "stream": True})
    events = [line.removeprefix("data: ") for line in body.decode().split("\n\n") if line]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    ref = service.chat(parse_request(ChatRequest, {"messages": [{"role": "user", "content": "word5 word17"}],
                                                   "max_tokens": 5, "temperature": 0}))
    assert text == ref["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == ref["choices"][0]["finish_reason"]
    # a request error in stream mode is still a plain 400, not an event stream
    status, out = http(server, "/v1/completions", {"prompt": "x", "max_tokens": 999, "stream": True})
    assert status == 400 and "context" in json.loads(out)["error"]["message"]


def test_http_stream_error_after_the_first_prompt_is_an_event(server):
    """The 200 is already sent when the second prompt turns out too long: an error event, then [DONE]."""
    long_prompt = " ".join(["word9"] * 300)
    status, body = http(server, "/v1/completions", {"prompt": ["word5", long_prompt], "max_tokens": 3,
                                                    "temperature": 0, "stream": True})
    events = [line.removeprefix("data: ") for line in body.decode().split("\n\n") if line]
    assert status == 200 and events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == 400 and "exceeds the model's context" in err["message"]
    assert all(json.loads(e)["choices"][0]["index"] == 0 for e in events[:-2])


def test_cli_serve_builds_a_sparse_server(tmp_path):
    """``losa serve`` on a 50 %-pruned checkpoint: sparse layers in /health, greedy text as the dense model's."""
    import losa
    from losa.cli import build_parser
    from losa.cli.serve import build_server

    model, tok = make_tiny_model("llama", seed=4, hidden=64), make_tiny_tokenizer()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layers" in name and p.dim() == 2:
                p[p.abs() < p.abs().median()] = 0  # 50 % magnitude
    losa.save_checkpoint(model, tok, tmp_path / "m", {"recipe": {}})
    dense = GenerationService(model, tok, "m")
    expected = completion(dense, max_tokens=6)["choices"][0]["text"]
    args = build_parser().parse_args(["serve", str(tmp_path / "m"), "--port", "0", "--model-name", "m"])
    srv = build_server(args)
    try:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        health = json.loads(http(srv, "/health")[1])
        assert health["runtime"] == "sparse" and health["sparse_layers"] == 14
        status, body = http(srv, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
        assert status == 200 and json.loads(body)["choices"][0]["text"] == expected
    finally:
        srv.shutdown()
        srv.server_close()


def test_cli_serve_errors(tmp_path, capsys):
    from losa.cli import main

    assert main(["serve", str(tmp_path / "missing"), "--port", "70000"]) == 2
    assert "is not a TCP port" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing"), "--max-tokens", "0"]) == 2
    assert "--max-tokens 0" in capsys.readouterr().err
