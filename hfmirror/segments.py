"""Which bytes of a file each connection fetches next: the segment table, and how many connections run.

A file being fetched is a table of **segments** ``[start, end)``, each written up to ``pos``. The
connections of a file share one :class:`SegmentTable`: they claim segments in file order, record what
they wrote, and, when the pieces run out, take the far half of a segment still running slowly (the
slow-tail re-split). The table owns its lock and does no I/O, so every scheduling decision can be
tested without a socket or a file; the coordinator waits on it for news.

A :class:`ConnectionRamp` (part of the table) decides how many connections a file may use: one at
first, all of them once that one proves slow alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import constants

__all__ = ["ConnectionRamp", "Segment", "SegmentTable", "WriteOutcome", "cut_into_pieces"]


@dataclass
class Segment:
    """Bytes ``[start, end)`` of the file (a piece), of which ``[start, pos)`` are written."""

    start: int
    pos: int
    end: int
    claimed: bool = False
    claimed_at: float = 0.0  # when a connection took it, and how far it was then: its speed since
    claimed_pos: int = 0

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def claim(self, now: float | None = None) -> None:
        self.claimed, self.claimed_pos = True, self.pos
        self.claimed_at = time.monotonic() if now is None else now

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


class ConnectionRamp:
    """How many of a file's connections may run: one at first, all once one proves too slow alone.

    The first connection is judged after ``RAMP_PROBE_SECONDS`` (counted from before its request, so
    a distant server's latency counts against it): below ``FAST_CONNECTION`` bytes/s, as behind any
    per-connection cap, every connection opens at once and stays open. One not clearly slow is judged
    once more at ``RAMP_PROBE_SECONDS_MAX``, on all it brought since its request. A connection that
    keeps up is judged again over each ``RAMP_WINDOW_SECONDS``, long enough that a hiccup of our own
    (a busy CPU) does not count as a slow link. While it keeps up, the file comes over that one
    connection: more would add nothing but CPU time here and load on the mirror.
    """

    def __init__(self, connections: int, now: float) -> None:
        self.connections = connections
        self.allowed = connections if constants.RAMP_PROBE_SECONDS <= 0 else 1
        self.probing = not self.open  # not judged yet: reads are kept small during the first look
        self.second_look = False  # not clearly slow at the first look: judged again, with large reads
        self._window = constants.RAMP_PROBE_SECONDS
        self._window_start = now
        self._window_bytes = 0

    @property
    def open(self) -> bool:
        return self.allowed >= self.connections

    def read_block(self) -> int:
        """How much a connection should ask one read for now (see READ_BLOCK)."""
        if self.probing and not self.second_look:
            return constants.PROBE_READ_BLOCK
        if not self.open:  # fast enough alone, so far: CPU, not the network, is what it waits for
            return constants.FAST_READ_BLOCK
        return constants.READ_BLOCK

    def observe(self, count: int, now: float, *, waited: float = 0.0) -> bool:
        """Record ``count`` new bytes at time ``now``, after the connection ``waited`` seconds for
        something of our own (the hash to catch up: not the link's time); True if this opened every
        connection."""
        if self.open:
            return False
        self._window_start += waited
        self._window_bytes += count
        elapsed = now - self._window_start
        if elapsed < self._window:
            return False
        slow = self._window_bytes < constants.FAST_CONNECTION * elapsed
        if slow and self.probing and not self.second_look:
            if self._window_bytes >= constants.FAST_CONNECTION / 4 * elapsed:  # not clearly slow
                self.second_look = True
                self._window = constants.RAMP_PROBE_SECONDS_MAX  # judged on all it brought so far
                return False
        self.probing = False
        if slow:
            self.allowed = self.connections
            return True
        self._window, self._window_start, self._window_bytes = constants.RAMP_WINDOW_SECONDS, now, 0
        return False


@dataclass(frozen=True)
class WriteOutcome:
    """What one recorded write changed, so that its connection knows whom to wake."""

    finished: bool  # its segment is complete: the hashed prefix may grow
    all_in: bool  # every byte of the file is written
    opened: bool  # the ramp just opened every connection
    save_due: bool  # the bytes written since the last save just crossed CHECKPOINT_BYTES


class SegmentTable:
    """The segments of one file, shared by its connections and its coordinator. Thread-safe.

    ``rows()`` is the table as the resume state saves it: ``[start, pos, end]`` in file order.
    """

    def __init__(
        self,
        segments: list[Segment],
        size: int,
        *,
        ranges_supported: bool = True,
        ramp: ConnectionRamp | None = None,
    ) -> None:
        self.size = size
        self.ranges_supported = ranges_supported
        self.ramp = ramp if ramp is not None else ConnectionRamp(1, now=time.monotonic())
        self._segments = list(segments)
        self._unsaved = 0  # bytes written since rows were last taken for a save
        # Reentrant, so that a caller's condition (see wait_while) may itself read the table.
        self._cond = threading.Condition(threading.RLock())

    @classmethod
    def from_rows(cls, rows: list[list[int]], size: int, **kwargs: object) -> SegmentTable:
        return cls([Segment(a, p, b) for a, p, b in rows], size, **kwargs)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ what is there

    def rows(self) -> list[list[int]]:
        with self._cond:
            return [[s.start, s.pos, s.end] for s in sorted(self._segments, key=lambda s: s.start)]

    def take_rows(self) -> list[list[int]]:
        """The rows, for a save: from now on, only bytes written after this count as unsaved."""
        with self._cond:
            self._unsaved = 0
            return self.rows()

    @property
    def unsaved(self) -> int:
        with self._cond:
            return self._unsaved

    @property
    def done_bytes(self) -> int:
        with self._cond:
            return sum(s.pos - s.start for s in self._segments)

    def prefix_end(self) -> int:
        """End of the contiguous finished run from byte 0."""
        with self._cond:
            for segment in sorted(self._segments, key=lambda s: s.start):
                if segment.pos < segment.end:
                    return segment.pos
            return self.size

    def at_front(self, segment: Segment) -> bool:
        """True if ``segment``'s next bytes are the next the hash of the finished prefix needs."""
        with self._cond:
            return segment.remaining > 0 and segment.pos == self.prefix_end()

    def written_from(self, pos: int) -> int:
        """End of the run of written bytes that starts at ``pos`` (``pos`` itself if none is written
        there): what a reader of the partial file may hand out, in order, from ``pos`` on."""
        with self._cond:
            end = pos
            for segment in sorted(self._segments, key=lambda s: s.start):
                if segment.end <= end:
                    continue
                if segment.start > end or segment.pos <= end:
                    break
                end = segment.pos
                if segment.pos < segment.end:
                    break
            return end

    def unfinished(self) -> bool:
        with self._cond:
            return any(s.remaining > 0 for s in self._segments)

    @property
    def remaining_bytes(self) -> int:
        with self._cond:
            return sum(s.remaining for s in self._segments)

    def active_connections(self) -> int:
        """Segments a connection is working on now."""
        with self._cond:
            return sum(1 for s in self._segments if s.claimed and s.remaining > 0)

    def per_connection_rate(self, now: float) -> float | None:
        """Bytes per second one connection of this file delivers, as measured on the segments running
        for long enough to tell (None before there is a fair measure)."""
        with self._cond:
            rates = [
                (s.pos - s.claimed_pos) / (now - s.claimed_at)
                for s in self._segments
                if s.claimed and now - s.claimed_at >= 0.2 and s.pos > s.claimed_pos
            ]
            return sum(rates) / len(rates) if rates else None

    def connections_worth_opening(self, most: int) -> int:
        """How many connections this table can keep busy, up to ``most``: one per open segment, or
        as many as the slow-tail re-split could make, whichever is more."""
        with self._cond:
            if not self.ranges_supported:
                return 1
            open_segments = sum(1 for s in self._segments if s.remaining > 0)
            splittable = sum(s.remaining for s in self._segments) // constants.MIN_SPLIT
            return max(1, min(most, max(open_segments, splittable)))

    # ------------------------------------------------------------------ scheduling

    def cut_for_connections(self) -> None:
        """Cut what is left into pieces for every connection the ramp allows.

        A running segment keeps one piece from where its connection is; that connection stops at the
        new end and takes the next free piece, so the file is still fetched in order.
        """
        with self._cond:
            for segment in list(self._segments):
                if segment.remaining < 2 * constants.MIN_SEGMENT:
                    continue
                pieces = cut_into_pieces(segment.pos, segment.end, self.ramp.connections)
                if len(pieces) < 2:
                    continue
                segment.end = pieces[0].end
                self._segments.extend(pieces[1:])

    def claim(self, now: float | None = None) -> Segment | None:
        """The next segment for a connection: the first unclaimed one, else the far half of a slow
        running one; None if there is nothing worth taking now."""
        now = time.monotonic() if now is None else now
        with self._cond:
            waiting = [s for s in self._segments if not s.claimed and s.remaining > 0]
            if waiting:
                segment = min(waiting, key=lambda s: s.start)
                segment.claim(now)
                return segment
            if not self.ranges_supported:
                return None
            # Split only where it pays: a segment big enough to halve that, at the speed its connection
            # has shown, still needs a while. On a fast link splitting would only throw away the bytes
            # already in flight past the new end.
            slow = [
                s
                for s in self._segments
                if s.claimed
                and s.remaining >= 2 * constants.MIN_SPLIT
                and s.seconds_left(now) > constants.SPLIT_IF_SECONDS_LEFT
            ]
            if not slow:
                return None
            slowest = max(slow, key=lambda s: s.seconds_left(now))
            middle = slowest.pos + slowest.remaining // 2
            tail = Segment(middle, middle, slowest.end)
            tail.claim(now)
            slowest.end = middle
            self._segments.append(tail)
            return tail

    def release(self, segment: Segment) -> None:
        """The connection working on ``segment`` stopped (done, failed or told to): others may take it."""
        with self._cond:
            segment.claimed = False

    def remaining_of(self, segment: Segment) -> int:
        with self._cond:
            return segment.remaining

    # ------------------------------------------------------------------ writing

    def next_read(self, segment: Segment) -> int:
        """How many bytes the connection on ``segment`` should ask its next read for (0: it is full)."""
        with self._cond:
            return max(0, min(self.ramp.read_block(), segment.remaining))

    def writable(self, segment: Segment, count: int) -> tuple[int, int]:
        """Where the ``count`` bytes just read for ``segment`` go, and how many of them to write: a
        re-split may have moved its end closer since the read was asked for."""
        with self._cond:
            return segment.pos, max(0, min(count, segment.remaining))

    def written(self, segment: Segment, count: int, now: float, *, waited: float = 0.0) -> WriteOutcome:
        """Record ``count`` bytes written at ``segment.pos`` (after its connection ``waited`` seconds
        for the hash: see ConnectionRamp.observe); cut for more connections if that makes the ramp
        open them."""
        with self._cond:
            # Never past the end: a re-split between writable() and now moved it; the bytes beyond it
            # were written where the new segment will write the very same ones.
            segment.pos = min(segment.pos + count, segment.end)
            self._unsaved += count
            opened = self.ramp.observe(count, now, waited=waited)
            if opened:
                self.cut_for_connections()
            crossed = self._unsaved - count < constants.CHECKPOINT_BYTES <= self._unsaved
            finished = segment.remaining <= 0
            all_in = finished and self.prefix_end() == self.size
            return WriteOutcome(finished=finished, all_in=all_in, opened=opened, save_due=crossed)

    def observe_time(self, now: float) -> bool:
        """Let the ramp judge a first connection that has brought nothing (a stall is slow too);
        True if every connection opened."""
        with self._cond:
            opened = self.ramp.observe(0, now)
            if opened:
                self.cut_for_connections()
            return opened

    # ------------------------------------------------------------------ waking the coordinator

    def notify(self) -> None:
        """Wake whoever waits in :meth:`wait_while`."""
        with self._cond:
            self._cond.notify_all()

    def wait_while(self, idle: Callable[[], bool], timeout: float) -> None:
        """Wait up to ``timeout`` if ``idle()`` holds, checked under the table's lock so that a
        :meth:`notify` between the check and the wait is not lost."""
        with self._cond:
            if idle():
                self._cond.wait(timeout)
