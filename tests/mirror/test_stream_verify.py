"""A replica streams what it reads of a file another replica fills, and checks that itself.

On NFS a replica may read stale pages of a partial file that another replica writes and verifies, so
the filler's checksum is no warrant for the bytes a streaming replica sends. No NFS here: the bytes
the streaming replica has not read yet are changed on disk after the filler verified them, which is
what a stale page looks like from the streaming side (the fill's own checksum passed).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from hfmirror.server.streaming import HOLD_BACK
from tests.mirror.conftest import BIG, Mirror, Upstream
from tests.mirror.support import MIB, wait_until

CORRUPT_AT = BIG - 3 * MIB  # far past what a stalled client lets the server send (socket buffers)


def _ask(url: str, path: str) -> socket.socket:
    """A connection that has asked for the whole of ``path`` and reads slowly: a small receive buffer,
    so the server can send only a few MiB (its send buffer) ahead of what the test has read."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(60)
    sock.connect((host, int(port)))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
    return sock


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The response head and whatever body came with it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "the server closed before answering"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def _read_rest(sock: socket.socket, body: bytes, size: int) -> bytes:
    """Read until ``size`` body bytes came or the server closed (a cut shows as a short body)."""
    chunks = [body]
    got = len(body)
    while got < size:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("stale", [False, True], ids=["same-bytes", "stale-bytes"])
def test_a_replica_never_sends_a_complete_file_it_read_wrong(
    upstream: Upstream,
    mirror: Callable[..., Mirror],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    stale: bool,
) -> None:
    content = (upstream.root / "big/one/weights.bin").read_bytes()
    blob = tmp_path / "shared" / "models--big--one" / "blobs" / hashlib.sha256(content).hexdigest()
    upstream.plan.limit_bandwidth(4 * MIB, path="*/weights.bin")  # the fill takes seconds
    filler = mirror(upstream.url, root=tmp_path / "shared", state_dir=tmp_path / "a", connections=2)
    replica = mirror(upstream.url, root=tmp_path / "shared", state_dir=tmp_path / "b", connections=2)
    commit = requests.get(f"{filler.url}/api/models/big/one", timeout=60).json()["sha"]
    path = f"/big/one/resolve/{commit}/weights.bin"  # a branch URL of an LFS file redirects here

    with contextlib.closing(_ask(filler.url, path)) as first:
        _read_head(first)  # the fill started: the filler holds the blob's lock
        with contextlib.closing(_ask(replica.url, path)) as sock:  # streams the partial file
            head, body = _read_head(sock)
            assert head.startswith(b"HTTP/1.1 200") and b"content-length: %d" % BIG in head.lower()
            wait_until(blob.exists, timeout=120)  # verified by the filler, renamed into place: same inode
            if stale:  # what the replica has yet to read now differs from what the filler verified
                with open(blob, "r+b") as f:
                    f.seek(CORRUPT_AT)
                    byte = f.read(1)
                    f.seek(CORRUPT_AT)
                    f.write(bytes([byte[0] ^ 0xFF]))
            with caplog.at_level(logging.WARNING, logger="hfmirror.server.streaming"):
                received = _read_rest(sock, body, BIG)
    if stale:
        assert len(received) == BIG - HOLD_BACK  # cut: the last block never left
        assert received[:CORRUPT_AT] == content[:CORRUPT_AT]
        assert "hash to" in caplog.text
    else:
        assert received == content
        assert "cutting" not in caplog.text
    assert os.path.getsize(blob) == BIG
