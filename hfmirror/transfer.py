"""Fetch one file into a partial file, over one or several ranged connections, and verify it.

How a file is fetched
---------------------
A large file starts on one connection asking for all of it. If that connection proves slow (a
mirror capping each connection, a distant server: see ``ConnectionRamp``), what is left is cut into
**segments** (pieces of a few MiB to 64 MiB) and the other connections open. Each connection takes
segments in file order, asks for ``Range: bytes=pos-(end-1)``, receives each block into a reused
buffer and writes it at its offset with ``os.pwrite``. A connection that runs out of segments takes the
second half of the largest one still running (the *slow-tail re-split*), so the last few percent never
crawl along one slow connection.

How it resumes
--------------
Every ``CHECKPOINT_BYTES`` of new data (or ``CHECKPOINT_INTERVAL`` seconds; on a fast link no more
often than every ``CHECKPOINT_MIN_GAP``) the coordinator saves the segment table to
``<partial>.hfmirror.json``: what has been written survives ``kill -9`` in the page cache, so the next
run loses at most what arrived since the last save. Every ``SYNC_INTERVAL`` seconds the data is
flushed to disk first, and that table is kept as the one to trust after a power cut. On resume,
requests carry ``If-Range`` with the validator the same host gave before: if the file changed, the
server sends it whole (200) and we start over.

How it is verified
------------------
A thread of its own hashes the contiguous finished prefix of the file while the rest is still arriving
(sha256 for LFS files, git blob sha1 for the others), so verification costs little extra time. The
connection writing at the front of that prefix hands its blocks to the hash in memory
(``hashing.HandedBlocks``) rather than have them read back from the file; hashed bytes then leave the
page cache (``pagecache.PageRecycler``). A mismatch discards the partial file and
fetches it again, a bounded number of times.

The units
---------
Each job has its own unit, tested through its own methods:

* :class:`~hfmirror.segments.SegmentTable` (with its :class:`~hfmirror.segments.ConnectionRamp`): which
  bytes each connection fetches next. Owns its lock, does no I/O.
* :class:`~hfmirror.resume.ResumeState` and :class:`~hfmirror.resume.CheckpointClock`: what is saved,
  and when.
* :class:`~hfmirror.hashing.PrefixHasher` and :class:`~hfmirror.hashing.HandedBlocks`: the hash of the
  finished prefix, and the buffers lent to the connection at its front.
* :mod:`hfmirror.policy`: what each answer means.
* Here, on top: ``_Connection`` (one worker: a request, its answer checked, its body written through the
  table), ``_Pass`` (the coordinator of one pass over the file: starts connections and the hash's
  thread, saves, stops), and :class:`FileTransfer` (the verify-or-start-over loop, and which endpoint
  to ask).
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import requests
import urllib3

from . import constants
from .endpoints import Endpoint, EndpointPool
from .errors import (
    DownloadInterrupted,
    IntegrityError,
    NetworkError,
    QuotaExhaustedError,
    RemoteError,
    StorageError,
)
from .hashing import HandedBlocks, PrefixHasher
from .listing import RemoteFile, RepoListing
from .pagecache import PageRecycler
from .policy import (
    TRANSPORT_ERRORS,
    Action,
    Asked,
    TransferStats,
    Verdict,
    announce_retry,
    combine_refusals,
    drain_error_body,
    judge_file_answer,
    judge_transport_error,
    quota_spent,
    settle,
)
from .resume import CheckpointClock, ResumeState
from .segments import Segment, SegmentTable

__all__ = ["FileTransfer", "TransferOptions"]

logger = logging.getLogger(__name__)


@dataclass
class TransferOptions:
    connections: int = 8
    stall_timeout: float = constants.DEFAULT_STALL_TIMEOUT
    token: str | None = None  # sent to the endpoints whose ``sends_token`` allows it


_Body = http.client.HTTPResponse | urllib3.BaseHTTPResponse  # what a body is read from


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
        # Endpoints that said they do not have this file (or could not answer for it), and what they said.
        self._refusals: list[tuple[Endpoint, Verdict]] = []

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
                state = ResumeState.fresh(self.state_path, self.file, ranges_supported=ranges_supported)
                self._discard()
            try:
                digest = self._one_pass(state)
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

    def _one_pass(self, state: ResumeState) -> str:
        """Open the partial file and fetch whatever ``state`` lacks; return the content's digest."""
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(self.partial_path, flags, 0o644)
        except OSError as error:
            raise StorageError(f"cannot write {self.partial_path}: {error.strerror}") from None
        return _Pass(self, state, fd).run()

    def connections_for(self, table: SegmentTable) -> int:
        """How many connections this file may use: one for a small file (one request each, politer to
        a rate-limiting mirror), else up to ``--connections``, as many as the table can keep busy."""
        if self.file.size < constants.MULTI_CONNECTION_THRESHOLD:
            return 1
        return table.connections_worth_opening(self.options.connections)

    # ------------------------------------------------------------------ which endpoint to ask

    def endpoint(self) -> Endpoint:
        """Where to ask for this file now: the first endpoint in service that has not said it lacks it.

        Raises:
            the error naming what each endpoint said, once none is left to ask.
        """
        with self._lock:
            refused = {id(endpoint) for endpoint, _ in self._refusals}
        for endpoint in self.pool.in_service():
            if id(endpoint) not in refused:
                return endpoint
        with self._lock:
            raise combine_refusals(list(self._refusals), self.asked(self.pool.current))

    def refuse(self, endpoint: Endpoint, verdict: Verdict) -> bool:
        """Stop asking ``endpoint`` after a FAIL_OVER verdict; True if another endpoint is left to ask.

        Not found there (a mirror lacking one file): only this file goes elsewhere. Anything else (not
        a Hub answer, a hang, a Retry-After beyond the limit) rules the endpoint out for the whole run.
        On the last endpoint, a hang is retried (False); anything else is the answer.
        """
        if isinstance(verdict.error, RemoteError):
            with self._lock:
                self._refusals.append((endpoint, verdict))
            following = self.endpoint()  # raises, naming what each endpoint said, if none is left
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
        raise combine_refusals(refusals, self.asked(endpoint))

    def asked(self, endpoint: Endpoint) -> Asked:
        withheld = bool(self.options.token) and not endpoint.sends_token
        listing = self.listing
        return Asked(listing.repo_id, listing.commit, endpoint.shown, self.file.path, withheld_token=withheld)

    def remember_validator(self, state: ResumeState, host: str, etag: str) -> None:
        """Keep the strong ETag ``host`` gave, for If-Range on a resume (the first one wins)."""
        with self._lock:
            state.validators.setdefault(host, etag)


class _Pass:
    """One pass over the file: the coordinator of its connections and of its hash.

    It starts connections as the ramp allows, saves the resume state when the clock says, and stops
    everything on the first error or Ctrl-C. The hash of the finished prefix runs on a thread of its
    own: on a fast link it is what the whole file waits for, and a save (a rename, which can wait for
    the file system's journal while the data is being written out) must not hold it up. Its
    connections and its hash only ever touch their own pass, so a thread still finishing a read for a
    pass that has ended can neither stop, nor fail, nor write into the next one.
    """

    def __init__(self, transfer: FileTransfer, state: ResumeState, fd: int) -> None:
        now = time.monotonic()
        self.transfer = transfer
        self.file = transfer.file
        self.state = state
        self.fd = fd
        self.table = state.start_attempt(transfer.connections_for(state.table), now)
        self.clock = CheckpointClock(now)
        # A large file's connections hand what they write at the front of the prefix to the hash in
        # memory, and its hashed bytes leave the page cache (small ones are not worth the buffers).
        large = self.file.size > constants.DROP_PAGES_LAG
        self.handed = HandedBlocks(_largest_read(), constants.HANDED_BLOCKS) if large else None
        self.hasher = PrefixHasher(fd, self.file.oid, self.file.size, handed=self.handed)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._error_lock = threading.Lock()
        self.connections: list[threading.Thread] = []
        self.prefix_news = threading.Event()  # set when the finished prefix may have grown
        name = f"hfmirror-hash-{self.file.path}"
        self.hashing = threading.Thread(target=self._hash_all, name=name, daemon=True)
        self.pages = PageRecycler(fd) if large and PageRecycler.available() else None

    def run(self) -> str:
        """Run the connections until every byte is written, hashing alongside; return the digest."""
        cancel = self.transfer.cancel
        if self.table.ramp.open and self.table.ramp.connections > 1:
            self.table.cut_for_connections()
        try:
            if os.fstat(self.fd).st_size != self.file.size:
                os.ftruncate(self.fd, self.file.size)  # sparse: the blocks are written as bytes arrive
            self.hashing.start()
            self._start_connections()
            while True:
                self.table.wait_while(self._idle, timeout=min(0.2, max(self._seconds_to_save(), 0.0)))
                self.table.observe_time(time.monotonic())  # a stalled first connection is slow too
                if len(self.connections) < self.table.ramp.allowed:
                    self._start_connections()
                if self._seconds_to_save() <= 0:
                    self.checkpoint()
                if self.error is not None or cancel.is_set():
                    self._give_up()
                if not self._running():
                    break  # every byte is in, or the connections ended early (checked below)
            self.checkpoint()
            if self.table.prefix_end() != self.file.size:
                raise NetworkError(f"{self.file.path}: transfer ended early")
            self.hashing.join()  # it ends on its own once every byte is hashed, or on Ctrl-C
            if self.error is not None or self.hasher.hashed < self.file.size:
                self._give_up()
            os.fsync(self.fd)
            self.checkpoint()
            return self.hasher.hexdigest()
        finally:
            self._end()

    def _give_up(self) -> NoReturn:
        """Stop on the first error (or Ctrl-C), keeping what was written for the next run."""
        self.stop.set()
        self.checkpoint(sync=True)
        if self.error is not None:
            raise self.error
        raise DownloadInterrupted("interrupted")

    def priority(self, endpoint: Endpoint) -> float:
        """Seconds this file would still take with one more connection: the larger, the sooner it gets
        the next free slot of the endpoint's connection budget (the longest job first, which finishes
        a set of files soonest). The rate is this file's own per connection if measured, else what the
        endpoint's connections delivered lately, else (nothing measured yet) that of a fast connection:
        always a rate, so that a priority taken before any measurement (it stays in the governor's line
        as it was) is in seconds too, like those taken after."""
        governor = endpoint.governor
        rate = self.table.per_connection_rate(time.monotonic())
        if rate is not None:
            governor.note_rate(rate)
        else:
            rate = governor.connection_rate or constants.FAST_CONNECTION
        return self.table.remaining_bytes / (self.table.active_connections() + 1) / max(rate, 1.0)

    def fail(self, error: BaseException) -> None:
        """An error of a connection or of the hash, handed to the coordinator (the first one is raised)."""
        with self._error_lock:
            if self.error is None and not self.stop.is_set():
                self.error = error
        self.table.notify()

    def _idle(self) -> bool:
        """Nothing for the coordinator to do until news comes (checked under the table's lock)."""
        return (
            self._seconds_to_save() > 0
            and self.error is None
            and self._running()
            and not self.transfer.cancel.is_set()
        )

    def _running(self) -> bool:
        return any(connection.is_alive() for connection in self.connections)

    def _seconds_to_save(self) -> float:
        return self.clock.seconds_to_save(self.table.unsaved, time.monotonic())

    def _start_connections(self) -> None:
        """Start connections (threads) up to the number the ramp allows."""
        while len(self.connections) < self.table.ramp.allowed:
            name = f"hfmirror-{self.file.path}-{len(self.connections)}"
            thread = threading.Thread(target=_Connection(self).run, name=name, daemon=True)
            self.connections.append(thread)
            thread.start()

    def _hash_all(self) -> None:
        """The hash's thread: hash the finished prefix as it grows, until the whole file is hashed.

        In bounded steps (see PrefixHasher.step), so that it notices soon when the pass stops.
        """
        table, hasher = self.table, self.hasher
        try:
            while (
                hasher.hashed < self.file.size
                and not self.stop.is_set()
                and not self.transfer.cancel.is_set()
            ):
                self.prefix_news.clear()  # before reading the prefix: news after this is not lost
                try:
                    hashed = hasher.step(table.prefix_end())
                except OSError as error:
                    raise StorageError(f"{self.transfer.partial_path}: {error}") from None
                if self.pages is not None:
                    self.pages.hashed_up_to(hashed)
                if hashed < self.file.size and hashed == table.prefix_end():
                    self.prefix_news.wait(0.2)
        except BaseException as error:  # handed to the coordinator, which raises it
            self.fail(error)
        finally:
            self.table.notify()

    def checkpoint(self, *, sync: bool = False) -> None:
        """Save the segment table; first flush the data to disk if ``sync``, or if it is time to.

        Without a flush the table still holds after ``kill -9`` (the page cache keeps what was written);
        the flush, every ``SYNC_INTERVAL`` seconds, is what also makes it hold after a power cut.
        """
        rows = self.table.take_rows()
        now = time.monotonic()
        synced = sync or self.clock.sync_due(now)
        try:
            if synced:
                os.fdatasync(self.fd) if hasattr(os, "fdatasync") else os.fsync(self.fd)
            self.state.save(rows, synced=synced)
        except OSError as error:
            synced = False
            logger.warning("could not save resume state for %s: %s", self.file.path, error)
        self.clock.saved(time.monotonic(), synced=synced)

    def _end(self) -> None:
        """Stop the pass's connections and close its file once none of them can write to it any more.

        A connection blocked in a read returns within the stall timeout. If one is still alive after
        that (or after a short wait when the user interrupted), the descriptor is left open rather than
        closed: a closed descriptor number can be reused by another file, which the connection would
        then write into.
        """
        self.stop.set()
        self.prefix_news.set()
        if self.handed is not None:
            self.handed.close()
        if self.hashing.is_alive():
            self.hashing.join()  # it reads from the descriptor; it stops after the block it is on
        if self.pages is not None:
            self.pages.close()
        options = self.transfer.options
        patience = 2.0 if self.transfer.cancel.is_set() else options.stall_timeout + constants.CONNECT_TIMEOUT
        deadline = time.monotonic() + patience
        for connection in self.connections:
            connection.join(max(0.0, deadline - time.monotonic()))
        if self._running():
            logger.warning("%s: a connection did not stop in time; leaving its file open", self.file.path)
            return
        os.close(self.fd)


class _Connection:
    """One connection of a pass: takes segments from the table, asks for them, writes what comes.

    Thin on purpose: the table decides what to fetch, the policy what an answer means, the transfer
    which endpoint to ask.
    """

    def __init__(self, a_pass: _Pass) -> None:
        self.a_pass = a_pass
        self.transfer = a_pass.transfer
        self.table = a_pass.table
        self.file = a_pass.file

    def _stopped(self) -> bool:
        return self.a_pass.stop.is_set() or self.transfer.cancel.is_set()

    def run(self) -> None:
        try:
            while not self._stopped():
                segment = self.table.claim()
                if segment is None:
                    if not self.table.unfinished() or not self.table.ranges_supported:
                        return
                    self.a_pass.stop.wait(0.1)  # others are still at it: look again for a slow one to split
                    continue
                try:
                    self._fetch_segment(segment)
                finally:
                    self.table.release(segment)
        except BaseException as error:  # handed to the coordinator, which raises it
            self.a_pass.fail(error)
        finally:
            self.table.notify()

    def _fetch_segment(self, segment: Segment) -> None:
        """Fill ``segment``, retrying failed requests with backoff; give up after MAX_RETRIES in a row.

        Each request goes to the transfer's endpoint: the run's current one, unless that one said it
        does not have this file, in which case the next one is asked.
        """
        transfer = self.transfer
        failures = 0
        while self.table.remaining_of(segment) > 0 and not self._stopped():
            endpoint = transfer.endpoint()
            try:
                if not endpoint.governor.acquire(self.a_pass.stop, priority=self.a_pass.priority(endpoint)):
                    return
            except QuotaExhaustedError as error:
                if transfer.refuse(endpoint, quota_spent(error)):
                    continue  # the run has moved on to another endpoint
                raise  # not reached: on the last endpoint, refuse() raises what each endpoint said
            start_pos = segment.pos
            try:
                self._request(endpoint, segment, sent_at=time.monotonic())
                endpoint.governor.on_success()
                transfer.pool.report_success(endpoint)
                failures = 0
                continue
            except _Judged as judged:
                verdict = judged.verdict
            finally:
                endpoint.governor.release()
            failures = 0 if segment.pos > start_pos else failures + 1
            if verdict.action is Action.FAIL_OVER and transfer.refuse(endpoint, verdict):
                continue  # another endpoint takes over, at once
            wait = settle(verdict, endpoint, transfer.pool, transfer.stats, attempt=failures)
            if failures > constants.MAX_RETRIES:
                raise NetworkError(
                    f"{self.file.path}: gave up after {failures} failed attempts: "
                    f"{endpoint.shown}: {verdict.reason}"
                ) from None
            if transfer.endpoint() is endpoint:  # not if the run has just moved on to another endpoint
                logger.info("%s: %s; retrying in %.1fs", self.file.path, verdict.reason, wait)
                announce_retry(endpoint, verdict, wait, failures)
                self.a_pass.stop.wait(wait)  # set on Ctrl-C too, by the coordinator

    def _request(self, endpoint: Endpoint, segment: Segment, *, sent_at: float) -> int:
        """One GET for the rest of ``segment``. Returns the bytes written; raises _Judged or worse."""
        state, transfer = self.a_pass.state, self.transfer
        url = endpoint.resolve_url(
            transfer.listing.repo_type, transfer.listing.repo_id, transfer.listing.commit, self.file.path
        )
        start, end = segment.pos, segment.pos + self.table.remaining_of(segment)
        headers = {}
        if self.table.ranges_supported and (start > 0 or end < self.file.size):
            headers["Range"] = f"bytes={start}-{end - 1}"
            validator = state.validators.get(endpoint.host)
            if validator:
                headers["If-Range"] = validator
        if transfer.options.token and endpoint.sends_token:
            headers["Authorization"] = f"Bearer {transfer.options.token}"
        session = transfer.session_for()
        endpoint.requests += 1
        try:
            response = session.get(
                url,
                headers=headers,
                stream=True,
                timeout=(constants.CONNECT_TIMEOUT, transfer.options.stall_timeout),
                allow_redirects=True,
            )
        except TRANSPORT_ERRORS as error:
            verdict = judge_transport_error(
                error, transfer.asked(endpoint), timeout=transfer.options.stall_timeout
            )
            raise _Judged(verdict) from None
        with response:
            # The endpoint's own answer says how much of its quota is left (a CDN's, after a redirect, not).
            first_hop = response.history[0] if response.history else response
            endpoint.governor.observe(first_hop.headers, sent_at)
            self._check_answer(endpoint, response, start, headers)
            # A server that ignores Range sends the whole file: the bytes held already are read past.
            held = start if "Range" not in headers else 0
            return self._stream_into(response, segment, held=held)

    def _check_answer(self, endpoint: Endpoint, response: requests.Response, start: int, sent: dict) -> None:
        """Raise unless the answer's body is the bytes asked for (the policy judges; this acts)."""
        transfer = self.transfer
        verdict = judge_file_answer(
            response, transfer.asked(endpoint), sent=sent, start=start, size=self.file.size, oid=self.file.oid
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
            transfer.remember_validator(self.a_pass.state, endpoint.host, etag)

    def _stream_into(self, response: requests.Response, segment: Segment, *, held: int = 0) -> int:
        """Copy the body into the file at ``segment.pos`` until the segment (which may shrink) is full.

        The body begins ``held`` bytes before ``segment.pos`` (a server that ignores Range, asked
        again after a drop, starts from byte 0): those are read and dropped, never written over what
        is there. Each block is received straight into one reused buffer and written from there. A
        body read to its end hands its connection back to the pool for the next piece; one left
        unfinished (the segment shrank, the pass ended) closes it when the response is closed.
        """
        body = _body_reader(response)
        # A segment only ever shrinks: a small file needs no 1 MiB buffer.
        own = memoryview(bytearray(max(1, min(_largest_read(), self.table.remaining_of(segment)))))
        self._read_past(body, held, own)
        handed = self.a_pass.handed
        written = 0
        while True:
            want = self.table.next_read(segment)
            if want <= 0 or self._stopped():
                break
            # Bytes the hash needs next go to it in memory: received into a buffer lent for the purpose.
            asked_at = time.monotonic()
            lent = handed.borrow(self._stopped) if handed and self.table.at_front(segment) else None
            waited = time.monotonic() - asked_at
            buffer = own if lent is None else lent
            try:
                usable, offset = self._receive_and_write(body, segment, buffer, want)
            except BaseException:
                if lent is not None:
                    handed.give_back(lent)
                raise
            if usable <= 0:  # this pass ended while we were reading
                if lent is not None:
                    handed.give_back(lent)
                break
            # Handed before the table records it: once the prefix has grown, the hash would otherwise
            # read the block back from the file. It hashes no byte beyond the prefix the table has.
            if lent is not None:
                handed.hand(offset, lent[:usable], lent)
            progress = self.table.written(segment, usable, time.monotonic(), waited=waited)
            # Wake the hash when the prefix may have grown: a handed block, a finished piece. Wake the
            # coordinator only when it has something to do: more connections to start, or a save
            # (once: from there the coordinator times its own wait to the next save).
            if progress.finished or lent is not None:
                self.a_pass.prefix_news.set()
            if progress.opened or progress.save_due:
                self.table.notify()
            if progress.all_in and self.a_pass.pages is not None:
                self.a_pass.pages.flush()
            written += usable
            self.transfer.stats.add(bytes_fetched=usable)
            self.transfer.on_bytes(usable)
        if body is not response.raw and body.isclosed():
            response.raw.release_conn()  # the whole body was read: keep the connection for the next piece
        return written

    def _receive_and_write(
        self, body: _Body, segment: Segment, buffer: memoryview, want: int
    ) -> tuple[int, int]:
        """Receive up to ``want`` bytes of ``segment`` into ``buffer`` and write them at their offset;
        return how many were written (0: the pass ended meanwhile) and where."""
        try:  # the network read alone: a failing disk write below must not look like a lost connection
            count = body.readinto(buffer[:want])
        except TRANSPORT_ERRORS as error:
            raise _retry(f"connection lost at byte {segment.pos} ({type(error).__name__})") from None
        if not count:
            raise _retry(f"body ended early at byte {segment.pos}")
        offset, usable = self.table.writable(segment, count)
        if usable <= 0 or self.a_pass.stop.is_set():
            return 0, offset
        self._write(buffer[:usable], offset)
        return usable, offset

    def _read_past(self, body: _Body, held: int, buffer: memoryview) -> None:
        """Read the first ``held`` bytes of ``body`` into ``buffer`` and forget them (a drop is retried)."""
        left = held
        while left > 0 and not self._stopped():
            try:
                count = body.readinto(buffer[: min(len(buffer), left)])
            except TRANSPORT_ERRORS as error:
                name = type(error).__name__
                raise _retry(f"connection lost reading past the {held} bytes already held ({name})") from None
            if not count:
                raise _retry(f"body ended before the {held} bytes already held")
            left -= count

    def _write(self, data: memoryview, offset: int) -> None:
        try:
            os.pwrite(self.a_pass.fd, data, offset)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise StorageError(
                    f"disk full while writing {self.file.path}; partial data kept, free space and re-run"
                ) from None
            raise StorageError(f"cannot write {self.transfer.partial_path}: {error.strerror}") from None


def _largest_read() -> int:
    """The most one read of a connection asks for (see READ_BLOCK)."""
    return max(constants.READ_BLOCK, constants.FAST_READ_BLOCK, constants.PROBE_READ_BLOCK)


def _body_reader(response: requests.Response) -> _Body:
    """What to call ``readinto`` on for the raw body: the http.client response inside urllib3's.

    urllib3's own ``read``/``readinto`` return a fresh bytes object per block after copying it twice;
    http.client's ``readinto`` receives straight into the caller's buffer, for a fraction of the CPU
    (bench/RESULTS.md, Analysis: session 3). Content decoding is off either way: the bytes must hash to
    the listed checksum as sent. Should urllib3 ever stop wrapping an http.client response, its own
    (slower) ``readinto`` is used.
    """
    inner = getattr(response.raw, "_fp", None)
    return inner if isinstance(inner, http.client.HTTPResponse) else response.raw
