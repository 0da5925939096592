"""A scriptable hostile mirror: a real HTTP server on 127.0.0.1 whose every answer a test decides.

For what a well-behaved server cannot be made to do: :mod:`hfmirror.server.faults` wraps the real app,
so its answers are still the app's. This one answers at the level of bytes on the socket: HTML pages
where a listing belongs, listings that never end or trickle in a byte at a time, silence before any
header, any status with any headers, redirects anywhere. Whatever no rule answers is passed on to a
real server (``behind=``) or answered 404, so a test scripts only what misbehaves::

    with HostileServer(behind=hub_server.url) as bad:
        bad.answer("/api/*", html("<html>please solve this captcha</html>"))
        result = download("tiny/nested", endpoints=[bad.url, hub_server.url], ...)
        assert bad.requests("/api/*")

``fake_repo(bad, repo_id, files)`` makes it serve a whole repository of its own (a listing that names
``files``, and their bytes), for listings no real server would give. Every request is recorded
(:class:`Seen`: method, path, headers, which rule answered, body bytes sent).
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = [
    "Exchange",
    "HostileServer",
    "Seen",
    "close",
    "endless",
    "fake_repo",
    "file_bytes",
    "forward",
    "hang",
    "html",
    "json_body",
    "literal",
    "redirect",
    "status",
    "trickle",
]

# The most any answer here sends, so that a client that never stops reading cannot keep a test busy.
SEND_LIMIT = 256 * 1024 * 1024


@dataclass
class Seen:
    """One request as the server saw it, and what it sent back."""

    method: str
    path: str  # decoded, without the query
    query: str
    headers: dict[str, str]  # lower-case names
    started: float
    peer: int = 0  # the client's port: requests with the same peer came over one connection
    rule: str = ""  # the pattern of the rule that answered ("" for the fallback)
    status: int | None = None
    bytes_sent: int = 0


class Exchange:
    """One request being answered: what answers use to write a response, byte by byte if they like."""

    def __init__(self, handler: BaseHTTPRequestHandler, seen: Seen, stopping: threading.Event) -> None:
        self.handler = handler
        self.seen = seen
        self.stopping = stopping

    def start(self, code: int, headers: dict[str, str] | None = None, *, length: int | None = None) -> None:
        """Send the status line and headers; ``length`` None means a body that ends when we close."""
        self.seen.status = code
        lines = [f"HTTP/1.1 {code} {http.client.responses.get(code, 'Whatever')}"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if length is not None:
            lines.append(f"Content-Length: {length}")
        else:
            lines.append("Connection: close")
            self.handler.close_connection = True
        self.handler.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.handler.wfile.flush()

    def write(self, data: bytes) -> None:
        """Send body bytes (raises OSError once the client has gone)."""
        if self.seen.bytes_sent + len(data) > SEND_LIMIT:
            raise OSError("hostile server: send limit reached")
        self.handler.wfile.write(data)
        self.handler.wfile.flush()
        self.seen.bytes_sent += len(data)

    def sleep(self, seconds: float) -> bool:
        """Wait; False if the server is stopping (answers then give up)."""
        return not self.stopping.wait(seconds)

    def body(self, code: int, headers: dict[str, str], content: bytes) -> None:
        """A whole answer with a Content-Length (no body for HEAD)."""
        self.start(code, headers, length=len(content))
        if self.seen.method != "HEAD":
            self.write(content)


Answer = Callable[[Exchange], None]


# --------------------------------------------------------------------------------------- answers


def status(code: int, headers: dict[str, str] | None = None, body: bytes = b"") -> Answer:
    """Any status, headers and body."""
    return lambda exchange: exchange.body(code, dict(headers or {}), body)


def json_body(value: Any, code: int = 200, headers: dict[str, str] | None = None) -> Answer:
    return status(code, {"Content-Type": "application/json", **(headers or {})}, json.dumps(value).encode())


def html(text: str = "<html><body>Please sign in to the network</body></html>", code: int = 200) -> Answer:
    """What a captive portal or a captcha page answers, whatever was asked."""
    return status(code, {"Content-Type": "text/html; charset=utf-8"}, text.encode())


def endless(chunk: bytes = b" " * 65536, content_type: str = "application/json", code: int = 200) -> Answer:
    """A ``code`` answer whose body never ends (up to SEND_LIMIT): no Content-Length, bytes as fast as
    they go (after the start of a listing, for a 200)."""

    def answer(exchange: Exchange) -> None:
        exchange.start(code, {"Content-Type": content_type})
        exchange.write(b'{"sha": "' + b"1" * 40 + b'", "siblings": [')
        while not exchange.stopping.is_set():
            exchange.write(chunk)

    return answer


def trickle(
    content: bytes, every: float = 1.0, content_type: str = "application/json", code: int = 200
) -> Answer:
    """A ``code`` answer with a true Content-Length whose body comes one byte every ``every`` seconds."""

    def answer(exchange: Exchange) -> None:
        exchange.start(code, {"Content-Type": content_type}, length=len(content))
        for index in range(len(content)):
            if not exchange.sleep(every):
                return
            exchange.write(content[index : index + 1])

    return answer


def hang() -> Answer:
    """Accept the request and never say a word (until the server stops)."""

    def answer(exchange: Exchange) -> None:
        exchange.handler.close_connection = True
        while exchange.sleep(0.1):
            pass

    return answer


def close() -> Answer:
    """Close the connection without an answer: what a dead or crashing endpoint does."""

    def answer(exchange: Exchange) -> None:
        exchange.handler.close_connection = True
        try:
            exchange.handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    return answer


def redirect(location: str, code: int = 302) -> Answer:
    return status(code, {"Location": location})


def forward(base_url: str) -> Answer:
    """Pass the request on to another server and relay its answer: a proxy that behaves."""
    target = urlsplit(base_url)

    def answer(exchange: Exchange) -> None:
        handler, seen = exchange.handler, exchange.seen
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
            connection.request(seen.method, handler.path, headers=headers)
            response = connection.getresponse()
            relayed = {
                k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP | {"content-length"}
            }
            content = response.read()
        finally:
            connection.close()
        exchange.body(response.status, relayed, content)

    return answer


def file_bytes(content: bytes, etag: str) -> Answer:
    """A file as the Hub serves it: ETag, Range answered with 206."""

    def answer(exchange: Exchange) -> None:
        headers = {"ETag": f'"{etag}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        asked = exchange.seen.headers.get("range", "")
        if asked.startswith("bytes="):
            first, _, last = asked.removeprefix("bytes=").partition("-")
            start, end = int(first or 0), min(int(last) if last else len(content) - 1, len(content) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            exchange.body(206, headers, content[start : end + 1])
        else:
            exchange.body(200, headers, content)

    return answer


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}


# ---------------------------------------------------------------------------------------- server


@dataclass
class _Rule:
    pattern: str
    answer: Answer
    methods: tuple[str, ...]
    times: int | None
    used: int = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.owner._handle(self)

    do_HEAD = do_GET
    do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    owner: HostileServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up on a hostile server is the point, not news


@dataclass
class HostileServer:
    """The server; use as a context manager. ``url`` is where it listens."""

    behind: str | None = None  # where requests no rule answers go; None: 404 for them
    rules: list[_Rule] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._connections: list[socket.socket] = []
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="hostile")

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._server.shutdown()
        with self._lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._server.server_close()
        self._thread.join(5)

    def answer(
        self,
        pattern: str,
        answer: Answer,
        *,
        methods: tuple[str, ...] = ("GET", "HEAD"),
        times: int | None = None,
    ) -> _Rule:
        """Answer requests whose decoded path matches the fnmatch ``pattern`` (``*`` crosses ``/``) with
        ``answer``, ``times`` times (None: always). Rules are tried in the order they were added."""
        rule = _Rule(pattern, answer, methods, times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def requests(self, pattern: str = "*", method: str | None = None) -> list[Seen]:
        with self._lock:
            return [
                s for s in self.seen if fnmatch.fnmatchcase(s.path, pattern) and method in (None, s.method)
            ]

    def _handle(self, handler: _Handler) -> None:
        path, _, query = handler.path.partition("?")
        seen = Seen(
            method=handler.command,
            path=unquote(path),
            query=query,
            headers={k.lower(): v for k, v in handler.headers.items()},
            started=time.monotonic(),
            peer=handler.client_address[1],
        )
        with self._lock:
            self.seen.append(seen)
            self._connections.append(handler.connection)
            rule = next((r for r in self.rules if self._takes(r, seen)), None)
            if rule is not None:
                rule.used += 1
        seen.rule = rule.pattern if rule is not None else ""
        if rule is not None:
            chosen = rule.answer
        elif self.behind:
            chosen = forward(self.behind)
        else:
            chosen = json_body({"error": "not here"}, 404, {"X-Error-Code": "EntryNotFound"})
        try:
            chosen(Exchange(handler, seen, self._stopping))
        except OSError:  # the client went away: nothing more to say to it
            handler.close_connection = True

    @staticmethod
    def _takes(rule: _Rule, seen: Seen) -> bool:
        if seen.method not in rule.methods or not fnmatch.fnmatchcase(seen.path, rule.pattern):
            return False
        return rule.times is None or rule.used < rule.times


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def fake_repo(
    server: HostileServer, repo_id: str, files: dict[str, bytes], *, commit: str = "1" * 40
) -> None:
    """Make ``server`` serve ``repo_id`` as a repository of ``files``: a Hub listing naming every one
    (whatever the name), and each file's bytes from its resolve URL."""
    siblings = [
        {"rfilename": name, "size": len(content), "blobId": git_blob_sha1(content)}
        for name, content in files.items()
    ]
    listing = {"id": repo_id, "sha": commit, "private": False, "siblings": siblings}
    server.answer(f"/api/models/{literal(repo_id)}/revision/*", json_body(listing))
    for name, content in files.items():
        server.answer(
            f"/{literal(repo_id)}/resolve/*/{literal(name)}", file_bytes(content, git_blob_sha1(content))
        )


def literal(text: str) -> str:
    """``text`` as an fnmatch pattern that matches only itself."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in text)
