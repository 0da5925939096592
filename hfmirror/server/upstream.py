"""The upstream mirrors, reached through the downloader's own machinery.

A team mirror asks its upstreams (hf-mirror.com, huggingface.co through a proxy, another hfmirror)
for three things, each the way ``hfmirror download`` asks:

* a listing: :func:`hfmirror.listing.list_repo` (failover order, retries, backoff, ``Retry-After``);
* a file: :class:`hfmirror.transfer.FileTransfer` into the cache's partial file (several connections
  when one is capped, stall detection, resume, the checksum checked before the file is renamed);
* whether a token may read a file (:meth:`Upstream.may_read`): one ``HEAD`` of its resolve URL, with
  the same session and endpoint governors, judged by the same request policy (:mod:`hfmirror.policy`).

The endpoint pool fails over for good once an endpoint keeps failing (that is the downloader's rule
for one run); a server runs for months, so the pool is renewed every :data:`FAILBACK_SECONDS` and a
recovered first endpoint is tried again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .. import constants
from ..endpoints import Endpoint, EndpointPool
from ..errors import NetworkError, RemoteError
from ..layout import CacheLayout
from ..listing import RemoteFile, RepoListing, list_repo
from ..policy import (
    TRANSPORT_ERRORS,
    Action,
    Asked,
    TransferStats,
    Verdict,
    judge_status,
    judge_transport_error,
    pause,
    settle,
)
from ..sessions import SessionFactory
from ..transfer import FileTransfer, TransferOptions

__all__ = ["FAILBACK_SECONDS", "Upstream"]

logger = logging.getLogger(__name__)

FAILBACK_SECONDS = 600.0  # a failed-over pool goes back to the first endpoint after this long
_PROBE_ATTEMPTS = 3  # per endpoint, for an access check


class Upstream:
    """Listings, files and access checks from the upstream endpoints (in failover order)."""

    def __init__(
        self,
        urls: list[str],
        *,
        connections: int = 8,
        stall_timeout: float = constants.DEFAULT_STALL_TIMEOUT,
        max_concurrency: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.urls = list(urls)
        self.connections = connections
        self.stall_timeout = stall_timeout
        self.max_concurrency = max_concurrency
        self.stats = TransferStats()  # every fill's and listing's counters (bytes fetched, retries, 429s)
        self.cancel = threading.Event()  # set at shutdown: waits end, transfers stop (keeping their state)
        self._sessions = SessionFactory(pool_size=max_concurrency)  # sockets within the governors' budget
        self._clock = clock
        self._pool_lock = threading.Lock()
        self._pool = self._new_pool()  # checks the URLs now, so a bad one fails at start
        self._pool_made = clock()

    def _new_pool(self) -> EndpointPool:
        return EndpointPool.from_urls(
            self.urls, max_concurrency=self.max_concurrency, failover_after=constants.FAILOVER_AFTER
        )

    def _renewed_pool(self) -> EndpointPool:
        """A pool back at the first endpoint, its failure counts cleared, but with the same rate
        governors: fills that still hold the old pool share with the new one each endpoint's
        connection cap, its rate-limit pauses and its announced quota."""
        return EndpointPool(
            endpoints=[Endpoint(e.url, e.governor) for e in self._pool.endpoints],
            failover_after=self._pool.failover_after,
        )

    @property
    def pool(self) -> EndpointPool:
        """The endpoint pool, renewed (back to the first endpoint) every FAILBACK_SECONDS."""
        with self._pool_lock:
            if (
                self._clock() - self._pool_made > FAILBACK_SECONDS
                and self._pool.current is not self._pool.endpoints[0]
            ):
                self._pool, self._pool_made = self._renewed_pool(), self._clock()
            return self._pool

    # -- listings

    def list(self, repo_type: str, repo_id: str, revision: str, token: str | None) -> RepoListing:
        """The repo at ``revision``, as the first endpoint that answers lists it. Blocking.

        Raises:
            RepoNotFoundError, RevisionNotFoundError, AccessDeniedError, UnsafeListingError, NetworkError.
        """
        return list_repo(
            self.pool,
            repo_id,
            repo_type=repo_type,
            revision=revision,
            token=token,
            session=self._sessions.get(),
            stats=self.stats,  # a listing's retries and 429s reach /metrics as a fill's do
            cancel=self.cancel,  # shutdown ends its waits (Retry-After, backoff) at once
        )

    # -- files

    def transfer(
        self,
        listing: RepoListing,
        file: RemoteFile,
        layout: CacheLayout,
        *,
        token: str | None,
        cancel: threading.Event,
        on_bytes: Callable[[int], None],
    ) -> FileTransfer:
        """The downloader's transfer of ``file`` into the cache's partial file (``run()`` it)."""
        return FileTransfer(
            file,
            listing,
            partial_path=layout.partial_path(file),
            state_path=layout.state_path(file),
            pool=self.pool,
            session_for=self._sessions.get,
            options=TransferOptions(
                connections=self.connections, stall_timeout=self.stall_timeout, token=token
            ),
            stats=self.stats,
            cancel=cancel,
            on_bytes=on_bytes,
        )

    # -- access

    def may_read(self, listing: RepoListing, file: RemoteFile, token: str | None) -> bool:
        """Whether the upstream serves ``file`` to ``token`` (None: to anyone). Blocking.

        One ``HEAD`` of the file's resolve URL per endpoint, judged by the downloader's request policy:
        a 2xx or a redirect means yes (the Hub redirects only requests it will serve); access denied
        means no at once (every endpoint gets the same token); not found means no unless another
        endpoint has it; anything else is retried or passed to the next endpoint, as for a download.

        Raises:
            NetworkError: if no endpoint gave a definite answer.
        """
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        refused = False
        problem = "no endpoint in service"
        for endpoint in self.pool.in_service():
            asked = Asked(listing.repo_id, listing.commit, endpoint.shown, file.path)
            url = endpoint.resolve_url(listing.repo_type, listing.repo_id, listing.commit, file.path)
            for attempt in range(1, _PROBE_ATTEMPTS + 1):
                verdict = self._probe(endpoint, url, headers, asked)
                if verdict is None:
                    return True
                problem = f"{endpoint.shown}: {verdict.reason}"
                if verdict.action is Action.FAIL:
                    return False
                if verdict.action is Action.FAIL_OVER:
                    refused = refused or isinstance(verdict.error, RemoteError)
                    break
                pause(settle(verdict, endpoint, self.pool, self.stats, attempt=attempt), self.cancel)
        if refused:
            return False
        raise NetworkError(f"could not check access to {listing.repo_id} upstream ({problem})")

    def _probe(self, endpoint: Endpoint, url: str, headers: dict[str, str], asked: Asked) -> Verdict | None:
        """One HEAD; None if it was let through, else the policy's verdict on what came back."""
        if not endpoint.governor.acquire_for_metadata(self.cancel):
            raise NetworkError("the mirror is shutting down")
        try:
            endpoint.requests += 1
            try:
                response = self._sessions.get().head(
                    url, headers=headers, allow_redirects=False, timeout=(constants.CONNECT_TIMEOUT,) * 2
                )
            except TRANSPORT_ERRORS as error:
                return judge_transport_error(error, asked, timeout=constants.CONNECT_TIMEOUT)
            if response.is_redirect:
                return None
            return judge_status(response.status_code, response.headers, asked)
        finally:
            endpoint.governor.release()
