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

import bisect
import collections
import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from . import constants
from .errors import BadInputError, QuotaExhaustedError
from .retry import RateLimitInfo, parse_ratelimit

__all__ = [
    "METADATA_PRIORITY",
    "Endpoint",
    "EndpointPool",
    "QuotaPacer",
    "RateGovernor",
    "normalize_endpoint",
    "redact_url",
]

# The priority of a listing or an access check: ahead of every transfer, whose priority is its file's
# seconds of work left. Such a request is short, and the transfers it leads to wait for its answer.
METADATA_PRIORITY = math.inf

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


class QuotaPacer:
    """Spends the request quota a server announces without going over it.

    A server that counts requests per window says, on its answers, how many are left (``r``) and in
    how many seconds the window resets (``t``), perhaps also the quota of each window (``q`` per
    ``w`` seconds): ``retry.parse_ratelimit``. From those, requests go out at full speed while the
    quota has room (it is meant to be used), and once it is spent none goes out until the window
    resets, at the earliest moment the answers allow: each one bounds the reset, which comes no later
    than the answer's arrival plus ``t`` (``t`` is rounded up), and the smallest bound is kept. A new
    window starts with ``q`` requests where the policy said so, else unknown until an answer tells.

    The count is ours: an answer's ``r`` less the requests sent after the one it answers (they may not
    have been counted when it was written), so requests in flight never overdraw the quota, and an
    answer saying fewer are left than we think (others share the quota: the Hub counts per IP) is
    believed. Without those headers the pacer never holds a request back.
    """

    def __init__(self) -> None:
        self.remaining: int | None = None  # requests we may still send in this window; None: unknown
        self.reset_at: float | None = None  # when this window ends, at the latest
        self.quota: int | None = None
        self.window: float | None = None
        self._window_start = float("-inf")
        self._sends: collections.deque[float] = collections.deque()  # our requests in this window
        self.announced = False  # the wait for this window's reset has been announced

    def delay(self, now: float) -> float:
        """Seconds until the quota lets a request go (0: now)."""
        self._roll(now)
        if self.remaining is None or self.remaining > 0 or self.reset_at is None:
            return 0.0
        return max(0.0, self.reset_at - now)

    def sent(self, now: float) -> None:
        """Count a request about to go out."""
        self._roll(now)
        self._sends.append(now)
        if self.remaining is not None:
            self.remaining -= 1

    def observe(self, info: RateLimitInfo, sent_at: float, now: float) -> None:
        """Take in what the answer to a request sent at ``sent_at`` said, arriving at ``now``."""
        self._roll(now)
        if sent_at < self._window_start:
            return  # it answers a request of a window that is over: nothing it says is news
        if info.quota is not None:
            self.quota, self.window = info.quota, info.window
        if info.reset is not None:
            latest = now + info.reset
            self.reset_at = latest if self.reset_at is None else min(self.reset_at, latest)
        if info.remaining is not None:
            sent_after = len(self._sends) - bisect.bisect_right(self._sends, sent_at)
            estimate = info.remaining - sent_after
            self.remaining = estimate if self.quota is None else min(estimate, self.quota - len(self._sends))

    def _roll(self, now: float) -> None:
        """Begin the next window once this one is over."""
        if self.reset_at is None or now < self.reset_at:
            return
        self._window_start = self.reset_at
        self._sends.clear()
        self.remaining = self.quota
        self.announced = False
        if self.window:  # fixed windows follow one another: the next one ends a window later
            self.reset_at += self.window * (1 + int((now - self.reset_at) // self.window))
        else:
            self.reset_at = None


class RateGovernor:
    """How many requests may be in flight to one endpoint, and in what order waiting ones go.

    * A connection budget: at most ``max_concurrency`` requests at once, shared by every file of the
      run. A 429/503 halves the limit, successes grow it back (additive increase, multiplicative
      decrease, as TCP does), and a ``Retry-After`` stops every request until it has passed.
    * A request quota, where the server announces one (:class:`QuotaPacer`).
    * Order: when a slot frees, the waiting request with the highest ``priority`` takes it (ties: first
      come, first served). Transfers ask with the seconds of work their file has left, so the budget
      goes where it helps most: a large file crawling behind a per-connection cap before a small one.
      Listings and access checks ask with ``METADATA_PRIORITY`` (:meth:`acquire_for_metadata`),
      ahead of them all.
    """

    def __init__(self, max_concurrency: int, *, name: str = "") -> None:
        self.max_concurrency = max(1, max_concurrency)
        self.name = name  # the endpoint as shown, for notices
        self.pacer = QuotaPacer()
        self._limit = float(self.max_concurrency)
        self._in_flight = 0
        self._not_before = 0.0
        self._waiting: list[tuple[float, int]] = []  # heap of (-priority, arrival): who goes next
        self._arrivals = itertools.count()
        self._cond = threading.Condition()
        self.connection_rate: float | None = None  # bytes/s one connection delivers, lately (see note_rate)

    @property
    def limit(self) -> int:
        """How many requests may be in flight right now."""
        return max(1, int(self._limit))

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot now."""
        with self._cond:
            return len(self._waiting)

    def acquire(
        self, cancel: threading.Event | None = None, *, priority: float = 0.0, paced: bool = True
    ) -> bool:
        """Wait for a slot (and for any Retry-After pause, and the quota, to allow). False if ``cancel``
        was set first: then no slot was taken, and none must be released.

        ``paced=False`` is for listings and access checks: the quota the pacer spends is the one file
        answers announce (the Hub's "resolvers"), which counts file requests only (listings count
        against another, "api"), so such a request neither waits for it nor uses it up.

        Raises:
            QuotaExhaustedError: if the announced quota stays spent for longer than ``MAX_RETRY_AFTER``
            (a Retry-After that long gives the endpoint up; so does a quota announced spent that long:
            ``policy.quota_spent`` is the verdict).
        """
        with self._cond:
            ticket = (-priority, next(self._arrivals))
            heapq.heappush(self._waiting, ticket)
            try:
                while True:
                    if cancel is not None and cancel.is_set():
                        return False
                    now = time.monotonic()
                    quota_wait = self.pacer.delay(now) if paced else 0.0
                    if quota_wait > constants.MAX_RETRY_AFTER:
                        raise QuotaExhaustedError(self.name, quota_wait, constants.MAX_RETRY_AFTER)
                    wait = max(self._not_before - now, quota_wait)
                    if wait <= 0 and self._in_flight < self.limit and self._waiting[0] == ticket:
                        heapq.heappop(self._waiting)
                        self._in_flight += 1
                        if paced:
                            self.pacer.sent(now)
                        self._cond.notify_all()  # the next in line may go too, if there is room
                        return True
                    self._announce(quota_wait)
                    self._cond.wait(timeout=min(max(wait, 0.05), 0.5))
            finally:
                if ticket in self._waiting:  # cancelled while waiting
                    self._waiting.remove(ticket)
                    heapq.heapify(self._waiting)
                    self._cond.notify_all()

    def acquire_for_metadata(self, cancel: threading.Event | None = None) -> bool:
        """:meth:`acquire` for a listing or an access check: ahead of every transfer, and outside the
        file-request quota (``paced=False``)."""
        return self.acquire(cancel, priority=METADATA_PRIORITY, paced=False)

    def release(self) -> None:
        with self._cond:
            self._in_flight = max(0, self._in_flight - 1)
            self._cond.notify_all()

    def observe(self, headers: Mapping[str, str], sent_at: float) -> None:
        """Read the rate limit an answer announces (to a request sent at ``sent_at``), if any."""
        info = parse_ratelimit(headers)
        if info is None:
            return
        with self._cond:
            self.pacer.observe(info, sent_at, time.monotonic())
            self._cond.notify_all()

    def note_rate(self, rate: float) -> None:
        """Fold in a file's measured bytes/s per connection: the rate files not yet measured assume, so
        that every file's priority is in the same unit."""
        with self._cond:
            self.connection_rate = (
                rate if self.connection_rate is None else 0.8 * self.connection_rate + 0.2 * rate
            )

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

    def _announce(self, quota_wait: float) -> None:
        """Say once per window that the quota is spent, if waiting for it is long enough to notice."""
        if quota_wait >= constants.NOTICE_WAIT_SECONDS and not self.pacer.announced:
            self.pacer.announced = True
            per = f" ({self.pacer.quota} requests per {self.pacer.window:g} s)" if self.pacer.window else ""
            logger.warning(
                "%s: its request quota%s is used up; waiting %.0f s for it to reset",
                self.name,
                per,
                quota_wait,
            )


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
    # Whether the run's token may be sent to it: not when the token was found on this machine and the
    # endpoint is one the user never chose (see download.token_audience).
    sends_token: bool = True

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
            endpoints=[Endpoint(url, RateGovernor(max_concurrency, name=redact_url(url))) for url in unique],
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
