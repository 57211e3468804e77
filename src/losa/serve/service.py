"""Generation behind the server: requests in, OpenAI-style completion objects out (no HTTP here).

A request is first *prepared* (tokenized, chat template applied, checked against the model's context),
so every refusal comes before any model time is spent or any byte of a stream is sent; then it is
answered whole or as a stream of chunks. The model generates one request at a time (a lock; the server
queues requests in front of it). Stop strings end generation at the token that completes them and are
cut from the text.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from jinja2 import TemplateError, TemplateSyntaxError

from losa.errors import LosaError
from losa.models.registry import max_context, prompt_problem
from losa.serve.limits import Deadline
from losa.serve.schema import ChatRequest, CompletionRequest, RequestError, SamplingFields
from losa.serve.stops import StopWatch, cut_at_stop

#: OpenAI's default ``max_tokens`` for /v1/completions
COMPLETION_DEFAULT_MAX_TOKENS = 16


@dataclass
class Generated:
    """One finished completion."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


@dataclass
class Job:
    """A request ready to generate: its prompts tokenized and within the model's context (see ``prepare``)."""

    req: SamplingFields
    prompts: list[torch.Tensor]  # (1, T) token ids each
    max_new: int

    @property
    def chat(self) -> bool:
        """Whether this is a chat request."""
        return isinstance(self.req, ChatRequest)


class GenerationService:
    """Completions and chat completions of one loaded model.

    Args:
        model: a causal LM with ``generate`` (dense or with sparse layers).
        tokenizer: its tokenizer (a chat template is needed for chat requests).
        name: the model id reported to clients.
        default_max_tokens: ``max_tokens`` of chat requests that give none (completions: 16, as OpenAI).
        compile: decode with a static KV cache and a compiled step (:class:`losa.inference.decode.LeanDecoder`;
            the first request of each cache size compiles first).
        compile_wrapper: ``"cpp"`` or ``"python"``: how the compiled step calls its kernels (see
            :class:`~losa.inference.decode.LeanDecoder`).
        decode_engine: ``"auto"`` (the C++ decode engine for models it supports) or ``"off"`` (see
            :class:`~losa.inference.decode.LeanDecoder`).

    Raises:
        LosaError: without a tokenizer, with ``default_max_tokens`` < 1, or an unknown ``compile_wrapper`` or
            ``decode_engine``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str, default_max_tokens: int = 256,
                 compile: bool = False, compile_wrapper: str = "cpp", decode_engine: str = "auto") -> None:
        from losa.inference.decode import LeanDecoder

        if tokenizer is None:
            raise LosaError(f"model {name} has no tokenizer; serving needs one")
        if default_max_tokens < 1:
            raise LosaError(f"default max tokens {default_max_tokens} must be at least 1")
        self.model, self.tok, self.name = model.eval(), tokenizer, name
        self.decoder = LeanDecoder(self.model, compile=compile, compile_wrapper=compile_wrapper,
                                   decode_engine=decode_engine)
        self.default_max_tokens = default_max_tokens
        self.context = max_context(model)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ prompts
    def encode_prompt(self, text: str) -> torch.Tensor:
        """Token ids (1, T) of a completion prompt.

        Args:
            text: the prompt.

        Returns:
            The ids, with the tokenizer's special tokens (e.g. BOS); an empty prompt is refused by
            :meth:`prepare`.
        """
        return self.tok(text, return_tensors="pt").input_ids

    def encode_chat(self, req: ChatRequest) -> torch.Tensor:
        """Token ids (1, T) of a conversation rendered by the chat template, with the generation prompt.

        Args:
            req: the chat request.

        Returns:
            The ids of the rendered text (the template places any special tokens).

        Raises:
            RequestError: (400) without a chat template, or when the template refuses the conversation
                (``raise_exception`` in the template, e.g. roles that do not alternate).
        """
        if not getattr(self.tok, "chat_template", None):
            raise RequestError(f"model {self.name} has no chat template; use /v1/completions with a plain prompt")
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        try:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateSyntaxError:
            raise  # the server's template is broken: a 500, not the client's fault
        except TemplateError as e:
            raise RequestError(f"the chat template refused the conversation: {e}") from None
        return self.tok(text, return_tensors="pt", add_special_tokens=False).input_ids

    def prepare(self, req: SamplingFields) -> Job:
        """Tokenize a request and check it against the model's context, before any generation.

        Args:
            req: a :class:`CompletionRequest` or :class:`ChatRequest`.

        Returns:
            The :class:`Job` to pass to :meth:`answer` or :meth:`chunks`.

        Raises:
            RequestError: (400) for an empty prompt, a refused conversation, or a prompt + ``max_tokens``
                beyond the context (each prompt of a list is checked).
        """
        if isinstance(req, ChatRequest):
            prompts, default_max = [self.encode_chat(req)], self.default_max_tokens
        else:
            prompts, default_max = [self.encode_prompt(p) for p in req.prompt], COMPLETION_DEFAULT_MAX_TOKENS
        max_new = req.token_limit or default_max
        for i, ids in enumerate(prompts):
            which = f"prompt {i}" if len(prompts) > 1 else "prompt"
            if (problem := prompt_problem(ids.shape[1], max_new, self.context, "max_tokens", which)) is not None:
                raise RequestError(problem)
        return Job(req, prompts, max_new)

    # ------------------------------------------------------------------ generation
    def _generate_kwargs(self, req: SamplingFields, max_new: int) -> dict:
        kw: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": self.pad, "do_sample": req.temperature > 0}
        if kw["do_sample"]:  # OpenAI semantics: temperature and nucleus only, no top-k
            kw.update(temperature=req.temperature, top_p=req.top_p, top_k=0)
        return kw

    def _run(self, ids: torch.Tensor, job: Job, watch: StopWatch) -> Generated:
        """Generate for one prompt (holding the model lock) and summarise."""
        with self._lock, torch.inference_mode():
            if job.req.seed is not None:
                torch.manual_seed(job.req.seed)
            kw = self._generate_kwargs(job.req, job.max_new)
            out = self.decoder.generate(ids, kw.pop("max_new_tokens"), attention_mask=torch.ones_like(ids),
                                        stopping_criteria=[watch], **kw)
        new = out[0, ids.shape[1]:]
        text, cut = cut_at_stop(watch.finish(), job.req.stop)
        stopped = cut or watch.stop_hit or (len(new) > 0 and int(new[-1]) in self.eos)
        if watch.timed_out and not stopped and len(new) < job.max_new:  # cut short, not finished
            raise watch.deadline.timeout("generating")
        return Generated(text, ids.shape[1], len(new), "stop" if stopped else "length")

    def generate(self, ids: torch.Tensor, job: Job, deadline: Deadline | None = None,
                 cancel: threading.Event | None = None) -> Generated:
        """One prompt's completion.

        Args:
            ids: prompt token ids (1, T), one of ``job.prompts``.
            job: the prepared request (sampling options, token limit).
            deadline: ends generation when it passes (None: no limit).
            cancel: ends generation at the next token when set (the client left); the text so far is kept.

        Returns:
            The finished completion.

        Raises:
            RequestTimeout: (504) when the deadline passed before the completion was done.
        """
        return self._run(ids, job, StopWatch(self.tok, ids.shape[1], job.req.stop, deadline, cancel=cancel))

    def stream(self, ids: torch.Tensor, job: Job, deadline: Deadline | None = None) -> Iterator[str | Generated]:
        """One prompt's completion as text pieces, then its :class:`Generated` summary (whose text is the whole).

        Closing the iterator early (client gone) ends generation at the next token.

        Args:
            ids: prompt token ids (1, T).
            job: the prepared request.
            deadline: ends generation when it passes.

        Returns:
            An iterator of ``str`` pieces, then one :class:`Generated`.

        Raises:
            RequestTimeout: (504) after the pieces generated in time, when the deadline passed.
        """
        pieces: queue.Queue[str | None] = queue.Queue()
        watch = StopWatch(self.tok, ids.shape[1], job.req.stop, deadline, on_text=pieces.put)
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["done"] = self._run(ids, job, watch)
            except BaseException as e:  # handed to the consumer below
                result["error"] = e
            finally:
                pieces.put(None)

        worker = threading.Thread(target=work, name="losa-generate", daemon=True)
        worker.start()
        hold = max(watch.longest - 1, 0)  # a stop string may still be forming in the last characters
        text, sent, stopped = "", 0, False
        try:
            while (piece := pieces.get()) is not None:
                text += piece
                cut, stopped = cut_at_stop(text, job.req.stop)
                upto = len(cut) if stopped else max(sent, len(text) - hold)
                if upto > sent:
                    yield text[sent:upto]
                    sent = upto
                if stopped:
                    break
        finally:
            watch.cancel.set()  # no-op once generation is over; else it ends at the next token
            worker.join()
        if "error" in result:
            raise result["error"]
        done: Generated = result["done"]
        if len(done.text) > sent:
            yield done.text[sent:]
        yield done

    # ------------------------------------------------------------------ OpenAI objects
    def _envelope(self, kind: str, prefix: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
                "model": self.name}

    @staticmethod
    def _usage(done: list[Generated]) -> dict:
        p, c = sum(g.prompt_tokens for g in done), sum(g.completion_tokens for g in done)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def answer(self, job: Job, deadline: Deadline | None = None, cancel: threading.Event | None = None) -> dict:
        """The whole answer: a ``text_completion`` or ``chat.completion`` object.

        Args:
            job: from :meth:`prepare`.
            deadline: ends generation when it passes.
            cancel: ends generation at the next token when set (the client left).

        Returns:
            The OpenAI object, with ``usage``.

        Raises:
            RequestTimeout: (504) when the deadline passes first.
        """
        done = [self.generate(ids, job, deadline, cancel) for ids in job.prompts]
        if job.chat:
            return {**self._envelope("chat.completion", "chatcmpl"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": done[0].text},
                                 "finish_reason": done[0].finish_reason}],
                    "usage": self._usage(done)}
        return {**self._envelope("text_completion", "cmpl"),
                "choices": [{"index": i, "text": g.text, "finish_reason": g.finish_reason, "logprobs": None}
                            for i, g in enumerate(done)],
                "usage": self._usage(done)}

    def chunks(self, job: Job, deadline: Deadline | None = None) -> Iterator[dict]:
        """The streamed answer: OpenAI chunk objects (SSE payloads, without the final ``[DONE]``).

        Completions: text chunks per prompt, each prompt closed by its finish reason. Chat: a role delta,
        content deltas, then the finish reason. With ``stream_options.include_usage`` every chunk has
        ``"usage": null`` and a last chunk with empty ``choices`` carries the usage, as in the OpenAI API.

        Args:
            job: from :meth:`prepare`.
            deadline: ends generation when it passes.

        Returns:
            An iterator of chunk dicts.

        Raises:
            RequestTimeout: (504) after the chunks generated in time, when the deadline passed.
        """
        head = self._envelope(*(("chat.completion.chunk", "chatcmpl") if job.chat else ("text_completion", "cmpl")))
        if job.req.include_usage:
            head["usage"] = None
        if job.chat:
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
        done = []
        for i, ids in enumerate(job.prompts):
            for item in self.stream(ids, job, deadline):
                yield {**head, "choices": [self._chunk_choice(job.chat, i, item)]}
                if isinstance(item, Generated):
                    done.append(item)
        if job.req.include_usage:
            yield {**head, "choices": [], "usage": self._usage(done)}

    @staticmethod
    def _chunk_choice(chat: bool, index: int, item: str | Generated) -> dict:
        done = isinstance(item, Generated)
        reason = item.finish_reason if done else None
        if chat:
            return {"index": index, "delta": {} if done else {"content": item}, "finish_reason": reason}
        return {"index": index, "text": "" if done else item, "logprobs": None, "finish_reason": reason}

    # ------------------------------------------------------------------ one-call helpers (Python API)
    def completion(self, req: CompletionRequest, deadline: Deadline | None = None) -> dict:
        """``prepare`` + ``answer`` of a completion request (see :meth:`answer`)."""
        return self.answer(self.prepare(req), deadline)

    def chat(self, req: ChatRequest, deadline: Deadline | None = None) -> dict:
        """``prepare`` + ``answer`` of a chat request (see :meth:`answer`)."""
        return self.answer(self.prepare(req), deadline)

    def completion_chunks(self, req: CompletionRequest, deadline: Deadline | None = None) -> Iterator[dict]:
        """``prepare`` + ``chunks`` of a completion request (see :meth:`chunks`)."""
        return self.chunks(self.prepare(req), deadline)

    def chat_chunks(self, req: ChatRequest, deadline: Deadline | None = None) -> Iterator[dict]:
        """``prepare`` + ``chunks`` of a chat request (see :meth:`chunks`)."""
        return self.chunks(self.prepare(req), deadline)
