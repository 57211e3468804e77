"""``losa serve`` as a real process, driven by the ``openai`` client (issue 16.7).

One server process (started from the CLI on a tiny checkpoint, port 0, API key from $LOSA_API_KEY) serves
all tests of this module and is terminated at the end, whatever happens. Expected texts come from a greedy
loop over the same checkpoint loaded in this process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

openai = pytest.importorskip("openai")

SRC = Path(__file__).resolve().parents[1] / "src"
KEY = "test-key-123"
PROMPT = "word5 word17 word33 word8"
CHAT = [{"role": "user", "content": "word5 word17"}]
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def greedy_text(model, tok, ids: torch.Tensor, n: int) -> tuple[str, int]:
    """Argmax of the full forward, token by token, stopping at EOS: (text, tokens)."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(out, skip_special_tokens=True), len(out)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "tiny"
    model, tok = make_tiny_model("llama", seed=3), make_tiny_tokenizer()
    model.generation_config.eos_token_id = 2
    tok.chat_template = TEMPLATE
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Greedy texts of the saved checkpoint, loaded as the server loads it."""
    import losa

    model, tok = losa.load_model(str(checkpoint))
    chat_ids = tok(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False), return_tensors="pt",
                   add_special_tokens=False).input_ids
    return {"completion": greedy_text(model, tok, tok(PROMPT, return_tensors="pt").input_ids, 8),
            "chat": greedy_text(model, tok, chat_ids, 6), "prompt_tokens": len(tok(PROMPT).input_ids)}


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """``losa serve`` in a subprocess; yields its base URL; always terminated."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "LOSA_API_KEY": KEY}
    cmd = [sys.executable, "-c", "import sys; from losa.cli import main; sys.exit(main(sys.argv[1:]))", "serve",
           str(checkpoint), "--dense", "--dtype", "float32", "--port", "0", "--model-name", "tiny", "--max-tokens", "6",
           "--max-queue", "1", "--request-timeout", "60", "--threads", "1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url, end = None, time.monotonic() + 90
        while url is None:
            assert proc.poll() is None, f"losa serve exited ({proc.returncode}):\n{log.read_text()}"
            assert time.monotonic() < end, f"losa serve did not start:\n{log.read_text()}"
            found = re.search(r"serving tiny on (http://\S+) ", log.read_text())
            url = found and found.group(1)
            time.sleep(0.1)
        while True:  # the socket listens before the app runs
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    assert json.loads(r.read())["status"] == "ok"
                break
            except OSError:
                assert time.monotonic() < end, f"no /health:\n{log.read_text()}"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_completion_plain_and_streamed(client, reference):
    text, n = reference["completion"]
    res = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    assert res.choices[0].text == text
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (reference["prompt_tokens"], n)
    # as OpenAI's clients may send them: null for the optional fields
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                       top_p=None, stop=None, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n


def test_chat_plain_and_streamed(client, reference):
    text, n = reference["chat"]
    res = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0)  # --max-tokens 6
    assert res.choices[0].message.content == text and res.usage.completion_tokens == n
    stream = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + n


def test_errors_through_the_client(server, client):
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
    assert [m.id for m in client.models.list()] == ["tiny"]
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context"):
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=999, stream=True)
    with urllib.request.urlopen(server + "/health", timeout=10) as r:  # no key needed
        assert r.status == 200


def test_concurrent_clients_get_an_answer_or_a_clean_503(server, reference):
    """5 threads for ~3 s against --max-queue 1: each request is answered right or refused with a JSON 503."""
    text, _ = reference["completion"]
    outcomes: list[str] = []
    problems: list[str] = []
    stop_at = time.monotonic() + 3

    def worker() -> None:
        client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)
        while time.monotonic() < stop_at:
            try:
                res = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
                outcomes.append("ok" if res.choices[0].text == text else "wrong")
            except openai.InternalServerError as e:
                body = e.body if isinstance(e.body, dict) else {}
                clean = e.status_code == 503 and body.get("type") and "busy" in body.get("message", "")
                outcomes.append("503" if clean else "bad")
                if not clean:
                    problems.append(f"{e.status_code} {e.body}")
                time.sleep(0.01)
            except Exception as e:  # anything else is a failure
                outcomes.append("bad")
                problems.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    assert not problems, (counts, problems[:3])
    assert set(counts) <= {"ok", "503"} and counts.get("ok", 0) >= 2 and counts.get("503", 0) >= 1, counts
    with urllib.request.urlopen(server + "/health", timeout=10) as r:  # still serving
        assert r.status == 200
