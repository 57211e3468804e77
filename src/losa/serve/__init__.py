"""``losa serve``: an OpenAI-compatible HTTP API (FastAPI on uvicorn) over a (sparse) model.

Python::

    from losa.serve import GenerationService, ServeSettings, make_server
    server = make_server(GenerationService(model, tok, "my-model"), port=8000,
                         settings=ServeSettings(request_timeout=120, max_queue=4, api_key="secret"))
    server.serve_forever()

or mount ``create_app(service, settings)`` in any ASGI server.
"""

from __future__ import annotations

from losa.serve.app import ServeSettings, create_app
from losa.serve.schema import ChatRequest, CompletionRequest, RequestError, RequestTimeout
from losa.serve.server import LosaServer, make_server
from losa.serve.service import Generated, GenerationService, Job

__all__ = ["ChatRequest", "CompletionRequest", "Generated", "GenerationService", "Job", "LosaServer",
           "RequestError", "RequestTimeout", "ServeSettings", "create_app", "make_server"]
