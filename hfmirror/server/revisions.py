"""Branches pinned to commits, and the listings of those commits kept in the cache.

A client asking for ``main`` gets the commit the upstream names for it, and that commit's files.
:class:`RevisionPins` asks the upstream again only once the pin is older than ``--revision-ttl``;
meanwhile every answer about ``main`` is the same commit. A commit is asked for once: what it holds
never changes.

:class:`ListingStore` keeps each commit's listing (every file's name, size and checksum) in the
cache, at ``<repo folder>/.hfmirror/listings/<commit>.json``, and the pin in ``refs/<branch>`` as
huggingface_hub does. So with the upstream unreachable, or after a restart, a cached revision is
still answered in full, the files not yet cached included (those then fail as the upstream does),
rather than as if it held only the files some client happened to fetch.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import NetworkError, UnsafePathError
from ..hashing import is_git_sha1, is_sha256
from ..layout import CacheLayout, cached_commit, repo_folder_name
from ..listing import RemoteFile, RepoListing
from ..paths import validate_relative_path
from .access import AccessGate
from .upstream import Upstream

__all__ = ["LISTINGS_FOLDER", "ListingStore", "Pinned", "RevisionPins"]

logger = logging.getLogger(__name__)

LISTINGS_FOLDER = ".hfmirror/listings"  # inside a repo's cache folder; huggingface_hub ignores it
_KEPT_IN_MEMORY = 256  # listings parsed and kept, least recently used dropped first


class ListingStore:
    """Commit listings on disk in the cache (written atomically, read back with every name checked)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._memory: collections.OrderedDict[tuple[str, str, str], RepoListing] = collections.OrderedDict()
        self._lock = threading.Lock()

    def path(self, repo_type: str, repo_id: str, commit: str) -> Path:
        return self.root / repo_folder_name(repo_id, repo_type) / LISTINGS_FOLDER / f"{commit}.json"

    def save(self, listing: RepoListing) -> None:
        path = self.path(listing.repo_type, listing.repo_id, listing.commit)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"commit": listing.commit, "files": [[f.path, f.size, f.oid] for f in listing.files]}
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        temporary.write_text(json.dumps(body))
        os.replace(temporary, path)
        self._remember(listing)

    def unlisted_commits(self, repo_type: str, repo_id: str) -> list[str]:
        """Snapshot folders of the repo that have no listing here: content another tool put in ROOT
        (huggingface_hub, ``hf download``, a copy), which may have come through someone's token."""
        snapshots = self.root / repo_folder_name(repo_id, repo_type) / "snapshots"
        try:
            names = os.listdir(snapshots)
        except OSError:
            return []
        return [name for name in names if not self.path(repo_type, repo_id, name).is_file()]

    def load(self, repo_type: str, repo_id: str, commit: str) -> RepoListing | None:
        """The stored listing of ``commit``, or None if there is none (or it does not parse)."""
        key = (repo_type, repo_id, commit)
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        if not is_git_sha1(commit):
            return None
        try:
            body = json.loads(self.path(repo_type, repo_id, commit).read_text())
            files = tuple(_checked_file(entry) for entry in body["files"])
        except (OSError, ValueError, KeyError, TypeError, UnsafePathError):
            return None
        listing = RepoListing(repo_id, repo_type, commit, commit, files)
        self._remember(listing)
        return listing

    def _remember(self, listing: RepoListing) -> None:
        with self._lock:
            self._memory[(listing.repo_type, listing.repo_id, listing.commit)] = listing
            while len(self._memory) > _KEPT_IN_MEMORY:
                self._memory.popitem(last=False)


def _checked_file(entry: object) -> RemoteFile:
    """One stored ``[path, size, oid]``, refused if anything in it is not what the listing allowed."""
    path, size, oid = entry  # type: ignore[misc]
    if (
        type(size) is not int
        or size < 0
        or not isinstance(oid, str)
        or not (is_sha256(oid) or is_git_sha1(oid))
    ):
        raise ValueError(f"bad stored listing entry {entry!r:.80}")
    return RemoteFile(validate_relative_path(path), size, oid)


@dataclass(frozen=True)
class Pinned:
    """A revision's listing, and where it came from: ``hit`` (a fresh pin), ``miss`` (just asked
    upstream) or ``stale`` (the upstream could not be reached; the last known commit)."""

    listing: RepoListing
    outcome: str


class RevisionPins:
    """Revision -> commit, from the upstream at most every ``ttl`` seconds, from the cache when it is down.

    A listing is published (kept, pinned, answered to others) only once the ``gate`` has classified
    the repo, when it must be: if it was fetched with a token, or if the repo holds snapshots another
    tool put there (:meth:`ListingStore.unlisted_commits`). Until then nobody could tell that what it
    leads to must not be shown to requests without that token.
    """

    def __init__(
        self,
        root: Path,
        store: ListingStore,
        upstream: Upstream,
        gate: AccessGate,
        *,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.store = store
        self.upstream = upstream
        self.gate = gate
        self.ttl = ttl
        self.clock = clock
        self._pins: dict[tuple[str, str, str], tuple[str, float]] = {}  # -> (commit, when asked)

    def fresh(self, repo_type: str, repo_id: str, revision: str) -> RepoListing | None:
        """The listing if no upstream call is due (a pin younger than the ttl, or a stored commit)."""
        if is_git_sha1(revision):
            return self.store.load(repo_type, repo_id, revision)
        pinned = self._pins.get((repo_type, repo_id, revision))
        if pinned is None or self.clock() - pinned[1] >= self.ttl:
            return None
        return self.store.load(repo_type, repo_id, pinned[0])

    def pin(self, repo_type: str, repo_id: str, revision: str, token: str | None) -> Pinned:
        """The listing of ``revision``, asking the upstream if the pin is due. Blocking (the mirror
        makes one such call at a time per revision: :mod:`.calls`).

        Raises:
            RemoteError (not found, access denied) as the upstream answered; NetworkError if it cannot be
            reached and nothing is cached for this revision.
        """
        key = (repo_type, repo_id, revision)
        listing = self.fresh(repo_type, repo_id, revision)
        if listing is not None:
            return Pinned(listing, "hit")
        try:
            listing = self.upstream.list(repo_type, repo_id, revision, token)
        except NetworkError:
            cached = self.cached(repo_type, repo_id, revision)
            if cached is None:
                raise
            logger.warning("upstream unreachable; answering %s@%s from the cache", repo_id, revision)
            return Pinned(cached, "stale")
        if token or self.store.unlisted_commits(repo_type, repo_id):
            self.gate.classify(listing, None)  # on this thread: it runs even if the client stopped waiting
        self.store.save(listing)
        CacheLayout(listing, self.root).finish_revision()  # refs/<revision>, as huggingface_hub keeps it
        if not is_git_sha1(revision):
            self._pins[key] = (listing.commit, self.clock())
        return Pinned(listing, "miss")

    def cached(self, repo_type: str, repo_id: str, revision: str) -> RepoListing | None:
        """The last known listing of ``revision`` from the cache alone (``refs/`` and the stored listing)."""
        commit = cached_commit(self.root / repo_folder_name(repo_id, repo_type), revision)
        return self.store.load(repo_type, repo_id, commit) if commit is not None else None
