"""Keeping stalled connections from starving everyone else (slowloris), under any open-file limit.

Three measures, each closing a gap that uvicorn leaves open:

* **A header deadline.** A connection must send complete request headers within
  :data:`HEADER_TIMEOUT` seconds of being accepted (or of its previous response). uvicorn has no
  such timer: its keep-alive timer starts only after a response and is cancelled by the first byte
  that arrives, so a client trickling a header byte now and then holds its connection forever.
  Bytes arriving do not extend this deadline.
* **A connection cap that sheds the stalled first.** At most ``max_connections`` connections are
  kept. When a new one would exceed that, the connection that has waited longest for its request
  headers is closed to make room (stalled and idle keep-alive connections, never one whose request
  is being answered); only if every connection is busy is the new one closed. So a flood of
  half-sent requests pushes out itself, not the clients that send whole requests.
* **An open-file budget.** The soft ``RLIMIT_NOFILE`` is raised to the hard limit, and the cap and
  the accept backlog are sized so that sockets, the files being served and the accept burst all fit:
  a process that runs out of descriptors cannot accept at all, and asyncio's accept loop then logs
  one error per backlog slot, many thousands a second.

:class:`ConnectionGuard` holds the policy and the bookkeeping; :meth:`ConnectionGuard.protocol_class`
is a subclass of uvicorn's own HTTP protocol that reports to it (passed to uvicorn as ``http=``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "HEADER_TIMEOUT",
    "ConnectionBudget",
    "ConnectionGuard",
    "connection_budget",
    "open_file_limit",
    "raise_open_file_limit",
]

logger = logging.getLogger(__name__)

HEADER_TIMEOUT = 5.0  # seconds from accept (or the last response) to complete request headers
DEFAULT_MAX_CONNECTIONS = 1000  # a team's clients; more belongs behind nginx (see the README)
_RESERVED_FILES = 64  # descriptors kept for everything else: listening socket, sqlite, logs, imports


@dataclass(frozen=True)
class ConnectionBudget:
    """How many connections, and how large an accept backlog, fit in the open-file limit."""

    max_connections: int
    backlog: int
    open_files: int  # the soft limit the budget was computed for


def open_file_limit() -> int:
    """The soft open-file limit now (a large number if unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 16


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard limit (as far as the OS allows); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:  # e.g. above the kernel's nr_open
            logger.info("could not raise the open-file limit from %d to %d: %s", soft, target, error)
    return soft if soft != resource.RLIM_INFINITY else 1 << 16


def connection_budget(open_files: int, wanted: int = DEFAULT_MAX_CONNECTIONS) -> ConnectionBudget:
    """The largest cap (up to ``wanted``) for which every descriptor the server may need fits.

    Each connection may hold two descriptors (its socket and the file it is being sent), and one
    accept burst takes up to ``backlog`` sockets before any of them can be shed.
    """
    backlog = max(16, min(511, open_files // 8))
    fits = (open_files - backlog - _RESERVED_FILES) // 2
    return ConnectionBudget(max(1, min(wanted, fits)), backlog, open_files)


@dataclass
class GuardCounters:
    """What the guard did (for tests, logs and /metrics)."""

    accepted: int = 0
    header_timeouts: int = 0  # closed for not sending complete headers in time
    shed: int = 0  # closed to make room for a newer connection
    refused: int = 0  # closed at once: every connection was busy


class ConnectionGuard:
    """The policy (cap, header deadline) and the connections it watches. Event-loop thread only."""

    def __init__(self, max_connections: int, header_timeout: float = HEADER_TIMEOUT) -> None:
        if max_connections < 1 or header_timeout <= 0:
            raise ValueError("max_connections must be >= 1 and header_timeout > 0")
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.counters = GuardCounters()
        self._open: set[Any] = set()
        # Connections waiting for request headers, oldest first, each with its deadline timer.
        self._waiting: collections.OrderedDict[Any, asyncio.TimerHandle] = collections.OrderedDict()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    # -- called by the protocol

    def admit(self, connection: Any) -> None:
        """A new connection: start its header deadline, then shed the longest-waiting if over the cap."""
        self.counters.accepted += 1
        self._open.add(connection)
        self.await_headers(connection)
        while len(self._open) > self.max_connections:
            victim = next(iter(self._waiting), None)
            if victim is None:  # cannot happen while the newcomer waits; kept for safety
                break
            if victim is connection:
                self.counters.refused += 1
            else:
                self.counters.shed += 1
            self._close(victim)

    def await_headers(self, connection: Any) -> None:
        """(Re)start the deadline for the next request's headers."""
        self.headers_received(connection)
        loop = asyncio.get_running_loop()
        self._waiting[connection] = loop.call_later(self.header_timeout, self._expire, connection)

    def headers_received(self, connection: Any) -> None:
        """A request's headers are complete: it no longer waits (and cannot be shed)."""
        timer = self._waiting.pop(connection, None)
        if timer is not None:
            timer.cancel()

    def forget(self, connection: Any) -> None:
        """The connection is gone."""
        self.headers_received(connection)
        self._open.discard(connection)

    # -- internals

    def _expire(self, connection: Any) -> None:
        if connection in self._waiting:
            self.counters.header_timeouts += 1
            self._close(connection)

    def _close(self, connection: Any) -> None:
        self.forget(connection)
        connection.transport.close()

    # -- the protocol

    def protocol_class(self, base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
        """uvicorn's HTTP protocol (h11, or httptools when installed), reporting to this guard."""
        if base is None:
            from uvicorn.protocols.http.auto import AutoHTTPProtocol

            base = AutoHTTPProtocol
        guard = self

        class GuardedHTTPProtocol(base):  # type: ignore[valid-type, misc]
            """uvicorn's protocol plus the guard's header deadline and connection cap."""

            def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
                super().connection_made(transport)  # type: ignore[arg-type]
                guard.admit(self)

            def connection_lost(self, exc: Exception | None) -> None:
                guard.forget(self)
                super().connection_lost(exc)

            def data_received(self, data: bytes) -> None:
                super().data_received(data)
                if self._request_active():
                    guard.headers_received(self)

            def on_response_complete(self) -> None:
                super().on_response_complete()  # may start a pipelined request at once
                if not self.transport.is_closing() and not self._request_active():
                    guard.await_headers(self)

            def _request_active(self) -> bool:
                """Whether a request's headers have arrived and its response is not finished."""
                cycle = getattr(self, "cycle", None)
                return cycle is not None and not cycle.response_complete

        return GuardedHTTPProtocol
