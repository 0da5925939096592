"""The Hub's HTTP API, shared by both servers: routing, the JSON the clients expect, error answers.

==============================================================  ==========================================
``GET /api/{models,datasets}/{repo}[/revision/{rev}]``          repo info: ``sha`` and ``siblings``
``GET /api/{models,datasets}/{repo}/tree/{rev}[/{path}]``        file listing, paginated with ``Link``
``HEAD|GET /[datasets/]{repo}/resolve/{rev}/{path}``             a file's bytes, ``Range`` supported
==============================================================  ==========================================

:class:`HubApi` parses requests and renders answers; where repos and files come from is up to a
subclass: :class:`~.app.LocalApi` (folders on disk) or :class:`~.mirror.UpstreamApi` (a cache that
fills itself from upstream mirrors).

The URL is parsed from the *raw* path, segment by segment, because clients quote a revision with
``safe=""`` (``refs%2Fpr%2F1``) and a decoded path would mix those slashes up with real ones; it also
means an encoded ``%2e%2e`` is seen as the ``..`` it is, and refused. Errors are answered as the Hub
does (status, ``X-Error-Code``, ``X-Error-Message``, JSON ``{"error": ...}``) so that huggingface_hub
raises its usual exceptions.

Caching by HTTP caches in front (nginx ``proxy_cache``, a CDN) follows from the URL: an answer
addressed by a commit id never changes and is marked immutable; one addressed by a branch or tag
must be revalidated (``no-cache``, with a strong ``ETag`` and ``304 Not Modified``); anything behind
a token is ``private``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any, BinaryIO
from urllib.parse import unquote

import anyio
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.types import Receive, Scope, Send

from ..errors import UnsafePathError
from ..hashing import is_git_sha1
from ..paths import validate_relative_path
from .repos import FileInfo, RepoLocation, Snapshot

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_PAGE_SIZE",
    "HubApi",
    "HubError",
    "cache_control",
    "file_headers",
]

DEFAULT_PAGE_SIZE = 1000  # entries per tree page, as on the Hub
CHUNK_SIZE = 1024 * 1024  # bytes per body message: large chunks keep a 1 GiB transfer fast

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
PRIVATE = "private, no-store"

_REPO_TYPES = {"models": "model", "datasets": "dataset"}
_MAX_MEMO_ENTRIES = 64  # rendered listings kept per snapshot

Readings = list[tuple[str, list[str]]]  # candidate (repo id, rest of the path) pairs, longest id first


class HubError(Exception):
    """An answer in the Hub's error format; raised inside handlers, turned into a response once."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def response(self) -> JSONResponse:
        message = str(self)
        headers = {"X-Error-Message": _header_safe(message)}
        if self.code:
            headers["X-Error-Code"] = self.code
        return JSONResponse({"error": message}, status_code=self.status, headers=headers)


def _header_safe(text: str) -> str:
    """Printable ASCII only, no space at either end: a header value may carry neither (h11 refuses it)."""
    return "".join(ch if " " <= ch <= "~" else f"\\x{ord(ch):02x}" for ch in text)[:500].strip()


def repo_not_found(repo_id: str) -> HubError:
    # The Hub answers 401 (not 404) so that a private repo and a missing one look the same.
    return HubError(401, f"Repository not found: {repo_id}", "RepoNotFound")


class BigChunkFileResponse(FileResponse):
    """A file, read in big chunks; optionally one already ``opened`` (it is then the one sent, and
    closed when the answer is over).

    A file opened before the answer starts is sent whole even if its name is unlinked meanwhile (a
    replica evicting it from a shared cache): an open file outlives its name, while Starlette opens
    by path only after the headers went out, too late for any clean answer.
    """

    chunk_size = CHUNK_SIZE

    def __init__(
        self, path: str | os.PathLike[str], *, opened: BinaryIO | None = None, **kwargs: Any
    ) -> None:
        super().__init__(path, **kwargs)
        self._opened = opened

    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[anyio.AsyncFile[bytes]]:
        # Starlette's one place that opens the file (every kind of answer goes through it).
        if self._opened is None:
            async with super()._open_file() as file:
                yield file
            return
        file = anyio.AsyncFile(self._opened)
        self._opened = None  # closed below
        try:
            yield file
        finally:
            with anyio.CancelScope(shield=True):  # closing must finish even if the transfer is cancelled
                await file.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._opened is not None:  # never read (a HEAD, a refused range)
                self._opened.close()


class WholeFileResponse(BigChunkFileResponse):
    """A file answered whole (200) even to a ``Range`` request."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"range", b"if-range")]
        await super().__call__(dict(scope, headers=headers), receive, send)


# ---------------------------------------------------------------------------------------- parsing


def _segments(request: Request) -> list[str]:
    """The percent-decoded segments of the raw request path (``/a/b%2Fc`` -> ``["a", "b/c"]``)."""
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode("utf-8")
    try:
        return [unquote(part, errors="strict") for part in raw.decode("ascii").split("/")[1:]]
    except UnicodeError:
        raise HubError(400, "malformed URL encoding") from None


def file_path(segments: list[str]) -> str:
    """Join URL segments into a file path, refusing anything that could leave the repo."""
    try:
        return validate_relative_path("/".join(segments))
    except UnsafePathError as error:
        raise HubError(400, str(error)) from None


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")


# ----------------------------------------------------------------------------------------- caching


def cache_control(revision: str, commit: str, *, private: bool = False) -> str:
    """What an HTTP cache may do with an answer about ``revision`` (see the module docstring)."""
    if private:
        return PRIVATE
    return IMMUTABLE if revision == commit and is_git_sha1(revision) else REVALIDATE


def file_headers(snap: Snapshot, info: FileInfo, revision: str, *, private: bool = False) -> dict[str, str]:
    """The headers huggingface_hub reads from a resolve answer (HEAD or GET)."""
    etag = f'"{info.etag}"'
    return {
        "ETag": etag,
        "X-Repo-Commit": snap.commit,
        "X-Linked-Etag": etag,
        "X-Linked-Size": str(info.size),
        "Accept-Ranges": "bytes",
        "Cache-Control": cache_control(revision, snap.commit, private=private),
    }


def not_modified(request: Request, headers: dict[str, str]) -> Response | None:
    """A ``304`` if the client (or a cache revalidating) already holds this exact content."""
    wanted = request.headers.get("if-none-match")
    if wanted is None:
        return None
    tags = {tag.strip().removeprefix("W/") for tag in wanted.split(",")}
    if headers["ETag"] in tags or "*" in tags:
        return Response(status_code=304, headers=headers)
    return None


# ------------------------------------------------------------------------------------------ the API


class HubApi:
    """Routing and rendering; subclasses say where repos, snapshots and files come from."""

    def __init__(self, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        self.page_size = page_size

    # -- what a subclass provides

    async def locate(
        self, request: Request, repo_type: str, readings: Readings
    ) -> tuple[list[str], RepoLocation]:
        """The repo a request is about (the first reading that names one) and the rest of its path.

        Raises:
            HubError: 401 RepoNotFound if no reading names a repo.
        """
        raise NotImplementedError

    async def snapshot(self, request: Request, location: RepoLocation, revision: str) -> Snapshot:
        """The repo at ``revision``, or a HubError (404 RevisionNotFound, ...)."""
        raise NotImplementedError

    async def resolve(self, request: Request, location: RepoLocation, revision: str, path: str) -> Response:
        """The answer to ``HEAD|GET .../resolve/{revision}/{path}``."""
        raise NotImplementedError

    def is_private(self, request: Request, location: RepoLocation) -> bool:
        """Whether answers about this repo must stay out of shared caches (content behind a token)."""
        return False

    # -- routing

    async def dispatch(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except HubError as error:
            return error.response()

    async def _route(self, request: Request) -> Response:
        segments = _segments(request)
        if len(segments) >= 3 and segments[0] == "api" and segments[1] in _REPO_TYPES:
            return await self._api(request, _REPO_TYPES[segments[1]], segments[2:])
        if "resolve" in segments:
            if segments[0] == "datasets":
                return await self._resolve(request, "dataset", segments[1:])
            return await self._resolve(request, "model", segments)
        raise HubError(404, "Not Found")

    async def _api(self, request: Request, repo_type: str, rest: list[str]) -> Response:
        if rest and rest[-1] == "":
            rest = rest[:-1]  # tolerate one trailing slash
        # The repo id has one or two segments; try the longer reading first, keep the forms that parse.
        readings = []
        for n in (2, 1):
            repo_id, tail = "/".join(rest[:n]), rest[n:]
            if len(rest) < n:
                continue
            if (
                not tail
                or (tail[0] == "revision" and len(tail) == 2)
                or (tail[0] == "tree" and len(tail) >= 2)
            ):
                readings.append((repo_id, tail))
        if not readings:
            raise HubError(404, "Not Found")
        tail, location = await self.locate(request, repo_type, readings)
        if not tail:
            return await self._info(request, location, "main")
        if tail[0] == "revision":
            return await self._info(request, location, tail[1])
        return await self._tree(request, location, tail[1], tail[2:])

    async def _resolve(self, request: Request, repo_type: str, rest: list[str]) -> Response:
        readings = [
            ("/".join(rest[:n]), rest[n + 1 :]) for n in (2, 1) if len(rest) >= n + 3 and rest[n] == "resolve"
        ]
        if not readings:
            raise HubError(404, "Not Found")
        tail, location = await self.locate(request, repo_type, readings)
        return await self.resolve(request, location, tail[0], file_path(tail[1:]))

    # -- listings

    async def _info(self, request: Request, location: RepoLocation, revision: str) -> Response:
        snap = await self.snapshot(request, location, revision)
        with_blobs = _flag(request, "blobs")
        body = _memo(snap, ("info", with_blobs), lambda: _render_json(_info_body(location, snap, with_blobs)))
        return Response(
            body,
            media_type="application/json",
            headers=self._listing_headers(request, location, revision, snap),
        )

    async def _tree(
        self, request: Request, location: RepoLocation, revision: str, where: list[str]
    ) -> Response:
        directory = file_path(where) if where else ""
        snap = await self.snapshot(request, location, revision)
        if directory and directory not in snap.directories:
            raise HubError(404, f"Entry not found: {directory}", "EntryNotFound")
        recursive, expand = _flag(request, "recursive"), _flag(request, "expand")
        key = ("tree", directory, recursive, expand)
        entries = _memo(snap, key, lambda: _tree_entries(snap, directory, recursive, expand))
        cursor = request.query_params.get("cursor", "0")
        if not cursor.isdigit() or int(cursor) > len(entries):
            raise HubError(400, f"invalid cursor: {cursor[:50]!r}")
        start = int(cursor)
        page = entries[start : start + self.page_size]
        headers = self._listing_headers(request, location, revision, snap)
        if start + self.page_size < len(entries):
            # request.url takes the Host header only if it is a well-formed host[:port] (Starlette's
            # parse_host_header), else the address the server is bound to: a malformed Host cannot
            # smuggle a path or userinfo into the link. Caches in front must key on the Host
            # (deploy/nginx.conf does), since another Host gives other links.
            next_url = request.url.include_query_params(cursor=str(start + self.page_size))
            headers["Link"] = f'<{next_url}>; rel="next"'
        return JSONResponse(page, headers=headers)

    def _listing_headers(
        self, request: Request, location: RepoLocation, revision: str, snap: Snapshot
    ) -> dict[str, str]:
        private = self.is_private(request, location)
        return {"Cache-Control": cache_control(revision, snap.commit, private=private)}


def _memo(snap: Snapshot, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
    """What ``make`` renders from ``snap``, computed once per snapshot (a new snapshot starts empty).

    Bounded: a client walking every folder of a big repo cannot make it hold more than a few dozen.
    """
    if key not in snap.memo:
        if len(snap.memo) >= _MAX_MEMO_ENTRIES:
            snap.memo.clear()
        snap.memo[key] = make()
    return snap.memo[key]


def _render_json(content: Any) -> bytes:
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _info_body(location: RepoLocation, snap: Snapshot, with_blobs: bool) -> dict[str, Any]:
    """The repo-info JSON (``HfApi.model_info``): the commit and, per file, its name (and checksums)."""
    siblings = []
    for info in snap.files.values():
        sibling: dict[str, Any] = {"rfilename": info.path}
        if with_blobs:
            sibling.update(size=info.size, blobId=info.oid)
            if info.lfs:
                sibling["lfs"] = {"sha256": info.etag, "size": info.size, "pointerSize": info.pointer_size}
        siblings.append(sibling)
    org, _, _ = location.repo_id.rpartition("/")
    body: dict[str, Any] = {
        "_id": snap.commit[:24],
        "id": location.repo_id,
        "author": org or None,
        "sha": snap.commit,
        "lastModified": _iso(snap.last_modified),
        "createdAt": _iso(snap.last_modified),
        "private": False,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": siblings,
        "usedStorage": sum(info.size for info in snap.files.values()),
    }
    if location.repo_type == "model":
        body["modelId"] = location.repo_id
    return body


def _tree_entries(snap: Snapshot, directory: str, recursive: bool, expand: bool) -> list[dict[str, Any]]:
    """The tree listing of ``directory`` ("" for the top), in the Hub's JSON shape, sorted by path."""
    prefix = directory + "/" if directory else ""

    def wanted(path: str) -> bool:
        if not path.startswith(prefix):
            return False
        return recursive or "/" not in path[len(prefix) :]

    entries: list[dict[str, Any]] = [
        {"type": "directory", "path": d, "oid": snap.directory_oid(d)} for d in snap.directories if wanted(d)
    ]
    for info in snap.files.values():
        if wanted(info.path):
            entry: dict[str, Any] = {"type": "file", "path": info.path, "size": info.size, "oid": info.oid}
            if info.lfs:
                entry["lfs"] = {"oid": info.etag, "size": info.size, "pointerSize": info.pointer_size}
            entries.append(entry)
    entries.sort(key=lambda entry: entry["path"])
    if expand:
        last_commit = {"id": snap.commit, "title": "hfmirror snapshot", "date": _iso(snap.last_modified)}
        for entry in entries:
            entry["lastCommit"] = last_commit
    return entries
