"""Filling the cache from the upstream: one transfer per file, whoever and however many ask.

In one process, every request for a file not yet cached shares one :class:`Fill`. Across processes
(replicas on one ROOT), the fill runs under the blob's lock file, the very lock huggingface_hub and
``hfmirror download`` take (``{ROOT}/.locks/<repo folder>/<oid>.lock``): one process fetches, the
others wait on the lock and meanwhile stream what it writes (:mod:`.streaming` reads the partial
file and its resume state, which any process can). If the process that fetches dies, its lock goes
with it, a waiting process takes the lock and the downloader resumes the partial file where the
state says it stopped; the next request after a restart does the same.

The fetch itself is the downloader's: :class:`~hfmirror.transfer.FileTransfer` into the cache's
partial file, then :meth:`~hfmirror.layout.CacheLayout.finalize` renames it to its blob once its
checksum matched the listing.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from filelock import FileLock, Timeout

from ..layout import CacheLayout
from ..listing import RemoteFile, RepoListing
from .eviction import CacheBudget, InUse
from .metrics import Metrics
from .upstream import Upstream

__all__ = ["Fill", "FillManager"]

logger = logging.getLogger(__name__)

_LOCK_POLL = 0.25  # seconds between tries for a blob's lock held by another process


class Fill:
    """One blob on its way into the cache, fetched by this process or by another one."""

    def __init__(self, listing: RepoListing, file: RemoteFile, layout: CacheLayout) -> None:
        self.listing = listing
        self.file = file
        self.layout = layout
        self.done = threading.Event()  # set when the blob is in place, or the fill gave up
        self.error: BaseException | None = None
        self.waiters = 0  # requests of this process streaming it (the fill stops waiting without any)

    @property
    def blob(self) -> Path:
        return self.layout.blob_path(self.file)

    @property
    def partial(self) -> Path:
        return self.layout.partial_path(self.file)

    @property
    def state(self) -> Path:
        return self.layout.state_path(self.file)


class FillManager:
    """Starts fills (at most one per blob in this process) and runs each under the blob's lock."""

    def __init__(
        self, root: Path, upstream: Upstream, budget: CacheBudget, in_use: InUse, metrics: Metrics
    ) -> None:
        self.root = root
        self.upstream = upstream
        self.budget = budget
        self.in_use = in_use
        self.metrics = metrics
        self.cancel = threading.Event()  # set at shutdown: fills stop and keep their resume state
        self._fills: dict[Path, Fill] = {}
        self._lock = threading.Lock()

    def join(self, listing: RepoListing, file: RemoteFile, token: str | None) -> Fill:
        """The fill of ``file`` this process runs (started now if there is none), counted as waited for.

        Call :meth:`leave` when done with it.
        """
        layout = CacheLayout(listing, self.root)
        blob = layout.blob_path(file)
        with self._lock:
            fill = self._fills.get(blob)
            if fill is None:
                fill = self._fills[blob] = Fill(listing, file, layout)
                threading.Thread(
                    target=self._run, args=(fill, token), name=f"hfmirror-fill-{file.oid[:12]}", daemon=True
                ).start()
            fill.waiters += 1
        return fill

    def leave(self, fill: Fill) -> None:
        with self._lock:
            fill.waiters -= 1

    def running(self) -> int:
        with self._lock:
            return len(self._fills)

    def _run(self, fill: Fill, token: str | None) -> None:
        try:
            with self.in_use.holding(fill.partial):
                self._fill(fill, token)
        except BaseException as error:  # handed to every request waiting for it
            fill.error = error
            if not self.cancel.is_set():
                logger.warning("fetching %s of %s failed: %s", fill.file.path, fill.listing.repo_id, error)
                self.metrics.add("upstream_errors")
        finally:
            with self._lock:
                self._fills.pop(fill.blob, None)
            fill.done.set()

    def _fill(self, fill: Fill, token: str | None) -> None:
        """Take the blob's lock (or wait while another process fetches), then fetch it unless done."""
        lock_path = fill.layout.lock_path(fill.file)
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_path))
        while not self.cancel.is_set():
            if fill.layout.is_complete(fill.file):
                return
            try:
                lock.acquire(timeout=_LOCK_POLL)
            except Timeout:
                with self._lock:
                    nobody_waits = fill.waiters <= 0
                if nobody_waits:  # another process fetches it and nobody here needs it any more
                    return
                continue
            try:
                if fill.layout.is_complete(fill.file):  # the other process finished while we waited
                    return
                self._fetch(fill, token)
                return
            finally:
                lock.release()

    def _fetch(self, fill: Fill, token: str | None) -> None:
        self.budget.make_room(fill.file.size, fill.partial)
        try:
            self.metrics.add("fills_started")
            logger.info("fetching %s of %s from upstream", fill.file.path, fill.listing.repo_id)
            transfer = self.upstream.transfer(
                fill.listing,
                fill.file,
                fill.layout,
                token=token,
                cancel=self.cancel,
                on_bytes=lambda n: self.metrics.add("upstream_bytes", n),
            )
            transfer.run()
            fill.layout.finalize(fill.file, fill.partial)
        finally:
            self.budget.release(fill.partial)
