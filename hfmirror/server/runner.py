"""Running the mirror: the listening socket, uvicorn with the connection guard, the log.

* :func:`prepare_server` does everything that can fail before serving (the folder, the open-file
  limit, binding the port), so ``hfmirror serve`` can say what went wrong in one line and exit.
* :class:`PreparedServer` then serves until Ctrl-C or SIGTERM.
* :class:`ServerThread` runs any ASGI app the same way from a background thread (tests, demo, bench).
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from ..errors import BadInputError
from .guard import (
    DEFAULT_MAX_CONNECTIONS,
    HEADER_TIMEOUT,
    ConnectionBudget,
    ConnectionGuard,
    connection_budget,
    open_file_limit,
    raise_open_file_limit,
)
from .logs import AccessLog, configure_server_logging

__all__ = ["PreparedServer", "ServerThread", "bind_socket", "prepare_server"]

logger = logging.getLogger(__name__)

KEEP_ALIVE_TIMEOUT = 5  # seconds an idle connection is kept between requests (uvicorn's default)


def bind_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (a name is resolved as asyncio would, first address).

    The socket is made with ``IPPROTO_TCP`` spelled out: asyncio sets ``TCP_NODELAY`` only on
    connections whose socket says so, and without it every small answer waits ~40 ms for a delayed ACK.

    Raises:
        BadInputError: the port is in use, or the address cannot be bound (one line, exit code 2).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as error:
        raise BadInputError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        return sock
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise BadInputError(
                f"port {port} on {host} is already in use (another server is listening there); "
                "choose another with --port"
            ) from None
        raise BadInputError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def _uvicorn_config(
    app: ASGIApp,
    guard: ConnectionGuard,
    budget: ConnectionBudget,
    *,
    configure_logging: bool,
    graceful_seconds: int,
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=guard.protocol_class(),
        lifespan="off",
        backlog=budget.backlog,
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
        timeout_graceful_shutdown=graceful_seconds,
        access_log=False,  # AccessLog writes the request lines, escaped and bounded
        log_config=None,  # configure_server_logging (or the embedding program) sets up the handlers
        log_level=logging.INFO if configure_logging else logging.WARNING,
    )


class PreparedServer:
    """A bound socket and a configured uvicorn, ready to :meth:`run`."""

    def __init__(
        self, app: Any, sock: socket.socket, budget: ConnectionBudget, guard: ConnectionGuard
    ) -> None:
        self.app = app  # the mirror app (``app.state.store`` lists what it serves)
        self.sock = sock
        self.budget = budget
        self.guard = guard
        host, port = sock.getsockname()[:2]
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def run(self) -> None:
        """Serve until Ctrl-C or SIGTERM; then return normally."""
        configure_server_logging()
        logger.info(
            "at most %d connections (open-file limit %d); request headers due within %.0f s",
            self.budget.max_connections,
            self.budget.open_files,
            self.guard.header_timeout,
        )
        config = _uvicorn_config(
            AccessLog(self.app), self.guard, self.budget, configure_logging=True, graceful_seconds=5
        )
        try:
            uvicorn.Server(config).run(sockets=[self.sock])
        except KeyboardInterrupt:
            # uvicorn re-raises the SIGINT it caught once it has shut down cleanly; nothing was interrupted.
            pass
        finally:
            self.sock.close()
        logger.info("hfmirror server stopped")


def prepare_server(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    header_timeout: float = HEADER_TIMEOUT,
) -> PreparedServer:
    """Raise the open-file limit, size the connection cap to it and bind the port.

    Raises:
        BadInputError: the port is in use or cannot be bound, or a limit is not positive.
    """
    if max_connections < 1 or header_timeout <= 0:
        raise BadInputError("--max-connections and the header timeout must be positive")
    budget = connection_budget(raise_open_file_limit(), max_connections)
    sock = bind_socket(host, port, budget.backlog)
    return PreparedServer(app, sock, budget, ConnectionGuard(budget.max_connections, header_timeout))


class ServerThread:
    """Run an ASGI app with uvicorn in a background thread on a free port (tests, benchmarks).

    It has the same connection guard as ``hfmirror serve``. Use as a context manager, or call
    :meth:`start` and :meth:`stop`::

        with ServerThread(create_app(root)) as server:
            requests.get(server.url + "/api/models/org/name")
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        access_log: bool = False,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT,
    ) -> None:
        self.app = app
        self.host = host
        # The embedding process's limit is its own business: sized to it, not raised.
        self.budget = connection_budget(open_file_limit(), max_connections)
        self.guard = ConnectionGuard(self.budget.max_connections, header_timeout)
        self._sock = bind_socket(host, port, self.budget.backlog)
        self.port = self._sock.getsockname()[1]
        served = AccessLog(app) if access_log else app
        config = _uvicorn_config(served, self.guard, self.budget, configure_logging=False, graceful_seconds=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="hfmirror-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _serve(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        finally:
            self._sock.close()

    def start(self, timeout: float = 20.0) -> ServerThread:
        """Start serving and wait until the socket is listening."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Ask uvicorn to shut down and wait for the thread."""
        self._server.should_exit = True
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
