"""What is in a repository at a revision: its commit, and every file's name, size and checksum.

One call, the one ``HfApi.repo_info(files_metadata=True)`` makes
(``GET /api/{type}s/{repo}/revision/{rev}?blobs=true``), answers all of it, so no per-file HEAD
request is needed before downloading. Everything in the answer comes from the network and is checked
before use: the commit must be 40 hex digits (it becomes a folder name), every file name must stay
inside the repo, sizes must be sane, checksums must be hex.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

import requests

from . import constants
from .endpoints import Endpoint, EndpointPool
from .errors import (
    BadInputError,
    DownloadInterrupted,
    EntryNotFoundError,
    QuotaExhaustedError,
    UnsafeListingError,
    UnsafePathError,
)
from .hashing import is_git_sha1, is_sha256
from .paths import validate_relative_path
from .policy import (
    TRANSPORT_ERRORS,
    Action,
    Asked,
    BodyLimitExceeded,
    TransferStats,
    Verdict,
    abandoned_verdict,
    announce_retry,
    combine_refusals,
    drain_error_body,
    judge_status,
    judge_transport_error,
    not_a_hub_answer,
    pause,
    quota_spent,
    read_body,
    settle,
)
from .retry import backoff_delay

__all__ = ["RemoteFile", "RepoListing", "filter_files", "list_repo", "validate_repo_id"]

logger = logging.getLogger(__name__)

_MAX_FILE_SIZE = 1 << 46  # 64 TiB: anything larger is a lie.


@dataclass(frozen=True)
class RemoteFile:
    """A file of the repository as the listing describes it."""

    path: str  # relative, forward slashes, validated
    size: int
    oid: str  # sha256 for LFS files, git blob sha1 otherwise: the expected checksum and the blob name
    blob_id: str = ""  # the git blob sha1 of what git stores (for LFS files, the pointer), if listed

    @property
    def is_lfs(self) -> bool:
        return is_sha256(self.oid)


@dataclass(frozen=True)
class RepoListing:
    """A repository pinned to one commit, and its files."""

    repo_id: str
    repo_type: str
    revision: str
    commit: str
    files: tuple[RemoteFile, ...]


# The Hub's rule for repo ids, as huggingface_hub.utils.validate_repo_id applies it (tests check that the
# two agree); written out here because importing huggingface_hub costs the downloader 30 ms at start.
_REPO_ID = re.compile(r"(\b[\w\-.]{1,96}\b/)?\b[\w\-.]{1,96}\b", re.ASCII)


def validate_repo_id(repo_id: str) -> str:
    """Check ``repo_id`` is ``name`` or ``namespace/name`` as the Hub allows; return it unchanged."""
    if repo_id.count("/") > 1:
        problem = "use 'name' or 'namespace/name' (and --repo-type for datasets)"
    elif not _REPO_ID.fullmatch(repo_id):
        problem = "letters, digits, '-', '_' and '.' only, not at either end, at most 96 per part"
    elif "--" in repo_id or ".." in repo_id:
        problem = "'--' and '..' are not allowed"
    elif repo_id.endswith(".git"):
        problem = "it cannot end in '.git'"
    else:
        return repo_id
    raise BadInputError(f"malformed repo id {repo_id!r}: {problem}")


def validate_revision(revision: str) -> str:
    """A revision becomes a file name under ``refs/``: it must be a safe relative path."""
    try:
        return validate_relative_path(revision)
    except UnsafePathError:
        raise BadInputError(f"malformed revision {revision!r}") from None


def filter_files(
    files: Iterable[RemoteFile],
    *,
    filenames: list[str] | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> list[RemoteFile]:
    """Keep the files named in ``filenames`` (all if None) that match an ``include`` glob (if any) and no
    ``exclude`` glob. Globs follow fnmatch, as ``hf download --include`` does; a glob ending in ``/``
    matches a whole folder.

    Raises:
        EntryNotFoundError: if a name in ``filenames`` is not in the repository, or the globs leave
            nothing (a typo in a pattern should not look like a successful download of no files).
    """
    files = list(files)
    if filenames:
        by_path = {f.path: f for f in files}
        missing = [name for name in filenames if name not in by_path]
        if missing:
            raise EntryNotFoundError(f"not in the repository: {', '.join(missing)}")
        files = [by_path[name] for name in dict.fromkeys(filenames)]

    def matches(path: str, patterns: list[str]) -> bool:
        return any(fnmatch.fnmatch(path, p + "*" if p.endswith("/") else p) for p in patterns)

    selected = files
    if include:
        selected = [f for f in selected if matches(f.path, include)]
    if exclude:
        selected = [f for f in selected if not matches(f.path, exclude)]
    if files and not selected and (include or exclude):
        patterns = [f"--include {p!r}" for p in include or []] + [f"--exclude {p!r}" for p in exclude or []]
        where = "named" if filenames else "in the repository"
        raise EntryNotFoundError(f"none of the {len(files)} files {where} matches {' '.join(patterns)}")
    return selected


class _NotAHubListing(Exception):
    """A listing no Hub gives (an entry that is not an object, no usable size or checksum): the
    endpoint is passed over, as for any answer that is not the Hub's. A mirror that ignores
    ``?blobs=true`` answers that way; another endpoint may well answer properly."""


def _parse_files(siblings: list[object]) -> tuple[RemoteFile, ...]:
    """Turn the listing's ``siblings`` into checked RemoteFiles.

    Raises:
        UnsafeListingError: a name that would leave the target, that the Hub forbids, or that is
            listed twice (or as a file and a folder): such a listing is refused wherever it comes from.
        _NotAHubListing: an entry without a usable size or checksum (nothing could be verified).
    """
    files: list[RemoteFile] = []
    seen: set[str] = set()
    for sibling in siblings:
        if not isinstance(sibling, dict):
            raise _NotAHubListing(f"a listing with a file entry that is not an object ({sibling!r:.80})")
        name = sibling.get("rfilename")
        try:
            path = validate_relative_path(name)  # type: ignore[arg-type]
        except UnsafePathError as error:
            raise UnsafeListingError(
                f"server listed an unsafe file name, refusing to download: {error}"
            ) from None
        if path in seen:
            raise UnsafeListingError(f"server listed a file name twice: {path!r}")
        seen.add(path)
        size, oid = sibling.get("size"), sibling.get("blobId")
        blob_id = oid.lower() if isinstance(oid, str) and is_git_sha1(oid.lower()) else ""
        lfs = sibling.get("lfs")
        if isinstance(lfs, dict):
            size, oid = lfs.get("size", size), lfs.get("sha256")
        if type(size) is not int or not 0 <= size < _MAX_FILE_SIZE:
            raise _NotAHubListing(f"a listing without a valid size for {path!r} ({size!r:.40})")
        oid = oid.lower() if isinstance(oid, str) else ""
        if not (is_sha256(oid) or is_git_sha1(oid)):
            raise _NotAHubListing(f"a listing without a checksum for {path!r}, so nothing could be verified")
        files.append(RemoteFile(path=path, size=size, oid=oid, blob_id=blob_id))
    # A file and a folder of the same name cannot both exist on disk.
    folders = {"/".join(p.split("/")[:i]) for p in seen for i in range(1, p.count("/") + 1)}
    clash = sorted(folders & seen)
    if clash:
        raise UnsafeListingError(f"server listed {clash[0]!r} both as a file and as a folder")
    return tuple(files)


def _info_url(endpoint: Endpoint, repo_id: str, repo_type: str, revision: str) -> str:
    """``GET {E}/api/{type}s/{repo}/revision/{rev}?blobs=true``: what HfApi.repo_info(files_metadata=True)
    asks for."""
    return f"{endpoint.url}/api/{repo_type}s/{repo_id}/revision/{quote(revision, safe='')}?blobs=true"


def list_repo(
    pool: EndpointPool,
    repo_id: str,
    *,
    repo_type: str,
    revision: str,
    token: str | None,
    session: requests.Session,
    stats: TransferStats | None = None,
    cancel: threading.Event | None = None,
) -> RepoListing:
    """Ask the endpoints, in failover order, what the repository holds at ``revision``.

    The call is the one ``HfApi.repo_info(files_metadata=True)`` makes, sent with the same session
    (proxies, certificates, rate governor) as the downloads, with ``token`` to the endpoints that may
    have it (``Endpoint.sends_token``), and judged by the same rules
    (:mod:`hfmirror.policy`). An endpoint that cannot be reached, keeps failing, says it does not have
    the repository, or answers something that is not a Hub listing is passed over for the next; the
    one that answers becomes the pool's current endpoint, for the rest of the run. Access denied is
    final. ``stats`` (if given) counts retries and 429s; ``cancel`` (if given) ends waits early.

    Raises:
        RepoNotFoundError, RevisionNotFoundError (only if every endpoint said so), AccessDeniedError,
        UnsafeListingError, NetworkError, DownloadInterrupted.
    """
    stats = stats if stats is not None else TransferStats()
    refusals: list[tuple[Endpoint, Verdict]] = []
    endpoint = pool.current
    attempts = 0  # on this endpoint
    while True:
        headers = {"Accept": "application/json"}
        if token and endpoint.sends_token:
            headers["Authorization"] = f"Bearer {token}"
        withheld = bool(token) and not endpoint.sends_token
        asked = Asked(repo_id, revision, endpoint.shown, withheld_token=withheld)
        outcome = _ask_for_listing(endpoint, session, headers, asked, repo_type, cancel)
        if isinstance(outcome, RepoListing):
            endpoint.governor.on_success()
            pool.report_success(endpoint)
            pool.use(endpoint)
            return outcome
        verdict = outcome
        if verdict.action is Action.FAIL:
            assert verdict.error is not None
            raise verdict.error
        attempts += 1
        if verdict.action in (Action.RETRY, Action.BACK_OFF):
            wait = settle(verdict, endpoint, pool, stats, attempt=attempts)
            # An endpoint that refuses connections is done after FAILOVER_AFTER of them, even the last
            # one: with no network at all, the cache should answer soon, not after every backoff.
            refused = verdict.endpoint_failed and endpoint.consecutive_failures >= pool.failover_after
            if pool.current is endpoint and not refused and attempts <= constants.MAX_RETRIES:
                announce_retry(endpoint, verdict, wait, attempts)
                pause(wait, cancel)
                continue
            if pool.current is not endpoint:  # the pool gave up on it (say, 429 after 429)
                verdict = abandoned_verdict(endpoint, asked)
        elif verdict.retry_if_last and len(pool.in_service()) == 1 and attempts < pool.failover_after:
            # No answer from the last endpoint left: the network may come back.
            stats.add(retries=1)
            wait = backoff_delay(attempts)
            announce_retry(endpoint, verdict, wait, attempts)
            pause(wait, cancel)
            continue
        refusals.append((endpoint, verdict))
        if pool.current is endpoint and not pool.fail_over(endpoint, verdict.reason):
            raise combine_refusals(refusals, asked)
        endpoint, attempts = pool.current, 0


def _ask_for_listing(
    endpoint: Endpoint,
    session: requests.Session,
    headers: dict[str, str],
    asked: Asked,
    repo_type: str,
    cancel: threading.Event | None,
) -> RepoListing | Verdict:
    """One listing request: the listing, or the verdict on what came back instead."""
    try:
        if not endpoint.governor.acquire_for_metadata(cancel):
            raise DownloadInterrupted("interrupted")
    except QuotaExhaustedError as error:
        return quota_spent(error)
    silence = threading.Timer(
        constants.SILENCE_NOTICE_SECONDS,
        lambda: logger.warning("still waiting for %s to list %s...", endpoint.shown, asked.repo_id),
    )
    silence.daemon = True
    try:
        endpoint.requests += 1
        silence.start()
        try:
            response = session.get(
                _info_url(endpoint, asked.repo_id, repo_type, asked.revision),
                headers=headers,
                stream=True,
                timeout=(constants.CONNECT_TIMEOUT, constants.LISTING_TIMEOUT),
            )
        except TRANSPORT_ERRORS as error:
            return judge_transport_error(error, asked, timeout=constants.LISTING_TIMEOUT)
        with response:
            verdict = judge_status(response.status_code, response.headers, asked)
            if verdict is not None:
                drain_error_body(response)
                return verdict
            if "html" in response.headers.get("Content-Type", "").lower():
                return not_a_hub_answer(
                    "an HTML page, not the Hub's API (a captive portal or a captcha?)", asked
                )
            try:
                body = read_body(
                    response, limit=constants.LISTING_MAX_BYTES, seconds=constants.LISTING_DEADLINE
                )
            except BodyLimitExceeded as problem:
                return not_a_hub_answer(f"listing cut off: {problem}", asked)
            except TRANSPORT_ERRORS as error:
                return Verdict(
                    Action.RETRY,
                    f"connection lost in the listing ({type(error).__name__})",
                    endpoint_failed=True,
                )
        return _parse_listing(body, endpoint, asked, repo_type)
    finally:
        silence.cancel()
        endpoint.governor.release()


def _parse_listing(body: bytes, endpoint: Endpoint, asked: Asked, repo_type: str) -> RepoListing | Verdict:
    """The listing in ``body``; a verdict if it is not a Hub listing at all (a broken or impostor mirror,
    a mirror that leaves out sizes or checksums).

    Raises:
        UnsafeListingError: a listing with names that would leave the target or that the Hub forbids.
    """
    try:
        info = json.loads(body)
    except ValueError:
        return not_a_hub_answer("a listing that is not JSON", asked)
    if not isinstance(info, dict):
        return not_a_hub_answer("a listing that is not a JSON object", asked)
    commit = info.get("sha")
    commit = commit.lower() if isinstance(commit, str) else ""
    if not is_git_sha1(commit):
        return not_a_hub_answer(f"a listing without a valid commit id ({info.get('sha')!r:.60})", asked)
    siblings = info.get("siblings", [])
    if not isinstance(siblings, list):
        return not_a_hub_answer("a listing whose files are not a list", asked)
    try:
        files = _parse_files(siblings)
    except _NotAHubListing as problem:
        return not_a_hub_answer(str(problem), asked)
    except UnsafeListingError as error:
        raise UnsafeListingError(f"{endpoint.shown}: {error}") from None
    return RepoListing(
        repo_id=asked.repo_id,
        repo_type=repo_type,
        revision=asked.revision,
        commit=commit,
        files=files,
    )
