"""``losa serve``: an OpenAI-compatible HTTP API over a (pruned) model on the sparse CPU runtime."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import threading

from losa.cli.common import add_model_arg, add_runtime_args, load_runtime_model, status
from losa.errors import LosaError

#: environment variable holding the API key when --api-key is not given
API_KEY_ENV = "LOSA_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` command.

    Args:
        sub: the ``losa`` command's subparsers.
    """
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (sparse runtime)",
                       description="Load a (pruned) model, swap its pruned linears for sparse CPU kernels and "
                                   "answer POST /v1/completions and /v1/chat/completions (with \"stream\": true "
                                   "for server-sent events), GET /v1/models and /health. One request is "
                                   "generated at a time; up to --max-queue more wait, others get 503 at once.")
    add_model_arg(p)
    add_runtime_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 = any free port)")
    p.add_argument("--model-name", default=None,
                   help="model id reported to clients (default: MODEL, or the --compact file's name without .safetensors)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="default max_tokens of chat requests that set none (default: 256; completions: 16)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="time a request may take from its arrival, waiting in the queue included; past it the "
                        "request ends with 504 (a stream: with an error event) (default: 600; 0 = no limit)")
    p.add_argument("--max-queue", type=int, default=8, metavar="N",
                   help="requests that may wait while one generates; when N wait, new ones get 503 at once "
                        "(default: 8; 0 = none waits)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (401 otherwise; /health stays open) "
                        f"(default: ${API_KEY_ENV}, else no key; the variable keeps the key out of ps)")
    p.set_defaults(func=run_serve)


def _settings(args: argparse.Namespace):
    from losa.serve import ServeSettings

    if not 0 <= args.port <= 65535:
        raise LosaError(f"--port {args.port} is not a TCP port; use 0-65535")
    if args.max_tokens < 1:
        raise LosaError(f"--max-tokens {args.max_tokens} must be at least 1")
    if not args.request_timeout >= 0:  # also refuses nan
        raise LosaError(f"--request-timeout {args.request_timeout} must be >= 0 seconds (0 = no limit)")
    if args.max_queue < 0:
        raise LosaError(f"--max-queue {args.max_queue} must be >= 0")
    return ServeSettings(request_timeout=args.request_timeout or None, max_queue=args.max_queue,
                         api_key=args.api_key or os.environ.get(API_KEY_ENV) or None)


def build_server(args: argparse.Namespace):
    """Bind the port, load the model and build the server (not yet serving).

    The port is bound first, so a busy port fails at once rather than after loading the model.

    Args:
        args: the parsed ``losa serve`` arguments.

    Returns:
        A :class:`~losa.serve.LosaServer`.

    Raises:
        LosaError: for invalid flags, a missing or unreadable ``--compact`` file, a port that cannot be
            bound, or a model that cannot be loaded.
    """
    from losa.serve import GenerationService, LosaServer, create_app
    from losa.serve.server import bind_socket

    settings = _settings(args)
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise LosaError(f"port {args.port} on {args.host} is in use; pick another with --port") from None
        raise LosaError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); check --host/--port") from None
    try:
        model, tok, mode, summary = load_runtime_model(args, "serving")
        name = args.model_name or (os.path.basename(args.compact).removesuffix(".safetensors") if args.compact
                                   else args.model)
        service = GenerationService(model, tok, name, default_max_tokens=args.max_tokens,
                                    compile=args.compile, compile_wrapper=args.compile_wrapper or "cpp",
                                    decode_engine=args.decode_engine)
    except BaseException:
        sock.close()
        raise
    info = {"runtime": mode, "sparse_layers": (summary or {}).get("replaced"),
            "compute": (summary or {}).get("compute"), "decode_engine": service.decoder.engine_reason}
    return LosaServer(create_app(service, settings, info), sock, log_level="info")


class _Terminated(Exception):
    """SIGTERM, raised again by uvicorn once it has shut down cleanly."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def run_serve(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C (or SIGTERM); either stops cleanly (open requests get up to 5 s).

    Args:
        args: the parsed ``losa serve`` arguments.

    Returns:
        0 after a clean stop.

    Raises:
        LosaError: see :func:`build_server`; also when uvicorn fails to start.
    """
    server = build_server(args)
    settings = server.app.state.settings
    limits = f"timeout {settings.request_timeout:g} s" if settings.request_timeout else "no timeout"
    # status lines go to stderr with the load's (and uvicorn's log): stdout stays empty
    status(f"serving {server.app.state.model} on {server.url} (POST /v1/completions, /v1/chat/completions; "
           f"GET /v1/models, /health; {limits}, up to {settings.max_queue} waiting"
           f"{', API key required' if settings.api_key else ''}); Ctrl-C stops")
    # uvicorn handles SIGINT/SIGTERM while it runs, then raises the signal again under the handler it found:
    # SIGINT's is KeyboardInterrupt; SIGTERM's default would kill the process (status 143) after the clean stop
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        server.serve_forever()
    except (KeyboardInterrupt, _Terminated):
        status("stopped")
    except SystemExit as e:  # uvicorn exits this way when startup fails, after logging why
        raise LosaError("the server failed to start; see the message above") from e
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        server.server_close()
    return 0
