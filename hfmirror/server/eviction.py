"""``--max-size``: keep the cache under a size by evicting whole files, least recently used first.

What counts is every blob under ROOT (complete ones and partial ones, which are as large as the file
from their first byte). Before a fill, :meth:`CacheBudget.make_room` evicts complete blobs, oldest
access first, until the new file fits; a blob being served or filled in this process is never
evicted (:class:`InUse`). Another replica on the same ROOT may evict a blob this one is sending: the
open file stays readable to the end (POSIX), and the next request fetches it again.

"Last access" is the blob's atime, set explicitly when a file is served (at most once a minute per
blob) so it does not depend on the file system's ``relatime``/``noatime``, and so ``hf cache scan``
shows the same. An evicted blob's snapshot links go with it, so the cache stays consistent for
huggingface_hub and ``hfmirror serve`` without ``--upstream``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import constants
from ..errors import InsufficientSpaceError
from .metrics import Metrics

__all__ = ["CacheBudget", "InUse", "parse_size"]

logger = logging.getLogger(__name__)

_TOUCH_EVERY = 60.0  # seconds: a blob's atime is refreshed at most this often
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``500G``, ``1.5T``, ``800M`` or a number of bytes (binary units, an optional ``B``/``iB``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 500G, 1.5T, 800M)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


class InUse:
    """Paths being read or written by this process (reference-counted)."""

    def __init__(self) -> None:
        self._counts: collections.Counter[Path] = collections.Counter()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def holding(self, *paths: Path) -> Iterator[None]:
        with self._lock:
            self._counts.update(paths)
        try:
            yield
        finally:
            with self._lock:
                self._counts.subtract(paths)
                for path in paths:
                    if self._counts[path] <= 0:
                        del self._counts[path]

    def __contains__(self, path: Path) -> bool:
        with self._lock:
            return self._counts[path] > 0


@dataclass(frozen=True)
class _Blob:
    path: Path
    size: int
    accessed: float
    complete: bool


class CacheBudget:
    """Evicts least-recently-used complete blobs so the cache stays under ``max_bytes`` (None: no limit)."""

    def __init__(self, root: Path, max_bytes: int | None, in_use: InUse, metrics: Metrics) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.in_use = in_use
        self.metrics = metrics
        self._lock = threading.Lock()
        self._touched: dict[Path, float] = {}
        self._reserved: dict[Path, int] = {}  # partial paths of fills that have not created them yet

    def used_bytes(self) -> int:
        """Bytes the cache holds now (complete and partial blobs)."""
        return sum(blob.size for blob in self._blobs())

    def touch(self, blob: Path) -> None:
        """Record that ``blob`` was just served (its atime; at most once a minute)."""
        now = time.monotonic()
        if now - self._touched.get(blob, -_TOUCH_EVERY) < _TOUCH_EVERY:
            return
        self._touched[blob] = now
        if len(self._touched) > 100_000:
            self._touched.clear()
        try:
            st = os.stat(blob)
            os.utime(blob, ns=(time.time_ns(), st.st_mtime_ns))
        except OSError:
            pass

    def make_room(self, size: int, partial: Path) -> None:
        """Evict until a file of ``size`` bytes (to be written at ``partial``) fits; reserve its room.

        Raises:
            InsufficientSpaceError: if it cannot fit even with everything evictable gone.
        """
        if self.max_bytes is None:
            return
        with self._lock:
            blobs = self._blobs()
            on_disk = {blob.path for blob in blobs}
            used = sum(blob.size for blob in blobs)
            used += sum(n for path, n in self._reserved.items() if path not in on_disk and path != partial)
            if partial not in on_disk:
                used += size
            candidates = sorted(
                (b for b in blobs if b.complete and b.path not in self.in_use), key=lambda b: b.accessed
            )
            while used > self.max_bytes and candidates:
                victim = candidates.pop(0)
                if self._evict(victim):
                    used -= victim.size
            if used > self.max_bytes:
                raise InsufficientSpaceError(
                    f"the cache cannot hold {size} more bytes under --max-size {self.max_bytes} "
                    "(what is left is being served or filled)"
                )
            self._reserved[partial] = size

    def release(self, partial: Path) -> None:
        """The fill writing ``partial`` has ended (its file now counts for itself, or is gone)."""
        with self._lock:
            self._reserved.pop(partial, None)

    # -- internals

    def _blobs(self) -> list[_Blob]:
        found = []
        for repo in _folders(self.root):
            for entry in _entries(repo / "blobs"):
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
                name = entry.name
                complete = "." not in name  # <oid>; partials and their state have suffixes
                if not complete and not name.endswith(constants.PARTIAL_SUFFIX):
                    continue
                found.append(_Blob(Path(entry.path), st.st_size, st.st_atime, complete))
        return found

    def _evict(self, blob: _Blob) -> bool:
        repo = blob.path.parent.parent
        real = os.path.realpath(blob.path)
        try:
            blob.path.unlink()
        except OSError as error:
            logger.warning("could not evict %s: %s", blob.path, error)
            return False
        for link in _links_to(repo / "snapshots", real):
            with contextlib.suppress(OSError):
                link.unlink()
        self.metrics.add("evictions")
        self.metrics.add("evicted_bytes", blob.size)
        logger.info(
            "evicted %s (%d bytes, least recently used) to stay under --max-size", blob.path, blob.size
        )
        return True


def _folders(root: Path) -> list[Path]:
    return [
        Path(e.path) for e in _entries(root) if e.name.startswith(("models--", "datasets--")) and e.is_dir()
    ]


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError:
        return []


def _links_to(snapshots: Path, real_blob: str) -> list[Path]:
    """Snapshot links that resolve to ``real_blob`` (the blob's real path)."""
    found = []
    for folder, _, names in os.walk(snapshots):
        for name in names:
            path = Path(folder, name)
            if path.is_symlink() and os.path.realpath(path) == real_blob:
                found.append(path)
    return found
