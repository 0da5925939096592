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
import threading
from collections.abc import Callable
from dataclasses import dataclass

from . import constants

__all__ = [
    "ContentHasher",
    "HandedBlocks",
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


@dataclass
class _Handed:
    offset: int  # where in the file the bytes were written
    data: memoryview  # the bytes written there
    buffer: memoryview  # the whole buffer they sit in, lent back to a connection once they are hashed

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


class HandedBlocks:
    """Blocks just written at the front of a file's hashed prefix, handed to its hasher in memory.

    Without them the hasher reads every byte back from the file after a connection wrote it: one more
    copy of the whole file, on the core the hash needs. A connection writing the very next bytes the
    hash will need borrows a buffer from this small pool (:meth:`borrow`), receives into it, writes it
    to the file, and hands it over (:meth:`hand`); the :class:`PrefixHasher` hashes it from there, and
    the buffer is free again.

    When every buffer is out, a connection waits for one while the hasher is working through handed
    blocks: on a fast link the hash is what the file waits for, and a receiver running ahead of it
    would only leave a tail to hash after the last byte. It does not wait while the hasher is still
    reading back older bytes (a resumed file): it gets None and uses a buffer of its own, whose bytes
    the hasher reads back later. Thread-safe.
    """

    def __init__(self, block_size: int, count: int) -> None:
        self.block_size = block_size
        self.count = count
        self._made = 0
        self._free: list[memoryview] = []
        self._handed: list[_Handed] = []
        self._hashed = 0  # the hasher's position, as it last said
        self._closed = False
        self._cond = threading.Condition()

    def borrow(self, stopped: Callable[[], bool]) -> memoryview | None:
        """A free buffer of ``block_size`` bytes, or None: use your own (see the class)."""
        with self._cond:
            while not self._closed and not stopped():
                if self._free:
                    return self._free.pop()
                if self._made < self.count:
                    self._made += 1  # made on first need: a file on a slow link never needs them all
                    return memoryview(bytearray(self.block_size))
                if not self._hasher_on_handed():
                    return None
                self._cond.wait(0.05)  # a hashed block, close() or the stop (checked again) ends it
            return None

    def give_back(self, buffer: memoryview) -> None:
        """A borrowed buffer that was not written after all."""
        with self._cond:
            self._free.append(buffer)
            self._cond.notify()

    def hand(self, offset: int, data: memoryview, buffer: memoryview) -> None:
        """``data`` (a view of the borrowed ``buffer``) is written at ``offset`` and final: hash it."""
        with self._cond:
            if self._closed or offset + len(data) <= self._hashed:  # already read back from the file
                self._free.append(buffer)
            else:
                self._handed.append(_Handed(offset, data, buffer))
            self._cond.notify()

    def close(self) -> None:
        """The pass is over: no one waits for a buffer any more."""
        with self._cond:
            self._closed = True
            self._handed.clear()
            self._cond.notify_all()

    def pending(self) -> bool:
        with self._cond:
            return bool(self._handed)

    # The hasher's side.

    def covering(self, pos: int) -> memoryview | None:
        """The handed bytes from ``pos`` on, as far as one block holds them (None if none does)."""
        with self._cond:
            for block in self._handed:
                if block.offset <= pos < block.end:
                    return block.data[pos - block.offset :]
            return None

    def next_start(self, pos: int) -> int | None:
        """Where the first handed block beyond ``pos`` starts: reading back from the file stops there."""
        with self._cond:
            starts = [block.offset for block in self._handed if block.offset > pos]
            return min(starts) if starts else None

    def hashed_up_to(self, pos: int) -> None:
        """Bytes before ``pos`` are hashed: the blocks that hold nothing beyond it are free again."""
        with self._cond:
            self._hashed = pos
            done = [block for block in self._handed if block.end <= pos]
            if done:
                self._handed = [block for block in self._handed if block.end > pos]
                self._free.extend(block.buffer for block in done)
                self._cond.notify_all()

    def _hasher_on_handed(self) -> bool:
        return any(block.offset <= self._hashed < block.end for block in self._handed)


class PrefixHasher:
    """Hashes a partial file front to back while the rest of it is still arriving.

    The bytes ``[0, hashed)`` are hashed; :meth:`step` hashes what has been written beyond that (up to
    the finished prefix it is given): from the blocks ``handed`` to it in memory where they hold the
    next bytes, else read back from ``fd``. A step hashes at most ``HASH_STEP`` bytes, so that its
    caller soon gets its turn to notice that the transfer has stopped.
    """

    BLOCK = 1024 * 1024

    def __init__(self, fd: int, expected: str, size: int, *, handed: HandedBlocks | None = None) -> None:
        self.fd = fd
        self.size = size
        self.hashed = 0
        self.handed = handed
        self._hasher = ContentHasher(expected, size)
        self._buffer: memoryview | None = None  # made on first need, then reused: fresh memory is slow

    def step(self, prefix_end: int) -> int:
        """Hash on towards ``prefix_end`` (bytes before it are final); return the new ``hashed``.

        Raises:
            OSError: if the bytes cannot be read back (a short read raises too).
        """
        upto = min(prefix_end, self.hashed + constants.HASH_STEP)
        while self.hashed < upto:
            data = self.handed.covering(self.hashed) if self.handed is not None else None
            if data is None:
                data = self._read_back(upto)
            count = min(len(data), upto - self.hashed)
            self._hasher.update(data[:count])
            self.hashed += count
            if self.handed is not None:
                self.handed.hashed_up_to(self.hashed)
        return self.hashed

    def _read_back(self, upto: int) -> memoryview:
        """Read the next bytes from the file, up to ``upto`` or the next handed block."""
        handed_at = self.handed.next_start(self.hashed) if self.handed is not None else None
        if handed_at is not None:
            upto = min(upto, handed_at)
        if self._buffer is None:
            self._buffer = memoryview(bytearray(self.BLOCK))
        count = os.preadv(self.fd, [self._buffer[: min(self.BLOCK, upto - self.hashed)]], self.hashed)
        if count <= 0:
            raise OSError(f"could not read back bytes {self.hashed}-{upto} that were written")
        return self._buffer[:count]

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
