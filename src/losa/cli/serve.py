"""``losa serve``: an OpenAI-compatible HTTP API over a (pruned) model on the sparse CPU runtime."""

from __future__ import annotations

import argparse
import errno

from losa.cli.common import add_model_arg, add_runtime_args, load_runtime_model
from losa.errors import LosaError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (sparse runtime)",
                       description="Load a (pruned) model, swap its pruned linears for sparse CPU kernels and "
                                   "answer POST /v1/completions and /v1/chat/completions (with \"stream\": true "
                                   "for server-sent events), GET /v1/models and /health. One request is "
                                   "generated at a time.")
    add_model_arg(p)
    add_runtime_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 = any free port)")
    p.add_argument("--model-name", default=None, help="model id reported to clients (default: MODEL)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="default max_tokens of chat requests that set none (default: 256; completions: 16)")
    p.set_defaults(func=run_serve)


def build_server(args: argparse.Namespace):
    """Load the model and bind the server (not yet serving)."""
    from losa.serve import GenerationService, make_server

    if not 0 <= args.port <= 65535:
        raise LosaError(f"--port {args.port} is not a TCP port; use 0-65535")
    if args.max_tokens < 1:
        raise LosaError(f"--max-tokens {args.max_tokens} must be at least 1")
    model, tok, mode, summary = load_runtime_model(args, "serving")
    service = GenerationService(model, tok, args.model_name or args.model, default_max_tokens=args.max_tokens)
    info = {"runtime": mode, "sparse_layers": (summary or {}).get("replaced"),
            "compute": (summary or {}).get("compute")}
    try:
        return make_server(service, args.host, args.port, info)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise LosaError(f"port {args.port} on {args.host} is in use; pick another with --port") from None
        raise LosaError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); check --host/--port") from None


def run_serve(args: argparse.Namespace) -> int:
    server = build_server(args)
    print(f"serving {server.service.name} on {server.url} "
          "(POST /v1/completions, /v1/chat/completions; GET /v1/models, /health); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
    return 0
