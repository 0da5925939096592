"""``hfmirror serve ROOT --upstream URL``: a team mirror that fills its cache from upstream mirrors.

:class:`UpstreamApi` answers the Hub's API for any repo the upstream has, from ROOT when it can:

* **Listings**: a branch is pinned to the commit the upstream names, asked again at most every
  ``--revision-ttl`` seconds (:mod:`.revisions`); a commit's listing is asked once and kept.
* **Files**: a cached blob is served from disk (a *hit*); any other is fetched once, by one process,
  and streamed to every client asking for it while it arrives (a *miss*: :mod:`.fills`,
  :mod:`.streaming`). A branch-addressed request for an LFS file is redirected to its commit-addressed
  URL, as the Hub redirects to its CDN, so an HTTP cache in front can keep the bytes for good.
* **Upstream down**: what is cached is still answered (*stale*); anything else fails fast, as the Hub
  fails: 504. The upstream's own refusals (401, 403, 404) are passed on as the Hub words them.
* **Tokens**: a client's ``Authorization`` goes upstream with its requests; what came through a token
  is served only to tokens the upstream accepts (:mod:`.access`). Tokens are never logged.
* **Operators**: ``--allow``/``--deny`` (:mod:`.repo_filter`), ``--max-size`` (:mod:`.eviction`), a log
  line per request with ``hit``/``miss``/``stale``, ``/metrics`` (:mod:`.metrics`).

Calls to the upstream run on a thread pool, one call in flight per question (:mod:`.calls`), and a
client waits for the upstream at most ``--upstream-timeout`` seconds before it gets its answer from
the cache or a 504.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from pathlib import Path
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from .. import constants
from ..errors import (
    AccessDeniedError,
    BadInputError,
    EntryNotFoundError,
    HfMirrorError,
    InsufficientSpaceError,
    IntegrityError,
    NetworkError,
    RemoteError,
    RepoNotFoundError,
    RevisionNotFoundError,
    StorageError,
    UnsafeListingError,
)
from ..layout import CacheLayout, repo_folder_name
from ..listing import RemoteFile, RepoListing, validate_repo_id, validate_revision
from .access import AccessGate, principal_of
from .calls import UpstreamCalls
from .checksums import ChecksumCache
from .eviction import CacheBudget, InUse
from .fills import FillManager
from .hubapi import (
    DEFAULT_PAGE_SIZE,
    BigChunkFileResponse,
    HubApi,
    HubError,
    Readings,
    WholeFileResponse,
    file_headers,
    not_modified,
    repo_not_found,
)
from .metrics import CountingMiddleware, Metrics
from .repo_filter import RepoFilter
from .repos import FileInfo, RepoLocation, RepoStore, Snapshot, snapshot_of
from .revisions import ListingStore, Pinned, RevisionPins
from .streaming import FillingFileResponse, parse_range, was_cut
from .upstream import Upstream

__all__ = [
    "DEFAULT_REVISION_TTL",
    "DEFAULT_UPSTREAM_TIMEOUT",
    "UpstreamApi",
    "create_mirror_app",
    "hub_error_for",
]

logger = logging.getLogger(__name__)

DEFAULT_REVISION_TTL = 300.0  # seconds a branch stays pinned to a commit before the upstream is asked again
DEFAULT_UPSTREAM_TIMEOUT = 10.0  # seconds a client waits on the upstream before a cached answer or a 504
_UPSTREAM_THREADS = 32
_KEPT_SNAPSHOTS = 256


def hub_error_for(error: BaseException) -> HubError:
    """An upstream failure (one of our errors) as the Hub would answer it."""
    message = str(error)
    if isinstance(error, RepoNotFoundError):
        return HubError(401, message, "RepoNotFound")
    if isinstance(error, RevisionNotFoundError):
        return HubError(404, message, "RevisionNotFound")
    if isinstance(error, EntryNotFoundError):
        return HubError(404, message, "EntryNotFound")
    if isinstance(error, AccessDeniedError):
        return HubError(403, message, "GatedRepo")
    if isinstance(error, NetworkError):
        return HubError(504, f"upstream unreachable: {message}")
    if isinstance(error, InsufficientSpaceError):
        return HubError(507, message)
    if isinstance(error, (IntegrityError, UnsafeListingError, RemoteError)):
        return HubError(502, f"upstream answered wrongly: {message}")
    if isinstance(error, StorageError):
        return HubError(507, f"the mirror cannot store it: {message}")
    if isinstance(error, BadInputError):
        return HubError(400, message)
    return HubError(500, f"mirror error: {type(error).__name__}")


def _token(request: Request) -> str | None:
    """The client's bearer token (forwarded upstream; never logged)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def _note(request: Request, outcome: str) -> None:
    """What the access log line and the counters say about this request (hit, miss, stale...)."""
    request.scope.setdefault("state", {})["log"] = outcome


class UpstreamApi(HubApi):
    """The Hub's API over a cache that fills itself from the upstream."""

    def __init__(
        self,
        root: Path,
        *,
        upstream: Upstream,
        pins: RevisionPins,
        gate: AccessGate,
        fills: FillManager,
        budget: CacheBudget,
        repo_filter: RepoFilter,
        metrics: Metrics,
        local: RepoStore,
        in_use: InUse,
        timeout: float = DEFAULT_UPSTREAM_TIMEOUT,
        page_size: int = DEFAULT_PAGE_SIZE,
        serve_seeded_offline: bool = False,
    ) -> None:
        super().__init__(page_size)
        self.root = root
        self.upstream = upstream
        self.pins = pins
        self.gate = gate
        self.fills = fills
        self.budget = budget
        self.repo_filter = repo_filter
        self.metrics = metrics
        self.local = local
        self.in_use = in_use
        self.timeout = timeout
        self.serve_seeded_offline = serve_seeded_offline
        self.calls = UpstreamCalls(_UPSTREAM_THREADS, timeout=timeout)
        self._snapshots: collections.OrderedDict[
            tuple[str, str, str], tuple[Snapshot, dict[str, RemoteFile]]
        ] = collections.OrderedDict()

    def close(self) -> None:
        """Stop fills (they keep their resume state) and drop upstream calls nobody waits for."""
        self.fills.cancel.set()
        self.upstream.cancel.set()
        self.calls.close()

    # -- which repo

    async def locate(
        self, request: Request, repo_type: str, readings: Readings
    ) -> tuple[list[str], RepoLocation]:
        for repo_id, tail in readings:
            try:
                validate_repo_id(repo_id)
            except BadInputError:
                continue
            if not self.repo_filter.permits(repo_type, repo_id):
                _note(request, "denied")
                raise HubError(403, f"{repo_id} is not served by this mirror (--allow/--deny)")
            base = self.root / repo_folder_name(repo_id, repo_type)
            return tail, RepoLocation(repo_type, repo_id, base, "cache")
        raise repo_not_found(readings[0][0])

    def is_private(self, request: Request, location: RepoLocation) -> bool:
        return self.gate.is_restricted(location.repo_type, location.repo_id)

    # -- listings

    async def _pinned(self, request: Request, location: RepoLocation, revision: str) -> Pinned:
        """The listing of ``revision``: pinned, from the upstream, or (upstream down) from the cache."""
        try:
            validate_revision(revision)  # it becomes a file name under refs/
        except BadInputError as error:
            raise HubError(400, str(error)) from None
        fresh = self.pins.fresh(location.repo_type, location.repo_id, revision)
        if fresh is not None:
            return Pinned(fresh, "hit")
        try:
            pinned = await self._pin(location, revision, _token(request))
        except (asyncio.TimeoutError, NetworkError) as error:
            cached = await run_in_threadpool(self._cached_listing, location, revision)
            if cached is None:
                self.metrics.add("upstream_errors")
                problem = "did not answer in time" if isinstance(error, asyncio.TimeoutError) else str(error)
                raise HubError(
                    504, f"upstream unreachable ({problem}) and {location.repo_id}@{revision} is not cached"
                ) from None
            return Pinned(cached, "stale")
        except HfMirrorError as error:
            raise hub_error_for(error) from None
        return pinned

    async def _pin(self, location: RepoLocation, revision: str, token: str | None) -> Pinned:
        """The upstream's listing of ``revision``: one call in flight per revision, whoever asks.

        A request that joined another's call and got a refusal (not found, access denied) asks again
        with its own token: the refusal was the other token's.
        """
        key = ("pin", location.repo_type, location.repo_id, revision)
        args = (location.repo_type, location.repo_id, revision, token)
        call = self.calls.start(key, self.pins.pin, *args)
        try:
            return await self.calls.wait(call)
        except RemoteError:
            if not call.joined:
                raise
        return await self.calls.run((*key, principal_of(token)), self.pins.pin, *args)

    def _cached_listing(self, location: RepoLocation, revision: str) -> RepoListing | None:
        """What the cache knows of ``revision`` without the upstream: our stored listing, else (if the
        operator allows it) the snapshot folder as another tool left it.

        Raises:
            HubError: 504 if only another tool's snapshot holds it: whether its repo is gated cannot be
                told without the upstream (the mirror classifies what it lists itself).
        """
        cached = self.pins.cached(location.repo_type, location.repo_id, revision)
        if cached is not None:
            return cached
        seeded = self._seeded_listing(location, revision)
        if seeded is not None and not self.serve_seeded_offline:
            raise HubError(
                504,
                f"upstream unreachable, and {location.repo_id}@{revision} is in the cache only as another "
                "tool left it: whether it is gated cannot be told (--serve-seeded-offline serves it anyway)",
            )
        return seeded

    def _seeded_listing(self, location: RepoLocation, revision: str) -> RepoListing | None:
        """``revision`` as huggingface_hub (or a copy) left it in ROOT: the files its snapshot holds."""
        found = self.local.find(location.repo_type, location.repo_id)
        if found is None or found.layout != "cache":
            return None
        try:
            snap = self.local.snapshot(found, revision)
        except RevisionNotFoundError:
            return None
        files = tuple(RemoteFile(i.path, i.size, i.etag) for i in snap.files.values())
        return RepoListing(location.repo_id, location.repo_type, revision, snap.commit, files)

    async def _classify(self, listing: RepoListing, file: RemoteFile) -> None:
        """A file is about to come through a token: is the repo restricted upstream? (fail closed)"""
        try:
            await self.calls.run(
                ("classify", listing.repo_type, listing.repo_id), self.gate.classify, listing, file
            )
        except asyncio.TimeoutError:
            raise HubError(504, "upstream did not answer an access check in time") from None

    async def _check_access(self, request: Request, listing: RepoListing, file: RemoteFile | None) -> None:
        if not self.gate.is_restricted(listing.repo_type, listing.repo_id):
            return
        token = _token(request)
        try:
            key = ("check", listing.repo_type, listing.repo_id, principal_of(token))
            await self.calls.run(key, self.gate.check, listing, file, token)
        except AccessDeniedError as error:
            _note(request, "denied")
            raise HubError(403 if token else 401, str(error), "GatedRepo") from None
        except (asyncio.TimeoutError, NetworkError):
            raise HubError(
                504, f"{listing.repo_id} is gated or private and the upstream cannot confirm access now"
            ) from None

    async def snapshot(self, request: Request, location: RepoLocation, revision: str) -> Snapshot:
        pinned = await self._pinned(request, location, revision)
        await self._check_access(request, pinned.listing, None)
        self._count(request, pinned.outcome)
        return self._snapshot_of(pinned.listing)

    def _snapshot_of(self, listing: RepoListing) -> Snapshot:
        """The listing as a Snapshot (kept per commit, so its rendered JSON is kept too)."""
        return self._kept(listing)[0]

    def _kept(self, listing: RepoListing) -> tuple[Snapshot, dict[str, RemoteFile]]:
        """The listing's Snapshot and its files by path, built once per commit (a GET costs no scan)."""
        key = (listing.repo_type, listing.repo_id, listing.commit)
        kept = self._snapshots.get(key)
        if kept is None:
            layout = CacheLayout(listing, self.root)
            ordered = sorted(listing.files, key=lambda f: f.path)
            files = {f.path: FileInfo(f.path, layout.blob_path(f), f.size, f.oid, f.is_lfs) for f in ordered}
            snap = snapshot_of(listing.repo_type, listing.repo_id, listing.commit, files, time.time())
            kept = self._snapshots[key] = (snap, {f.path: f for f in ordered})
            while len(self._snapshots) > _KEPT_SNAPSHOTS:
                self._snapshots.popitem(last=False)
        return kept

    def _count(self, request: Request, outcome: str) -> None:
        _note(request, outcome)
        counter = {"hit": "cache_hits", "miss": "cache_misses", "stale": "stale_answers"}[outcome]
        self.metrics.add(counter)

    # -- files

    async def resolve(self, request: Request, location: RepoLocation, revision: str, path: str) -> Response:
        pinned = await self._pinned(request, location, revision)
        listing = pinned.listing
        snap, by_path = self._kept(listing)
        file = by_path.get(path)
        if file is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        await self._check_access(request, listing, file)
        private = self.gate.is_restricted(listing.repo_type, listing.repo_id)
        headers = file_headers(snap, snap.files[path], revision, private=private)
        if revision != listing.commit and file.is_lfs:
            # As the Hub sends LFS files to its CDN: to the URL whose bytes never change.
            self._count(request, pinned.outcome)
            prefix = "datasets/" if listing.repo_type == "dataset" else ""
            target = f"/{prefix}{listing.repo_id}/resolve/{listing.commit}/{quote(path)}"
            cache_control = headers["Cache-Control"] if private else "no-cache"  # the branch may move
            return Response(
                status_code=302, headers={**headers, "Location": target, "Cache-Control": cache_control}
            )
        layout = CacheLayout(listing, self.root)
        cached = await run_in_threadpool(_is_complete, layout, file)
        if cached:
            # Looked at again after that wait: meanwhile a token may have fetched the file and found
            # the repo restricted. From here to the answer nothing awaits.
            await self._check_access(request, listing, file)
        if request.method == "HEAD":
            self._count(request, "hit" if cached else pinned.outcome)
            return Response(status_code=200, headers={**headers, "Content-Length": str(file.size)})
        if cached:
            answer = self._from_cache(
                request, layout, file, headers, "stale" if pinned.outcome == "stale" else "hit"
            )
            if answer is not None:
                return answer  # else evicted a moment ago (by another replica): a miss after all
        if pinned.outcome == "stale":
            raise HubError(504, f"upstream unreachable and {path} of {listing.repo_id} is not cached")
        return await self._from_upstream(request, listing, file, headers)

    def _from_cache(
        self, request: Request, layout: CacheLayout, file: RemoteFile, headers: dict[str, str], outcome: str
    ) -> Response | None:
        """The cached blob (opened here, before any header is sent), or None if it is gone."""
        blob = layout.blob_path(file)
        unchanged = not_modified(request, headers)
        if unchanged is None:
            try:
                opened = open(blob, "rb")  # the response closes it once sent
            except FileNotFoundError:  # evicted by another replica since it was found
                return None
            except OSError as error:
                raise HubError(503, f"{file.path} cannot be read from the cache: {error.strerror}") from None
        self._count(request, outcome)
        self.budget.touch(blob)
        if unchanged is not None:
            return unchanged
        answer = WholeFileResponse if was_cut(blob) else BigChunkFileResponse
        return answer(blob, headers=headers, stat_result=os.fstat(opened.fileno()), opened=opened)

    async def _from_upstream(
        self, request: Request, listing: RepoListing, file: RemoteFile, headers: dict[str, str]
    ) -> Response:
        token = _token(request)
        if token:
            await self._classify(listing, file)
        # The last look before joining a fill, which may be one that a token started: from here to
        # the join nothing awaits, so a repo that became restricted since resolve() checked is seen.
        await self._check_access(request, listing, file)
        if self.gate.is_restricted(listing.repo_type, listing.repo_id):
            headers = {**headers, "Cache-Control": "private, no-store"}
        self._count(request, "miss")
        byte_range = None
        if_range = request.headers.get("if-range")
        layout = CacheLayout(listing, self.root)
        if (if_range is None or if_range == headers["ETag"]) and not was_cut(layout.blob_path(file)):
            byte_range = parse_range(request.headers.get("range"), file.size)
        fill = self.fills.join(listing, file, token)

        def cut(reason: str) -> None:
            _note(request, "miss,cut")

        return FillingFileResponse(
            fill,
            headers,
            byte_range,
            in_use=self.in_use,
            first_byte_timeout=self.timeout,
            stall_timeout=self.upstream.stall_timeout * 2,
            error_response=lambda error: hub_error_for(error).response(),
            on_cut=cut,
            on_finish=lambda: self.fills.leave(fill),
        )


def _is_complete(layout: CacheLayout, file: RemoteFile) -> bool:
    """Whether the blob is cached (right size); links it into the snapshot folder if it is not yet."""
    try:
        return layout.is_complete(file)
    except OSError:
        return False


def create_mirror_app(
    root: str | os.PathLike[str],
    upstreams: list[str],
    *,
    state_dir: str | os.PathLike[str] | None = None,
    revision_ttl: float = DEFAULT_REVISION_TTL,
    upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT,
    allow: list[str] | None = None,
    deny: list[str] | None = None,
    max_size: int | None = None,
    connections: int = 8,
    stall_timeout: float = constants.DEFAULT_STALL_TIMEOUT,
    page_size: int = DEFAULT_PAGE_SIZE,
    serve_seeded_offline: bool = False,
) -> Starlette:
    """The team mirror as an ASGI app: ``root`` (made if missing) fills itself from ``upstreams``.

    ``serve_seeded_offline``: with the upstream unreachable, also answer revisions that only another
    tool's snapshot in ``root`` holds (refused by default: they may be gated).

    ``app.state`` holds ``api``, ``metrics``, ``fills``, ``upstream`` and ``budget`` (for tests).

    Raises:
        BadInputError: a bad upstream URL, or a number that must be positive.
    """
    if (
        revision_ttl < 0
        or upstream_timeout <= 0
        or connections < 1
        or (max_size is not None and max_size <= 0)
    ):
        raise BadInputError(
            "--revision-ttl, --upstream-timeout, --connections and --max-size must be positive"
        )
    folder = Path(root).expanduser().absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(f"cannot create the cache folder {folder}: {error.strerror}") from None
    upstream = Upstream(upstreams, connections=connections, stall_timeout=stall_timeout)
    metrics = Metrics()
    in_use = InUse()
    budget = CacheBudget(folder, max_size, in_use, metrics)
    gate = AccessGate(folder, upstream, ttl=revision_ttl)
    fills = FillManager(folder, upstream, budget, in_use, metrics)
    api = UpstreamApi(
        folder,
        upstream=upstream,
        pins=RevisionPins(folder, ListingStore(folder), upstream, gate, ttl=revision_ttl),
        gate=gate,
        fills=fills,
        budget=budget,
        repo_filter=RepoFilter(allow or (), deny or ()),
        metrics=metrics,
        local=RepoStore(folder, ChecksumCache(state_dir)),
        in_use=in_use,
        timeout=upstream_timeout,
        page_size=page_size,
        serve_seeded_offline=serve_seeded_offline,
    )
    metrics.gauge("fills_running", "Files being fetched from the upstream by this process.", fills.running)
    stats = upstream.stats  # the downloader's own counters, for every fill and listing
    metrics.counted_elsewhere("upstream_retries", "Upstream requests retried.", lambda: stats.retries)
    metrics.counted_elsewhere(
        "upstream_rate_limited", "Upstream 429/503 backed off from.", lambda: stats.rate_limited
    )
    metrics.counted_elsewhere(
        "upstream_verify_failures",
        "Upstream files whose checksum did not match.",
        lambda: stats.verify_failures,
    )
    if max_size is not None:
        metrics.gauge("cache_limit_bytes", "The --max-size limit.", lambda: max_size)

    async def serve_metrics(request: Request) -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    app = Starlette(
        routes=[
            Route("/metrics", serve_metrics, methods=["GET"]),
            Route("/{rest:path}", api.dispatch, methods=["GET", "HEAD"]),
        ],
        middleware=[Middleware(CountingMiddleware, metrics=metrics)],
    )
    app.state.api = api
    app.state.metrics = metrics
    app.state.fills = fills
    app.state.upstream = upstream
    app.state.budget = budget
    app.state.store = api.local
    return app
