"""Generation behind the server: prompts in, OpenAI-style completion objects out (no HTTP here).

One model serves one request at a time (a lock): CPU decoding already uses every core, so parallel
requests would only slow each other down. Stop strings end generation early and are cut from the
returned text; ``stream`` variants yield OpenAI chunk objects.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria

from losa.errors import LosaError
from losa.serve.schema import ChatRequest, CompletionRequest, RequestError, SamplingFields

#: OpenAI's default ``max_tokens`` for /v1/completions
COMPLETION_DEFAULT_MAX_TOKENS = 16


@dataclass
class Generated:
    """One finished completion."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def cut_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stops or ()) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class _StopCriterion(StoppingCriteria):
    """Ends generation once ``cancel`` is set (client gone, stop string streamed) or a stop string appears.

    Our own check rather than transformers' ``stop_strings``, which needs a tokenizer whose vocabulary it can
    map back to text (it fails on word-level vocabularies): decode the last few new tokens and search them.
    """

    def __init__(self, cancel: threading.Event, tok: Any, prompt_len: int, stops: list[str] | None) -> None:
        self.cancel, self.tok, self.prompt_len, self.stops = cancel, tok, prompt_len, stops or []
        # a stop string of L characters lies within the last L tokens (plus one for a token it starts inside)
        self.window = max((len(s) for s in self.stops), default=0) + 1

    def __call__(self, input_ids: torch.Tensor, scores: Any, **_: Any) -> torch.Tensor:
        done = self.cancel.is_set()
        if not done and self.stops:
            tail = input_ids[0, max(self.prompt_len, input_ids.shape[1] - self.window):]
            text = self.tok.decode(tail, skip_special_tokens=True)
            done = any(s in text for s in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class GenerationService:
    """Completions and chat completions of one loaded model.

    ``name`` is the model id reported to clients; ``default_max_tokens`` applies to chat requests without
    ``max_tokens`` (completions default to 16, as in the OpenAI API).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str, default_max_tokens: int = 256) -> None:
        if tokenizer is None:
            raise LosaError(f"model {name} has no tokenizer; serving needs one")
        if default_max_tokens < 1:
            raise LosaError(f"default max tokens {default_max_tokens} must be at least 1")
        self.model, self.tok, self.name = model.eval(), tokenizer, name
        self.default_max_tokens = default_max_tokens
        self.context = getattr(model.config, "max_position_embeddings", None)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ prompts
    def encode_prompt(self, text: str) -> torch.Tensor:
        ids = self.tok(text, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise RequestError("the prompt is empty after tokenization; send some text")
        return ids

    def encode_chat(self, req: ChatRequest) -> torch.Tensor:
        if not getattr(self.tok, "chat_template", None):
            raise RequestError(f"model {self.name} has no chat template; use /v1/completions with a plain prompt")
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tok(text, return_tensors="pt", add_special_tokens=False).input_ids

    # ------------------------------------------------------------------ generation
    def _generate_kwargs(self, req: SamplingFields, prompt_len: int, default_max: int) -> dict:
        max_new = req.max_tokens or default_max
        if self.context is not None and prompt_len + max_new > self.context:
            raise RequestError(f"prompt ({prompt_len} tokens) + max_tokens ({max_new}) exceeds the model's context "
                               f"of {self.context} tokens; shorten the prompt or lower max_tokens")
        kw: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": self.pad, "do_sample": req.temperature > 0}
        if kw["do_sample"]:  # OpenAI semantics: temperature and nucleus only, no top-k
            kw.update(temperature=req.temperature, top_p=req.top_p, top_k=0)
        return kw

    def _run(self, ids: torch.Tensor, req: SamplingFields, kw: dict, cancel: threading.Event,
             streamer: Any = None) -> torch.Tensor:
        """The generated ids (without the prompt); holds the model lock."""
        with self._lock, torch.inference_mode():
            if req.seed is not None:
                torch.manual_seed(req.seed)
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                      stopping_criteria=[_StopCriterion(cancel, self.tok, ids.shape[1], req.stop)],
                                      **kw)
        return out[0, ids.shape[1]:]

    def _finish(self, new_ids: torch.Tensor, stopped: bool, max_new: int) -> str:
        if stopped or (len(new_ids) and int(new_ids[-1]) in self.eos) or len(new_ids) < max_new:
            return "stop"
        return "length"

    def generate(self, ids: torch.Tensor, req: SamplingFields, default_max: int) -> Generated:
        kw = self._generate_kwargs(req, ids.shape[1], default_max)
        new = self._run(ids, req, kw, threading.Event())
        text, stopped = cut_at_stop(self.tok.decode(new, skip_special_tokens=True), req.stop)
        return Generated(text, ids.shape[1], len(new), self._finish(new, stopped, kw["max_new_tokens"]))

    def stream(self, ids: torch.Tensor, req: SamplingFields, default_max: int) -> Iterator[str | Generated]:
        """Text pieces as they are decoded, then the :class:`Generated` summary (whose text is the whole)."""
        from transformers import TextIteratorStreamer

        kw = self._generate_kwargs(req, ids.shape[1], default_max)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        cancel, result = threading.Event(), {}

        def work() -> None:
            try:
                result["ids"] = self._run(ids, req, kw, cancel, streamer)
            except BaseException as e:  # handed to the consumer below
                result["error"] = e
                streamer.end()

        worker = threading.Thread(target=work, name="losa-generate", daemon=True)
        worker.start()
        hold = max((len(s) for s in req.stop or ()), default=1) - 1  # a stop string may still be forming
        text, sent, stopped = "", 0, False
        try:
            for piece in streamer:
                text += piece
                cut, stopped = cut_at_stop(text, req.stop)
                upto = len(cut) if stopped else max(sent, len(text) - hold)
                if upto > sent:
                    yield text[sent:upto]
                    sent = upto
                if stopped:
                    text = cut
                    cancel.set()
                    break
        finally:
            cancel.set()  # the client may be gone: end generation at the next token
            worker.join()
        if "error" in result:
            raise result["error"]
        if not stopped:
            text, stopped = cut_at_stop(text, req.stop)
            if len(text) > sent:
                yield text[sent:]
        new = result["ids"]
        yield Generated(text, ids.shape[1], len(new), self._finish(new, stopped, kw["max_new_tokens"]))

    # ------------------------------------------------------------------ OpenAI objects
    def _envelope(self, kind: str, prefix: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
                "model": self.name}

    @staticmethod
    def _usage(done: list[Generated]) -> dict:
        p, c = sum(g.prompt_tokens for g in done), sum(g.completion_tokens for g in done)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def completion(self, req: CompletionRequest) -> dict:
        done = [self.generate(self.encode_prompt(p), req, COMPLETION_DEFAULT_MAX_TOKENS) for p in req.prompt]
        return {**self._envelope("text_completion", "cmpl"),
                "choices": [{"index": i, "text": g.text, "finish_reason": g.finish_reason, "logprobs": None}
                            for i, g in enumerate(done)],
                "usage": self._usage(done)}

    def chat(self, req: ChatRequest) -> dict:
        g = self.generate(self.encode_chat(req), req, self.default_max_tokens)
        return {**self._envelope("chat.completion", "chatcmpl"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                             "finish_reason": g.finish_reason}],
                "usage": self._usage([g])}

    def completion_chunks(self, req: CompletionRequest) -> Iterator[dict]:
        """Streamed /v1/completions: text chunks per prompt, each prompt closed by its finish reason."""
        head = self._envelope("text_completion", "cmpl")
        for i, prompt in enumerate(req.prompt):
            for item in self.stream(self.encode_prompt(prompt), req, COMPLETION_DEFAULT_MAX_TOKENS):
                done = isinstance(item, Generated)
                yield {**head, "choices": [{"index": i, "text": "" if done else item, "logprobs": None,
                                            "finish_reason": item.finish_reason if done else None}]}

    def chat_chunks(self, req: ChatRequest) -> Iterator[dict]:
        """Streamed /v1/chat/completions: a role delta, content deltas, then the finish reason."""
        ids = self.encode_chat(req)
        head = self._envelope("chat.completion.chunk", "chatcmpl")
        yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
        for item in self.stream(ids, req, self.default_max_tokens):
            done = isinstance(item, Generated)
            yield {**head, "choices": [{"index": 0, "delta": {} if done else {"content": item},
                                        "finish_reason": item.finish_reason if done else None}]}
