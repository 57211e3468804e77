"""Validated request bodies of the OpenAI-style endpoints (the subset losa serves)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class RequestError(ValueError):
    """A request the server refuses or cannot finish, with an HTTP status and a one-line message.

    Args:
        message: what went wrong and what to do about it (one line).
        status: the HTTP status to answer with (400 unless said otherwise).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class RequestTimeout(RequestError):
    """A request that ran past the server's ``--request-timeout`` (HTTP 504).

    Args:
        message: what the request was doing when time ran out (one line).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, 504)


def _drop_nulls(data: Any) -> Any:
    """``null`` means "the default", as OpenAI's clients send it: drop such keys before validation."""
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(BaseModel):
    """``stream_options`` of a streamed request."""

    model_config = ConfigDict(extra="allow")

    include_usage: bool = Field(False, description="end the stream with a chunk carrying the token usage")

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        return _drop_nulls(data)


class SamplingFields(BaseModel):
    """Decoding options shared by completions and chat completions (OpenAI names and defaults).

    A field sent as ``null`` takes its default, as if it were absent.
    """

    # Clients send fields we do not use (user, presence_penalty, ...): ignore them, but the ones that would
    # change the answer and are not implemented are refused in ``_unsupported``.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (None: the endpoint's default)")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens (chat)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        return _drop_nulls(data)

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"n={v} is not supported; send one request per completion")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops or None

    @model_validator(mode="after")
    def _unsupported(self) -> SamplingFields:
        extra = self.model_extra or {}
        for name in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias"):
            if extra.get(name) not in (None, False, 0, {}, []):
                raise ValueError(f"{name} is not supported by losa serve; drop it from the request")
        if extra.get("best_of") not in (None, 1):
            raise ValueError("best_of is not supported by losa serve; drop it from the request")
        if self.include_usage and not self.stream:  # would be ignored: OpenAI's API refuses it too
            raise ValueError('stream_options.include_usage needs "stream": true; set stream or drop stream_options')
        return self

    @property
    def token_limit(self) -> int | None:
        """``max_completion_tokens`` if given, else ``max_tokens`` (None: the endpoint's default)."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk (``stream_options.include_usage``)."""
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: continue one prompt or several."""

    prompt: str | list[str]

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> list[str]:
        prompts = [v] if isinstance(v, str) else v
        if isinstance(prompts, list) and prompts and all(
                isinstance(p, int) or (isinstance(p, list) and all(isinstance(t, int) for t in p)) for p in prompts):
            raise ValueError("token-id prompts are not supported; send the prompt as text (a string or a list of "
                             "strings)")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("give the prompt as a string or a list of strings")
        if not prompts:
            raise ValueError("prompt is an empty list; give a string or a list of strings")
        return prompts


class ChatMessage(BaseModel):
    """One turn of a conversation; content parts are joined into plain text (``null`` content = empty)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text(cls, v: str | list[dict[str, Any]] | None) -> str:
        if v is None or isinstance(v, str):
            return v or ""
        parts = []
        for part in v:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part of type {part.get('type')!r} is not supported; send text parts")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(SamplingFields):
    """``POST /v1/chat/completions``: answer a conversation through the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)


def parse_request(cls: type[SamplingFields], body: Any) -> Any:
    """Validate a decoded JSON body.

    Args:
        cls: :class:`CompletionRequest` or :class:`ChatRequest`.
        body: the decoded JSON.

    Returns:
        The validated request.

    Raises:
        RequestError: (400) naming the first problem, in one line.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise RequestError(f"invalid request: {where}: {msg}" if where else f"invalid request: {msg}") from None
