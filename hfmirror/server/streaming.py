"""Streaming a file to clients while it is being filled, without ever completing a wrong one.

The bytes come from the cache's partial file; what has been written is read from its resume state
(the segment table the downloader saves every few MiB), so this works whichever process fetches.
A range not written yet is waited for. The file's last :data:`HOLD_BACK` bytes are held back from
every answer that reaches them until the file's checksum has matched, which shows as the blob
appearing with the very inode being read (the downloader renames the verified partial file into
place). If instead the partial file is replaced (a mismatch: the downloader discards it and starts
again) or the fill fails, the connection is cut: a client may see a short body, never a complete
wrong file. A client that resumes after the cut (huggingface_hub resumes with a bare ``Range``) would
join bytes of the discarded attempt to verified ones, so for a day after a cut, range requests for
that file get the whole file (200), which makes such clients start over.

The filler's checksum vouches for the bytes it wrote, not for the bytes this process reads back: a
replica on NFS may read stale pages of a partial file another replica is writing. So a whole-file
answer also hashes exactly the bytes it sends, and its last block leaves only once that hash matches
the listing (else the connection is cut). A range answer cannot be checked that way (it holds only
part of the file); its client has to check the file it assembles.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import mimetypes
import os
import time
from collections.abc import Callable
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..hashing import ContentHasher
from ..listing import RemoteFile
from ..resume import ResumeState
from .eviction import InUse
from .fills import Fill
from .hubapi import CHUNK_SIZE, HubError

__all__ = ["CUT_MARKER_SUFFIX", "HOLD_BACK", "FillReader", "FillingFileResponse", "parse_range", "was_cut"]

logger = logging.getLogger(__name__)

HOLD_BACK = 1024 * 1024  # the last bytes of an answer wait for the checksum
POLL_SECONDS = 0.05  # how often a waiting stream looks at the partial file again
# Beside a blob whose answer was cut (its client holds bytes that may be wrong): for a day, a range
# request for it is answered with the whole file, so a client resuming (huggingface_hub does, with a
# bare Range) starts again from byte 0 instead of completing a wrong file.
CUT_MARKER_SUFFIX = ".hfmirror.cut"
CUT_MEMORY_SECONDS = 86400.0


def cut_marker(blob: Path) -> Path:
    return blob.with_name(blob.name + CUT_MARKER_SUFFIX)


def was_cut(blob: Path) -> bool:
    """Whether an answer for ``blob`` was cut short within the last day (see CUT_MARKER_SUFFIX)."""
    try:
        return time.time() - cut_marker(blob).stat().st_mtime < CUT_MEMORY_SECONDS
    except OSError:
        return False


class FillState(enum.Enum):
    FILLING = "filling"  # the partial file being read is still the one being written
    VERIFIED = "verified"  # it has become the blob: every byte of it is right
    REPLACED = "replaced"  # it was discarded: what was read from it may be wrong


class FillReader:
    """Reads a partial file as it fills, and says how much of it is written and whether it is verified."""

    def __init__(self, file: RemoteFile, blob: Path, partial: Path, state: Path) -> None:
        self.file = file
        self.blob = blob
        self.partial = partial
        self.state_path = state
        self.fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._verified = False

    def open(self) -> bool:
        """Open the blob (if verified already) or the partial file; False if neither exists yet."""
        for path, verified in ((self.blob, True), (self.partial, False)):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            st = os.fstat(fd)
            self.fd, self._identity, self._verified = fd, (st.st_dev, st.st_ino), verified
            return True
        return False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _is_ours(self, path: Path) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    def state(self) -> FillState:
        if self._verified or self._is_ours(self.blob):
            self._verified = True
            return FillState.VERIFIED
        if self._is_ours(self.partial):
            return FillState.FILLING
        # The rename into place may have happened between the two looks.
        if self._is_ours(self.blob):
            self._verified = True
            return FillState.VERIFIED
        return FillState.REPLACED

    def written_from(self, pos: int) -> int:
        """End of the run of written bytes that starts at ``pos`` (``pos`` itself if none is known)."""
        if self.state() is FillState.VERIFIED:
            return self.file.size
        saved = ResumeState.load(self.state_path, self.file)
        if saved is None or self.state() is not FillState.FILLING:  # the table must be of our file
            return pos
        return saved.table.written_from(pos)

    def read(self, pos: int, count: int) -> bytes:
        assert self.fd is not None
        return os.pread(self.fd, count, pos)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``Range: bytes=a-b`` (one range) as ``(start, end)`` with ``end`` exclusive; None for the whole.

    Raises:
        HubError: 416 if the range starts past the end.
    """
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[len("bytes=") :].strip().partition("-")
    try:
        if not first:  # the last N bytes
            count = int(last)
            return (max(0, size - count), size) if count > 0 else None
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    except ValueError:
        return None
    if start >= size or end <= start:
        raise HubError(416, f"range not satisfiable: {header[:60]}")
    return start, end


class FillingFileResponse(Response):
    """A resolve answer for a file that is still arriving from the upstream."""

    def __init__(
        self,
        fill: Fill,
        headers: dict[str, str],
        byte_range: tuple[int, int] | None,
        *,
        in_use: InUse,
        first_byte_timeout: float,
        stall_timeout: float,
        error_response: Callable[[BaseException], Response],
        on_cut: Callable[[str], None],
        on_finish: Callable[[], None],
    ) -> None:
        self.fill = fill
        self.file = fill.file
        self.byte_range = byte_range
        self.in_use = in_use
        self.first_byte_timeout = first_byte_timeout
        self.stall_timeout = stall_timeout
        self.error_response = error_response
        self.on_cut = on_cut
        self.on_finish = on_finish
        self.extra_headers = dict(headers)
        self.status_code = 206 if byte_range is not None else 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reader = FillReader(self.file, self.fill.blob, self.fill.partial, self.fill.state)
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, gone))
        try:
            with self.in_use.holding(self.fill.blob, self.fill.partial):
                problem = await self._first_bytes(reader)
                if problem is not None:
                    await problem(scope, receive, send)
                else:
                    await self._stream(reader, send, gone)
        finally:
            watcher.cancel()
            reader.close()
            self.on_finish()

    @property
    def _span(self) -> tuple[int, int]:
        return self.byte_range if self.byte_range is not None else (0, self.file.size)

    def _failed(self) -> bool:
        return self.fill.done.is_set() and self.fill.error is not None

    async def _first_bytes(self, reader: FillReader) -> Response | None:
        """Wait until bytes at the answer's start are there; an error answer instead if none come."""
        start, _ = self._span
        deadline = time.monotonic() + self.first_byte_timeout
        while True:
            if reader.fd is not None or reader.open():
                if reader.state() is FillState.VERIFIED:
                    return None
                if await run_in_threadpool(reader.written_from, start) > start:
                    return None
            if self._failed() and self.fill.error is not None:
                return self.error_response(self.fill.error)
            if time.monotonic() > deadline:
                message = f"the upstream sent none of {self.file.path} within {self.first_byte_timeout:.0f} s"
                return HubError(504, message).response()
            await asyncio.sleep(POLL_SECONDS)

    async def _stream(self, reader: FillReader, send: Send, gone: asyncio.Event) -> None:
        start, end = self._span
        headers = self._raw_headers()
        await send({"type": "http.response.start", "status": self.status_code, "headers": headers})
        if start == end:  # an empty file: nothing to send but the end
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        hold_from = min(end, max(start, self.file.size - HOLD_BACK))  # the file's last block waits
        # A whole-file answer hashes what it sends: its last block also waits for that hash to match.
        hasher = ContentHasher(self.file.oid, self.file.size) if (start, end) == (0, self.file.size) else None
        pos, last_progress = start, time.monotonic()
        while pos < end and not gone.is_set():
            state = reader.state()
            if state is FillState.REPLACED:
                return self._cut("the partial file was discarded (a checksum mismatch, or a restart)")
            if state is FillState.VERIFIED:
                if hasher is not None and pos == hold_from:
                    return await self._send_checked_tail(reader, hasher, pos, send)
                limit = end if hasher is None else hold_from
            elif self._failed():
                return self._cut(f"the fill failed: {self.fill.error}")
            else:
                limit = min(await run_in_threadpool(reader.written_from, pos), hold_from)
            if limit > pos:
                chunk = await run_in_threadpool(
                    _read_hashed, reader, hasher, pos, min(CHUNK_SIZE, limit - pos)
                )
                if not chunk:
                    return self._cut("the partial file is shorter than its table says")
                pos += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": pos < end})
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > self.stall_timeout:
                return self._cut(f"no new bytes for {self.stall_timeout:.0f} s")
            else:
                await asyncio.sleep(POLL_SECONDS)

    async def _send_checked_tail(
        self, reader: FillReader, hasher: ContentHasher, pos: int, send: Send
    ) -> None:
        """Send the held-back last block (from ``pos``) only if the whole answer then hashes to the
        listing's checksum: the filler verified what it wrote, this checks what this process read."""
        count = self.file.size - pos  # at most HOLD_BACK, so it is held in memory while it is checked
        tail = await run_in_threadpool(_read_hashed, reader, hasher, pos, count)
        if len(tail) != count:
            return self._cut("the file is shorter than the listing says")
        digest = hasher.hexdigest()
        if digest != self.file.oid:
            return self._cut(f"the bytes read hash to {digest}, not to the listed {self.file.oid}")
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    def _raw_headers(self) -> list[tuple[bytes, bytes]]:
        start, end = self._span
        headers = dict(self.extra_headers)
        headers["Content-Length"] = str(end - start)
        headers["Content-Type"] = mimetypes.guess_type(self.file.path)[0] or "application/octet-stream"
        if self.byte_range is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{self.file.size}"
        return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    def _cut(self, reason: str) -> None:
        """End the answer without its last bytes (the server then closes the connection), and remember
        it, so that this client's resumption starts over (see CUT_MARKER_SUFFIX)."""
        logger.warning("cutting the answer for %s: %s", self.file.path, reason)
        try:
            cut_marker(self.fill.blob).touch()
        except OSError as error:
            logger.warning("could not record the cut answer for %s: %s", self.file.path, error)
        self.on_cut(reason)


def _read_hashed(reader: FillReader, hasher: ContentHasher | None, pos: int, count: int) -> bytes:
    """Up to ``count`` bytes at ``pos``, fed to ``hasher`` too (on a worker thread: sha256 of 1 MiB
    takes milliseconds, which the event loop's other clients should not wait for)."""
    chunk = reader.read(pos, count)
    if hasher is not None:
        hasher.update(chunk)
    return chunk


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return
