"""Fetch one file into a partial file, over one or several ranged connections, and verify it.

How a file is fetched
---------------------
A large file starts on one connection asking for all of it. If that connection proves slow (a
mirror capping each connection, a distant server: see ``ConnectionRamp``), what is left is cut into
**segments** ``[start, end)`` (pieces of a few MiB to 64 MiB), each remembering ``pos``, how far it
has been written, and the other connections open. Worker threads take segments in file order, ask
for ``Range: bytes=pos-(end-1)``, receive each block into a reused buffer and write it at its offset
with ``os.pwrite``. A worker that runs out of segments takes the second half of the largest one still
running (the *slow-tail re-split*), so the last few percent never crawl along one slow connection.

How it resumes
--------------
Every ``CHECKPOINT_BYTES`` of new data (or ``CHECKPOINT_INTERVAL`` seconds; on a fast link no more
often than every ``CHECKPOINT_MIN_GAP``) the coordinator saves the segment table to
``<partial>.hfmirror.json``: what has been written survives ``kill -9`` in the page cache, so the next
run loses at most what arrived since the last save. Every ``SYNC_INTERVAL`` seconds
the data is flushed to disk first, and that table is kept as the one to trust after a power cut (see
``ResumeState``). On resume, requests carry ``If-Range`` with the validator the same host gave
before: if the file changed, the server sends it whole (200) and we start over.

How it is verified
------------------
The coordinator hashes the contiguous finished prefix of the file while the rest is still arriving
(sha256 for LFS files, git blob sha1 for the others), so verification costs little extra time; hashed
bytes then leave the page cache (``pagecache.PageRecycler``). A mismatch discards the partial file and
fetches it again, a bounded number of times.
"""

from __future__ import annotations

import errno
import functools
import http.client
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests
import urllib3

from . import constants
from .endpoints import Endpoint, EndpointPool
from .errors import (
    DownloadInterrupted,
    IntegrityError,
    NetworkError,
    RemoteError,
    StorageError,
)
from .hashing import ContentHasher
from .listing import RemoteFile, RepoListing
from .pagecache import PageRecycler
from .policy import (
    Action,
    Asked,
    TransferStats,
    Verdict,
    announce_retry,
    combine_refusals,
    drain_error_body,
    judge_file_answer,
    judge_transport_error,
    settle,
)

__all__ = ["FileTransfer", "ResumeState", "Segment", "TransferOptions", "TransferStats"]

logger = logging.getLogger(__name__)

_STATE_VERSION = 2


@functools.cache
def boot_id() -> str | None:
    """This boot's id (Linux), or None where there is none: then every checkpoint syncs first."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


_HASH_BLOCK = 1024 * 1024


@dataclass
class Segment:
    """Bytes ``[start, end)`` of the file (a piece), of which ``[start, pos)`` are written."""

    start: int
    pos: int
    end: int
    claimed: bool = False
    claimed_at: float = 0.0  # when a worker took it, and how far it was then: its speed since
    claimed_pos: int = 0

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def claim(self) -> None:
        self.claimed, self.claimed_at, self.claimed_pos = True, time.monotonic(), self.pos

    def seconds_left(self, now: float) -> float:
        """How long the rest will take at the speed seen so far (0 until there is a fair measure)."""
        elapsed = now - self.claimed_at
        done = self.pos - self.claimed_pos
        if elapsed < 0.2 or done <= 0:
            return 0.0 if elapsed < 0.2 else float("inf")
        return self.remaining / (done / elapsed)


def cut_into_pieces(start: int, end: int, connections: int) -> list[Segment]:
    """Bytes ``[start, end)`` as pieces for ``connections`` connections to take in file order.

    About ``PIECES_PER_CONNECTION`` pieces per connection (each MIN_SEGMENT to MAX_PIECE bytes), then
    one last wave of ``connections`` small pieces. Connections take pieces in order, so the finished
    prefix (what is hashed while downloading) trails the newest byte by about one wave; the small last
    wave leaves little to hash after the last byte. Few, large pieces mean few requests: each new
    request costs a round trip, and a capped server's pacing restarts with it.
    """
    tail = connections * constants.MIN_SEGMENT
    body_end = end - tail if connections > 1 and end - start >= 4 * tail else end
    size = body_end - start
    piece = size // (connections * constants.PIECES_PER_CONNECTION)
    piece = min(max(piece, constants.MIN_SEGMENT), constants.MAX_PIECE)
    return _even_pieces(start, body_end, max(1, size // piece)) + _even_pieces(body_end, end, connections)


def _even_pieces(start: int, end: int, count: int) -> list[Segment]:
    bounds = [start + (end - start) * i // count for i in range(count + 1)]
    return [Segment(a, a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


@dataclass
class TransferOptions:
    connections: int = 8
    stall_timeout: float = constants.DEFAULT_STALL_TIMEOUT
    token: str | None = None


class ResumeState:
    """The segment table of one partial file, saved as JSON beside it.

    Two tables are saved: ``segments``, what has been written (the page cache holds it, so it survives
    the process being killed), and ``durable``, what an ``fdatasync`` has since put on disk (it also
    survives a power cut). The file names the boot it was written in; a run in the same boot trusts
    ``segments``, a run after a reboot only ``durable``.
    """

    def __init__(
        self,
        path: Path,
        file: RemoteFile,
        segments: list[Segment],
        *,
        validators: dict[str, str] | None = None,
        ranges_supported: bool = True,
    ) -> None:
        self.path = path
        self.file = file
        self.segments = segments
        self.validators = dict(validators or {})  # host -> strong ETag of the bytes we hold
        self.ranges_supported = ranges_supported
        self.durable: list[list[int]] = [[s.start, s.pos, s.end] for s in segments]  # as of the last sync

    @classmethod
    def fresh(cls, path: Path, file: RemoteFile) -> ResumeState:
        """One segment for the whole file; it is cut into pieces if more connections open."""
        return cls(path, file, [Segment(0, 0, file.size)] if file.size else [])

    @classmethod
    def load(cls, path: Path, file: RemoteFile) -> ResumeState | None:
        """The saved state, or None if there is none or it is for other content, or damaged."""
        try:
            data = json.loads(path.read_text())
            if data["version"] not in (1, _STATE_VERSION):
                return None
            if data["oid"] != file.oid or data["size"] != file.size:
                return None
            # Version 1 synced before every save: its one table is durable.
            this_boot = boot_id()
            same_boot = data["version"] != 1 and this_boot is not None and data.get("boot_id") == this_boot
            table = data["segments"] if same_boot or data["version"] == 1 else data["durable"]
            segments = [Segment(int(a), int(p), int(b)) for a, p, b in table]
            covered = 0
            for segment in sorted(segments, key=lambda s: s.start):
                if segment.start != covered or not segment.start <= segment.pos <= segment.end:
                    return None
                covered = segment.end
            if covered != file.size:
                return None
            state = cls(
                path,
                file,
                segments,
                validators=dict(data.get("validators", {})),
                ranges_supported=bool(data.get("ranges_supported", True)),
            )
            if same_boot:
                state.durable = [[int(a), int(p), int(b)] for a, p, b in data["durable"]]
            return state
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def table(self) -> list[list[int]]:
        """The segment table as saved: ``[start, pos, end]`` in file order."""
        return [[s.start, s.pos, s.end] for s in sorted(self.segments, key=lambda s: s.start)]

    def snapshot(self, table: list[list[int]]) -> dict[str, object]:
        return {
            "version": _STATE_VERSION,
            "path": self.file.path,
            "oid": self.file.oid,
            "size": self.file.size,
            "boot_id": boot_id(),
            "ranges_supported": self.ranges_supported,
            "validators": dict(self.validators),
            "segments": table,
            "durable": self.durable,
        }

    @staticmethod
    def write(path: Path, snapshot: dict[str, object]) -> None:
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(snapshot))
        os.replace(temporary, path)

    @property
    def done_bytes(self) -> int:
        return sum(s.pos - s.start for s in self.segments)

    def prefix_end(self) -> int:
        """End of the contiguous finished run from byte 0."""
        for segment in sorted(self.segments, key=lambda s: s.start):
            if segment.pos < segment.end:
                return segment.pos
        return self.file.size


class _Judged(Exception):
    """A request came back with a verdict other than "write the body" (see :mod:`hfmirror.policy`)."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict


def _retry(reason: str) -> _Judged:
    """The connection failed mid-body: ask again from where it stopped (the endpoint is not to blame)."""
    return _Judged(Verdict(Action.RETRY, reason))


class _StartOver(Exception):
    """The bytes we hold cannot be continued: start this file again from zero."""

    def __init__(self, message: str, *, ranges_supported: bool = True) -> None:
        super().__init__(message)
        self.ranges_supported = ranges_supported


_TRANSPORT_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


class ConnectionRamp:
    """How many of a file's connections may run: one at first, all once one proves too slow alone.

    The first connection is judged after ``RAMP_PROBE_SECONDS`` (counted from before its request, so
    a distant server's latency counts against it): below ``FAST_CONNECTION`` bytes/s, as behind any
    per-connection cap, every connection opens at once and stays open. A connection that keeps up is
    judged again over each ``RAMP_WINDOW_SECONDS``, long enough that a hiccup of our own (a busy CPU)
    does not count as a slow link. While it keeps up, the file comes over that one connection: more
    would add nothing but CPU time here and load on the mirror.
    """

    def __init__(self, connections: int, now: float) -> None:
        self.connections = connections
        self.allowed = connections if constants.RAMP_PROBE_SECONDS <= 0 else 1
        self.probing = not self.open  # the first, short window: reads are kept small during it
        self._window = constants.RAMP_PROBE_SECONDS
        self._window_start = now
        self._window_bytes = 0

    @property
    def open(self) -> bool:
        return self.allowed >= self.connections

    def read_block(self) -> int:
        """How much a connection should ask one read for now (see READ_BLOCK)."""
        if self.probing:
            return constants.PROBE_READ_BLOCK
        if not self.open:  # judged fast enough alone: CPU, not the network, is what it waits for
            return constants.FAST_READ_BLOCK
        return constants.READ_BLOCK

    def observe(self, count: int, now: float) -> bool:
        """Record ``count`` new bytes at time ``now``; True if this opened every connection."""
        if self.open:
            return False
        self._window_bytes += count
        elapsed = now - self._window_start
        if elapsed < self._window:
            return False
        self.probing = False
        if self._window_bytes < constants.FAST_CONNECTION * elapsed:
            self.allowed = self.connections
            return True
        self._window, self._window_start, self._window_bytes = constants.RAMP_WINDOW_SECONDS, now, 0
        return False


class _Attempt:
    """One pass over the file: its own segment table, file descriptor, stop flag and error slot.

    Workers only ever touch their own attempt, so a worker still finishing a read for an attempt that
    has ended can neither stop, nor fail, nor write into the next one.
    """

    def __init__(self, state: ResumeState, fd: int, ramp: ConnectionRamp) -> None:
        self.state = state
        self.ramp = ramp
        self.fd = fd
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.workers: list[threading.Thread] = []
        self.unsaved = 0  # bytes written since the last checkpoint
        self.hashed = 0  # bytes [0, hashed) are hashed (by the coordinator, which alone moves this)
        self.hash_buffer = memoryview(bytearray(_HASH_BLOCK))  # reused: fresh memory is slow to touch
        # Large files leave the page cache behind the hash (small ones are not worth a thread).
        large = state.file.size > constants.DROP_PAGES_LAG and PageRecycler.available()
        self.pages = PageRecycler(fd) if large else None
        self.synced_at = time.monotonic()  # when the data file was last flushed to disk
        self.saved_at = time.monotonic()  # when the resume state was last saved

    def seconds_to_save(self) -> float:
        """How long until the resume state is due to be saved again (0 or less: now)."""
        return _seconds_to_checkpoint(self.unsaved, time.monotonic() - self.saved_at)


class FileTransfer:
    """Downloads one RemoteFile into ``partial_path`` and verifies it.

    ``run()`` returns when the partial file holds exactly the listed content; the caller renames it.
    """

    def __init__(
        self,
        file: RemoteFile,
        listing: RepoListing,
        *,
        partial_path: Path,
        state_path: Path,
        pool: EndpointPool,
        session_for: Callable[[], requests.Session],
        options: TransferOptions,
        stats: TransferStats,
        cancel: threading.Event,
        on_bytes: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.file = file
        self.listing = listing
        self.partial_path = partial_path
        self.state_path = state_path
        self.pool = pool
        self.session_for = session_for
        self.options = options
        self.stats = stats
        self.cancel = cancel
        self.on_bytes = on_bytes
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Endpoints that said they do not have this file (or could not answer for it), and what they said.
        self._refusals: list[tuple[Endpoint, Verdict]] = []

    # ------------------------------------------------------------------ the file as a whole

    def resumable_bytes(self) -> int:
        """How many bytes a previous run left that this one will keep.

        An estimate, read without the file's lock, for the progress bar and the free-space check;
        ``run()`` reads the state again under the lock, since another process may have moved it on.
        """
        state = ResumeState.load(self.state_path, self.file)
        if state is None or not self.partial_path.exists():
            return 0
        return state.done_bytes

    def run(self) -> None:
        """Fetch and verify, starting over on a checksum mismatch at most MAX_VERIFY_ATTEMPTS times.

        Raises:
            IntegrityError: if the content never matched; NetworkError, RemoteError, StorageError,
            DownloadInterrupted as they arise. Partial data and state are kept for all but IntegrityError.
        """
        try:
            self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(f"cannot write {self.partial_path}: {error.strerror or error}") from None
        last_problem = ""
        attempts = 0
        ranges_supported = True
        while attempts < constants.MAX_VERIFY_ATTEMPTS:
            state = ResumeState.load(self.state_path, self.file) if self.partial_path.exists() else None
            if state is None:
                state = ResumeState.fresh(self.state_path, self.file)
                state.ranges_supported = ranges_supported
                self._discard()
            try:
                digest = self._fetch(state)
            except _StartOver as restart:
                logger.info("%s: starting over: %s", self.file.path, restart)
                self.stats.add(restarts=1)
                ranges_supported = restart.ranges_supported
                self._discard()
                attempts += 1
                last_problem = str(restart)
                continue
            if digest == self.file.oid:
                self.state_path.unlink(missing_ok=True)
                return
            attempts += 1
            self.stats.add(verify_failures=1)
            last_problem = f"checksum {digest} instead of {self.file.oid}"
            logger.warning("%s: %s; fetching it again", self.file.path, last_problem)
            self._discard()
        raise IntegrityError(
            f"{self.file.path}: content never matched after {attempts} attempts ({last_problem})"
        )

    def _discard(self) -> None:
        self.partial_path.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)

    def _fetch(self, state: ResumeState) -> str:
        """Run the workers until every segment is written; hash along the way; return the digest."""
        hasher = ContentHasher(self.file.oid, self.file.size)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(self.partial_path, flags, 0o644)
        except OSError as error:
            raise StorageError(f"cannot write {self.partial_path}: {error.strerror}") from None
        attempt = _Attempt(state, fd, ConnectionRamp(self._worker_count(state), time.monotonic()))
        if attempt.ramp.open and attempt.ramp.connections > 1:
            self._cut_for_connections(attempt)
        try:
            if os.fstat(fd).st_size != self.file.size:
                os.ftruncate(fd, self.file.size)  # sparse: the blocks are written as bytes arrive
            self._start_workers(attempt)
            while True:
                with self._wake:
                    running = any(w.is_alive() for w in attempt.workers)
                    # Sleep unless there is work already (a wake-up may have come while we hashed).
                    save_in = attempt.seconds_to_save()
                    idle = state.prefix_end() == attempt.hashed and save_in > 0
                    if idle and attempt.error is None and running and not self.cancel.is_set():
                        self._wake.wait(timeout=min(0.2, save_in))
                    if attempt.ramp.observe(0, time.monotonic()):  # a stalled first connection is slow too
                        self._cut_for_connections(attempt)
                if len(attempt.workers) < attempt.ramp.allowed:
                    self._start_workers(attempt)
                if attempt.seconds_to_save() <= 0:
                    self._checkpoint(attempt)
                self._hash_arrived(attempt, hasher)  # returns early when a save falls due
                if attempt.error is not None or self.cancel.is_set():
                    attempt.stop.set()
                    self._checkpoint(attempt, sync=True)
                    if attempt.error is not None:
                        raise attempt.error
                    raise DownloadInterrupted("interrupted")
                if attempt.hashed == self.file.size or not any(w.is_alive() for w in attempt.workers):
                    break  # every byte is in (workers still looking for work are stopped by _end)
            self._checkpoint(attempt)
            if state.prefix_end() != self.file.size:  # workers ended with bytes missing: should not happen
                raise NetworkError(f"{self.file.path}: transfer ended early")
            while attempt.hashed < self.file.size:
                self._hash_arrived(attempt, hasher)
            os.fsync(fd)
            self._checkpoint(attempt)
            return hasher.hexdigest()
        finally:
            self._end(attempt)

    def _end(self, attempt: _Attempt) -> None:
        """Stop the attempt's workers and close its file once none of them can write to it any more.

        A worker blocked in a read returns within the stall timeout. If one is still alive after that
        (or after a short wait when the user interrupted), the descriptor is left open rather than
        closed: a closed descriptor number can be reused by another file, which the worker would then
        write into.
        """
        attempt.stop.set()
        if attempt.pages is not None:
            attempt.pages.close()
        patience = 2.0 if self.cancel.is_set() else self.options.stall_timeout + constants.CONNECT_TIMEOUT
        deadline = time.monotonic() + patience
        for worker in attempt.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if any(worker.is_alive() for worker in attempt.workers):
            logger.warning("%s: a connection did not stop in time; leaving its file open", self.file.path)
            return
        os.close(attempt.fd)

    def _worker_count(self, state: ResumeState) -> int:
        if not state.ranges_supported or self.file.size < constants.MULTI_CONNECTION_THRESHOLD:
            return 1  # small files: one request each, politer to a rate-limiting mirror
        open_segments = sum(1 for s in state.segments if s.remaining > 0)
        splittable = sum(s.remaining for s in state.segments) // constants.MIN_SPLIT
        return max(1, min(self.options.connections, max(open_segments, splittable)))

    def _hash_arrived(self, attempt: _Attempt, hasher: ContentHasher) -> None:
        """Hash the finished prefix as far as it reaches now (at most HASH_STEP), reading it back.

        Bounded so that the coordinator's loop saves checkpoints between steps: hashing a whole wave
        of pieces at once (250 MiB, 0.2 s) held back the checkpoints a kill -9 relies on. A step also
        ends after any block at which a save has fallen due: on a busy machine 8 MiB of sha256 can
        take 20-30 ms, long enough for eight fast connections to bring several MiB more.
        """
        with self._lock:
            upto = min(attempt.state.prefix_end(), attempt.hashed + constants.HASH_STEP)
        start = hashed = attempt.hashed
        buffer = attempt.hash_buffer
        while hashed < upto:
            count = os.preadv(attempt.fd, [buffer[: min(len(buffer), upto - hashed)]], hashed)
            if count <= 0:
                raise StorageError(f"{self.partial_path}: could not read back what was written")
            hasher.update(buffer[:count])
            hashed += count
            if attempt.seconds_to_save() <= 0:
                break
        attempt.hashed = hashed
        if hashed > start and attempt.pages is not None:
            attempt.pages.hashed_up_to(hashed)

    def _checkpoint(self, attempt: _Attempt, *, sync: bool = False) -> None:
        """Save the segment table; first flush the data to disk if ``sync``, or if it is time to.

        Without a flush the table still holds after ``kill -9`` (the page cache keeps what was written);
        the flush, every ``SYNC_INTERVAL`` seconds, is what also makes it hold after a power cut.
        """
        with self._lock:
            table = attempt.state.table()
            attempt.unsaved = 0
        now = time.monotonic()
        try:
            if sync or boot_id() is None or now - attempt.synced_at >= constants.SYNC_INTERVAL:
                os.fdatasync(attempt.fd) if hasattr(os, "fdatasync") else os.fsync(attempt.fd)
                attempt.state.durable, attempt.synced_at = table, now
            ResumeState.write(self.state_path, attempt.state.snapshot(table))
        except OSError as error:
            logger.warning("could not save resume state for %s: %s", self.file.path, error)
        attempt.saved_at = time.monotonic()  # a failed save is not retried at once, either

    # ------------------------------------------------------------------ segments and workers

    def _cut_for_connections(self, attempt: _Attempt) -> None:
        """Cut what is left into pieces for every connection (caller holds the lock, or runs alone).

        A running segment keeps one piece from where its connection is; that connection stops at the
        new end and takes the next free piece, so the file is still fetched in order.
        """
        state = attempt.state
        for segment in list(state.segments):
            if segment.remaining < 2 * constants.MIN_SEGMENT:
                continue
            pieces = cut_into_pieces(segment.pos, segment.end, attempt.ramp.connections)
            if len(pieces) < 2:
                continue
            segment.end = pieces[0].end
            state.segments.extend(pieces[1:])

    def _claim(self, attempt: _Attempt) -> Segment | None:
        """The next segment to work on: an unclaimed one, else the far half of a slow running one."""
        with self._lock:
            state = attempt.state
            waiting = [s for s in state.segments if not s.claimed and s.remaining > 0]
            if waiting:
                segment = min(waiting, key=lambda s: s.start)
                segment.claim()
                return segment
            if not state.ranges_supported:
                return None
            # Split only where it pays: a segment big enough to halve that, at the speed its connection
            # has shown, still needs a while. On a fast link splitting would only throw away the bytes
            # already in flight past the new end.
            now = time.monotonic()
            slow = [
                s
                for s in state.segments
                if s.claimed
                and s.remaining >= 2 * constants.MIN_SPLIT
                and s.seconds_left(now) > constants.SPLIT_IF_SECONDS_LEFT
            ]
            if not slow:
                return None
            slowest = max(slow, key=lambda s: s.seconds_left(now))
            middle = slowest.pos + slowest.remaining // 2
            tail = Segment(middle, middle, slowest.end)
            tail.claim()
            slowest.end = middle
            state.segments.append(tail)
            return tail

    def _start_workers(self, attempt: _Attempt) -> None:
        """Start connections (threads) up to the number the ramp allows."""
        while len(attempt.workers) < attempt.ramp.allowed:
            name = f"hfmirror-{self.file.path}-{len(attempt.workers)}"
            worker = threading.Thread(target=self._worker, args=(attempt,), name=name, daemon=True)
            attempt.workers.append(worker)
            worker.start()

    def _worker(self, attempt: _Attempt) -> None:
        try:
            while not attempt.stop.is_set() and not self.cancel.is_set():
                segment = self._claim(attempt)
                if segment is None:
                    with self._lock:
                        unfinished = any(s.remaining > 0 for s in attempt.state.segments)
                    if not unfinished or not attempt.state.ranges_supported:
                        return
                    attempt.stop.wait(0.1)  # others are still at it: look again for a slow one to split
                    continue
                try:
                    self._fetch_segment(attempt, segment)
                finally:
                    with self._lock:
                        segment.claimed = False
        except BaseException as error:  # handed to the coordinator, which raises it
            with self._wake:
                if attempt.error is None and not attempt.stop.is_set():
                    attempt.error = error
                self._wake.notify_all()
        finally:
            with self._wake:
                self._wake.notify_all()

    def _fetch_segment(self, attempt: _Attempt, segment: Segment) -> None:
        """Fill ``segment``, retrying failed requests with backoff; give up after MAX_RETRIES in a row.

        Each request goes to :meth:`_endpoint`: the run's current endpoint, unless that one said it does
        not have this file, in which case the next one is asked.
        """
        failures = 0
        while segment.remaining > 0 and not attempt.stop.is_set() and not self.cancel.is_set():
            endpoint = self._endpoint()
            if not endpoint.governor.acquire(attempt.stop):
                return
            start_pos = segment.pos
            try:
                self._request_segment(attempt, endpoint, segment)
                endpoint.governor.on_success()
                self.pool.report_success(endpoint)
                failures = 0
                continue
            except _Judged as judged:
                verdict = judged.verdict
            finally:
                endpoint.governor.release()
            failures = 0 if segment.pos > start_pos else failures + 1
            if verdict.action is Action.FAIL_OVER and self._refuse(endpoint, verdict):
                continue  # another endpoint takes over, at once
            wait = settle(verdict, endpoint, self.pool, self.stats, attempt=failures)
            if failures > constants.MAX_RETRIES:
                raise NetworkError(
                    f"{self.file.path}: gave up after {failures} failed attempts: "
                    f"{endpoint.shown}: {verdict.reason}"
                ) from None
            if self._endpoint() is endpoint:  # not if the run has just moved on to another endpoint
                logger.info("%s: %s; retrying in %.1fs", self.file.path, verdict.reason, wait)
                announce_retry(endpoint, verdict, wait, failures)
                attempt.stop.wait(wait)  # set on Ctrl-C too, by the coordinator

    def _endpoint(self) -> Endpoint:
        """Where to ask for this file now: the first endpoint in service that has not said it lacks it."""
        with self._lock:
            refused = {id(endpoint) for endpoint, _ in self._refusals}
        for endpoint in self.pool.in_service():
            if id(endpoint) not in refused:
                return endpoint
        with self._lock:
            raise combine_refusals(list(self._refusals), self._asked(self.pool.current))

    def _refuse(self, endpoint: Endpoint, verdict: Verdict) -> bool:
        """Stop asking ``endpoint`` after a FAIL_OVER verdict; True if another endpoint is left to ask.

        Not found there (a mirror lacking one file): only this file goes elsewhere. Anything else (not
        a Hub answer, a hang, a Retry-After beyond the limit) rules the endpoint out for the whole run.
        On the last endpoint, a hang is retried (False); anything else is the answer.
        """
        if isinstance(verdict.error, RemoteError):
            with self._lock:
                self._refusals.append((endpoint, verdict))
            following = self._endpoint()  # raises, naming what each endpoint said, if none is left
            logger.warning(
                "%s: %s on %s; asking %s", self.file.path, verdict.reason, endpoint.shown, following.shown
            )
            return True
        if self.pool.fail_over(endpoint, verdict.reason):
            with self._lock:
                self._refusals.append((endpoint, verdict))
            return True
        if verdict.retry_if_last:
            return False
        with self._lock:
            refusals = [*self._refusals, (endpoint, verdict)]
        raise combine_refusals(refusals, self._asked(endpoint))

    def _asked(self, endpoint: Endpoint) -> Asked:
        return Asked(self.listing.repo_id, self.listing.commit, endpoint.shown, filename=self.file.path)

    def _request_segment(self, attempt: _Attempt, endpoint: Endpoint, segment: Segment) -> int:
        """One GET for the rest of ``segment``. Returns the bytes written; raises _Judged or worse."""
        state = attempt.state
        url = endpoint.resolve_url(
            self.listing.repo_type, self.listing.repo_id, self.listing.commit, self.file.path
        )
        headers = {}
        if state.ranges_supported and (segment.pos > 0 or segment.end < self.file.size):
            headers["Range"] = f"bytes={segment.pos}-{segment.end - 1}"
            validator = state.validators.get(endpoint.host)
            if validator:
                headers["If-Range"] = validator
        if self.options.token:
            headers["Authorization"] = f"Bearer {self.options.token}"
        session = self.session_for()
        endpoint.requests += 1
        try:
            response = session.get(
                url,
                headers=headers,
                stream=True,
                timeout=(constants.CONNECT_TIMEOUT, self.options.stall_timeout),
                allow_redirects=True,
            )
        except _TRANSPORT_ERRORS as error:
            asked = self._asked(endpoint)
            raise _Judged(judge_transport_error(error, asked, timeout=self.options.stall_timeout)) from None
        with response:
            self._check_answer(attempt, endpoint, response, segment, headers)
            try:
                return self._stream_into(attempt, response, segment)
            except _TRANSPORT_ERRORS as error:
                raise _retry(f"connection lost at byte {segment.pos} ({type(error).__name__})") from None

    def _check_answer(
        self,
        attempt: _Attempt,
        endpoint: Endpoint,
        response: requests.Response,
        segment: Segment,
        sent: dict[str, str],
    ) -> None:
        """Raise unless the answer's body is the bytes asked for (the policy judges; this acts)."""
        with self._lock:
            start = segment.pos
        verdict = judge_file_answer(
            response, self._asked(endpoint), sent=sent, start=start, size=self.file.size, oid=self.file.oid
        )
        if verdict is not None:
            if response.status_code >= 300:
                drain_error_body(response)  # so that the connection serves the next request
            if verdict.action is Action.START_OVER:
                raise _StartOver(verdict.reason, ranges_supported=verdict.ranges_supported)
            if verdict.action is Action.FAIL:
                assert verdict.error is not None
                raise verdict.error
            raise _Judged(verdict)
        etag = response.headers.get("ETag", "")
        if etag and not etag.startswith("W/"):
            # Whoever answered last (the endpoint or its CDN) checks If-Range against this value.
            with self._lock:
                attempt.state.validators.setdefault(endpoint.host, etag)

    def _stream_into(self, attempt: _Attempt, response: requests.Response, segment: Segment) -> int:
        """Copy the body into the file at ``segment.pos`` until the segment (which may shrink) is full.

        Each block is received straight into one reused buffer and written from there. A body read to
        its end hands its connection back to the pool for the next piece; one left unfinished (the
        segment shrank, the attempt ended) closes it when the response is closed.
        """
        body = _body_reader(response)
        largest = max(constants.READ_BLOCK, constants.FAST_READ_BLOCK, constants.PROBE_READ_BLOCK)
        with self._lock:  # a segment only ever shrinks: a small file needs no 1 MiB buffer
            buffer = memoryview(bytearray(max(1, min(largest, segment.end - segment.pos))))
        written = 0
        while True:
            with self._lock:
                block = attempt.ramp.read_block()
                want = min(block, segment.end - segment.pos)
            if want <= 0 or attempt.stop.is_set() or self.cancel.is_set():
                break
            try:
                count = body.readinto(buffer[:want])
            except (OSError, http.client.HTTPException) as error:
                raise _retry(f"connection lost at byte {segment.pos} ({type(error).__name__})") from None
            if not count:
                raise _retry(f"body ended early at byte {segment.pos}")
            with self._lock:
                # A re-split may have moved `end` closer; never write past it.
                usable = min(count, segment.end - segment.pos)
                offset = segment.pos
            if usable <= 0 or attempt.stop.is_set():  # this attempt ended while we were reading
                break
            try:
                os.pwrite(attempt.fd, buffer[:usable], offset)
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    raise StorageError(
                        f"disk full while writing {self.file.path}; partial data kept, free space and re-run"
                    ) from None
                raise StorageError(f"cannot write {self.partial_path}: {error.strerror}") from None
            with self._wake:
                segment.pos += usable
                attempt.unsaved += usable
                # Wake the coordinator only when it has something to do: a finished piece may extend
                # the prefix it hashes, and crossing CHECKPOINT_BYTES unsaved calls for a checkpoint
                # (once: from there the coordinator times its own wait to the next save). Wake the
                # waiting connections when this one proves too slow alone.
                opened = attempt.ramp.observe(usable, time.monotonic())
                if opened:
                    self._cut_for_connections(attempt)
                crossed = attempt.unsaved - usable < constants.CHECKPOINT_BYTES <= attempt.unsaved
                if opened or segment.remaining <= 0 or crossed:
                    self._wake.notify_all()
                if segment.remaining <= 0 and attempt.pages is not None:
                    if attempt.state.prefix_end() == self.file.size:  # the last byte is in
                        attempt.pages.flush()
            written += usable
            self.stats.add(bytes_fetched=usable)
            self.on_bytes(usable)
        if body is not response.raw and body.isclosed():
            response.raw.release_conn()  # the whole body was read: keep the connection for the next piece
        return written


def _seconds_to_checkpoint(unsaved: int, since_last: float) -> float:
    """How long until the resume state should be saved again (0 or less: now).

    Every CHECKPOINT_BYTES of new data, but at most once per CHECKPOINT_MIN_GAP: on a fast link a kill
    then loses what arrived in that gap, which takes no longer to fetch again. And at least every
    CHECKPOINT_INTERVAL.
    """
    if unsaved >= constants.CHECKPOINT_BYTES:
        return constants.CHECKPOINT_MIN_GAP - since_last
    return constants.CHECKPOINT_INTERVAL - since_last


def _body_reader(response: requests.Response) -> http.client.HTTPResponse | urllib3.BaseHTTPResponse:
    """What to call ``readinto`` on for the raw body: the http.client response inside urllib3's.

    urllib3's own ``read``/``readinto`` return a fresh bytes object per block after copying it twice;
    http.client's ``readinto`` receives straight into the caller's buffer. Over loopback a 1 GiB body
    took 0.45 s of CPU that way against 1.1 s through urllib3 (2.0 s through its ``readinto``). Content
    decoding is off either way: the bytes must hash to the listed checksum as sent. Should urllib3 ever
    stop wrapping an http.client response, its own (slower) ``readinto`` is used.
    """
    inner = getattr(response.raw, "_fp", None)
    return inner if isinstance(inner, http.client.HTTPResponse) else response.raw
