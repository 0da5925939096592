"""Folder listings that stay inside ROOT and are kept up to date without walking the whole tree.

A repo with 20,000 files must not cost 20,000 ``stat`` calls per request. A :class:`FolderIndex`
remembers, for every folder of one tree, the folder's modification time and its files; a
:meth:`~FolderIndex.refresh` re-reads only the folders whose mtime changed. Creating, deleting or
renaming a file changes its folder's mtime, so this notices every change that tools make by
writing a temporary file and renaming it (huggingface_hub, hfmirror, git, rsync). A file rewritten
in place changes only its own mtime: :meth:`~FolderIndex.check_file` stats the one file a request
is about to serve, so its bytes and its checksum never disagree.

Why not revalidate every N seconds instead: in between, a file just added would be "not found" and
a file just replaced would be served under its old checksum, which a verifying client rejects.
A ``stat`` per *folder* costs microseconds; most repos have a handful of folders.

A folder whose mtime is within :data:`RACY_WINDOW_NS` of the moment it was read is read again on the
next refresh (as git does for its index): file systems keep coarse timestamps, so a file added in
the same tick as the read would otherwise leave the mtime unchanged and go unnoticed.

Every path is confined to ROOT by its *real* path (all symlinks resolved): a folder or file that
resolves outside ROOT is never listed, whichever link along the way points out.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UnsafePathError
from ..paths import validate_relative_path

__all__ = ["RACY_WINDOW_NS", "Confinement", "FolderIndex", "ScannedFile"]

# A folder modified this recently (nanoseconds) before it was read is read again at the next refresh.
RACY_WINDOW_NS = 2_000_000_000


class Confinement:
    """Answers "does this path, with every symlink resolved, stay inside ROOT?"."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.real_root = Path(os.path.realpath(root))

    def real(self, path: str | os.PathLike[str]) -> Path | None:
        """The real path of ``path`` if it is inside ROOT (ROOT itself included), else None."""
        real = Path(os.path.realpath(path))
        if real == self.real_root or self.real_root in real.parents:
            return real
        return None

    def contains(self, path: str | os.PathLike[str]) -> bool:
        return self.real(path) is not None


@dataclass(frozen=True)
class ScannedFile:
    """One regular file found under an index's base folder."""

    path: str  # relative to the base, forward slashes
    local: Path  # the entry as found (may be a symlink)
    real: Path  # where it resolves: always inside ROOT
    size: int
    mtime_ns: int

    def same_as(self, st: os.stat_result) -> bool:
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns


@dataclass
class _Folder:
    mtime_ns: int
    racy: bool
    files: dict[str, ScannedFile] = field(default_factory=dict)  # by name
    subfolders: tuple[str, ...] = ()  # names


@dataclass
class IndexCounters:
    """How much work the index did, for tests and for reasoning about cost."""

    folders_read: int = 0  # os.scandir calls
    refreshes: int = 0


class FolderIndex:
    """The regular files under ``base``, re-read folder by folder as folders change. Thread-safe.

    Hidden folders (``.git``, ``.cache`` of a local-dir download) are skipped; hidden files such as
    ``.gitattributes`` are kept. Folder symlinks are not followed (no loops, no second path to a
    file); file symlinks are followed when they resolve inside ROOT. FIFOs, sockets, devices and
    names that are not plain relative paths are skipped.
    """

    def __init__(self, base: Path, confinement: Confinement) -> None:
        self.base = base
        self.confinement = confinement
        self.counters = IndexCounters()
        self.generation = 0  # bumped on every change; snapshots built from an older one are stale
        self._folders: dict[str, _Folder] = {}  # by relative path, "" for the base
        self._lock = threading.Lock()
        self._sorted: list[ScannedFile] | None = None

    # ------------------------------------------------------------------------------------ reading

    def refresh(self) -> int:
        """Bring the index up to date (one stat per folder, a read of each changed one); the generation."""
        with self._lock:
            self.counters.refreshes += 1
            if self._base_moved_out():
                if self._folders:
                    self._folders.clear()
                    self._changed()
                return self.generation
            pending = [""]
            while pending:
                rel = pending.pop()
                known = self._folders.get(rel)
                st = self._stat_folder(rel)
                if st is None:
                    if known is not None:
                        self._forget(rel)
                        self._changed()
                    continue
                if (known is None or known.racy or known.mtime_ns != st.st_mtime_ns) and self._read_folder(
                    rel, st
                ):
                    self._changed()
                pending.extend(_join(rel, name) for name in self._folders[rel].subfolders)
            return self.generation

    def files(self) -> list[ScannedFile]:
        """Every file found by the last refresh, sorted by path."""
        with self._lock:
            if self._sorted is None:
                found = [f for folder in self._folders.values() for f in folder.files.values()]
                self._sorted = sorted(found, key=lambda f: f.path)
            return self._sorted

    def check_file(self, path: str) -> ScannedFile | None:
        """Stat one indexed file now (it may have been rewritten in place); its current entry, or None."""
        folder_rel, _, name = path.rpartition("/")
        with self._lock:
            folder = self._folders.get(folder_rel)
            known = folder.files.get(name) if folder is not None else None
            if folder is None or known is None:
                return None
            current = self._scan_file(path, known.local)
            if current != known:
                if current is None:
                    del folder.files[name]
                else:
                    folder.files[name] = current
                self._changed()
            return current

    # ---------------------------------------------------------------------------------- internals

    def _changed(self) -> None:
        self.generation += 1
        self._sorted = None

    def _base_moved_out(self) -> bool:
        return self.confinement.real(self.base) is None

    def _stat_folder(self, rel: str) -> os.stat_result | None:
        path = self.base / rel if rel else self.base
        try:
            # The base may be a link (checked to stay inside ROOT); folders below it never are.
            st = os.stat(path) if not rel else os.lstat(path)
        except OSError:
            return None
        return st if stat.S_ISDIR(st.st_mode) else None

    def _read_folder(self, rel: str, st: os.stat_result) -> bool:
        """Read one folder's entries; True if its files or sub-folders differ from what was known."""
        folder_path = self.base / rel if rel else self.base
        self.counters.folders_read += 1
        read_at = time.time_ns()
        files: dict[str, ScannedFile] = {}
        subfolders: list[str] = []
        try:
            entries = list(os.scandir(folder_path))
        except OSError:
            entries = []
        for entry in entries:
            entry_rel = _join(rel, entry.name)
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not entry.name.startswith("."):
                        subfolders.append(entry.name)
                    continue
            except OSError:
                continue
            scanned = self._scan_file(entry_rel, Path(entry.path))
            if scanned is not None:
                files[entry.name] = scanned
        old = self._folders.get(rel)
        for gone in set(old.subfolders if old else ()) - set(subfolders):
            self._forget(_join(rel, gone))
        new = _Folder(
            mtime_ns=st.st_mtime_ns,
            racy=read_at - st.st_mtime_ns < RACY_WINDOW_NS,
            files=files,
            subfolders=tuple(sorted(subfolders)),
        )
        self._folders[rel] = new
        return old is None or (old.files, old.subfolders) != (new.files, new.subfolders)

    def _scan_file(self, rel: str, local: Path) -> ScannedFile | None:
        """The entry for a regular file that resolves inside ROOT, or None for anything else."""
        real = self.confinement.real(local)
        if real is None:
            return None
        try:
            st = os.stat(real)
            validate_relative_path(rel)
        except (OSError, UnsafePathError):
            return None  # vanished, dangling, or a name that is not servable (a control character)
        if not stat.S_ISREG(st.st_mode):
            return None
        return ScannedFile(rel, local, real, st.st_size, st.st_mtime_ns)

    def _forget(self, rel: str) -> None:
        folder = self._folders.pop(rel, None)
        if folder is not None:
            for name in folder.subfolders:
                self._forget(_join(rel, name))


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name
