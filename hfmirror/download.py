"""``download()``: the one function the CLI, ``model_download.py`` and Python callers use.

The steps, in order:

1. Check the arguments (repo id, revision, endpoints) before touching the network.
2. List the repository once, from the first endpoint that answers (:mod:`hfmirror.listing`).
3. Choose the files (names, ``include``/``exclude`` globs) and see which are already complete here
   (ours or huggingface_hub's); for the rest, count bytes a previous run left behind.
4. Check the target is writable and has room for what is left.
5. Fetch the missing files, several at once, each over several connections
   (:mod:`hfmirror.transfer`), each under a file lock shared with huggingface_hub, each verified and
   then renamed into place (:mod:`hfmirror.layout`).
6. Record ``refs/<revision>`` and return a :class:`DownloadResult`.

With no network (no endpoint answers, or ``HF_HUB_OFFLINE=1``), what the cache or the local folder
already holds is the answer, as with huggingface_hub, but only if it holds everything asked for
(:mod:`hfmirror.offline`).

Library code reports what a user should know while it runs (waits, failovers) as warnings on the
``hfmirror`` logger; the CLI shows them on stderr.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from . import constants
from .endpoints import EndpointPool
from .errors import (
    BadInputError,
    DownloadInterrupted,
    InsufficientSpaceError,
    NetworkError,
    NotWritableError,
    StorageError,
)
from .layout import CacheLayout, Layout, LocalDirLayout, storage_errors
from .listing import RemoteFile, filter_files, list_repo, validate_repo_id, validate_revision
from .offline import offline_answer
from .policy import TransferStats
from .progress import Progress
from .sessions import SessionFactory
from .transfer import FileTransfer, TransferOptions

__all__ = ["DownloadResult", "FileOutcome", "download", "token_audience"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileOutcome:
    path: str
    size: int
    status: str  # "downloaded", "present", "would-download" (dry run)
    resumed_bytes: int = 0


@dataclass
class DownloadResult:
    """What a download did. ``path`` is the snapshot folder (cache) or the local dir."""

    repo_id: str
    repo_type: str
    revision: str
    commit: str
    path: Path
    endpoint: str
    files: list[FileOutcome]
    bytes_downloaded: int
    seconds: float
    retries: int = 0
    rate_limited: int = 0
    verify_failures: int = 0
    restarts: int = 0
    dry_run: bool = False
    failovers: int = 0  # times the run moved to another endpoint
    endpoints: list[dict[str, Any]] = field(default_factory=list)  # what each endpoint did (Endpoint.outcome)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "repo_type": self.repo_type,
            "revision": self.revision,
            "commit": self.commit,
            "path": str(self.path),
            "endpoint": self.endpoint,
            "dry_run": self.dry_run,
            "files": [f.__dict__ for f in self.files],
            "total_bytes": self.total_bytes,
            "bytes_downloaded": self.bytes_downloaded,
            "seconds": round(self.seconds, 3),
            "retries": self.retries,
            "rate_limited": self.rate_limited,
            "verify_failures": self.verify_failures,
            "restarts": self.restarts,
            "failovers": self.failovers,
            "endpoints": self.endpoints,
        }

    def describe(self) -> str:
        """The human summary: a plan for a dry run, one line otherwise."""
        if self.dry_run:
            lines = [f"{self.repo_id} @ {self.commit[:12]} via {self.endpoint}:"]
            for f in self.files:
                note = f" ({_size(f.resumed_bytes)} already here, will resume)" if f.resumed_bytes else ""
                lines.append(f"  {f.status:<15} {_size(f.size):>10}  {f.path}{note}")
            todo = [f for f in self.files if f.status != "present"]
            left = sum(f.size - f.resumed_bytes for f in todo)
            lines.append(
                f"{len(self.files)} files, {_size(self.total_bytes)} in total; "
                f"{len(self.files) - len(todo)} present; {len(todo)} to fetch, {_size(left)} to download"
            )
            return "\n".join(lines)
        fetched = sum(1 for f in self.files if f.status == "downloaded")
        speed = self.bytes_downloaded / self.seconds if self.seconds > 0 else 0.0
        left = [f"{e['url']} ({e['abandoned']})" for e in self.endpoints if e.get("abandoned")]
        return (
            f"{len(self.files)} files ({_size(self.total_bytes)}): {fetched} downloaded, "
            f"{len(self.files) - fetched} already present; {_size(self.bytes_downloaded)} in "
            f"{self.seconds:.1f}s ({_size(speed)}/s); {self.retries} retries, "
            f"{self.rate_limited} rate-limited, {self.failovers} failovers; endpoint {self.endpoint}"
            + (f"; left: {', '.join(left)}" if left else "")
        )


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _stored_token() -> str | None:
    """huggingface_hub's token (HF_TOKEN, OIDC, the login token file, Colab secrets), if any.

    Importing huggingface_hub costs 30 ms at start, so when none of its sources can hold a token,
    the answer (None) is given without asking it.
    """
    from huggingface_hub import constants as hub_constants  # a small module, unlike huggingface_hub.utils

    sources = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE")
    if not any(os.environ.get(name) for name in sources) and "google.colab" not in sys.modules:
        if not os.path.exists(hub_constants.HF_TOKEN_PATH):
            return None
    from huggingface_hub import get_token

    return get_token()


def token_audience(pool: EndpointPool, *, stored: bool, chosen: bool) -> None:
    """Decide which endpoints of the run the token goes to (``Endpoint.sends_token``).

    A token given for this run (``--token``) goes to every endpoint of the run. A token found on this
    machine (``stored``: HF_TOKEN, ``hf auth login``) was meant for huggingface.co: it goes there, and
    to endpoints the user ``chosen`` (``--endpoint``, HF_ENDPOINT), never to a built-in default mirror
    the user did not name, which would otherwise receive every user's Hub token.
    """
    for endpoint in pool.endpoints:
        endpoint.sends_token = not stored or chosen or endpoint.url == constants.HUB_ENDPOINT


def download(
    repo_id: str,
    *,
    filenames: list[str] | None = None,
    revision: str = "main",
    repo_type: str = "model",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    endpoints: list[str] | None = None,
    token: str | None = None,
    max_workers: int = 8,
    connections: int = 8,
    max_connections: int = constants.CONNECTION_BUDGET,
    stall_timeout: float = constants.DEFAULT_STALL_TIMEOUT,
    dry_run: bool = False,
    progress: bool = True,
) -> DownloadResult:
    """Download a repository (or some of its files) through mirrors, resuming anything unfinished.

    Args:
        repo_id: ``name`` or ``namespace/name``.
        filenames: only these files (exact paths in the repo); all if None.
        revision: branch, tag or commit sha.
        repo_type: ``"model"`` or ``"dataset"``.
        include, exclude: fnmatch globs on file paths.
        local_dir: write plain files here instead of the Hugging Face cache.
        cache_dir: the cache folder (default HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub).
        endpoints: base URLs in failover order (default HF_ENDPOINT, else hf-mirror.com, huggingface.co).
        token: access token, sent to every endpoint of the run. Without one, HF_TOKEN or
            huggingface_hub's stored token is used, and sent only to huggingface.co and to endpoints
            the caller chose (``endpoints``, HF_ENDPOINT), never to a default mirror (see
            :func:`token_audience`). Never printed; dropped by ``requests`` on a redirect to another host.
        max_workers: files fetched at once.
        connections: connections at once within one large file.
        max_connections: connections (requests in flight) at once to one endpoint, shared by every
            file of the run: ``max_workers`` and ``connections`` are honoured within it.
        stall_timeout: seconds without a byte before a connection is dropped and resumed.
        dry_run: list what would be fetched; fetch nothing.
        progress: show progress bars on a terminal.

    Returns:
        A :class:`DownloadResult`; ``result.path`` is where the files are.

    Raises:
        BadInputError, RepoNotFoundError, RevisionNotFoundError, EntryNotFoundError, AccessDeniedError,
        UnsafeListingError, NetworkError, IntegrityError, StorageError, DownloadInterrupted.
    """
    started = time.monotonic()
    validate_repo_id(repo_id)
    validate_revision(revision)
    if repo_type not in ("model", "dataset"):
        raise BadInputError(f"repo type must be 'model' or 'dataset', not {repo_type!r}")
    if max_workers < 1 or connections < 1 or max_connections < 1:
        raise BadInputError("max_workers, connections and max_connections must be at least 1")
    stored = not token
    token = token or _stored_token()
    pool = EndpointPool.from_urls(
        endpoints or constants.default_endpoints(),
        max_concurrency=max_connections,
        failover_after=constants.FAILOVER_AFTER,
    )
    token_audience(pool, stored=stored, chosen=bool(endpoints or constants.chosen_endpoint()))

    sessions = SessionFactory(pool_size=max_connections)
    cache_base = (
        Path(cache_dir).expanduser() if cache_dir is not None else constants.default_cache_dir()
    ).absolute()
    target = Path(local_dir).expanduser().absolute() if local_dir is not None else None
    stats = TransferStats()
    cancel = threading.Event()

    def answer_offline(reason: str) -> DownloadResult:
        answer = offline_answer(
            repo_id,
            repo_type=repo_type,
            revision=revision,
            filenames=filenames,
            include=include,
            exclude=exclude,
            cache_dir=cache_base,
            local_dir=target,
            reason=reason,
            dry_run=dry_run,
        )
        return DownloadResult(
            repo_id=repo_id,
            repo_type=repo_type,
            revision=revision,
            commit=answer.commit,
            path=answer.path,
            endpoint=OFFLINE_ENDPOINT,
            files=[FileOutcome(path, size, "present") for path, size in answer.files]
            + [FileOutcome(path, size, "would-download") for path, size in answer.missing],
            bytes_downloaded=0,
            seconds=time.monotonic() - started,
            dry_run=dry_run,
        )

    if _offline_mode():
        return answer_offline("offline mode (HF_HUB_OFFLINE is set)")
    try:
        listing = list_repo(
            pool,
            repo_id,
            repo_type=repo_type,
            revision=revision,
            token=token,
            session=sessions.get(),
            stats=stats,
            cancel=cancel,
        )
    except NetworkError as error:
        # Like huggingface_hub: with no network, what is already here is still an answer.
        answer = answer_offline(str(error))
        logger.warning("%s; using the copy already here", error)
        return answer
    files = filter_files(listing.files, filenames=filenames, include=include, exclude=exclude)
    layout: Layout
    if target is not None:
        layout = LocalDirLayout(listing, target)
    else:
        layout = CacheLayout(listing, cache_base)

    options = TransferOptions(connections=connections, stall_timeout=stall_timeout, token=token)

    def transfer_for(file: RemoteFile, on_bytes=lambda n: None) -> FileTransfer:
        return FileTransfer(
            file,
            listing,
            partial_path=layout.partial_path(file),
            state_path=layout.state_path(file),
            pool=pool,
            session_for=sessions.get,
            options=options,
            stats=stats,
            cancel=cancel,
            on_bytes=on_bytes,
        )

    def result(files: list[FileOutcome], **fields: Any) -> DownloadResult:
        return DownloadResult(
            repo_id=repo_id,
            repo_type=repo_type,
            revision=revision,
            commit=listing.commit,
            path=layout.result_path,
            files=files,
            seconds=time.monotonic() - started,
            endpoint=pool.current.shown,
            retries=stats.retries,
            rate_limited=stats.rate_limited,
            failovers=pool.failovers,
            endpoints=[endpoint.outcome() for endpoint in pool.endpoints],
            **fields,
        )

    if dry_run:
        plan = [_plan_entry(layout, f, transfer_for(f)) for f in files]
        return result(plan, bytes_downloaded=0, dry_run=True)

    _ensure_writable(layout.storage_root())
    present = {f.path for f in files if _complete_without_lock(layout, f)}
    # Largest first: the longest job starts first, which finishes a set of jobs soonest.
    todo = sorted((f for f in files if f.path not in present), key=lambda f: -f.size)
    resumable = {f.path: transfer_for(f).resumable_bytes() for f in todo}
    _ensure_space(layout.storage_root(), sum(f.size - resumable[f.path] for f in todo))

    bar = Progress(
        total_bytes=sum(f.size for f in todo),
        already=sum(resumable.values()),
        enabled=progress,
    )
    outcomes = {path: FileOutcome(path, f.size, "present") for f in files if (path := f.path) in present}
    try:
        for file, status in _run_parallel(
            todo,
            max_workers,
            cancel,
            lambda f: _fetch_one(
                layout,
                f,
                transfer_for(f, on_bytes=lambda n, name=f.path: bar.advance(name, n)),
                bar,
                cancel,
                resumable[f.path],
            ),
        ):
            outcomes[file.path] = FileOutcome(file.path, file.size, status, resumable[file.path])
    finally:
        bar.close()
    layout.finish_revision()
    return result(
        [outcomes[f.path] for f in files],
        bytes_downloaded=stats.bytes_fetched,
        verify_failures=stats.verify_failures,
        restarts=stats.restarts,
    )


OFFLINE_ENDPOINT = "(offline: local copy)"


def _offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _plan_entry(layout: Layout, file: RemoteFile, transfer: FileTransfer) -> FileOutcome:
    if _complete_without_lock(layout, file, repair=False):
        return FileOutcome(file.path, file.size, "present")
    return FileOutcome(file.path, file.size, "would-download", transfer.resumable_bytes())


def _complete_without_lock(layout: Layout, file: RemoteFile, repair: bool = True) -> bool:
    """A cheap first look: complete files need no lock, no connection, no bar."""
    try:
        return layout.is_complete(file, repair=repair)
    except OSError:
        return False


def _fetch_one(
    layout: Layout,
    file: RemoteFile,
    transfer: FileTransfer,
    bar: Progress,
    cancel: threading.Event,
    resumed: int,
) -> str:
    """Fetch one file under its lock; another process holding the lock may finish it for us."""
    lock_path = layout.lock_path(file)
    with storage_errors(f"lock {file.path} for writing"):
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_path))
        while True:
            try:
                lock.acquire(timeout=0.5)
                break
            except Timeout:
                if cancel.is_set():
                    raise DownloadInterrupted(
                        "interrupted while waiting for another download of this file"
                    ) from None
    try:
        with storage_errors(f"check {file.path} in the target"):
            if layout.is_complete(file):  # someone else finished it while we waited
                return "present"
        obstacle = layout.obstacle(file)
        if obstacle is not None:  # found before fetching a byte, rather than after
            raise StorageError(f"cannot put {file.path} in place: {obstacle}; move it away and run again")
        bar.file_started(file.path, file.size, resumed)
        transfer.run()
        layout.finalize(file, transfer.partial_path)
        return "downloaded"
    finally:
        bar.file_finished(file.path)
        lock.release()


def _run_parallel(files: list[RemoteFile], workers: int, cancel: threading.Event, job):
    """Run ``job(file)`` on up to ``workers`` daemon threads; yield (file, result) as they finish.

    Daemon threads (not a ThreadPoolExecutor, whose threads are joined at exit) so that Ctrl-C ends
    the process promptly even while a connection is blocked; the first error cancels the rest.
    """
    pending: queue.Queue[RemoteFile] = queue.Queue()
    for file in files:
        pending.put(file)
    done: queue.Queue[tuple[RemoteFile, str | None, BaseException | None]] = queue.Queue()

    def worker() -> None:
        while not cancel.is_set():
            try:
                file = pending.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((file, job(file), None))
            except BaseException as error:  # re-raised in the caller's thread
                done.put((file, None, error))

    threads = [
        threading.Thread(target=worker, daemon=True, name=f"hfmirror-file-{i}")
        for i in range(min(workers, len(files)))
    ]
    for thread in threads:
        thread.start()
    remaining = len(files)
    try:
        while remaining:
            try:
                file, status, error = done.get(timeout=0.2)
            except queue.Empty:
                if not any(t.is_alive() for t in threads) and done.empty():
                    raise DownloadInterrupted("interrupted") from None
                continue
            remaining -= 1
            if error is not None:
                raise error
            yield file, status
    except KeyboardInterrupt:
        cancel.set()
        _wait_for_checkpoints(threads)
        raise DownloadInterrupted(
            "interrupted; partial data is kept, run the same command again to resume"
        ) from None
    except BaseException:
        cancel.set()
        _wait_for_checkpoints(threads)
        raise


def _wait_for_checkpoints(threads: list[threading.Thread], timeout: float = 3.0) -> None:
    """Give transfers a moment to save their resume state after a cancel."""
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".hfmirror-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise NotWritableError(f"cannot write to {folder}: {error.strerror or error}") from None


def _ensure_space(folder: Path, needed: int) -> None:
    try:
        free = shutil.disk_usage(folder).free
    except OSError as error:
        raise StorageError(f"cannot check free space in {folder}: {error}") from None
    if needed + constants.FREE_SPACE_MARGIN > free:
        raise InsufficientSpaceError(
            f"not enough disk space in {folder}: need {_size(needed)} more, {_size(free)} free"
        )
