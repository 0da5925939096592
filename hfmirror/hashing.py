"""The two checksums the Hub uses to name file contents.

* Regular (small, non-LFS) files are named by their **git blob sha1**:
  ``sha1(b"blob <size>\\0" + content)``, 40 hex digits.
* LFS files (weights, anything large) are named by the **sha256** of their content, 64 hex digits.

The Hub sends one of these as a file's ETag, and the Hugging Face cache names blobs after it, so the
length of the hex string tells which hash to compute.
"""

from __future__ import annotations

import hashlib
import os
import re

from . import constants

__all__ = [
    "ContentHasher",
    "PrefixHasher",
    "file_digest",
    "git_blob_sha1",
    "git_blob_sha1_of_file",
    "is_git_sha1",
    "is_sha256",
    "sha256_of_file",
]

_HEX40 = re.compile(r"[0-9a-f]{40}")  # fullmatch: "$" would let a trailing newline through
_HEX64 = re.compile(r"[0-9a-f]{64}")
_READ_BLOCK = 8 * 1024 * 1024


def is_git_sha1(value: str) -> bool:
    """True for 40 lowercase hex digits (a git blob or commit id)."""
    return bool(_HEX40.fullmatch(value))


def is_sha256(value: str) -> bool:
    """True for 64 lowercase hex digits (an LFS object id)."""
    return bool(_HEX64.fullmatch(value))


class ContentHasher:
    """Incremental hasher that computes whichever checksum ``expected`` is written in.

    Feed it the file's bytes in order with :meth:`update`; :meth:`hexdigest` gives the same kind of
    value as ``expected`` (git blob sha1 for 40 hex digits, sha256 for 64).
    """

    def __init__(self, expected: str, size: int) -> None:
        if is_sha256(expected):
            self.kind = "sha256"
            self._hash = hashlib.sha256()
        elif is_git_sha1(expected):
            self.kind = "git-sha1"
            self._hash = hashlib.sha1()
            self._hash.update(b"blob %d\0" % size)
        else:
            raise ValueError(f"not a sha1 or sha256 hex digest: {expected!r}")

    def update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class PrefixHasher:
    """Hashes a partial file front to back while the rest of it is still arriving.

    The bytes ``[0, hashed)`` are hashed; :meth:`step` reads back from ``fd`` what has been written
    beyond that (up to the finished prefix it is given) and hashes it, in bounded steps so that its
    caller gets its turn in between (to save resume state, to notice errors and Ctrl-C). Each step
    hashes at most ``HASH_STEP`` bytes, and ends after the first block at which ``stop_early()`` says
    something more urgent is due: on a busy machine 8 MiB of sha256 can take 20-30 ms, in which
    eight fast connections bring several MiB that a save should not wait for.
    """

    BLOCK = 1024 * 1024

    def __init__(self, fd: int, expected: str, size: int) -> None:
        self.fd = fd
        self.size = size
        self.hashed = 0
        self._hasher = ContentHasher(expected, size)
        self._buffer = memoryview(bytearray(self.BLOCK))  # reused: fresh memory is slow to touch

    def step(self, prefix_end: int, *, stop_early=lambda: False) -> int:
        """Hash on towards ``prefix_end`` (bytes before it are final); return the new ``hashed``.

        Raises:
            OSError: if the bytes cannot be read back (a short read raises too).
        """
        upto = min(prefix_end, self.hashed + constants.HASH_STEP)
        while self.hashed < upto:
            count = os.preadv(self.fd, [self._buffer[: min(self.BLOCK, upto - self.hashed)]], self.hashed)
            if count <= 0:
                raise OSError(f"could not read back bytes {self.hashed}-{upto} that were written")
            self._hasher.update(self._buffer[:count])
            self.hashed += count
            if stop_early():
                break
        return self.hashed

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of ``data`` (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _stream_file(path: str | os.PathLike[str], update) -> None:
    """Feed the file's bytes, in order and in large blocks, to ``update``."""
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            update(block)


def file_digest(path: str | os.PathLike[str], expected: str) -> str:
    """Hash the file at ``path`` with the algorithm ``expected`` is written in; return the hex digest."""
    hasher = ContentHasher(expected, os.path.getsize(path))
    _stream_file(path, hasher.update)
    return hasher.hexdigest()


def sha256_of_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of the file at ``path`` (the LFS object id)."""
    digest = hashlib.sha256()
    _stream_file(path, digest.update)
    return digest.hexdigest()


def git_blob_sha1_of_file(path: str | os.PathLike[str]) -> str:
    """The git blob id of the file at ``path``, streamed (``git_blob_sha1`` needs the bytes in memory)."""
    digest = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    _stream_file(path, digest.update)
    return digest.hexdigest()
