"""``hfmirror serve ROOT``: the Hub's API over folders on disk (a plain tree or a Hugging Face cache).

:class:`LocalApi` answers from a :class:`~.repos.RepoStore`; the routes and the JSON are those of
:class:`~.hubapi.HubApi`. :func:`create_app` builds the ASGI app.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import BadInputError, RevisionNotFoundError
from .checksums import ChecksumCache
from .hubapi import (
    DEFAULT_PAGE_SIZE,
    BigChunkFileResponse,
    HubApi,
    HubError,
    Readings,
    file_headers,
    not_modified,
    repo_not_found,
)
from .repos import RepoLocation, RepoStore, Snapshot
from .runner import ServerThread

__all__ = ["DEFAULT_PAGE_SIZE", "LocalApi", "ServerThread", "create_app"]

logger = logging.getLogger(__name__)


class LocalApi(HubApi):
    """The Hub's API over the repos a :class:`RepoStore` finds under ROOT."""

    def __init__(self, store: RepoStore, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        super().__init__(page_size)
        self.store = store

    async def locate(
        self, request: Request, repo_type: str, readings: Readings
    ) -> tuple[list[str], RepoLocation]:
        for repo_id, tail in readings:
            location = self.store.find(repo_type, repo_id)
            if location is not None:
                return tail, location
        raise repo_not_found(readings[0][0])

    async def snapshot(self, request: Request, location: RepoLocation, revision: str) -> Snapshot:
        try:
            # Hashing never-seen files blocks: keep it off the event loop.
            return await run_in_threadpool(self.store.snapshot, location, revision)
        except RevisionNotFoundError as error:
            raise HubError(404, str(error), "RevisionNotFound") from None

    async def resolve(self, request: Request, location: RepoLocation, revision: str, path: str) -> Response:
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
        headers = file_headers(snap, info, revision)
        unchanged = not_modified(request, headers)
        if unchanged is not None:
            return unchanged
        return BigChunkFileResponse(info.local, headers=headers, stat_result=stat_result)


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
    api = LocalApi(store, page_size)
    handler: Callable[[Request], Awaitable[Response]] = api.dispatch
    app = Starlette(routes=[Route("/{rest:path}", handler, methods=["GET", "HEAD"])])
    app.state.store = store
    app.state.checksums = checksums
    return app
