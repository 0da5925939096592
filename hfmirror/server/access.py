"""Gated and private repos: content fetched with one client's token is served only to tokens the
upstream accepts for that repo.

Every repo is public until a token-bearing request makes the mirror fetch from it; then one
anonymous ``HEAD`` upstream tells whether the repo is restricted (the answer is no). A restricted
repo is marked in the cache (``<repo folder>/.hfmirror/restricted``), so a restart keeps it so, and
from then on every request for it (listings and files alike) must carry a token the upstream accepts
for it: the verdict is asked upstream, with that token, and remembered for ``ttl`` seconds, per repo
and per token (kept as a sha256, never the token itself). An anonymous request is checked the same
way, so a repo the upstream has since made public is served to everyone again.

When the upstream cannot be asked, the answer is no (fail closed): a gated model is never handed to
someone only because the upstream was down.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import AccessDeniedError, NetworkError, RemoteError
from ..layout import repo_folder_name
from ..listing import RemoteFile, RepoListing
from .repos import RESTRICTED_MARKER
from .upstream import Upstream

__all__ = ["AccessGate", "RESTRICTED_MARKER", "principal_of"]

logger = logging.getLogger(__name__)

_MAX_VERDICTS = 100_000


def principal_of(token: str | None) -> str:
    """Who a request is, for remembering verdicts: a token's sha256 (never the token), or anonymous."""
    return hashlib.sha256(token.encode()).hexdigest() if token else "anonymous"


class AccessGate:
    """Which repos are restricted, and which tokens the upstream accepts for them."""

    def __init__(
        self, root: Path, upstream: Upstream, *, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.root = root
        self.upstream = upstream
        self.ttl = ttl
        self.clock = clock
        self._verdicts: dict[tuple[str, str, str], tuple[bool, float]] = {}
        self._lock = threading.Lock()

    # -- which repos

    def _marker(self, repo_type: str, repo_id: str) -> Path:
        return self.root / repo_folder_name(repo_id, repo_type) / RESTRICTED_MARKER

    def is_restricted(self, repo_type: str, repo_id: str) -> bool:
        return self._marker(repo_type, repo_id).exists()

    def _mark(self, repo_type: str, repo_id: str, restricted: bool) -> None:
        marker = self._marker(repo_type, repo_id)
        if restricted:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("content here was fetched with a token the upstream requires\n")
            logger.info("%s is gated or private upstream: served only to tokens it accepts", repo_id)
        else:
            marker.unlink(missing_ok=True)

    def classify(self, listing: RepoListing, file: RemoteFile | None) -> None:
        """Find out whether the repo is restricted upstream, and mark it if it is (or if that cannot be
        known: unknown counts as restricted). Call it before anything a token fetched is served.

        Blocking: one anonymous request upstream, its answer remembered for ``ttl``.
        """
        if self.is_restricted(listing.repo_type, listing.repo_id):
            return
        try:
            public = self._verdict(listing, file, None)
        except NetworkError:
            public = False
        if not public:
            self._mark(listing.repo_type, listing.repo_id, True)

    # -- which tokens

    def check(self, listing: RepoListing, file: RemoteFile | None, token: str | None) -> None:
        """Let the request through, or raise. Blocking when the verdict is not remembered.

        Raises:
            AccessDeniedError: the upstream does not serve this repo to this token (or to anyone
                without one).
            NetworkError: the repo is restricted and the upstream cannot be asked.
        """
        if not self.is_restricted(listing.repo_type, listing.repo_id):
            return
        if self._verdict(listing, file, token):
            if token is None:  # the upstream serves it to anyone now
                self._mark(listing.repo_type, listing.repo_id, False)
            return
        who = "this token" if token else "requests without a token"
        raise AccessDeniedError(f"{listing.repo_id} is gated or private upstream, and not served to {who}")

    def _verdict(self, listing: RepoListing, file: RemoteFile | None, token: str | None) -> bool:
        key = (listing.repo_type, listing.repo_id, principal_of(token))
        now = self.clock()
        with self._lock:
            known = self._verdicts.get(key)
        if known is not None and now - known[1] < self.ttl:
            return known[0]
        probe = file if file is not None else (listing.files[0] if listing.files else None)
        if probe is None:  # nothing to ask about but the listing itself
            try:
                self.upstream.list(listing.repo_type, listing.repo_id, listing.commit, token)
                allowed = True
            except RemoteError:  # denied, or "not found" for this token: the same as no
                allowed = False
        else:
            allowed = self.upstream.may_read(listing, probe, token)
        with self._lock:
            if len(self._verdicts) > _MAX_VERDICTS:
                self._verdicts.clear()
            self._verdicts[key] = (allowed, now)
        return allowed
