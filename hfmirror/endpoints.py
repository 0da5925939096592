"""Which mirror to talk to, and how hard.

An :class:`EndpointPool` holds the endpoints in failover order. Requests go to the current one; after
``FAILOVER_AFTER`` consecutive connection-level failures it moves on to the next, and says so.

Each endpoint has a :class:`RateGovernor`: a concurrency limit that halves when the endpoint answers
429/503 and creeps back up with each success (additive increase, multiplicative decrease, as TCP does),
plus a "do not send before" time taken from ``Retry-After``. Every worker asks it for a slot before a
request, so a rate-limited mirror sees fewer and politer requests instead of a retry storm.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

from .errors import BadInputError

__all__ = ["Endpoint", "EndpointPool", "RateGovernor", "normalize_endpoint"]

logger = logging.getLogger(__name__)


def normalize_endpoint(url: str) -> str:
    """Check an endpoint URL (http or https, a host, no query) and drop any trailing slash."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise BadInputError(f"not an http(s) endpoint URL: {url!r}")
    return url


class RateGovernor:
    """A concurrency limit that backs off when the server says it is overloaded."""

    def __init__(self, max_concurrency: int) -> None:
        self.max_concurrency = max(1, max_concurrency)
        self._limit = float(self.max_concurrency)
        self._in_flight = 0
        self._not_before = 0.0
        self._cond = threading.Condition()

    @property
    def limit(self) -> int:
        """How many requests may be in flight right now."""
        return max(1, int(self._limit))

    def acquire(self, cancel: threading.Event | None = None) -> None:
        """Wait for a slot (and for any Retry-After pause to pass)."""
        with self._cond:
            while True:
                if cancel is not None and cancel.is_set():
                    return
                wait = self._not_before - time.monotonic()
                if wait <= 0 and self._in_flight < self.limit:
                    self._in_flight += 1
                    return
                self._cond.wait(timeout=min(max(wait, 0.05), 0.5))

    def release(self) -> None:
        with self._cond:
            self._in_flight = max(0, self._in_flight - 1)
            self._cond.notify_all()

    def on_success(self) -> None:
        """Additive increase: one more slot per ``limit`` successes."""
        with self._cond:
            self._limit = min(float(self.max_concurrency), self._limit + 1.0 / self._limit)
            self._cond.notify_all()

    def on_overloaded(self, delay: float) -> None:
        """Multiplicative decrease, and no request at all for ``delay`` seconds."""
        with self._cond:
            self._limit = max(1.0, self._limit / 2)
            self._not_before = max(self._not_before, time.monotonic() + delay)


@dataclass
class Endpoint:
    """One mirror: its base URL, its rate governor and its recent failures."""

    url: str
    governor: RateGovernor
    consecutive_failures: int = 0
    requests: int = 0
    rate_limited: int = 0

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    def resolve_url(self, repo_type: str, repo_id: str, revision: str, filename: str) -> str:
        """The Hub's download URL of a file: ``{E}/[datasets/]{repo}/resolve/{rev}/{path}``."""
        prefix = "datasets/" if repo_type == "dataset" else ""
        return f"{self.url}/{prefix}{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"


@dataclass
class EndpointPool:
    """Endpoints in failover order; ``current`` is the one in use."""

    endpoints: list[Endpoint]
    failover_after: int = 3
    _index: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_urls(cls, urls: list[str], *, max_concurrency: int, failover_after: int) -> EndpointPool:
        unique: list[str] = []
        for url in urls:
            normalized = normalize_endpoint(url)
            if normalized not in unique:
                unique.append(normalized)
        if not unique:
            raise BadInputError("no endpoint given")
        return cls(
            endpoints=[Endpoint(url, RateGovernor(max_concurrency)) for url in unique],
            failover_after=failover_after,
        )

    @property
    def current(self) -> Endpoint:
        with self._lock:
            return self.endpoints[self._index]

    def use(self, endpoint: Endpoint) -> None:
        """Make ``endpoint`` the current one (the one that answered the listing)."""
        with self._lock:
            self._index = self.endpoints.index(endpoint)

    def report_success(self, endpoint: Endpoint) -> None:
        endpoint.consecutive_failures = 0

    def report_failure(self, endpoint: Endpoint) -> None:
        """Count a connection-level failure; fail over once an endpoint keeps failing."""
        with self._lock:
            endpoint.consecutive_failures += 1
            # The last endpoint is never abandoned: its retry budget decides when to give up.
            if (
                endpoint.consecutive_failures >= self.failover_after
                and self._index + 1 < len(self.endpoints)
                and self.endpoints[self._index] is endpoint
            ):
                self._index += 1
                following = self.endpoints[self._index].url
                logger.warning("%s keeps failing; switching to %s", endpoint.url, following)
