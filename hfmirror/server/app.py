"""The mirror's HTTP API: the few Hub endpoints that huggingface_hub, transformers and hfmirror call.

==============================================================  ==========================================
``GET /api/{models,datasets}/{repo}[/revision/{rev}]``          repo info: ``sha`` and ``siblings``
``GET /api/{models,datasets}/{repo}/tree/{rev}[/{path}]``        file listing, paginated with ``Link``
``HEAD|GET /[datasets/]{repo}/resolve/{rev}/{path}``             a file's bytes, ``Range`` supported
==============================================================  ==========================================

The URL is parsed from the *raw* path, segment by segment, because clients quote a revision with
``safe=""`` (``refs%2Fpr%2F1``) and a decoded path would mix those slashes up with real ones; it also
means an encoded ``%2e%2e`` is seen as the ``..`` it is, and refused. Errors are answered as the Hub
does (status, ``X-Error-Code``, ``X-Error-Message``, JSON ``{"error": ...}``) so that huggingface_hub
raises its usual exceptions.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from ..errors import BadInputError, RevisionNotFoundError, UnsafePathError
from ..paths import validate_relative_path
from .checksums import ChecksumCache
from .repos import RepoLocation, RepoStore, Snapshot
from .runner import ServerThread, prepare_server

__all__ = ["DEFAULT_PAGE_SIZE", "ServerThread", "create_app", "run_server"]

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 1000  # entries per tree page, as on the Hub
CHUNK_SIZE = 1024 * 1024  # bytes per body message: large chunks keep a 1 GiB transfer fast

_REPO_TYPES = {"models": "model", "datasets": "dataset"}
_MAX_MEMO_ENTRIES = 64  # rendered listings kept per snapshot


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


def _repo_not_found(repo_id: str) -> HubError:
    # The Hub answers 401 (not 404) so that a private repo and a missing one look the same.
    return HubError(401, f"Repository not found: {repo_id}", "RepoNotFound")


class _BigChunkFileResponse(FileResponse):
    chunk_size = CHUNK_SIZE


# ---------------------------------------------------------------------------------------- parsing


def _segments(request: Request) -> list[str]:
    """The percent-decoded segments of the raw request path (``/a/b%2Fc`` -> ``["a", "b/c"]``)."""
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode("utf-8")
    try:
        return [unquote(part, errors="strict") for part in raw.decode("ascii").split("/")[1:]]
    except UnicodeError:
        raise HubError(400, "malformed URL encoding") from None


def _file_path(segments: list[str]) -> str:
    """Join URL segments into a file path, refusing anything that could leave the repo."""
    try:
        return validate_relative_path("/".join(segments))
    except UnsafePathError as error:
        raise HubError(400, str(error)) from None


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")


# ------------------------------------------------------------------------------------------ the app


class _MirrorApi:
    """The request handlers, sharing one :class:`RepoStore`."""

    def __init__(self, store: RepoStore, page_size: int) -> None:
        self.store = store
        self.page_size = page_size

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

    # -- /api/{type}s/...

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
        repo_id, tail, location = self._locate(repo_type, readings)
        if not tail:
            return await self._info(request, location, "main")
        if tail[0] == "revision":
            return await self._info(request, location, tail[1])
        return await self._tree(request, location, tail[1], tail[2:])

    def _locate(
        self, repo_type: str, readings: list[tuple[str, list[str]]]
    ) -> tuple[str, list[str], RepoLocation]:
        for repo_id, tail in readings:
            location = self.store.find(repo_type, repo_id)
            if location is not None:
                return repo_id, tail, location
        raise _repo_not_found(readings[0][0])

    async def _snapshot(self, location: RepoLocation, revision: str) -> Snapshot:
        try:
            # Hashing never-seen files blocks: keep it off the event loop.
            return await run_in_threadpool(self.store.snapshot, location, revision)
        except RevisionNotFoundError as error:
            raise HubError(404, str(error), "RevisionNotFound") from None

    async def _info(self, request: Request, location: RepoLocation, revision: str) -> Response:
        snap = await self._snapshot(location, revision)
        with_blobs = _flag(request, "blobs")
        body = _memo(snap, ("info", with_blobs), lambda: _render_json(_info_body(location, snap, with_blobs)))
        return Response(body, media_type="application/json")

    async def _tree(
        self, request: Request, location: RepoLocation, revision: str, where: list[str]
    ) -> Response:
        directory = _file_path(where) if where else ""
        snap = await self._snapshot(location, revision)
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
        headers = {}
        if start + self.page_size < len(entries):
            next_url = request.url.include_query_params(cursor=str(start + self.page_size))
            headers["Link"] = f'<{next_url}>; rel="next"'
        return JSONResponse(page, headers=headers)

    # -- /{repo}/resolve/{rev}/{path}

    async def _resolve(self, request: Request, repo_type: str, rest: list[str]) -> Response:
        readings = [
            ("/".join(rest[:n]), rest[n + 1 :]) for n in (2, 1) if len(rest) >= n + 3 and rest[n] == "resolve"
        ]
        if not readings:
            raise HubError(404, "Not Found")
        _, tail, location = self._locate(repo_type, readings)
        revision, path = tail[0], _file_path(tail[1:])
        try:
            snap, info = await run_in_threadpool(self.store.resolve, location, revision, path)
        except RevisionNotFoundError as error:
            raise HubError(404, str(error), "RevisionNotFound") from None
        try:
            stat_result = os.stat(info.local) if info is not None else None
        except OSError:
            stat_result = None
        if info is None or stat_result is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        etag = f'"{info.etag}"'
        headers = {
            "ETag": etag,
            "X-Repo-Commit": snap.commit,
            "X-Linked-Etag": etag,
            "X-Linked-Size": str(info.size),
            "Accept-Ranges": "bytes",
        }
        return _BigChunkFileResponse(info.local, headers=headers, stat_result=stat_result)


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


def create_app(
    root: str | os.PathLike[str],
    *,
    state_dir: str | os.PathLike[str] | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    checksums: ChecksumCache | None = None,
) -> Starlette:
    """The mirror as an ASGI app serving ``root`` (a plain tree or a Hugging Face cache folder).

    Args:
        root: the folder to serve.
        state_dir: where remembered checksums are kept (default ``~/.cache/hfmirror``).
        page_size: tree entries per page (small values let tests exercise pagination).
        checksums: an existing cache to share (``state_dir`` is then ignored).

    ``app.state.store`` and ``app.state.checksums`` give access to the internals (for tests).
    """
    if not Path(root).is_dir():
        raise BadInputError(f"not a folder: {root}")
    if page_size < 1:
        raise BadInputError("page_size must be at least 1")
    checksums = checksums if checksums is not None else ChecksumCache(state_dir)
    store = RepoStore(root, checksums)
    api = _MirrorApi(store, page_size)
    handler: Callable[[Request], Awaitable[Response]] = api.dispatch
    app = Starlette(routes=[Route("/{rest:path}", handler, methods=["GET", "HEAD"])])
    app.state.store = store
    app.state.checksums = checksums
    return app


# ------------------------------------------------------------------------------------------ running


def run_server(
    root: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    state_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Serve ``root`` until Ctrl-C (or SIGTERM), logging one line per request; then return normally."""
    prepare_server(create_app(root, state_dir=state_dir), host=host, port=port).run()
