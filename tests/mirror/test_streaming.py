"""Streaming a file being filled, step by step: the partial file and its resume state are set up as
the downloader leaves them, and a real server streams them to a real socket."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from hfmirror.layout import CacheLayout
from hfmirror.listing import RemoteFile, RepoListing
from hfmirror.resume import ResumeState
from hfmirror.segments import Segment
from hfmirror.server.app import ServerThread
from hfmirror.server.eviction import InUse
from hfmirror.server.fills import Fill
from hfmirror.server.hubapi import HubError
from hfmirror.server.streaming import HOLD_BACK, FillingFileResponse, FillReader, parse_range

SIZE = 3 * HOLD_BACK + 777


@pytest.fixture
def filling(tmp_path: Path) -> Fill:
    """A fill whose partial file holds every byte, as the downloader leaves it just before the hash."""
    content = os.urandom(SIZE)
    file = RemoteFile("w.bin", SIZE, hashlib.sha256(content).hexdigest())
    listing = RepoListing("org/m", "model", "main", "c" * 40, (file,))
    fill = Fill(listing, file, CacheLayout(listing, tmp_path))
    fill.partial.parent.mkdir(parents=True)
    fill.partial.write_bytes(content)
    write_table(fill, [Segment(0, SIZE, SIZE)])
    fill.content = content  # type: ignore[attr-defined]
    return fill


def write_table(fill: Fill, segments: list[Segment]) -> None:
    state = ResumeState(fill.state, fill.file, segments)
    state.save(state.table.rows(), synced=True)


@pytest.fixture
def streamed(filling: Fill) -> Iterator[socket.socket]:
    """A socket that has asked a server streaming ``filling`` for the whole file."""

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        response = FillingFileResponse(
            filling,
            {"ETag": f'"{filling.file.oid}"'},
            None,
            in_use=InUse(),
            first_byte_timeout=10,
            stall_timeout=60,
            error_response=lambda error: HubError(500, str(error)).response(),
            on_cut=lambda reason: None,
            on_finish=lambda: None,
        )
        await response(scope, receive, send)

    with ServerThread(app) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"GET /w.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        yield sock
        sock.close()


def receive(sock: socket.socket, *, until_quiet: float, enough: int | None = None) -> tuple[bytes, bool]:
    """Read until nothing arrives for ``until_quiet`` s (False), the server closes (True), or ``enough``
    bytes came (False)."""
    data = b""
    sock.settimeout(until_quiet)
    while enough is None or len(data) < enough:
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            return data, False
        if not chunk:
            return data, True
        data += chunk
    return data, False


def body_of(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[2]


def read_body(sock: socket.socket, count: int) -> bytes:
    """The response head and the first ``count`` body bytes (waiting up to 30 s for them)."""
    data = b""
    sock.settimeout(30)
    while b"\r\n\r\n" not in data or len(body_of(data)) < count:
        chunk = sock.recv(1 << 20)
        assert chunk, "the server closed early"
        data += chunk
    return data


def test_the_last_block_waits_for_the_checksum(filling: Fill, streamed: socket.socket) -> None:
    data = read_body(streamed, SIZE - HOLD_BACK)
    more, closed = receive(streamed, until_quiet=1.0)  # and then nothing, while unverified
    assert not closed and more == b""
    assert body_of(data) == filling.content[: SIZE - HOLD_BACK]  # type: ignore[attr-defined]
    os.replace(filling.partial, filling.blob)  # what the downloader does once the checksum matched
    rest, _ = receive(streamed, until_quiet=10.0, enough=HOLD_BACK)
    assert body_of(data) + rest == filling.content  # type: ignore[attr-defined]


def test_a_discarded_attempt_cuts_the_connection(filling: Fill, streamed: socket.socket) -> None:
    data = read_body(streamed, SIZE - HOLD_BACK)
    filling.partial.unlink()  # a mismatch: the downloader throws the attempt away...
    filling.partial.write_bytes(b"\0" * SIZE)  # ...and starts a new one
    rest, closed = receive(streamed, until_quiet=10.0)
    assert closed and rest == b""
    assert len(body_of(data)) == SIZE - HOLD_BACK  # never the whole file


def test_a_failed_fill_cuts_the_connection(filling: Fill, streamed: socket.socket) -> None:
    data = read_body(streamed, SIZE - HOLD_BACK)
    filling.error = OSError("the upstream went away for good")
    filling.done.set()
    rest, closed = receive(streamed, until_quiet=10.0)
    assert closed and len(body_of(data) + rest) == SIZE - HOLD_BACK


def test_the_reader_follows_the_segment_table(filling: Fill) -> None:
    third = SIZE // 3
    write_table(
        filling,
        [
            Segment(0, third, third),
            Segment(third, third + 100, 2 * third),
            Segment(2 * third, 2 * third, SIZE),
        ],
    )
    reader = FillReader(filling.file, filling.blob, filling.partial, filling.state)
    assert reader.open()
    assert reader.written_from(0) == third + 100  # a finished piece, then part of the next
    assert reader.written_from(third + 50) == third + 100
    assert reader.written_from(third + 100) == third + 100  # not there yet
    assert reader.written_from(2 * third) == 2 * third
    os.replace(filling.partial, filling.blob)  # verified: the file being read is now the blob
    assert reader.written_from(third + 100) == SIZE  # every byte, whatever the table said
    reader.close()


def test_the_reader_trusts_no_table_once_its_file_was_discarded(filling: Fill) -> None:
    write_table(filling, [Segment(0, SIZE // 2, SIZE)])
    reader = FillReader(filling.file, filling.blob, filling.partial, filling.state)
    assert reader.open() and reader.written_from(0) == SIZE // 2
    filling.partial.unlink()  # a mismatch: the downloader throws the attempt away...
    filling.partial.write_bytes(b"\0" * SIZE)  # ...and a new attempt writes another file
    write_table(filling, [Segment(0, SIZE, SIZE)])  # whose table says more
    assert reader.written_from(0) == 0  # the table is not of the file being read
    reader.close()


def test_range_header_parsing() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 10)
    assert parse_range("bytes=90-", 100) == (90, 100)
    assert parse_range("bytes=-5", 100) == (95, 100)
    assert parse_range("bytes=50-1000", 100) == (50, 100)
    assert parse_range("bytes=0-1,5-9", 100) is None  # several ranges: the whole file instead
    assert parse_range("items=0-9", 100) is None
    with pytest.raises(HubError) as error:
        parse_range("bytes=100-", 100)
    assert error.value.status == 416
