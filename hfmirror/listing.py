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
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

import requests

from . import constants
from .endpoints import Endpoint, EndpointPool
from .errors import (
    AccessDeniedError,
    BadInputError,
    EntryNotFoundError,
    HfMirrorError,
    NetworkError,
    RemoteError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnsafeListingError,
    UnsafePathError,
)
from .hashing import is_git_sha1, is_sha256
from .paths import validate_relative_path
from .retry import RETRYABLE_STATUS, backoff_delay, server_requested_delay

__all__ = ["RemoteFile", "RepoListing", "filter_files", "list_repo", "validate_repo_id"]

logger = logging.getLogger(__name__)

_MAX_FILE_SIZE = 1 << 46  # 64 TiB: anything larger is a lie.


@dataclass(frozen=True)
class RemoteFile:
    """A file of the repository as the listing describes it."""

    path: str  # relative, forward slashes, validated
    size: int
    oid: str  # sha256 for LFS files, git blob sha1 otherwise: the expected checksum and the blob name

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
    endpoint: str


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


def _parse_files(siblings: object) -> tuple[RemoteFile, ...]:
    """Turn the listing's ``siblings`` into checked RemoteFiles. Anything unsafe aborts the listing."""
    if not isinstance(siblings, list):
        raise UnsafeListingError("server listing has no list of files")
    files: list[RemoteFile] = []
    seen: set[str] = set()
    for sibling in siblings:
        if not isinstance(sibling, dict):
            raise UnsafeListingError(f"server listed a file entry that is not an object: {sibling!r:.80}")
        name = sibling.get("rfilename")
        try:
            path = validate_relative_path(name)  # type: ignore[arg-type]
        except UnsafePathError as error:
            raise UnsafeListingError(
                f"server listed an unsafe file name, refusing to download: {error}"
            ) from None
        if path.split("/")[0] == ".cache" or path in seen:
            raise UnsafeListingError(f"server listed a reserved or duplicate file name: {path!r}")
        seen.add(path)
        size, oid = sibling.get("size"), sibling.get("blobId")
        lfs = sibling.get("lfs")
        if isinstance(lfs, dict):
            size, oid = lfs.get("size", size), lfs.get("sha256")
        if type(size) is not int or not 0 <= size < _MAX_FILE_SIZE:
            raise UnsafeListingError(f"server listed an invalid size for {path!r}: {size!r:.40}")
        oid = oid.lower() if isinstance(oid, str) else ""
        if not (is_sha256(oid) or is_git_sha1(oid)):
            raise UnsafeListingError(f"server gave no usable checksum for {path!r}, so it cannot be verified")
        files.append(RemoteFile(path=path, size=size, oid=oid))
    # A file and a folder of the same name cannot both exist on disk.
    folders = {"/".join(p.split("/")[:i]) for p in seen for i in range(1, p.count("/") + 1)}
    clash = sorted(folders & seen)
    if clash:
        raise UnsafeListingError(f"server listed {clash[0]!r} both as a file and as a folder")
    return tuple(files)


def _definite_error(response: requests.Response, repo_id: str, revision: str, endpoint: str) -> HfMirrorError:
    """A 4xx answer as one of our errors, following the Hub's ``X-Error-Code`` header."""
    code = response.headers.get("X-Error-Code", "")
    status = response.status_code
    token_hint = "if it is private or gated, pass --token or set HF_TOKEN"
    if code == "GatedRepo":
        return AccessDeniedError(f"{repo_id} is gated on {endpoint}: accept its terms, then pass --token")
    if code == "RepoNotFound" or (status == 404 and not code):
        return RepoNotFoundError(f"repository {repo_id!r} not found on {endpoint} ({token_hint})")
    if code == "RevisionNotFound":
        return RevisionNotFoundError(f"revision {revision!r} not found in {repo_id} on {endpoint}")
    if status in (401, 403):
        return AccessDeniedError(f"access to {repo_id} denied by {endpoint} (HTTP {status}; {token_hint})")
    return RemoteError(f"{endpoint} answered HTTP {status} for {repo_id}")


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
) -> RepoListing:
    """Ask the endpoints, in failover order, what the repository holds at ``revision``.

    The call is the one ``HfApi.repo_info(files_metadata=True)`` makes, sent with the same session
    (proxies, certificates, retry policy, rate governor) as the downloads, rather than through a second
    HTTP stack. A definite answer (not found, access denied) ends the search; an endpoint that cannot
    be reached or keeps failing is passed over for the next. The endpoint that answers becomes the
    pool's current one.

    Raises:
        RepoNotFoundError, RevisionNotFoundError, AccessDeniedError, UnsafeListingError, NetworkError.
    """
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    last_problem = "no endpoint tried"
    for endpoint in pool.endpoints:
        failures = 0
        while failures < constants.MAX_RETRIES:
            endpoint.governor.acquire()
            try:
                endpoint.requests += 1
                response = session.get(
                    _info_url(endpoint, repo_id, repo_type, revision),
                    headers=headers,
                    timeout=(constants.CONNECT_TIMEOUT, constants.CONNECT_TIMEOUT * 3),
                )
                body = response.content
            except requests.RequestException as error:
                failures += 1
                last_problem = f"{endpoint.url} unreachable ({type(error).__name__})"
                logger.info("listing %s on %s failed: %s", repo_id, endpoint.url, error)
                if failures >= pool.failover_after:
                    break
                time.sleep(backoff_delay(failures))
                continue
            finally:
                endpoint.governor.release()
            status = response.status_code
            if status in (429, 503):
                endpoint.rate_limited += 1
                delay = server_requested_delay(response.headers)
                endpoint.governor.on_overloaded(
                    min(delay if delay is not None else 1.0, constants.MAX_RETRY_AFTER)
                )
                failures += 1
                last_problem = f"{endpoint.url} answered HTTP {status}"
                continue
            if status in RETRYABLE_STATUS:
                failures += 1
                last_problem = f"{endpoint.url} answered HTTP {status}"
                time.sleep(backoff_delay(failures))
                continue
            if status >= 400:
                raise _definite_error(response, repo_id, revision, endpoint.url)
            return _parse_listing(body, endpoint, repo_id, repo_type, revision)
        logger.warning("giving up on %s: %s", endpoint.url, last_problem)
    raise NetworkError(f"no endpoint reachable for {repo_id}: {last_problem}")


def _parse_listing(
    body: bytes, endpoint: Endpoint, repo_id: str, repo_type: str, revision: str
) -> RepoListing:
    try:
        info = json.loads(body)
    except ValueError:
        raise UnsafeListingError(f"{endpoint.url} sent a listing for {repo_id} that is not JSON") from None
    if not isinstance(info, dict):
        raise UnsafeListingError(f"{endpoint.url} sent a listing for {repo_id} that is not a JSON object")
    commit = info.get("sha")
    commit = commit.lower() if isinstance(commit, str) else ""
    if not is_git_sha1(commit):
        raise UnsafeListingError(
            f"{endpoint.url} gave an invalid commit id for {repo_id}: {info.get('sha')!r:.60}"
        )
    files = _parse_files(info.get("siblings", []))
    return RepoListing(
        repo_id=repo_id,
        repo_type=repo_type,
        revision=revision,
        commit=commit,
        files=files,
        endpoint=endpoint.url,
    )
