"""Finding repositories on disk and describing their files the way the Hub does.

Two layouts are served, looked up at request time so repos added while the server runs are found:

* a **plain tree**: ``ROOT/<org>/<name>/...`` for models, ``ROOT/datasets/<org>/<name>/...`` for
  datasets, and ``ROOT/<name>/...`` for repos without an org (a folder is such a repo when at least one
  regular file sits directly inside it). The only revisions are ``main`` and a commit id computed from
  the content, so the same files always give the same commit.
* a **Hugging Face cache** folder: ``ROOT/models--<org>--<name>/{blobs,refs,snapshots}``. Commits are the
  snapshot folder names, ``refs/<branch>`` maps branches to them, and a blob's file name is already its
  ETag, so nothing needs hashing.

Every file gets the Hub's checksums: the sha256 for "LFS" files (weights, anything large), the git blob
sha1 for the rest. Hidden folders (``.git``, ``.cache``) and anything that resolves outside ROOT are
never listed, so they can never be served.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RevisionNotFoundError, UnsafePathError
from ..hashing import git_blob_sha1, is_git_sha1, is_sha256
from ..paths import safe_join, validate_relative_path
from .checksums import GIT_SHA1, SHA256, ChecksumCache

__all__ = [
    "LFS_SIZE_THRESHOLD",
    "FileInfo",
    "RepoLocation",
    "RepoStore",
    "Snapshot",
    "is_lfs_file",
    "is_valid_repo_id",
    "lfs_pointer",
]

# Files at least this large are stored in LFS by the Hub (its upload threshold is 10 MiB).
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

# Extensions from the Hub's default .gitattributes: stored in LFS whatever their size.
LFS_EXTENSIONS = frozenset(
    """7z arrow bin bz2 ckpt ftz gguf gz h5 joblib mlmodel model msgpack npy npz onnx ot parquet pb pickle
    pkl pt pth rar safetensors tar tflite tgz wasm xz zip zst""".split()
)

# One segment of a repo id: letters, digits, '-', '_' and '.', not starting with '.' or '-'.
_REPO_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,95}$")
_CACHE_PREFIX = {"model": "models", "dataset": "datasets"}


def is_valid_repo_id(repo_id: str) -> bool:
    """True for ``name`` or ``org/name`` made of safe segments (no ``..``, no ``--``, nothing hidden)."""
    parts = repo_id.split("/")
    return 1 <= len(parts) <= 2 and all(
        _REPO_SEGMENT.match(p) and ".." not in p and "--" not in p for p in parts
    )


def is_lfs_file(path: str, size: int) -> bool:
    """Whether the Hub would store this file in LFS: a weight/archive extension, or large."""
    suffix = path.rsplit("/", 1)[-1].rsplit(".", 1)
    return size >= LFS_SIZE_THRESHOLD or (len(suffix) == 2 and suffix[1].lower() in LFS_EXTENSIONS)


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that a git repo on the Hub stores instead of an LFS file's content."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class FileInfo:
    """One file of a snapshot, with the checksums the Hub reports for it."""

    path: str  # relative, forward slashes
    local: Path  # where the bytes are (may be a symlink that stays inside ROOT)
    size: int
    etag: str  # sha256 for LFS files, git blob sha1 otherwise: the ETag and the cache blob name
    lfs: bool

    @property
    def oid(self) -> str:
        """The git blob id the Hub lists in ``tree``: of the content, or of the LFS pointer file."""
        return git_blob_sha1(lfs_pointer(self.etag, self.size)) if self.lfs else self.etag

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.etag, self.size))


@dataclass(frozen=True)
class Snapshot:
    """Everything a client can see of one repo at one commit."""

    repo_type: str
    repo_id: str
    commit: str
    files: dict[str, FileInfo]  # by path, sorted
    last_modified: float  # newest file mtime, seconds since the epoch
    directories: frozenset[str] = field(default_factory=frozenset)

    def directory_oid(self, directory: str) -> str:
        """A stable id for a folder: sha1 over the paths and oids of the files below it."""
        prefix = directory + "/"
        digest = hashlib.sha1()
        for path, info in self.files.items():
            if path.startswith(prefix):
                digest.update(f"{path}\0{info.oid}\n".encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class RepoLocation:
    """Where a repo lives: a plain folder, or a ``models--org--name`` folder of a Hugging Face cache."""

    repo_type: str  # "model" or "dataset"
    repo_id: str
    base: Path
    layout: str  # "plain" or "cache"


class RepoStore:
    """Looks repos up under ``root`` and builds their snapshots, re-using work while files are unchanged."""

    def __init__(self, root: str | os.PathLike[str], checksums: ChecksumCache) -> None:
        self.root = Path(root)
        self.real_root = Path(os.path.realpath(root))
        self.checksums = checksums
        # Plain-tree snapshots, keyed by repo folder, re-used while the (path, size, mtime) list is the same.
        self._snapshots: dict[Path, tuple[tuple[tuple[str, int, int], ...], Snapshot]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ lookup

    def find(self, repo_type: str, repo_id: str) -> RepoLocation | None:
        """The repo's location, or None if there is no such repo (or its id is malformed)."""
        if repo_type not in _CACHE_PREFIX or not is_valid_repo_id(repo_id):
            return None
        cache_dir = self.root / f"{_CACHE_PREFIX[repo_type]}--{repo_id.replace('/', '--')}"
        if self._inside_root(cache_dir) and (cache_dir / "snapshots").is_dir():
            return RepoLocation(repo_type, repo_id, cache_dir, "cache")
        top = self.root / "datasets" if repo_type == "dataset" else self.root
        parts = repo_id.split("/")
        if repo_type == "model" and parts[0] == "datasets":
            return None  # ROOT/datasets holds datasets, never a model org
        base = top.joinpath(*parts)
        if not self._inside_root(base) or not base.is_dir():
            return None
        if len(parts) == 1 and not _has_regular_file(base):
            return None  # an org folder, not a repo
        if len(parts) == 2 and _has_regular_file(top / parts[0]):
            return None  # a sub-folder of a no-org repo, not a repo
        return RepoLocation(repo_type, repo_id, base, "plain")

    def snapshot(self, location: RepoLocation, revision: str) -> Snapshot:
        """The repo at ``revision``. Blocking (may hash files): call it from a worker thread.

        Raises:
            RevisionNotFoundError: if the revision is not ``main``/the commit (plain) or not in the cache.
        """
        if location.layout == "cache":
            return self._cache_snapshot(location, revision)
        snap = self._plain_snapshot(location)
        if revision not in ("main", snap.commit):
            raise RevisionNotFoundError(f"revision {revision!r} not found in {location.repo_id}")
        return snap

    # ---------------------------------------------------------------------------------- plain tree

    def _plain_snapshot(self, location: RepoLocation) -> Snapshot:
        found = self._walk(location.base)
        signature = tuple((path, st.st_size, st.st_mtime_ns) for path, _, st in found)
        with self._lock:
            cached = self._snapshots.get(location.base)
        if cached is not None and cached[0] == signature:
            return cached[1]
        files = {}
        for path, local, st in found:
            lfs = is_lfs_file(path, st.st_size)
            etag = self.checksums.digest(local, SHA256 if lfs else GIT_SHA1)
            files[path] = FileInfo(path, local, st.st_size, etag, lfs)
        commit = hashlib.sha1(b"".join(f"{p}\0{f.etag}\n".encode() for p, f in files.items())).hexdigest()
        snap = _make_snapshot(location, commit, files, found)
        with self._lock:
            self._snapshots[location.base] = (signature, snap)
        return snap

    # ---------------------------------------------------------------------------- Hugging Face cache

    def _cache_snapshot(self, location: RepoLocation, revision: str) -> Snapshot:
        commit = self._cache_commit(location, revision)
        snapshot_dir = location.base / "snapshots" / commit
        blobs = Path(os.path.realpath(location.base / "blobs"))
        found = self._walk(snapshot_dir)
        files = {}
        for path, local, st in found:
            real = Path(os.path.realpath(local))
            name = real.name
            if real.parent == blobs and (is_sha256(name) or is_git_sha1(name)):
                etag, lfs = name, is_sha256(name)  # the blob's name is its ETag: no hashing
            else:  # a copied file (no symlinks on this file system): hash it like a plain tree
                lfs = is_lfs_file(path, st.st_size)
                etag = self.checksums.digest(local, SHA256 if lfs else GIT_SHA1)
            files[path] = FileInfo(path, local, st.st_size, etag, lfs)
        return _make_snapshot(location, commit, files, found)

    def _cache_commit(self, location: RepoLocation, revision: str) -> str:
        """Map a branch (``refs/<revision>``) or a commit id to a snapshot folder name."""
        missing = RevisionNotFoundError(f"revision {revision!r} not found in {location.repo_id}")
        try:
            validate_relative_path(revision)
            ref = safe_join(location.base / "refs", revision)
        except UnsafePathError:
            raise missing from None
        commit = revision
        if ref.is_file():
            commit = ref.read_text(encoding="utf-8", errors="replace").strip()
        if not is_git_sha1(commit) or not (location.base / "snapshots" / commit).is_dir():
            raise missing
        return commit

    # ---------------------------------------------------------------------------------- walking

    def _walk(self, base: Path) -> list[tuple[str, Path, os.stat_result]]:
        """Regular files under ``base`` as (relative path, local path, stat), sorted by path.

        Hidden folders are skipped (``.git``, ``.cache`` of a local-dir download); hidden files such as
        ``.gitattributes`` are kept. Folder symlinks are not followed (no loops); file symlinks are
        followed only when they stay inside ROOT. FIFOs, sockets and devices are skipped.
        """
        found: list[tuple[str, Path, os.stat_result]] = []
        stack = [(base, "")]
        while stack:
            folder, prefix = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                rel = prefix + entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if not entry.name.startswith("."):
                            stack.append((Path(entry.path), rel + "/"))
                        continue
                    if entry.is_symlink() and not self._inside_root(Path(entry.path)):
                        continue
                    st = os.stat(entry.path)  # follows a file symlink
                except OSError:
                    continue  # vanished or a dangling link
                if stat.S_ISREG(st.st_mode):
                    try:
                        validate_relative_path(rel)
                    except UnsafePathError:
                        continue  # e.g. a control character in a name: not servable, not listed
                    found.append((rel, Path(entry.path), st))
        found.sort(key=lambda item: item[0])
        return found

    def _inside_root(self, path: Path) -> bool:
        real = Path(os.path.realpath(path))
        return real == self.real_root or self.real_root in real.parents


def _has_regular_file(folder: Path) -> bool:
    """Whether a regular (non-hidden) file sits directly in ``folder``: the mark of a no-org repo."""
    try:
        with os.scandir(folder) as entries:
            return any(not e.name.startswith(".") and e.is_file() for e in entries)
    except OSError:
        return False


def _make_snapshot(
    location: RepoLocation,
    commit: str,
    files: dict[str, FileInfo],
    found: list[tuple[str, Path, os.stat_result]],
) -> Snapshot:
    directories = {path.rsplit("/", 1)[0] for path in files if "/" in path}
    for directory in list(directories):  # add every ancestor: a/b/c.txt gives a and a/b
        parts = directory.split("/")
        directories.update("/".join(parts[:i]) for i in range(1, len(parts)))
    last_modified = max((st.st_mtime for _, _, st in found), default=0.0)
    return Snapshot(
        location.repo_type, location.repo_id, commit, files, last_modified, frozenset(directories)
    )
