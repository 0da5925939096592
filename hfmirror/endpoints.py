"""Which mirror to talk to, and how hard.

An :class:`EndpointPool` holds the endpoints in failover order, for one run. Every request goes to the
current one, and once the run has left an endpoint it never goes back to it: the listing and every
file after it use the endpoint the run moved to. The run moves on (:meth:`EndpointPool.fail_over`)
when the current endpoint

* fails ``FAILOVER_AFTER`` connections in a row (refused, reset, 5xx),
* keeps answering 429: ``RATE_LIMITED_FAILOVER_AFTER`` pauses in a row with no success between them
  (a single 429 is a rate limit to obey, not a failure),
* or gives an answer that rules it out for this run (not a Hub answer, a hang, a ``Retry-After``
  beyond the limit): :mod:`hfmirror.policy` decides which answers those are.

The last endpoint left is never abandoned: its retry budget decides when the run gives up.

Each endpoint has a :class:`RateGovernor`: a concurrency limit that halves when the endpoint answers
429/503 and creeps back up with each success (additive increase, multiplicative decrease, as TCP does),
plus a "do not send before" time taken from ``Retry-After``. Every worker asks it for a slot before a
request, so a rate-limited mirror sees fewer and politer requests instead of a retry storm.

Endpoint URLs may carry credentials (``https://user:password@host``): they are used for requests but
never shown; :func:`redact_url` is what every message, summary and log line prints instead.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from . import constants
from .errors import BadInputError

__all__ = ["Endpoint", "EndpointPool", "RateGovernor", "normalize_endpoint", "redact_url"]

logger = logging.getLogger(__name__)


def redact_url(url: str) -> str:
    """``url`` with any user name and password replaced by ``***``, for showing it to people."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def normalize_endpoint(url: str) -> str:
    """Check an endpoint URL (http or https, a host, no query) and drop any trailing slash."""
    url = url.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        valid = False
    if not valid or parts.query or parts.fragment:
        raise BadInputError(f"not an http(s) endpoint URL: {redact_url(url)!r}")
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

    def acquire(self, cancel: threading.Event | None = None) -> bool:
        """Wait for a slot (and for any Retry-After pause to pass). False if ``cancel`` was set first:
        then no slot was taken, and none must be released."""
        with self._cond:
            while True:
                if cancel is not None and cancel.is_set():
                    return False
                wait = self._not_before - time.monotonic()
                if wait <= 0 and self._in_flight < self.limit:
                    self._in_flight += 1
                    return True
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

    def on_overloaded(self, delay: float) -> bool:
        """Multiplicative decrease, and no request at all for ``delay`` seconds.

        Returns True if this begins a new pause, False if a pause was already running: the 429s of
        requests sent together come back together, and they are one rate-limit episode, not several.
        """
        with self._cond:
            now = time.monotonic()
            new_pause = now >= self._not_before
            if new_pause:
                self._limit = max(1.0, self._limit / 2)
            self._not_before = max(self._not_before, now + delay)
            return new_pause


@dataclass(eq=False)  # each endpoint is itself: compared by identity
class Endpoint:
    """One mirror: its base URL, its rate governor, and what it has done in this run."""

    url: str
    governor: RateGovernor
    consecutive_failures: int = 0
    requests: int = 0
    rate_limited: int = 0  # 429/503 answers
    failures: int = 0  # connection-level failures and 5xx answers
    rate_limit_streak: int = 0  # pauses in a row with no success between them
    abandoned: str | None = None  # why the run stopped using it, if it did

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def shown(self) -> str:
        """The URL as messages show it: credentials masked."""
        return redact_url(self.url)

    def resolve_url(self, repo_type: str, repo_id: str, revision: str, filename: str) -> str:
        """The Hub's download URL of a file: ``{E}/[datasets/]{repo}/resolve/{rev}/{path}``."""
        prefix = "datasets/" if repo_type == "dataset" else ""
        return f"{self.url}/{prefix}{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"

    def outcome(self) -> dict[str, Any]:
        """What this endpoint did in the run, for the summary and ``--json``."""
        return {
            "url": self.shown,
            "requests": self.requests,
            "rate_limited": self.rate_limited,
            "failures": self.failures,
            "abandoned": self.abandoned,
        }


@dataclass
class EndpointPool:
    """Endpoints in failover order; ``current`` is the one in use. One pool serves one whole run."""

    endpoints: list[Endpoint]
    failover_after: int = 3
    failovers: int = 0  # times the run moved to another endpoint
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

    def in_service(self) -> list[Endpoint]:
        """The current endpoint, then the later ones the run has not abandoned, in failover order."""
        with self._lock:
            return [e for e in self.endpoints[self._index :] if e.abandoned is None]

    def use(self, endpoint: Endpoint) -> None:
        """Make ``endpoint`` the current one; the run will not go back to the ones before it."""
        with self._lock:
            self._index = self.endpoints.index(endpoint)

    def report_success(self, endpoint: Endpoint) -> None:
        endpoint.consecutive_failures = 0
        endpoint.rate_limit_streak = 0

    def report_failure(self, endpoint: Endpoint) -> None:
        """Count a connection-level failure; fail over once an endpoint keeps failing."""
        with self._lock:
            endpoint.failures += 1
            endpoint.consecutive_failures += 1
            keeps_failing = endpoint.consecutive_failures >= self.failover_after
        if keeps_failing:
            self.fail_over(endpoint, f"failed {endpoint.consecutive_failures} times in a row")

    def report_rate_limited(self, endpoint: Endpoint, *, new_pause: bool) -> None:
        """Count a 429/503; fail over once an endpoint keeps answering it pause after pause."""
        with self._lock:
            endpoint.rate_limited += 1
            if new_pause:
                endpoint.rate_limit_streak += 1
            streak = endpoint.rate_limit_streak
        if new_pause and streak >= constants.RATE_LIMITED_FAILOVER_AFTER:
            self.fail_over(endpoint, f"kept answering 429/503 ({streak} pauses in a row, no success)")

    def fail_over(self, endpoint: Endpoint, reason: str) -> bool:
        """Stop using ``endpoint`` for the rest of the run, because of ``reason``.

        Returns True if the run no longer depends on it (another endpoint took over, or it had been
        left already); False if it is the last endpoint left, which is never abandoned.
        """
        with self._lock:
            if endpoint.abandoned is not None or self.endpoints.index(endpoint) < self._index:
                return True
            others = [e for e in self.endpoints[self._index :] if e.abandoned is None and e is not endpoint]
            if not others:
                return False
            endpoint.abandoned = reason
            if self.endpoints[self._index] is not endpoint:
                return True  # a later endpoint, asked for one file: just not asked again
            self._index = self.endpoints.index(others[0])
            self.failovers += 1
        logger.warning(
            "%s %s; switching to %s for the rest of the run", endpoint.shown, reason, others[0].shown
        )
        return True
