"""A fault-injecting ASGI wrapper: the network misbehaving on purpose, for tests and benchmarks.

Wrap any ASGI app (normally the mirror from :mod:`.app`) with :class:`FaultInjector` and a
:class:`FaultPlan`. The plan is a list of :class:`Fault` rules, changeable at runtime from any thread.
Each rule picks requests by path glob and method, can let the first ``skip`` matching requests pass,
and then applies to ``times`` of them (or to every one). Kinds of fault:

==================  =================================================================================
``drop``            send ``after_bytes`` of the body, then close the connection (a truncated body)
``status``          answer ``status`` (e.g. 503) instead of calling the app
``too_many``        answer 429 with ``Retry-After`` (seconds or an HTTP date) and optionally
                    ``RateLimit: "api";r=0;t=N``
``stall``           sleep ``seconds`` before the headers (``after_bytes=None``) or after that many bytes
``corrupt``         flip the first byte of each body message: same length, wrong content
``ignore_range``    drop the request's ``Range`` header, so a full 200 answer comes back
``bandwidth``       pace each response to ``rate`` bytes per second
``xet``             add Xet headers (``X-Xet-Hash``, ``Link: <...>; rel="xet-auth"``) to resolve answers
``redirect``        answer resolve requests with 302 to the same path on ``url`` (another host name)
``require_token``   a gated repo: answer 401 (no token) or 403 (another token) with ``X-Error-Code:
                    GatedRepo`` unless the request carries ``Authorization: Bearer <token>``
==================  =================================================================================

Besides the rules, the plan has three limits of its own, each off until set:

* ``plan.limit_requests(R)`` answers 429 to requests beyond R per second (sliding, unannounced).
* ``plan.request_quota(Q, W)`` is a fixed-window quota as the Hub runs one: Q matching requests per
  window of W seconds (windows follow one another from the first request), announced on every
  matching answer with ``RateLimit: "<name>";r=<left>;t=<seconds to reset>`` and
  ``RateLimit-Policy: "fixed window";"<name>";q=Q;w=W``; beyond it, 429 with ``Retry-After``.
* ``plan.limit_link(R)`` paces all response bodies together to R bytes per second: a link shared by
  every connection (a ``bandwidth`` rule caps each connection on its own, and both may apply).

Every request is recorded (method, path, headers such as ``Authorization``, ``Range``, status, body
bytes sent, faults applied): ``plan.records`` and the per-path summary ``plan.stats``. A server in
another process is controlled over HTTP: ``GET /_faults/stats``, ``GET /_faults/requests``,
``POST /_faults/plan`` (JSON ``{"reset": true, "faults": [{"kind": "drop", ...}], "max_rps": R,
"quota": {"limit": Q, "window": W}, "link_rate": R}``) and ``POST /_faults/reset``. Run one with
``python -m hfmirror.server.faults ROOT --port P``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import fnmatch
import json
import logging
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["FAULT_KINDS", "Fault", "FaultInjector", "FaultPlan", "RequestRecord", "main"]

logger = logging.getLogger(__name__)

FAULT_KINDS = (
    "drop",
    "status",
    "too_many",
    "stall",
    "corrupt",
    "ignore_range",
    "bandwidth",
    "xet",
    "redirect",
    "require_token",
)
# Faults that change the body only make sense for GET; the others also hit HEAD by default.
_BODY_KINDS = {"drop", "corrupt", "ignore_range", "bandwidth"}
_MAX_RECORDS = 100_000  # keep memory bounded during long benchmarks
_FAKE_XET_HASH = "0" * 64


@dataclass
class Fault:
    """One rule of a :class:`FaultPlan`. Counters ``seen`` and ``applied`` are updated as requests arrive."""

    kind: str
    path: str = "*"  # fnmatch glob on the decoded URL path, e.g. "*/model.safetensors" ("*" crosses "/")
    methods: tuple[str, ...] | None = None  # None: GET for body faults, GET and HEAD for the others
    skip: int = 0  # let this many matching requests through first
    times: int | None = None  # then apply to this many (None: to every one)
    after_bytes: int | None = None  # drop/stall: how much of the body goes out first
    status: int = 503  # status
    retry_after: str | None = "1"  # too_many: seconds, or an HTTP date
    ratelimit_reset: int | None = None  # too_many: also send RateLimit: "api";r=0;t=N
    seconds: float = 0.0  # stall
    rate: float = 0.0  # bandwidth, bytes per second
    url: str = ""  # redirect target base, e.g. "http://localhost:8001"
    token: str = ""  # require_token: the one token let through
    seen: int = 0
    applied: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {', '.join(FAULT_KINDS)}")
        if self.methods is None:
            stall_body = self.kind == "stall" and self.after_bytes is not None
            self.methods = ("GET",) if self.kind in _BODY_KINDS or stall_body else ("GET", "HEAD")
        self.methods = tuple(m.upper() for m in self.methods)
        if self.kind == "drop" and self.after_bytes is None:
            self.after_bytes = 0  # ASGI cannot close a connection before the headers: drop right after them
        if self.kind == "bandwidth" and self.rate <= 0:
            raise ValueError("a bandwidth fault needs rate > 0 (bytes per second)")
        if self.kind == "redirect" and not self.url:
            raise ValueError("a redirect fault needs url")
        if self.kind == "require_token" and not self.token:
            raise ValueError("a require_token fault needs token")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        known = {f.name for f in fields(cls)} - {"seen", "applied"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        data = dict(data)
        if data.get("methods") is not None:
            data["methods"] = tuple(data["methods"])
        return cls(**data)

    def _take(self, method: str, path: str) -> bool:
        """Count a request; True if this rule applies to it (plan lock held)."""
        if method not in (self.methods or ()) or not fnmatch.fnmatchcase(path, self.path):
            return False
        self.seen += 1
        if self.seen <= self.skip or (self.times is not None and self.applied >= self.times):
            return False
        self.applied += 1
        return True


@dataclass
class RequestRecord:
    """What one request asked for and what it got."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names
    range: str | None
    status: int | None = None
    bytes_sent: int = 0  # body bytes that went out
    faults: list[str] = field(default_factory=list)
    started: float = 0.0
    duration: float = 0.0
    client: str = ""  # "host:port" of the connection it came over (a new port means a new connection)


@dataclass
class Quota:
    """A fixed-window request quota: ``limit`` matching requests per ``window`` seconds.

    The first counted request starts window 0; window k covers ``[origin + k*window, origin + (k+1)*window)``.
    Refused requests do not count.
    """

    limit: int
    window: float
    path: str = "*/resolve/*"  # what it counts (the Hub's "resolvers" quota counts file downloads)
    name: str = "resolvers"
    origin: float | None = None
    current: int = -1  # the window the count is for
    count: int = 0

    def take(self, now: float) -> tuple[bool, int, float]:
        """Count a request at ``now`` if the window has room: (admitted, requests left, seconds to reset)."""
        if self.origin is None:
            self.origin = now
        index = int((now - self.origin) // self.window)
        if index != self.current:
            self.current, self.count = index, 0
        reset_in = self.origin + (index + 1) * self.window - now
        if self.count >= self.limit:
            return False, 0, reset_in
        self.count += 1
        return True, self.limit - self.count, reset_in

    def headers(self, left: int, reset_in: float) -> dict[str, str]:
        """The Hub's announcement of the quota (``t`` rounded up: never earlier than the reset)."""
        return {
            "RateLimit": f'"{self.name}";r={left};t={max(1, math.ceil(reset_in))}',
            "RateLimit-Policy": f'"fixed window";"{self.name}";q={self.limit};w={self.window:g}',
        }


class FaultPlan:
    """A thread-safe, runtime-changeable list of faults, plus the record of every request served."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.faults: list[Fault] = []
        self.max_rps: float | None = None
        self.quota: Quota | None = None
        self.link_rate: float | None = None
        self._link_free_at = 0.0  # when the shared link has sent everything handed to it so far
        self._records: list[RequestRecord] = []
        self._recent: collections.deque[float] = collections.deque()  # admitted request times

    # -- building the plan

    def add(self, fault: Fault) -> Fault:
        """Append a rule (rules are checked in order) and return it, so its counters can be read."""
        with self._lock:
            self.faults.append(fault)
        return fault

    def drop(self, after_bytes: int = 0, **match: Any) -> Fault:
        """Close the connection after ``after_bytes`` body bytes."""
        return self.add(Fault("drop", after_bytes=after_bytes, **match))

    def fail(self, status: int = 503, **match: Any) -> Fault:
        """Answer ``status`` without calling the app."""
        return self.add(Fault("status", status=status, **match))

    def too_many_requests(
        self, retry_after: str | int | None = 1, *, ratelimit_reset: int | None = None, **match: Any
    ) -> Fault:
        """Answer 429 with ``Retry-After`` (seconds or HTTP date; None: none), optionally ``RateLimit``."""
        value = None if retry_after is None else str(retry_after)
        return self.add(Fault("too_many", retry_after=value, ratelimit_reset=ratelimit_reset, **match))

    def stall(self, seconds: float, *, after_bytes: int | None = None, **match: Any) -> Fault:
        """Sleep ``seconds`` before the headers, or after ``after_bytes`` of the body."""
        return self.add(Fault("stall", seconds=seconds, after_bytes=after_bytes, **match))

    def corrupt(self, **match: Any) -> Fault:
        """Flip bytes of the body (the length stays the same)."""
        return self.add(Fault("corrupt", **match))

    def ignore_range(self, **match: Any) -> Fault:
        """Strip the ``Range`` header: the full file comes back with 200."""
        return self.add(Fault("ignore_range", **match))

    def limit_bandwidth(self, rate: float, **match: Any) -> Fault:
        """Pace each matching response to ``rate`` bytes per second."""
        return self.add(Fault("bandwidth", rate=rate, **match))

    def xet_headers(self, **match: Any) -> Fault:
        """Add the headers with which the Hub sends clients to its Xet storage."""
        return self.add(Fault("xet", **match))

    def redirect(self, url: str, **match: Any) -> Fault:
        """Answer resolve requests with 302 to the same path on ``url`` (unless already on that host)."""
        return self.add(Fault("redirect", url=url.rstrip("/"), **match))

    def require_token(self, token: str, **match: Any) -> Fault:
        """Let matching requests through only with ``Authorization: Bearer <token>`` (a gated repo)."""
        return self.add(Fault("require_token", token=token, **match))

    def limit_requests(self, max_rps: float | None) -> None:
        """Answer 429 (``Retry-After: 1``) to requests beyond ``max_rps`` per second; None: no limit."""
        with self._lock:
            self.max_rps = max_rps
            self._recent.clear()

    def request_quota(
        self, limit: int | None, window: float = 1.0, *, path: str = "*/resolve/*", name: str = "resolvers"
    ) -> Quota | None:
        """Allow ``limit`` requests matching ``path`` per fixed window of ``window`` seconds, announced
        in RateLimit headers, 429 beyond; None: no quota."""
        if limit is not None and (limit < 1 or window <= 0):
            raise ValueError("a quota needs limit >= 1 and window > 0")
        quota = Quota(int(limit), float(window), path=path, name=name) if limit is not None else None
        with self._lock:
            self.quota = quota
        return quota

    def limit_link(self, rate: float | None) -> None:
        """Pace every response body together to ``rate`` bytes per second (a shared link); None: no cap."""
        if rate is not None and rate <= 0:
            raise ValueError("a link rate must be > 0 bytes per second")
        with self._lock:
            self.link_rate = rate
            self._link_free_at = 0.0

    def reset(self) -> None:
        """Remove every fault and limit, and forget the records."""
        with self._lock:
            self.faults.clear()
            self.max_rps = None
            self.quota = None
            self.link_rate = None
            self._records.clear()
            self._recent.clear()

    def configure(self, data: dict[str, Any]) -> None:
        """Apply a JSON plan: ``{"reset": bool, "faults": [{...}], "max_rps": R, "quota": {"limit": Q,
        "window": W, "path": glob, "name": str} or null, "link_rate": R or null}``."""
        new_faults = [Fault.from_dict(item) for item in data.get("faults", [])]
        quota = data.get("quota")
        if quota is not None and not isinstance(quota, dict):
            raise ValueError("quota must be an object or null")
        if data.get("reset"):
            self.reset()
        for fault in new_faults:
            self.add(fault)
        if "max_rps" in data:
            self.limit_requests(data["max_rps"])
        if "quota" in data:
            self.request_quota(**quota) if quota is not None else self.request_quota(None)
        if "link_rate" in data:
            self.limit_link(data["link_rate"])

    # -- reading what happened

    @property
    def records(self) -> list[RequestRecord]:
        """A copy of the request records, oldest first."""
        with self._lock:
            return list(self._records)

    def requests(self, path: str = "*", method: str | None = None) -> list[RequestRecord]:
        """The records whose path matches the glob ``path`` (and ``method``, if given)."""
        return [
            r
            for r in self.records
            if fnmatch.fnmatchcase(r.path, path) and (method is None or r.method == method.upper())
        ]

    def bytes_sent(self, path: str = "*") -> int:
        """Body bytes sent for paths matching ``path``."""
        return sum(r.bytes_sent for r in self.requests(path))

    @property
    def stats(self) -> dict[str, Any]:
        """Totals and, per path, requests by method, body bytes, statuses and the ranges requested."""
        per_path: dict[str, dict[str, Any]] = {}
        records = self.records
        for r in records:
            entry = per_path.setdefault(
                r.path, {"requests": 0, "bytes": 0, "methods": {}, "statuses": {}, "ranges": []}
            )
            entry["requests"] += 1
            entry["bytes"] += r.bytes_sent
            entry["methods"][r.method] = entry["methods"].get(r.method, 0) + 1
            status = str(r.status)
            entry["statuses"][status] = entry["statuses"].get(status, 0) + 1
            if r.range is not None:
                entry["ranges"].append(r.range)
        with self._lock:
            faults = [asdict(f) for f in self.faults]
        return {
            "requests": len(records),
            "bytes": sum(r.bytes_sent for r in records),
            "paths": per_path,
            "faults": faults,
        }

    # -- used by the injector

    def _take_quota(self, path: str, now: float) -> tuple[bool, dict[str, str]]:
        """(admitted, headers announcing the quota) for a request; (True, {}) where no quota applies."""
        with self._lock:
            quota = self.quota
            if quota is None or not fnmatch.fnmatchcase(path, quota.path):
                return True, {}
            admitted, left, reset_in = quota.take(now)
            return admitted, quota.headers(left, reset_in)

    def _link_delay(self, count: int, now: float) -> float:
        """Reserve the shared link for ``count`` bytes, after whatever it carries already; how long to
        wait until they have gone through it (then they are sent, as a paced connection sends)."""
        with self._lock:
            if self.link_rate is None:
                return 0.0
            self._link_free_at = max(now, self._link_free_at) + count / self.link_rate
            return self._link_free_at - now

    def _admit(self, now: float) -> bool:
        with self._lock:
            if self.max_rps is None:
                return True
            while self._recent and now - self._recent[0] >= 1.0:
                self._recent.popleft()
            if len(self._recent) >= self.max_rps:
                return False
            self._recent.append(now)
            return True

    def _match(self, method: str, path: str) -> list[Fault]:
        with self._lock:
            return [fault for fault in self.faults if fault._take(method, path)]

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            if len(self._records) >= _MAX_RECORDS:
                del self._records[: _MAX_RECORDS // 10]
            self._records.append(record)


class _Dropped(Exception):
    """Raised inside the app's ``send`` to abandon a response halfway (the connection then closes)."""


class FaultInjector:
    """ASGI middleware applying a :class:`FaultPlan` to every request of the wrapped app."""

    def __init__(self, app: ASGIApp, plan: FaultPlan | None = None) -> None:
        self.app = app
        self.plan = plan if plan is not None else FaultPlan()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith("/_faults/"):
            await self._control(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        record = RequestRecord(
            method=scope["method"],
            path=scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=headers,
            range=headers.get("range"),
            started=time.time(),
            client=":".join(str(part) for part in scope.get("client") or ()),
        )
        self.plan._record(record)
        try:
            await self._handle(scope, receive, send, record)
        finally:
            record.duration = time.time() - record.started

    async def _handle(self, scope: Scope, receive: Receive, send: Send, record: RequestRecord) -> None:
        if not self.plan._admit(time.monotonic()):
            record.faults.append("max_rps")
            await _send_simple(send, record, 429, {"Retry-After": "1"}, b"rate limited")
            return
        admitted, announced = self.plan._take_quota(record.path, time.monotonic())
        if not admitted:
            record.faults.append("quota")
            retry_after = announced["RateLimit"].rpartition("t=")[2]
            headers = {**announced, "Retry-After": retry_after}
            await _send_simple(send, record, 429, headers, b'{"error": "rate limit reached"}')
            return
        faults = self.plan._match(record.method, record.path)
        record.faults.extend(f.kind for f in faults)
        is_resolve = "/resolve/" in record.path
        for fault in faults:
            if fault.kind == "stall" and fault.after_bytes is None:
                await asyncio.sleep(fault.seconds)
        for fault in faults:
            if fault.kind == "status":
                await _send_simple(send, record, fault.status, {}, b'{"error": "injected fault"}')
                return
            if fault.kind == "too_many":
                extra = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                if fault.ratelimit_reset is not None:
                    extra["RateLimit"] = f'"api";r=0;t={fault.ratelimit_reset}'
                await _send_simple(send, record, 429, extra, b'{"error": "too many requests"}')
                return
            if fault.kind == "redirect" and is_resolve and await self._redirect(scope, send, record, fault):
                return
            if (
                fault.kind == "require_token"
                and record.headers.get("authorization") != f"Bearer {fault.token}"
            ):
                status = 403 if "authorization" in record.headers else 401
                extra = {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this repo is restricted"}
                await _send_simple(send, record, status, extra, b'{"error": "gated repo"}')
                return
        if any(f.kind == "ignore_range" for f in faults):
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k.lower() != b"range"])
        shaper = _ResponseShaper(send, record, faults, scope, xet=is_resolve, plan=self.plan, extra=announced)
        try:
            await self.app(scope, receive, shaper.send)
        except Exception:
            if not shaper.dropped:
                raise
            # Returning without finishing the response makes uvicorn close the connection.
            logger.info("fault: dropped %s %s after %d bytes", record.method, record.path, record.bytes_sent)

    async def _redirect(self, scope: Scope, send: Send, record: RequestRecord, fault: Fault) -> bool:
        """Send a 302 carrying the file's metadata headers, as the Hub does for LFS files. False: not now."""
        target = urlsplit(fault.url)
        if record.headers.get("host", "").lower() == target.netloc.lower():
            return False  # already on the target host: serve normally
        started: list[Message] = []

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.append(message)

        async def no_body() -> Message:
            return {"type": "http.disconnect"}

        await self.app(dict(scope, method="HEAD"), no_body, capture)
        if not started or started[0]["status"] != 200:
            return False
        raw_path = scope.get("raw_path") or scope["path"].encode()
        location = fault.url + raw_path.decode("latin-1")
        if scope.get("query_string"):
            location += "?" + scope["query_string"].decode("latin-1")
        headers = [
            (k, v) for k, v in started[0]["headers"] if k.lower() not in (b"content-length", b"location")
        ]
        headers += [(b"location", location.encode("latin-1")), (b"content-length", b"0")]
        record.status = 302
        await send({"type": "http.response.start", "status": 302, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True

    async def _control(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The JSON endpoints that let another process read stats and change the plan."""
        path, method = scope["path"], scope["method"]
        record = RequestRecord(method, path, "", {}, None)  # not kept: control calls are not traffic
        try:
            if method == "GET" and path == "/_faults/stats":
                body: Any = self.plan.stats
            elif method == "GET" and path == "/_faults/requests":
                body = [asdict(r) for r in self.plan.records]
            elif method == "POST" and path == "/_faults/plan":
                self.plan.configure(json.loads(await _read_body(receive) or b"{}"))
                body = self.plan.stats
            elif method == "POST" and path == "/_faults/reset":
                self.plan.reset()
                body = {"ok": True}
            else:
                await _send_simple(send, record, 404, {}, b'{"error": "unknown fault control endpoint"}')
                return
        except (ValueError, TypeError) as error:
            await _send_simple(send, record, 400, {}, json.dumps({"error": str(error)}).encode())
            return
        await _send_simple(send, record, 200, {}, json.dumps(body).encode())


class _ResponseShaper:
    """Wraps ``send`` for one response: counts, paces, corrupts, stalls or drops the body."""

    def __init__(
        self,
        send: Send,
        record: RequestRecord,
        faults: list[Fault],
        scope: Scope,
        *,
        xet: bool,
        plan: FaultPlan | None = None,
        extra: dict[str, str] | None = None,
    ):
        self._send = send
        self.record = record
        self.plan = plan
        self.link = plan is not None and plan.link_rate is not None  # decided per response
        self.extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (extra or {}).items()]
        drops = [f.after_bytes for f in faults if f.kind == "drop" and f.after_bytes is not None]
        self.drop_at = min(drops) if drops else None
        # (offset, seconds) of the stalls still to come in this response, in order.
        self.stalls = sorted(
            (f.after_bytes, f.seconds) for f in faults if f.kind == "stall" and f.after_bytes is not None
        )
        self.corrupt = any(f.kind == "corrupt" for f in faults)
        rates = [f.rate for f in faults if f.kind == "bandwidth"]
        self.rate = min(rates) if rates else None
        self.xet = xet and any(f.kind == "xet" for f in faults)
        self.host = dict(scope["headers"]).get(b"host", b"localhost").decode("latin-1")
        self.dropped = False
        self._paced_start: float | None = None
        # Pacing sends small pieces (about 20 per second) so the rate is smooth, not bursty; a shared
        # link, pieces short enough that connections take turns on it.
        self._piece = int(min(64 * 1024, max(1024, self.rate / 20))) if self.rate else 1 << 30
        if self.link:
            self._piece = min(self._piece, 64 * 1024)

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.record.status = message["status"]
            extra = list(self.extra)
            if self.xet:
                extra += [
                    (b"x-xet-hash", _FAKE_XET_HASH.encode()),
                    (b"link", f'<http://{self.host}/api/xet-read-token>; rel="xet-auth"'.encode("latin-1")),
                ]
            if extra:
                message = dict(message, headers=list(message["headers"]) + extra)
            await self._send(message)
            return
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if self.corrupt and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        if self.rate is None and not self.link and not self.stalls and self.drop_at is None:
            self.record.bytes_sent += len(body)
            await self._send(dict(message, body=body))
            return
        # Slow path: cut the body at every stall and drop offset, and into small pieces when pacing.
        offset = 0
        while True:
            await self._due_faults(has_more=offset < len(body) or more)
            if offset >= len(body):
                break
            sent = self.record.bytes_sent
            n = min(self._piece, len(body) - offset)
            for at in [s[0] for s in self.stalls] + ([self.drop_at] if self.drop_at is not None else []):
                if sent < at < sent + n:
                    n = at - sent
            await self._emit(body[offset : offset + n], True)
            offset += n
        if not more:
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _due_faults(self, *, has_more: bool) -> None:
        """Stall or drop if the body has reached a fault's offset."""
        sent = self.record.bytes_sent
        while self.stalls and self.stalls[0][0] <= sent:
            _, seconds = self.stalls.pop(0)
            await asyncio.sleep(seconds)
        if self.drop_at is not None and sent >= self.drop_at and has_more:
            self.dropped = True
            raise _Dropped(f"fault: connection dropped after {sent} bytes")

    async def _emit(self, chunk: bytes, more: bool) -> None:
        if self.rate is not None and chunk:
            if self._paced_start is None:
                self._paced_start = time.monotonic()
            due = self._paced_start + (self.record.bytes_sent + len(chunk)) / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        if self.link and self.plan is not None and chunk:
            delay = self.plan._link_delay(len(chunk), time.monotonic())
            if delay > 0:
                await asyncio.sleep(delay)
        self.record.bytes_sent += len(chunk)
        await self._send({"type": "http.response.body", "body": chunk, "more_body": more})


async def _send_simple(
    send: Send, record: RequestRecord, status: int, headers: dict[str, str], body: bytes
) -> None:
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    record.status = status
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


# ------------------------------------------------------------------------------------ command line


def _parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hfmirror.server.faults",
        description="Serve ROOT like `hfmirror serve`, through the fault injector (for benchmarks).",
    )
    parser.add_argument("root", help="folder to serve (plain tree or Hugging Face cache)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free; the log line shows it)")
    parser.add_argument("--state-dir", help="where remembered checksums are kept")
    parser.add_argument("--page-size", type=int, default=1000, help="tree entries per page")
    parser.add_argument("--rate-per-conn", type=float, help="pace every response to this many bytes/s")
    parser.add_argument("--max-rps", type=float, help="answer 429 beyond this many requests per second")
    parser.add_argument(
        "--quota", metavar="Q/W", help="a fixed-window quota of Q file requests per W seconds, announced"
    )
    parser.add_argument("--link-rate", type=float, help="pace all responses together to this many bytes/s")
    parser.add_argument("--xet", action="store_true", help="add Xet headers to resolve answers")
    parser.add_argument("--plan", help="a JSON plan file, as accepted by POST /_faults/plan")
    return parser.parse_args(list(argv) if argv is not None else None)


def main(argv: Iterable[str] | None = None) -> None:
    """Run the mirror wrapped in a :class:`FaultInjector` until Ctrl-C."""
    import uvicorn

    from .app import create_app

    args = _parse_args(argv)
    plan = FaultPlan()
    if args.rate_per_conn:
        plan.limit_bandwidth(args.rate_per_conn)
    if args.max_rps:
        plan.limit_requests(args.max_rps)
    if args.quota:
        limit, _, window = args.quota.partition("/")
        plan.request_quota(int(limit), float(window or 1))
    if args.link_rate:
        plan.limit_link(args.link_rate)
    if args.xet:
        plan.xet_headers()
    if args.plan:
        with open(args.plan, encoding="utf-8") as f:
            plan.configure(json.load(f))
    app = FaultInjector(create_app(args.root, state_dir=args.state_dir, page_size=args.page_size), plan)
    config = uvicorn.Config(app, host=args.host, port=args.port, lifespan="off", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
