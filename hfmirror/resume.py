"""What survives a killed process: the resume state of a partial file, and when to save it.

:class:`ResumeState` is the one reader and writer of ``<partial>.hfmirror.json``. Two tables are
saved: ``segments``, what has been written (the page cache holds it, so it survives the process being
killed), and ``durable``, what an ``fdatasync`` has since put on disk (it also survives a power cut).
The file names the boot it was written in; a run in the same boot trusts ``segments``, a run after a
reboot only ``durable``. Anything that wants to know how far a partial download got (the demo, the
tests, the benchmarks) asks :meth:`ResumeState.saved_bytes` rather than reading the JSON itself.

:class:`CheckpointClock` says when a save is due: every ``CHECKPOINT_BYTES`` of new data (at most once
per ``CHECKPOINT_MIN_GAP``) or ``CHECKPOINT_INTERVAL`` seconds, whichever comes first, with a flush of
the data first every ``SYNC_INTERVAL`` seconds (see those constants for why).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from . import constants
from .listing import RemoteFile
from .segments import ConnectionRamp, Segment, SegmentTable

__all__ = ["CheckpointClock", "ResumeState", "boot_id"]

_STATE_VERSION = 2


@functools.cache
def boot_id() -> str | None:
    """This boot's id (Linux), or None where there is none: then every checkpoint syncs first."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


class ResumeState:
    """The saved segment table of one partial file, and what the server said about it."""

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
        self.table = SegmentTable(segments, file.size, ranges_supported=ranges_supported)
        self.validators = dict(validators or {})  # host -> strong ETag of the bytes we hold
        self.durable: list[list[int]] = self.table.rows()  # as of the last sync

    @classmethod
    def fresh(cls, path: Path, file: RemoteFile, *, ranges_supported: bool = True) -> ResumeState:
        """One segment for the whole file; it is cut into pieces if more connections open."""
        segments = [Segment(0, 0, file.size)] if file.size else []
        return cls(path, file, segments, ranges_supported=ranges_supported)

    @classmethod
    def load(cls, path: Path, file: RemoteFile) -> ResumeState | None:
        """The saved state, or None if there is none or it is for other content, or damaged."""
        data = _read(path)
        if data is None or data["oid"] != file.oid or data["size"] != file.size:
            return None
        rows = _trusted_rows(data)
        if rows is None or not _covers(rows, file.size):
            return None
        state = cls(
            path,
            file,
            [Segment(a, p, b) for a, p, b in rows],
            validators=data.get("validators", {}),
            ranges_supported=data.get("ranges_supported", True),
        )
        if _same_boot(data):
            state.durable = _rows(data["durable"]) or []  # a valid table: _read checked it
        return state

    @staticmethod
    def saved_bytes(path: Path) -> int:
        """How many bytes the state at ``path`` vouches for (0 if there is none, or it is damaged or
        being replaced): what a run started now would keep."""
        data = _read(path)
        rows = _trusted_rows(data) if data is not None else None
        return sum(pos - start for start, pos, _ in rows) if rows is not None else 0

    @property
    def ranges_supported(self) -> bool:
        return self.table.ranges_supported

    @ranges_supported.setter
    def ranges_supported(self, value: bool) -> None:
        self.table.ranges_supported = value

    @property
    def done_bytes(self) -> int:
        return self.table.done_bytes

    def start_attempt(self, connections: int, now: float) -> SegmentTable:
        """The table, with a fresh connection ramp for a new pass over the file."""
        self.table.ramp = ConnectionRamp(connections, now)
        return self.table

    def save(self, rows: list[list[int]], *, synced: bool) -> None:
        """Write ``rows`` (taken with ``SegmentTable.take_rows``) atomically; ``synced`` if the data was
        flushed to disk just before, which makes them the durable table too."""
        if synced:
            self.durable = rows
        snapshot: dict[str, Any] = {
            "version": _STATE_VERSION,
            "path": self.file.path,
            "oid": self.file.oid,
            "size": self.file.size,
            "boot_id": boot_id(),
            "ranges_supported": self.ranges_supported,
            "validators": dict(self.validators),
            "segments": rows,
            "durable": self.durable,
        }
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(snapshot))
        os.replace(temporary, self.path)


def _read(path: Path) -> dict[str, Any] | None:
    """The saved JSON, if it is a state this version can read, with every field of the right type.

    The file may be damaged (a disk error, a hand edit, another program): whatever it holds, a bad
    state is no state (the file is fetched again), never an exception.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") not in (1, _STATE_VERSION):
        return None
    if not isinstance(data.get("oid"), str) or type(data.get("size")) is not int:
        return None
    validators = data.get("validators", {})
    if not isinstance(validators, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in validators.items()
    ):
        return None
    if not isinstance(data.get("ranges_supported", True), bool):
        return None
    if _rows(data.get("segments")) is None:
        return None
    if data["version"] != 1 and _rows(data.get("durable")) is None:
        return None
    return data


def _rows(table: object) -> list[list[int]] | None:
    """A saved table as ``[start, pos, end]`` rows with ``start <= pos <= end``; None if it is not one."""
    if not isinstance(table, list):
        return None
    rows = []
    for row in table:
        if not (isinstance(row, list) and len(row) == 3 and all(type(n) is int for n in row)):
            return None
        start, pos, end = row
        if not 0 <= start <= pos <= end:
            return None
        rows.append([start, pos, end])
    return rows


def _same_boot(data: dict[str, Any]) -> bool:
    this_boot = boot_id()
    return data["version"] != 1 and this_boot is not None and data.get("boot_id") == this_boot


def _trusted_rows(data: dict[str, Any]) -> list[list[int]] | None:
    """The table to trust: what was written, in the boot it was written in (version 1 synced before
    every save, so its one table is durable); after a reboot, only what was synced."""
    return _rows(data["segments"] if _same_boot(data) or data["version"] == 1 else data["durable"])


def _covers(rows: list[list[int]], size: int) -> bool:
    """Whether the rows tile ``[0, size)`` exactly, in order, with no gap or overlap."""
    covered = 0
    for start, _, end in sorted(rows):
        if start != covered:
            return False
        covered = end
    return covered == size


class CheckpointClock:
    """When the resume state of a running transfer should be saved, and when the data flushed first."""

    def __init__(self, now: float) -> None:
        self.saved_at = now  # when the resume state was last saved
        self.synced_at = now  # when the data file was last flushed to disk

    def seconds_to_save(self, unsaved: int, now: float) -> float:
        """How long until a save is due, with ``unsaved`` bytes written since the last (0 or less: now).

        Every CHECKPOINT_BYTES of new data, but at most once per CHECKPOINT_MIN_GAP: on a fast link a
        kill then loses what arrived in that gap, which takes no longer to fetch again. And at least
        every CHECKPOINT_INTERVAL.
        """
        since_last = now - self.saved_at
        if unsaved >= constants.CHECKPOINT_BYTES:
            return constants.CHECKPOINT_MIN_GAP - since_last
        return constants.CHECKPOINT_INTERVAL - since_last

    def sync_due(self, now: float) -> bool:
        """Whether the next save should flush the data first: every SYNC_INTERVAL, and always where
        there is no boot id to tell a killed process (page cache intact) from a power cut."""
        return boot_id() is None or now - self.synced_at >= constants.SYNC_INTERVAL

    def saved(self, now: float, *, synced: bool) -> None:
        """Record a save (a failed one too: it is not retried at once either)."""
        self.saved_at = now
        if synced:
            self.synced_at = now
