"""What is in a repository at a revision: its commit, and every file's name, size and checksum.

One call, ``HfApi.repo_info(files_metadata=True)`` (``GET /api/{type}s/{repo}/revision/{rev}?blobs=true``),
answers all of it, so no per-file HEAD request is needed before downloading. Everything in the answer
comes from the network and is checked before use: the commit must be 40 hex digits (it becomes a folder
name), every file name must stay inside the repo, sizes must be sane, checksums must be hex.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

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


def validate_repo_id(repo_id: str) -> str:
    """Check ``repo_id`` is ``name`` or ``namespace/name`` as the Hub allows; return it unchanged."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hf_validate

    try:
        hf_validate(repo_id)
    except HFValidationError as error:
        raise BadInputError(f"malformed repo id {repo_id!r}: {str(error).splitlines()[0]}") from None
    return repo_id


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
        EntryNotFoundError: if a name in ``filenames`` is not in the repository.
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

    if include:
        files = [f for f in files if matches(f.path, include)]
    if exclude:
        files = [f for f in files if not matches(f.path, exclude)]
    return files


def _parse_files(siblings: Iterable[object]) -> tuple[RemoteFile, ...]:
    """Turn the listing's siblings into checked RemoteFiles. Anything unsafe aborts the listing."""
    files: list[RemoteFile] = []
    seen: set[str] = set()
    for sibling in siblings:
        name = getattr(sibling, "rfilename", None)
        try:
            path = validate_relative_path(name)  # type: ignore[arg-type]
        except UnsafePathError as error:
            raise UnsafeListingError(
                f"server listed an unsafe file name, refusing to download: {error}"
            ) from None
        if path.split("/")[0] == ".cache" or path in seen:
            raise UnsafeListingError(f"server listed a reserved or duplicate file name: {path!r}")
        seen.add(path)
        size = getattr(sibling, "size", None)
        lfs = getattr(sibling, "lfs", None)
        oid = (lfs.sha256 if lfs is not None else getattr(sibling, "blob_id", None)) or ""
        if lfs is not None and lfs.size is not None:
            size = lfs.size
        if not isinstance(size, int) or not 0 <= size < _MAX_FILE_SIZE:
            raise UnsafeListingError(f"server listed an invalid size for {path!r}: {size!r}")
        oid = oid.lower()
        if not (is_sha256(oid) or is_git_sha1(oid)):
            raise UnsafeListingError(f"server gave no usable checksum for {path!r}, so it cannot be verified")
        files.append(RemoteFile(path=path, size=size, oid=oid))
    # A file and a folder of the same name cannot both exist on disk.
    folders = {"/".join(p.split("/")[:i]) for p in seen for i in range(1, p.count("/") + 1)}
    clash = sorted(folders & seen)
    if clash:
        raise UnsafeListingError(f"server listed {clash[0]!r} both as a file and as a folder")
    return tuple(files)


def _is_transport_error(error: BaseException) -> bool:
    """Connection refused, DNS failure, timeout, protocol error: the request never got an answer."""
    module = type(error).__module__.split(".")[0]
    return module.startswith(("httpx", "httpcore")) or isinstance(error, (ConnectionError, TimeoutError))


def _map_hub_error(error: Exception, repo_id: str, revision: str, endpoint: str) -> HfMirrorError | None:
    """A definite answer from the server as one of our errors; None for errors worth retrying."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.errors import (
        RevisionNotFoundError as HubRevisionNotFoundError,
    )

    token_hint = "if it is private or gated, pass --token or set HF_TOKEN"
    if isinstance(error, GatedRepoError):
        return AccessDeniedError(f"{repo_id} is gated on {endpoint}: accept its terms, then pass --token")
    if isinstance(error, RepositoryNotFoundError):
        return RepoNotFoundError(f"repository {repo_id!r} not found on {endpoint} ({token_hint})")
    if isinstance(error, HubRevisionNotFoundError):
        return RevisionNotFoundError(f"revision {revision!r} not found in {repo_id} on {endpoint}")
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            return AccessDeniedError(
                f"access to {repo_id} denied by {endpoint} (HTTP {status}; {token_hint})"
            )
        if status == 404:
            return RepoNotFoundError(f"repository {repo_id!r} not found on {endpoint} ({token_hint})")
        if status in RETRYABLE_STATUS:
            return None
        return RemoteError(f"{endpoint} answered HTTP {status} for {repo_id}")
    return None


def _list_once(endpoint: Endpoint, repo_id: str, repo_type: str, revision: str, token: str | None):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint.url, token=token or False, library_name="hfmirror")
    return api.repo_info(
        repo_id,
        revision=revision,
        repo_type=repo_type,
        files_metadata=True,
        timeout=constants.CONNECT_TIMEOUT * 3,
    )


def list_repo(
    pool: EndpointPool,
    repo_id: str,
    *,
    repo_type: str,
    revision: str,
    token: str | None,
) -> RepoListing:
    """Ask the endpoints, in failover order, what the repository holds at ``revision``.

    A definite answer (not found, access denied) ends the search; an endpoint that cannot be reached or
    keeps failing is passed over for the next. The endpoint that answers becomes the pool's current one.

    Raises:
        RepoNotFoundError, RevisionNotFoundError, AccessDeniedError, UnsafeListingError, NetworkError.
    """
    from huggingface_hub.errors import HfHubHTTPError

    last_problem = "no endpoint tried"
    for endpoint in pool.endpoints:
        for attempt in range(constants.MAX_RETRIES):
            endpoint.governor.acquire()
            try:
                endpoint.requests += 1
                info = _list_once(endpoint, repo_id, repo_type, revision, token)
            except Exception as error:  # classified below: definite, retryable, or a bug
                definite = _map_hub_error(error, repo_id, revision, endpoint.url)
                if definite is not None:
                    raise definite from None
                if isinstance(error, HfHubHTTPError) and error.response is not None:
                    status = error.response.status_code
                    last_problem = f"{endpoint.url} answered HTTP {status}"
                    delay = server_requested_delay(error.response.headers)
                    if status in (429, 503):
                        endpoint.rate_limited += 1
                        endpoint.governor.on_overloaded(min(delay or 1.0, constants.MAX_RETRY_AFTER))
                        continue
                    time.sleep(backoff_delay(attempt))
                    continue
                if not _is_transport_error(error):
                    raise
                last_problem = f"{endpoint.url} unreachable ({type(error).__name__})"
                logger.info("listing %s on %s failed: %s", repo_id, endpoint.url, error)
                if attempt + 1 >= pool.failover_after:
                    break
                time.sleep(backoff_delay(attempt))
                continue
            finally:
                endpoint.governor.release()
            commit = (info.sha or "").lower()
            if not is_git_sha1(commit):
                raise UnsafeListingError(
                    f"{endpoint.url} gave an invalid commit id for {repo_id}: {info.sha!r}"
                )
            pool.use(endpoint)
            return RepoListing(
                repo_id=repo_id,
                repo_type=repo_type,
                revision=revision,
                commit=commit,
                files=_parse_files(info.siblings or []),
                endpoint=endpoint.url,
            )
        logger.warning("giving up on %s: %s", endpoint.url, last_problem)
    raise NetworkError(f"no endpoint reachable for {repo_id}: {last_problem}")
