"""A persistent, thread-safe cache of file checksums.

Hashing a multi-gigabyte weight file takes seconds, and the server needs every file's checksum (it is
the file's ETag and part of the repo's commit id). So each checksum is computed once and stored in a
small sqlite database under the state folder, keyed by the file's real path, size and modification
time: if any of the three changes, the old value is simply never found again.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path

from ..errors import StorageError
from ..hashing import git_blob_sha1_of_file, sha256_of_file

__all__ = ["ChecksumCache", "DEFAULT_STATE_DIR", "GIT_SHA1", "SHA256"]

logger = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("~/.cache/hfmirror")
SHA256 = "sha256"  # LFS object id
GIT_SHA1 = "git-sha1"  # git blob id: sha1(b"blob <size>\0" + content)

_LOGGED_HASH_SIZE = 64 * 1024 * 1024  # hashing a file this large takes a noticeable fraction of a second
_Key = tuple[str, int, int, str]  # (real path, size, mtime_ns, kind)


class ChecksumCache:
    """Checksums of files, computed at most once per (real path, size, mtime) and kept in sqlite.

    Safe to use from many threads: two requests for the same never-hashed file wait for one
    computation instead of hashing twice. ``computed`` counts the files actually hashed by this
    instance, which lets tests check that a second instance re-uses the stored values.
    """

    def __init__(self, state_dir: str | os.PathLike[str] | None = None) -> None:
        """Open (or create) the database under ``state_dir``.

        Raises:
            StorageError: the folder or the database cannot be created or opened there.
        """
        folder = Path(state_dir if state_dir is not None else DEFAULT_STATE_DIR).expanduser()
        self.db_path = folder / "checksums.sqlite3"
        self.computed = 0
        self._memory: dict[_Key, str] = {}
        self._lock = threading.Lock()  # guards _memory, _pending, the connection and `computed`
        self._pending: dict[_Key, threading.Lock] = {}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # One connection shared by all threads (sqlite serialises anyway); our lock keeps it safe.
            self._db = self._open()
        except (OSError, sqlite3.Error) as error:
            problem = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise StorageError(f"cannot keep checksums in the state folder {folder}: {problem}") from None

    def _open(self) -> sqlite3.Connection:
        """The database connection, its table made if missing."""
        db = sqlite3.connect(self.db_path, check_same_thread=False, timeout=30)
        try:
            self._prepare(db)
        except sqlite3.Error:
            db.close()
            raise
        return db

    @staticmethod
    def _prepare(db: sqlite3.Connection) -> None:
        # Write-ahead log, synced at checkpoints rather than at every commit: the default synced each
        # stored checksum (10 ms a file: over three minutes for a 20,000-file repo's first listing).
        # A power cut can then lose the last few values, which only costs hashing those files again;
        # the database itself stays consistent.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        with db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS checksums ("
                " path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,"
                " kind TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (path, kind))"
            )

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def digest(self, path: str | os.PathLike[str], kind: str) -> str:
        """The ``kind`` checksum (:data:`SHA256` or :data:`GIT_SHA1`) of the file at ``path``, hex.

        Symlinks are followed: the cache is keyed by the real file, so the same blob reached through
        two snapshot links is hashed once.
        """
        if kind not in (SHA256, GIT_SHA1):
            raise ValueError(f"unknown checksum kind: {kind!r}")
        real = os.path.realpath(path)
        st = os.stat(real)
        key: _Key = (real, st.st_size, st.st_mtime_ns, kind)
        with self._lock:
            if key in self._memory:
                return self._memory[key]
            stored = self._load(key)
            if stored is not None:
                self._memory[key] = stored
                return stored
            file_lock = self._pending.setdefault(key, threading.Lock())
        with file_lock:  # one thread hashes, the others wait here and then find the value
            with self._lock:
                if key in self._memory:
                    return self._memory[key]
            # Only large files are worth a line: a 20,000-file repo would otherwise fill the log at start.
            level = logging.INFO if st.st_size >= _LOGGED_HASH_SIZE else logging.DEBUG
            logger.log(level, "hashing %s (%s, %d bytes)", real, kind, st.st_size)
            value = sha256_of_file(real) if kind == SHA256 else git_blob_sha1_of_file(real)
            with self._lock:
                self.computed += 1
                self._memory[key] = value
                self._pending.pop(key, None)
                with self._db:
                    self._db.execute(
                        "INSERT OR REPLACE INTO checksums (path, size, mtime_ns, kind, digest)"
                        " VALUES (?, ?, ?, ?, ?)",
                        key + (value,),
                    )
            return value

    def _load(self, key: _Key) -> str | None:
        """The stored digest for ``key`` if the file has not changed since it was hashed (lock held)."""
        path, size, mtime_ns, kind = key
        row = self._db.execute(
            "SELECT digest FROM checksums WHERE path = ? AND size = ? AND mtime_ns = ? AND kind = ?",
            (path, size, mtime_ns, kind),
        ).fetchone()
        return row[0] if row else None
