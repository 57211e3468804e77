"""Running the app: uvicorn on a socket that is bound up front, so a busy port fails before anything else."""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI

from losa.serve.app import ServeSettings, create_app
from losa.serve.service import GenerationService


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: any free port) and listening, ready for uvicorn.

    Connections made before uvicorn runs wait in the backlog.

    Args:
        host: address or host name to bind.
        port: TCP port.

    Returns:
        The bound socket.

    Raises:
        OSError: when the address cannot be bound (``errno.EADDRINUSE`` for a busy port).
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart while old connections linger
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class LosaServer:
    """An ASGI app served by uvicorn on an already-bound socket.

    Args:
        app: the ASGI app (see :func:`~losa.serve.app.create_app`).
        sock: a bound socket (see :func:`bind_socket`); the server owns it from now on.
        log_level: uvicorn's log level ("info" logs every request).
    """

    def __init__(self, app: FastAPI, sock: socket.socket, log_level: str = "warning") -> None:
        self.app, self.socket = app, sock
        # log_config=None: uvicorn's loggers go through the application's logging setup
        config = uvicorn.Config(app, log_config=None, log_level=log_level, timeout_graceful_shutdown=5,
                                lifespan="off")
        self._server = uvicorn.Server(config)

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound socket."""
        host, port = self.socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def started(self) -> bool:
        """Whether uvicorn is accepting connections."""
        return self._server.started

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (or, in the main thread, SIGINT/SIGTERM: uvicorn then re-raises it)."""
        self._server.run(sockets=[self.socket])

    def shutdown(self) -> None:
        """Ask :meth:`serve_forever` to return (finishing open requests for up to 5 s); thread-safe."""
        self._server.should_exit = True

    def server_close(self) -> None:
        """Close the socket (after :meth:`serve_forever` returned, or when it never ran)."""
        self.socket.close()


def make_server(service: GenerationService, host: str = "127.0.0.1", port: int = 8000, info: dict | None = None,
                settings: ServeSettings | None = None, log_level: str = "warning") -> LosaServer:
    """Bind and build the server; ``serve_forever()`` runs it, ``shutdown()`` stops it.

    Args:
        service: the generation service.
        host: address to bind.
        port: TCP port (0: any free port; see ``url``).
        info: extra facts for ``/health``.
        settings: timeout, queue bound and API key.
        log_level: uvicorn's log level.

    Returns:
        The bound, not yet serving :class:`LosaServer`.

    Raises:
        OSError: when the address cannot be bound.
    """
    sock = bind_socket(host, port)
    return LosaServer(create_app(service, settings, info), sock, log_level)
