"""``losa serve``: an OpenAI-compatible HTTP API over a (sparse) model.

Python::

    from losa.serve import GenerationService, make_server
    server = make_server(GenerationService(model, tok, "my-model"), port=8000)
    server.serve_forever()
"""

from __future__ import annotations

from losa.serve.http import LosaHTTPServer, make_server
from losa.serve.schema import ChatRequest, CompletionRequest, RequestError
from losa.serve.service import Generated, GenerationService

__all__ = ["ChatRequest", "CompletionRequest", "GenerationService", "Generated", "LosaHTTPServer",
           "RequestError", "make_server"]
