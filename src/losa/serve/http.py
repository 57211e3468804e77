"""The HTTP side of ``losa serve``: an OpenAI-compatible JSON API on the standard library's server.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``"stream": true`` answers with server-sent events ending in ``data: [DONE]``). Errors are JSON
``{"error": {"message", "type", "code"}}`` with a 4xx/5xx status, never a traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from losa.serve.schema import ChatRequest, CompletionRequest, RequestError, parse_request
from losa.serve.service import GenerationService

log = logging.getLogger("losa.serve")

#: largest request body accepted (bytes)
MAX_BODY = 8 * 2**20


def _error_body(status: int, message: str) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": status}}


def _status_of(exc: Exception) -> tuple[int, str]:
    """Status and one-line message for an exception raised while answering (call inside ``except``)."""
    if isinstance(exc, RequestError):
        return exc.status, str(exc)
    log.exception("generation failed")  # the details stay in the server's log
    return 500, f"generation failed: {type(exc).__name__}: {exc}"


class _Handler(BaseHTTPRequestHandler):
    server_version = "losa-serve"
    protocol_version = "HTTP/1.1"
    server: LosaHTTPServer

    # ------------------------------------------------------------------ plumbing
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's signature)
        log.info("%s %s", self.address_string(), format % args)

    def _send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, message: str) -> None:
        self._send_json(status, _error_body(status, message))

    def _read_json(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RequestError("invalid Content-Length header") from None
        if length > MAX_BODY:
            raise RequestError(f"request body of {length} bytes is over the {MAX_BODY}-byte limit", 413)
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None

    def _send_events(self, chunks: Iterator[dict]) -> None:
        """Server-sent events; the first chunk is computed before the 200 so request errors stay 4xx."""
        first = next(chunks, None)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's end
        self.end_headers()
        self.close_connection = True
        try:
            if first is not None:
                self.wfile.write(f"data: {json.dumps(first)}\n\n".encode())
            for chunk in chunks:
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            chunks.close()  # the client left: stop generating
            return
        except Exception as e:  # the 200 is out: a later prompt refused, or generation failed, as an event
            self.wfile.write(f"data: {json.dumps(_error_body(*_status_of(e)))}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    # ------------------------------------------------------------------ routes
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        path = self.path.split("?", 1)[0].rstrip("/")
        svc = self.server.service
        if path == "/health":
            self._send_json(200, {"status": "ok", "model": svc.name, **self.server.info})
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": svc.name, "object": "model", "created": 0,
                                                               "owned_by": "losa"}]})
        else:
            self._send_error(404, f"no route GET {path or '/'}; try /health or /v1/models")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        svc = self.server.service
        routes = {"/v1/completions": (CompletionRequest, svc.completion, svc.completion_chunks),
                  "/v1/chat/completions": (ChatRequest, svc.chat, svc.chat_chunks)}
        if path not in routes:
            self._send_error(404, f"no route POST {path or '/'}; use /v1/completions or /v1/chat/completions")
            return
        cls, answer, chunks = routes[path]
        try:
            req = parse_request(cls, self._read_json())
            if req.model not in (None, "", svc.name):
                raise RequestError(f"model {req.model!r} is not served here; this server has {svc.name!r}", 404)
            if req.stream:
                self._send_events(chunks(req))
            else:
                self._send_json(200, answer(req))
        except Exception as e:  # refused (4xx) or the model failed (500): one line for the client
            self._send_error(*_status_of(e))


class LosaHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server holding one :class:`GenerationService` (which serialises generation)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: GenerationService, info: dict | None = None) -> None:
        self.service = service
        self.info = dict(info or {})  # extra facts for /health (sparse layers, precision)
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(service: GenerationService, host: str = "127.0.0.1", port: int = 8000,
                info: dict | None = None) -> LosaHTTPServer:
    """Bind (port 0 = any free port); call ``serve_forever()`` to run and ``shutdown()`` to stop."""
    return LosaHTTPServer((host, port), service, info)
