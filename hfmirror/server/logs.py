"""The server's log: one line per request, and a handler that no client can flood.

Anything a client sends can end up in the log (a path, a header), and a client can send a lot of
requests. So every record is escaped onto one line (no control characters: a ``\\r\\n`` in a path
cannot forge a line; only a traceback spans lines, each indented) and cut to
:data:`MAX_RECORD_CHARS`, and the handler spends from a byte budget that refills at
:data:`LOG_BYTES_PER_SECOND`: past it, records are counted instead of written, and one line says how
many were dropped once the budget allows writing again. Whatever arrives, the log grows by at most
:data:`LOG_BURST_BYTES` at once and :data:`LOG_BYTES_PER_SECOND` after that: a flood of requests, or
of errors from connections past the open-file limit, cannot fill the disk.

:class:`AccessLog` is the ASGI middleware that writes the per-request line.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from starlette.types import ASGIApp, Receive, Scope, Send

from .tally import ResponseTally

__all__ = [
    "LOG_BURST_BYTES",
    "LOG_BYTES_PER_SECOND",
    "MAX_RECORD_CHARS",
    "AccessLog",
    "BoundedLogHandler",
    "configure_server_logging",
    "printable",
]

ACCESS_LOGGER = "hfmirror.access"
MAX_RECORD_CHARS = 4000  # a traceback fits; a 16 KB request path does not
MAX_PATH_CHARS = 300  # of a request path in an access line
LOG_BYTES_PER_SECOND = 32 * 1024  # sustained: ~300 access lines a second
LOG_BURST_BYTES = 256 * 1024


def printable(text: str, limit: int) -> str:
    """``text`` on one line: control and non-ASCII characters escaped, cut to ``limit`` characters."""
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    escaped = "".join(ch if " " <= ch <= "~" else f"\\x{ord(ch):02x}" for ch in escaped)
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


class BoundedLogHandler(logging.Handler):
    """A stream handler with a refilling byte budget; what does not fit is counted, then reported.

    Args:
        stream: where lines go (default stderr).
        rate: budget refill, bytes per second.
        burst: the most the budget holds (what may be written at once after a quiet time).
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        rate: float = LOG_BYTES_PER_SECOND,
        burst: float = LOG_BURST_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.dropped = 0  # records not written since the last report
        self.dropped_total = 0
        self._budget = burst
        self._last = clock()
        self._budget_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.render(record)
            with self._budget_lock:
                lines = self._admit(text)
            for line in lines:
                self.stream.write(line + "\n")
            if lines:
                self.stream.flush()
        except Exception:  # a broken stream must not break a request
            self.handleError(record)

    @staticmethod
    def render(record: logging.LogRecord) -> str:
        """``LEVEL: message`` on one line, then an indented traceback if there is one; escaped and cut.

        Only a traceback spans lines, and each of its lines is indented, so nothing a client sends can
        produce a line that looks like a record of its own.
        """
        text = f"{record.levelname}: {printable(record.getMessage(), MAX_RECORD_CHARS)}"
        if record.exc_info:
            trace = logging.Formatter().formatException(record.exc_info)
            text += "".join(f"\n    {printable(line, MAX_RECORD_CHARS)}" for line in trace.splitlines())
        return text[:MAX_RECORD_CHARS]

    def _admit(self, text: str) -> list[str]:
        """The lines to write for one record (none if over budget; a drop report first if one is due)."""
        now = self.clock()
        self._budget = min(self.burst, self._budget + (now - self._last) * self.rate)
        self._last = now
        lines = []
        if self.dropped:
            report = f"hfmirror: log rate limit: {self.dropped} log records dropped"
            if self._budget < len(report) + len(text):
                self.dropped += 1
                self.dropped_total += 1
                return []
            lines.append(report)
            self._budget -= len(report)
            self.dropped = 0
        if self._budget < len(text):
            self.dropped += 1
            self.dropped_total += 1
            return lines
        self._budget -= len(text)
        lines.append(text)
        return lines


def configure_server_logging(
    handler: logging.Handler | None = None, level: int = logging.INFO
) -> logging.Handler:
    """Send the server's records (ours, uvicorn's, asyncio's) through one bounded handler on stderr."""
    handler = handler if handler is not None else BoundedLogHandler()
    for name in ("hfmirror", "uvicorn", "uvicorn.error", "asyncio"):
        log = logging.getLogger(name)
        log.handlers = [handler]
        log.propagate = False
        log.setLevel(level)
    access = logging.getLogger("uvicorn.access")  # replaced by AccessLog
    access.handlers = []
    access.propagate = False
    return handler


class AccessLog:
    """ASGI middleware: one line per request, ``client "METHOD path" status bytes seconds [extra]``.

    ``extra`` is whatever the app put in ``scope["state"]["log"]`` (a short word such as ``hit``).
    """

    def __init__(self, app: ASGIApp, logger: logging.Logger | None = None) -> None:
        self.app = app
        self.logger = logger if logger is not None else logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        tally = ResponseTally(send)
        try:
            await self.app(scope, receive, tally.send)
        finally:
            self._log(scope, tally, time.monotonic() - started)

    def _log(self, scope: Scope, tally: ResponseTally, seconds: float) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "replace")
        query: bytes = scope.get("query_string") or b""
        target = raw + (b"?" + query if query else b"")
        client = scope.get("client")
        extra = (scope.get("state") or {}).get("log")
        self.logger.info(
            '%s "%s %s" %s %d %.3fs%s',
            f"{client[0]}:{client[1]}" if client else "-",
            scope["method"],
            printable(target.decode("latin-1"), MAX_PATH_CHARS),
            tally.status if tally.status is not None else "-",
            tally.body_bytes,
            seconds,
            f" {printable(str(extra), 40)}" if extra else "",
        )
