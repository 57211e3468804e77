"""``losa serve``: the generation service against a hand-written greedy loop, request validation, the
FastAPI app on an in-process uvicorn (limits, API key, errors, streaming) and the CLI's own errors."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import anyio
import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from losa.serve import (
    ChatRequest,
    CompletionRequest,
    GenerationService,
    RequestError,
    RequestTimeout,
    ServeSettings,
    make_server,
)
from losa.serve.limits import Deadline, Gate
from losa.serve.schema import parse_request
from losa.serve.stops import cut_at_stop

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
    # and it really samples: a fall-back to greedy would give one text for every seed, the greedy one
    greedy = service.completion(parse_request(CompletionRequest, {**req, "temperature": 0}))["choices"][0]["text"]
    texts = {service.completion(parse_request(CompletionRequest, {**req, "seed": s}))["choices"][0]["text"]
             for s in range(8)}
    assert len(texts) >= 4 and texts != {greedy}


@pytest.mark.parametrize("temperature", [0, 1.5], ids=["greedy", "sampled"])
def test_the_engines_token_loop_answers_as_generates_loop(service, temperature):
    """Requests run the decode engine's own token loop (with the server's stop watch as a stopping criterion);
    generate's loop around the same engine gives the same completion for the same seed."""
    req = {"prompt": PROMPT, "max_tokens": 10, "temperature": temperature, "seed": 5}
    free = service.completion(parse_request(CompletionRequest, req))["choices"][0]["text"].split()
    req["stop"] = free[2]  # a word of this very completion: the server's stop watch ends the loop there
    res = service.completion(parse_request(CompletionRequest, req))
    got = res["choices"][0]
    assert got["finish_reason"] == "stop" and res["usage"]["completion_tokens"] < 10
    assert service.decoder.last_engine == "on" and service.decoder.last_loop == "engine"
    service.decoder.token_loop = "generate"
    try:
        ref_res = service.completion(parse_request(CompletionRequest, req))
        assert service.decoder.last_loop == "generate (asked)"
    finally:
        service.decoder.token_loop = "auto"
    assert got == ref_res["choices"][0] and res["usage"] == ref_res["usage"]


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
    ({"prompt": [504, 3575]}, r"invalid request: prompt: token-id prompts are not supported; send the prompt as text"),
    ({"prompt": [[504, 3575], [7]]}, "token-id prompts are not supported"),
    ({"prompt": ["a", 3]}, r"invalid request: prompt: give the prompt as a string or a list of strings$"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "logprobs": 3}, "logprobs is not supported"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "up to 4"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 'stream_options.include_usage needs "stream": true'),
    ([1, 2], "JSON object"),
])
def test_bad_completion_requests(body, fragment):
    with pytest.raises(RequestError, match=fragment) as e:
        parse_request(CompletionRequest, body)
    assert e.value.status == 400 and "\n" not in str(e.value) and ": body:" not in str(e.value)


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
    with pytest.raises(RequestError, match="prompt 1 is empty after tokenization"):
        completion(service, prompt=["word1", ""])
    plain = GenerationService(service.model, make_tiny_tokenizer(), "plain")
    with pytest.raises(RequestError, match="no chat template"):
        plain.chat(parse_request(ChatRequest, {"messages": [{"role": "user", "content": "word1"}]}))


# ---------------------------------------------------------------------------------------------- HTTP
@contextlib.contextmanager
def running(service, settings: ServeSettings | None = None, info: dict | None = None):
    """The app on uvicorn in a thread, on a free port; always stopped at the end."""
    srv = make_server(service, "127.0.0.1", 0, info, settings)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        end = time.monotonic() + 10
        while not srv.started:
            assert t.is_alive() and time.monotonic() < end, "the server did not start"
            time.sleep(0.01)
        yield srv
    finally:
        srv.shutdown()
        t.join(10)
        srv.server_close()


@pytest.fixture(scope="module")
def server(service):
    with running(service, info={"runtime": "dense"}) as srv:
        yield srv


def http(server, path: str, body: object | None = None, raw: bytes | None = None,
         headers: dict | None = None) -> tuple[int, bytes]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(server.url + path, data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def events_of(body: bytes) -> list[str]:
    return [line.removeprefix("data: ") for line in body.decode().split("\n\n") if line]


def error_of(status: int, body: bytes, code: int) -> dict:
    """The error object of an answer that must be a JSON error with status ``code``."""
    err = json.loads(body)["error"]
    assert status == code and err["code"] == code, (status, body)
    assert isinstance(err["message"], str) and "\n" not in err["message"] and err["type"]
    return err


@contextlib.contextmanager
def slowed(model, delay: float, fail_at: int | None = None):
    """Each forward of ``model`` sleeps ``delay`` s (and the ``fail_at``-th raises); yields the call log."""
    calls: list[float] = []

    def hook(module, args, output):
        calls.append(time.monotonic())
        if fail_at is not None and len(calls) == fail_at:
            raise RuntimeError("boom")
        time.sleep(delay)

    handle = model.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def test_http_routes(server, service):
    status, body = http(server, "/health")
    assert status == 200 and json.loads(body) == {"status": "ok", "model": "tiny", "runtime": "dense"}
    status, body = http(server, "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny"
    status, body = http(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0})
    assert status == 200
    ref = greedy_ids(service.model, service.tok, PROMPT, 5)
    assert json.loads(body)["choices"][0]["text"] == service.tok.decode(ref, skip_special_tokens=True)
    # curl -d sends a form Content-Type: the body is read as JSON all the same
    status, body = http(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0},
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and json.loads(body)["choices"][0]["text"] == service.tok.decode(ref, skip_special_tokens=True)


def test_http_errors_are_json(server):
    cases = [("/v1/completions", None, b"{not json", 400, "not valid JSON"),
             ("/v1/completions", {"prompt": "x", "max_tokens": -1}, None, 400, "max_tokens"),
             ("/v1/completions", {"prompt": "x", "model": "other"}, None, 404, "not served here"),
             ("/v1/embeddings", {"input": "x"}, None, 404, "no route POST /v1/embeddings"),
             ("/nowhere", None, None, 404, "no route GET /nowhere"),
             ("/v1/completions", None, None, 405, "GET /v1/completions is not allowed")]
    for path, body, raw, code, fragment in cases:
        status, out = http(server, path, body, raw)
        assert fragment in error_of(status, out, code)["message"], (path, out)


def test_http_stream_is_server_sent_events(server, service):
    status, body = http(server, "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "word5 word17"}], "max_tokens": 5,
                         "temperature": 0, "stream": True})
    events = events_of(body)
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    ref = service.chat(parse_request(ChatRequest, {"messages": [{"role": "user", "content": "word5 word17"}],
                                                   "max_tokens": 5, "temperature": 0}))
    assert text == ref["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == ref["choices"][0]["finish_reason"]
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage


def test_context_overflow_is_400_before_any_stream(server):
    """Issue 16.3: a chat stream used to answer 200 (role chunk) and fail inside; every prompt is checked."""
    long_text = " ".join(["word9"] * 300)
    cases = [("/v1/chat/completions", {"messages": [{"role": "user", "content": long_text}]}),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word5"}], "max_tokens": 999}),
             ("/v1/completions", {"prompt": ["word5", long_text], "max_tokens": 3}),
             ("/v1/completions", {"prompt": "x", "max_tokens": 999})]
    for path, body in cases:
        status, out = http(server, path, {**body, "stream": True, "temperature": 0})
        assert "exceeds the model's context of 256 tokens" in error_of(status, out, 400)["message"], out
    status, out = http(server, "/v1/completions", {"prompt": ["word5", long_text], "max_tokens": 3})
    assert "prompt 1 (300 tokens)" in error_of(status, out, 400)["message"]


def test_stream_failure_after_the_start_is_an_error_event(server, service):
    """The 200 is out when generation fails at the 3rd token: content, an error event, then [DONE]."""
    with slowed(service.model, 0.0, fail_at=3):
        status, body = http(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                                        "stream": True})
    events = events_of(body)
    assert status == 200 and events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == 500 and err["message"] == "generation failed: RuntimeError: boom"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2])
    assert text == service.tok.decode(greedy_ids(service.model, service.tok, PROMPT, 2))
    with slowed(service.model, 0.0, fail_at=1):  # not streamed: a plain 500
        status, body = http(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8})
    assert error_of(status, body, 500)["message"] == "generation failed: RuntimeError: boom"


def test_include_usage_ends_the_stream_with_a_usage_chunk(server, service):
    """Issue 16.6: as the OpenAI API, a last chunk with empty choices and the usage, before [DONE]."""
    ref = greedy_ids(service.model, service.tok, PROMPT, 6)
    n_prompt = len(service.tok(PROMPT).input_ids)
    for path, body in [("/v1/completions", {"prompt": PROMPT}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]})]:
        status, out = http(server, path, {**body, "max_tokens": 6, "temperature": 0, "stream": True,
                                          "stream_options": {"include_usage": True}})
        events = events_of(out)
        assert status == 200 and events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        # the chat template renders PROMPT + " "; the word-level tokenizer gives the same tokens
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
            "prompt_tokens": n_prompt, "completion_tokens": len(ref), "total_tokens": n_prompt + len(ref)}
        assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks[:-1])


def test_null_fields_take_their_defaults(server, service):
    """Issue 16.4: OpenAI's clients send null for unset fields; ``temperature: null`` used to be a 400."""
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stream", "max_tokens", "stop", "stream_options", "seed",
                           "logprobs", "echo", "user", "best_of", "max_completion_tokens"])
    with_nulls = parse_request(CompletionRequest, {"prompt": PROMPT, **nulls})
    assert with_nulls == parse_request(CompletionRequest, {"prompt": PROMPT})
    assert (with_nulls.temperature, with_nulls.top_p, with_nulls.n, with_nulls.stream) == (1.0, 1.0, 1, False)
    chat = parse_request(ChatRequest, {"messages": [{"role": "user", "content": "a"},
                                                    {"role": "assistant", "content": None}],
                                       "stream_options": {"include_usage": None}, "temperature": None})
    assert chat.messages[1].content == "" and not chat.include_usage
    # over HTTP: the null fields change nothing (seeded sampling at the default temperature, 16 tokens)
    plain = {"prompt": PROMPT, "seed": 5}
    status, a = http(server, "/v1/completions", {**plain, **{k: None for k in nulls if k != "seed"}})
    status_b, b = http(server, "/v1/completions", plain)
    assert status == status_b == 200
    assert json.loads(a)["choices"] == json.loads(b)["choices"]
    assert json.loads(a)["usage"]["completion_tokens"] == json.loads(b)["usage"]["completion_tokens"]


def test_chat_template_exception_is_a_400(service):
    """Issue 16.5: a template's raise_exception (roles must alternate) is the client's error, not a 500."""
    tok = make_tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
                         "{% endif %}{{ m['content'] }} {% endfor %}")
    strict = GenerationService(service.model, tok, "strict", default_max_tokens=3)
    with running(strict) as srv:
        two_users = [{"role": "user", "content": "word5"}, {"role": "user", "content": "word6"}]
        status, body = http(srv, "/v1/chat/completions", {"messages": two_users, "stream": True})
        assert error_of(status, body, 400)["message"] == ("the chat template refused the conversation: "
                                                          "Conversation roles must alternate "
                                                          "user/assistant/user/assistant")
        ok = [{"role": "user", "content": "word5"}, {"role": "assistant", "content": "word6"},
              {"role": "user", "content": "word7"}]
        status, body = http(srv, "/v1/chat/completions", {"messages": ok, "temperature": 0})
        assert status == 200 and json.loads(body)["usage"]["prompt_tokens"] == 3


def test_api_key(service):
    """Issue 16.1: with a key, /v1/* wants ``Authorization: Bearer KEY`` (401 otherwise); /health stays open."""
    with running(service, ServeSettings(api_key="s3cret")) as srv:
        assert http(srv, "/health")[0] == 200
        body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0}
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "Bearer s3cret0"}]:
            for path, data in [("/v1/models", None), ("/v1/completions", body)]:
                status, out = http(srv, path, data, headers=headers)
                assert error_of(status, out, 401)["type"] == "authentication_error", (headers, path)
        good = {"Authorization": "Bearer s3cret"}
        assert http(srv, "/v1/models", headers=good)[0] == 200
        status, out = http(srv, "/v1/completions", body, headers=good)
        ref = greedy_ids(service.model, service.tok, PROMPT, 2)
        assert status == 200 and json.loads(out)["choices"][0]["text"] == service.tok.decode(ref)


def test_full_queue_answers_503_at_once(service):
    """Issue 16.1: one generates, ``max_queue`` wait, the next is refused while the first still runs."""
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    expected = service.tok.decode(greedy_ids(service.model, service.tok, PROMPT, 20), skip_special_tokens=True)
    with running(service, ServeSettings(max_queue=1)) as srv, slowed(service.model, 0.05) as calls:
        results: dict[str, tuple[int, bytes]] = {}
        first = threading.Thread(target=lambda: results.__setitem__("first", http(srv, "/v1/completions", body)))
        first.start()
        until = time.monotonic() + 10
        while not calls:  # the first is generating
            assert time.monotonic() < until
            time.sleep(0.005)
        second = threading.Thread(target=lambda: results.__setitem__("second", http(srv, "/v1/completions", body)))
        second.start()
        while srv.app.state.gate.waiting < 1:  # the second waits
            assert time.monotonic() < until
            time.sleep(0.005)
        for stream in (False, True):
            status, out = http(srv, "/v1/completions", {**body, "stream": stream})
            assert "busy" in error_of(status, out, 503)["message"]
        assert first.is_alive()  # refused while the first was still generating: at once
        first.join(30)
        second.join(30)
    for name in ("first", "second"):
        status, out = results[name]
        assert status == 200 and json.loads(out)["choices"][0]["text"] == expected, name


def test_request_timeout_ends_generation(service):
    """Issue 16.1: past --request-timeout, 504 (a stream: an error event) and the model is free again."""
    n_ref = len(greedy_ids(service.model, service.tok, PROMPT, 40))  # tokens it would generate in time
    assert n_ref >= 8
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    with running(service, ServeSettings(request_timeout=0.5)) as srv, slowed(service.model, 0.2) as calls:
        start = time.monotonic()
        status, out = http(srv, "/v1/completions", body)
        assert error_of(status, out, 504)["type"] == "timeout_error"
        assert time.monotonic() - start < 0.5 + 5 * 0.2 and len(calls) < n_ref
        n = len(calls)
        time.sleep(0.3)
        assert len(calls) == n  # generation has ended, not just the answer
        status, out = http(srv, "/v1/completions", {**body, "stream": True})
        events = events_of(out)
        assert status == 200 and events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] == 504 and "timeout while generating" in err["message"]
        pieces = [json.loads(e)["choices"][0]["text"] for e in events[:-2]]
        assert 0 < len(pieces) < n_ref
        status, out = http(srv, "/v1/completions", {**body, "max_tokens": 1})
        assert status == 200


@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_ends_generation(service, stream):
    """A client that hangs up (streamed or not) frees the model at the next token, not at the timeout."""
    import http.client

    n_ref = len(greedy_ids(service.model, service.tok, PROMPT, 40))  # forwards of a whole generation
    with running(service) as srv, slowed(service.model, 0.1) as calls:
        conn = http.client.HTTPConnection(*srv.socket.getsockname()[:2], timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 40, "temperature": 0,
                                                            "stream": stream}))
        if stream:
            assert conn.getresponse().status == 200  # the first chunk is out: generation runs
        else:
            while not calls:
                time.sleep(0.005)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        gate, end = srv.app.state.gate, time.monotonic() + 10
        while gate.busy:
            assert time.monotonic() < end
            time.sleep(0.01)
        n = len(calls)
        time.sleep(0.3)
        assert len(calls) == n < n_ref  # generation ended early and stays ended


def test_gate_queue_and_deadline():
    """The gate alone: a full queue is refused at once; waiting past the deadline is a timeout."""
    async def main() -> None:
        gate = Gate(max_queue=1)
        holding, release = anyio.Event(), anyio.Event()
        order: list[str] = []

        async def hold() -> None:
            async with gate.slot(Deadline(None)):
                holding.set()
                await release.wait()
                order.append("first")

        async def wait_turn() -> None:
            async with gate.slot(Deadline(None)):
                order.append("second")

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await holding.wait()
            tg.start_soon(wait_turn)
            await anyio.wait_all_tasks_blocked()
            assert gate.waiting == 1
            with pytest.raises(RequestError, match="busy: 1 request") as e:
                async with gate.slot(Deadline(None)):
                    pass
            assert e.value.status == 503
            release.set()
        assert order == ["first", "second"] and gate.waiting == 0 and not gate.busy

        gate = Gate(max_queue=4)
        release = anyio.Event()
        async with anyio.create_task_group() as tg:
            holding = anyio.Event()
            tg.start_soon(hold)
            await holding.wait()
            start = time.monotonic()
            with pytest.raises(RequestTimeout, match="while waiting for earlier requests"):
                async with gate.slot(Deadline(0.2)):
                    pass
            assert 0.15 < time.monotonic() - start < 2 and gate.waiting == 0
            release.set()

    anyio.run(main)


# ---------------------------------------------------------------------------------------------- CLI
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
    args = build_parser().parse_args(["serve", str(tmp_path / "m"), "--port", "0", "--model-name", "m",
                                      "--dtype", "float32", "--value-dtype", "float32"])  # exact: as the dense model
    srv = build_server(args)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    try:
        t.start()
        health = json.loads(http(srv, "/health")[1])
        assert health["runtime"] == "sparse" and health["sparse_layers"] == 14
        status, body = http(srv, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
        assert status == 200 and json.loads(body)["choices"][0]["text"] == expected
    finally:
        srv.shutdown()
        t.join(10)
        srv.server_close()


def test_cli_serve_errors(tmp_path, capsys):
    from losa.cli import main

    missing = str(tmp_path / "missing")
    for flags, fragment in [(["--port", "70000"], "is not a TCP port"), (["--max-tokens", "0"], "--max-tokens 0"),
                            (["--max-queue", "-1"], "--max-queue -1"),
                            (["--request-timeout", "-2"], "--request-timeout -2"),
                            (["--host", "192.0.2.1", "--port", "0"], "cannot listen on 192.0.2.1:0")]:
        assert main(["serve", missing, *flags]) == 2
        assert fragment in capsys.readouterr().err


def test_cli_serve_port_in_use_is_one_line(tmp_path, capsys):
    """The port is bound before the model loads: a busy port is one ``error:`` line, not a traceback."""
    from losa.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tmp_path / "missing"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: port {port} on 127.0.0.1 is in use; pick another with --port\n"


def test_cli_serve_help_documents_every_flag():
    from losa.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["serve"]
    flags = {opt: a.help for a in sub._actions for opt in a.option_strings}
    for flag in ("--request-timeout", "--max-queue", "--api-key", "--port", "--host", "--max-tokens"):
        assert flags.get(flag), flag
    assert all(h for h in flags.values()), [f for f, h in flags.items() if not h]
    assert "LOSA_API_KEY" in flags["--api-key"] and "503" in flags["--max-queue"] and "504" in flags["--request-timeout"]


def test_cli_serve_sigterm_stops_cleanly_with_status_0(tmp_path, capsys, monkeypatch):
    """uvicorn shuts down on SIGTERM, then raises it again under the handler it found; ``run_serve`` must have
    one there (the default handler killed the process with status 143 after the clean stop)."""
    import os
    import signal

    from losa.cli import build_parser, serve

    model, tok = make_tiny_model("llama", seed=3), make_tiny_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    built = []

    def build(args):
        built.append(real_build(args))
        return built[-1]

    real_build = serve.build_server
    monkeypatch.setattr(serve, "build_server", build)
    leaked = []
    outer = signal.signal(signal.SIGTERM, lambda *a: leaked.append(a))  # instead of dying when the fix is missing
    try:
        def terminate():
            end = time.monotonic() + 30
            while not (built and built[0].started) and time.monotonic() < end:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=terminate, daemon=True).start()
        args = build_parser().parse_args(["serve", str(tmp_path / "m"), "--dense", "--dtype", "float32", "--port", "0"])
        assert serve.run_serve(args) == 0
        assert signal.getsignal(signal.SIGTERM) is not getattr(serve, "_raise_terminated", None)  # restored
    finally:
        signal.signal(signal.SIGTERM, outer)
    assert built[0].socket.fileno() == -1  # closed
    printed = capsys.readouterr()
    assert printed.err.splitlines()[-1] == "stopped" and not leaked
    assert printed.out == ""  # every status line goes to stderr, like generate's
