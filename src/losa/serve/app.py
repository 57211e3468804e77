"""The HTTP side of ``losa serve``: an OpenAI-compatible FastAPI app over a :class:`GenerationService`.

Routes: ``GET /health`` (always open), ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``"stream": true`` answers with server-sent events ending in
``data: [DONE]``). Errors are JSON ``{"error": {"message", "type", "code"}}`` with a one-line message,
never a traceback; once a stream has started, an error arrives as such an event before ``[DONE]``.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException

from losa.serve.limits import Deadline, Gate
from losa.serve.schema import ChatRequest, CompletionRequest, RequestError, SamplingFields, parse_request
from losa.serve.service import GenerationService, Job

log = logging.getLogger("losa.serve")

#: largest request body accepted (bytes)
MAX_BODY = 8 * 2**20

_ERROR_TYPES = {401: "authentication_error", 503: "server_overloaded", 504: "timeout_error"}


@dataclass(frozen=True)
class ServeSettings:
    """Limits and access of the server.

    Args:
        request_timeout: seconds a request may take from arrival, waiting included (None: no limit).
        max_queue: requests that may wait while one generates; more are refused with 503 at once.
        api_key: when set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
    """

    request_timeout: float | None = 600.0
    max_queue: int = 8
    api_key: str | None = None

    def __post_init__(self) -> None:
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"request_timeout {self.request_timeout} must be positive (None: no limit)")
        if self.max_queue < 0:
            raise ValueError(f"max_queue {self.max_queue} must be at least 0")


def error_body(status: int, message: str) -> dict:
    """The OpenAI-style error object.

    Args:
        status: the HTTP status.
        message: what went wrong (collapsed to one line).

    Returns:
        ``{"error": {"message", "type", "code"}}``.
    """
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": " ".join(str(message).split()), "type": kind, "code": status}}


def _as_request_error(exc: Exception) -> RequestError:
    """A client-facing error for anything raised while answering (call inside ``except``)."""
    if isinstance(exc, RequestError):
        return exc
    log.exception("generation failed")  # the details stay in the server's log
    return RequestError(f"generation failed: {type(exc).__name__}: {exc}", 500)


def _sse(obj: object) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _read_json(request: Request) -> object:
    """The body as JSON, whatever the Content-Type (``curl -d`` sends form-encoded), size-limited."""
    if int(request.headers.get("content-length") or 0) > MAX_BODY:  # h11 has checked it is a number
        raise RequestError(f"the request body is over the {MAX_BODY}-byte limit", 413)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY:
            raise RequestError(f"the request body is over the {MAX_BODY}-byte limit", 413)
    try:
        return json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({getattr(e, 'msg', e)})") from None


def create_app(service: GenerationService, settings: ServeSettings | None = None, info: dict | None = None) -> FastAPI:
    """The FastAPI app serving ``service``.

    Args:
        service: the loaded model's generation service.
        settings: timeout, queue bound and API key (default: :class:`ServeSettings`).
        info: extra facts for ``/health`` (runtime, sparse layers, ...).

    Returns:
        The app (``app.state`` holds ``gate``, ``settings`` and the ``model`` name).
    """
    settings = settings or ServeSettings()
    gate = Gate(settings.max_queue)
    info = dict(info or {})
    bearer = HTTPBearer(auto_error=False)

    async def require_key(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.api_key is None:
            return
        given = creds.credentials.encode() if creds is not None else b""
        if not secrets.compare_digest(given, settings.api_key.encode()):
            raise RequestError("missing or wrong API key; send the header 'Authorization: Bearer <key>'", 401)

    app = FastAPI(title="losa serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gate, app.state.settings, app.state.model = gate, settings, service.name
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(error_body(exc.status, str(exc)), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            hint = "use /v1/completions or /v1/chat/completions" if request.method == "POST" else \
                "try /health or /v1/models"
            message = f"no route {where}; {hint}"
        elif exc.status_code == 405:
            message = f"{where} is not allowed; completions take POST, /health and /v1/models take GET"
        else:
            message = f"{where}: {exc.detail}"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _failed(request: Request, exc: Exception) -> JSONResponse:  # last resort; routes convert their own
        err = _as_request_error(exc)
        return JSONResponse(error_body(err.status, str(err)), status_code=err.status)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": service.name, **info}

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0, "owned_by": "losa"}]}

    async def answer(request: Request, cls: type[SamplingFields]) -> object:
        deadline = Deadline(settings.request_timeout)
        req = parse_request(cls, await _read_json(request))
        if req.model not in (None, "", service.name):
            raise RequestError(f"model {req.model!r} is not served here; this server has {service.name!r}", 404)
        job = await run_in_threadpool(service.prepare, req)  # every 4xx about the request comes from here
        if not req.stream:
            async with gate.slot(deadline):
                return await _unless_gone(request, service.answer, job, deadline)
        events = _events(service.chunks(job, deadline), gate, deadline)
        first = await anext(events)  # waits for the model: 503/504 are still plain JSON answers
        return StreamingResponse(_prepend(first, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @v1.post("/completions")
    async def completions(request: Request) -> object:
        try:
            return await answer(request, CompletionRequest)
        except Exception as e:  # refused (4xx, 503, 504) or the model failed (500): one line for the client
            raise _as_request_error(e) from None

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> object:
        try:
            return await answer(request, ChatRequest)
        except Exception as e:
            raise _as_request_error(e) from None

    app.include_router(v1)
    return app


async def _unless_gone(request: Request, answer: Callable[..., dict], job: Job, deadline: Deadline) -> dict:
    """``answer(job, deadline, cancel)`` in a worker thread; a client that disconnects meanwhile sets ``cancel``."""
    cancel = threading.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":  # the body is read: only the end comes
            pass
        cancel.set()

    outcome: dict = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        try:
            outcome["answer"] = await run_in_threadpool(answer, job, deadline, cancel)
        except Exception as e:  # raised below, not wrapped in the task group's ExceptionGroup
            outcome["error"] = e
        tg.cancel_scope.cancel()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["answer"]


async def _events(chunks: Iterator[dict], gate: Gate, deadline: Deadline) -> AsyncIterator[str]:
    """Server-sent events of ``chunks``, holding the gate from before the first event to the end.

    An error after the first event (the 200 is out) becomes an error event; ``[DONE]`` always ends the
    stream. Leaving early (client gone) closes ``chunks``, which ends generation at the next token.
    """
    async with gate.slot(deadline):
        try:
            try:
                async for chunk in iterate_in_threadpool(chunks):
                    yield _sse(chunk)
            except Exception as e:
                err = _as_request_error(e)
                yield _sse(error_body(err.status, str(err)))
            yield "data: [DONE]\n\n"
        finally:
            with anyio.CancelScope(shield=True):  # the model is free only once generation has ended
                await anyio.to_thread.run_sync(chunks.close)


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for item in rest:
        yield item
