"""The mirror's counters, served at ``/metrics`` in Prometheus' text format.

Each process counts for itself (a Prometheus server scrapes every replica); the numbers start at zero
when the process starts, as Prometheus expects of counters.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from .tally import ResponseTally

__all__ = ["COUNTERS", "CountingMiddleware", "Metrics"]

COUNTERS = {
    "requests": "Requests answered.",
    "cache_hits": "Requests answered from what the cache already held.",
    "cache_misses": "Requests that needed the upstream (a listing or a file not yet cached).",
    "stale_answers": "Requests answered from the cache because the upstream could not be reached.",
    "errors": "Answers with a 5xx status, and responses cut short.",
    "upstream_errors": "Upstream requests that failed (unreachable, or an error after retries).",
    "upstream_bytes": "Body bytes fetched from the upstream.",
    "served_bytes": "Body bytes sent to clients.",
    "fills_started": "Files this process started fetching from the upstream.",
    "evictions": "Files evicted from the cache to stay under --max-size.",
    "evicted_bytes": "Bytes evicted from the cache.",
}


class Metrics:
    """Thread-safe counters, plus gauges read when ``/metrics`` is asked for."""

    def __init__(self, prefix: str = "hfmirror") -> None:
        self.prefix = prefix
        self._values = dict.fromkeys(COUNTERS, 0)
        self._read: dict[str, tuple[str, str, Callable[[], float]]] = {}  # name -> (kind, help, read)
        self._lock = threading.Lock()

    def add(self, name: str, amount: int = 1) -> None:
        if name not in COUNTERS:
            raise KeyError(f"unknown counter {name!r}")
        with self._lock:
            self._values[name] += amount

    def value(self, name: str) -> int:
        with self._lock:
            return self._values[name]

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Report ``read()`` as the gauge ``<prefix>_<name>`` at each scrape."""
        self._read[name] = ("gauge", help_text, read)

    def counted_elsewhere(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Report ``read()``, a total kept by someone else, as the counter ``<prefix>_<name>_total``."""
        self._read[f"{name}_total"] = ("counter", help_text, read)

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            values = dict(self._values)
        lines = []
        for name, help_text in COUNTERS.items():
            full = f"{self.prefix}_{name}_total"
            lines += [f"# HELP {full} {help_text}", f"# TYPE {full} counter", f"{full} {values[name]}"]
        for name, (kind, help_text, read) in self._read.items():
            full = f"{self.prefix}_{name}"
            lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}", f"{full} {read():g}"]
        return "\n".join(lines) + "\n"


class CountingMiddleware:
    """ASGI middleware: counts requests, bytes sent and failed answers into :class:`Metrics`.

    A request whose answer was cut short is one the app marked ``cut`` in ``scope["state"]["log"]``.
    Scrapes of ``/metrics`` itself are not counted.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            await self.app(scope, receive, send)
            return
        tally = ResponseTally(send)
        try:
            await self.app(scope, receive, tally.send)
        finally:
            self.metrics.add("requests")
            self.metrics.add("served_bytes", tally.body_bytes)
            outcome = str((scope.get("state") or {}).get("log", ""))
            if tally.status is None or tally.status >= 500 or "cut" in outcome:
                self.metrics.add("errors")
