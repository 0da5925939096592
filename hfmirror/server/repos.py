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
sha1 for the rest. Hidden folders (``.git``, ``.cache``) and anything that resolves outside ROOT (the
repo folder, ``refs``, a snapshot folder, ``blobs``, any file or folder link) are never listed, so they
can never be served.

A repo's listing is kept between requests: each repo (each commit, in a cache) has a
:class:`~.scan.FolderIndex` that re-reads only changed folders, and a :class:`Snapshot` is rebuilt
only when the index changed, re-using the checksums of unchanged files. See :mod:`.scan` for how
changes are noticed and why.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInputError, RevisionNotFoundError
from ..hashing import git_blob_sha1, is_git_sha1, is_sha256
from ..layout import cached_commit
from ..listing import validate_repo_id
from .checksums import GIT_SHA1, SHA256, ChecksumCache
from .scan import Confinement, FolderIndex, ScannedFile

__all__ = [
    "LFS_SIZE_THRESHOLD",
    "RESTRICTED_MARKER",
    "FileInfo",
    "RepoLocation",
    "RepoStore",
    "Snapshot",
    "is_lfs_file",
    "is_valid_repo_id",
    "lfs_pointer",
    "snapshot_of",
]

# Files at least this large are stored in LFS by the Hub (its upload threshold is 10 MiB).
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

# Extensions from the Hub's default .gitattributes: stored in LFS whatever their size.
LFS_EXTENSIONS = frozenset(
    """7z arrow bin bz2 ckpt ftz gguf gz h5 joblib mlmodel model msgpack npy npz onnx ot parquet pb pickle
    pkl pt pth rar safetensors tar tflite tgz wasm xz zip zst""".split()
)

# In a repo folder: the team mirror fetched this repo's content with a token the upstream requires
# (:mod:`.access`). Only the mirror, which asks the upstream who may read it, serves such a repo.
RESTRICTED_MARKER = ".hfmirror/restricted"

# Listings kept at once (one per plain repo, one per cached commit); the least recently used goes first.
MAX_LISTINGS = 1024

_CACHE_PREFIX = {"model": "models", "dataset": "datasets"}


def is_valid_repo_id(repo_id: str) -> bool:
    """True for ``name`` or ``org/name`` as the Hub allows it (the downloader's rule: nothing hidden,
    no ``..`` or ``--``, a word character at either end of each part)."""
    try:
        validate_repo_id(repo_id)
    except BadInputError:
        return False
    return True


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
    local: Path  # the real file whose bytes are served (always inside ROOT)
    size: int
    etag: str  # sha256 for LFS files, git blob sha1 otherwise: the ETag and the cache blob name
    lfs: bool
    mtime_ns: int = 0  # of ``local`` when the checksum was taken: an unchanged file keeps its checksum

    @property
    def oid(self) -> str:
        """The git blob id the Hub lists in ``tree``: of the content, or of the LFS pointer file."""
        return git_blob_sha1(lfs_pointer(self.etag, self.size)) if self.lfs else self.etag

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.etag, self.size))

    def describes(self, scanned: ScannedFile) -> bool:
        """Whether this entry (and so its checksum) is still right for the file as scanned now."""
        return (self.local, self.size, self.mtime_ns) == (scanned.real, scanned.size, scanned.mtime_ns)


@dataclass(frozen=True)
class Snapshot:
    """Everything a client can see of one repo at one commit.

    A snapshot never changes; when the files do, a new one is built. ``memo`` lets the API keep what it
    renders from a snapshot (a listing's JSON) for as long as the snapshot is current.
    """

    repo_type: str
    repo_id: str
    commit: str
    files: dict[str, FileInfo]  # by path, sorted
    last_modified: float  # newest file mtime, seconds since the epoch
    directories: frozenset[str] = field(default_factory=frozenset)
    memo: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    @functools.cached_property
    def directory_oids(self) -> dict[str, str]:
        """A stable id per folder: sha1 over the paths and oids of the files below it (one pass)."""
        digests = {directory: hashlib.sha1() for directory in self.directories}
        for path, info in self.files.items():
            line = f"{path}\0{info.oid}\n".encode()
            parts = path.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                digests["/".join(parts[:depth])].update(line)
        return {directory: digest.hexdigest() for directory, digest in digests.items()}

    def directory_oid(self, directory: str) -> str:
        return self.directory_oids[directory]


@dataclass(frozen=True)
class RepoLocation:
    """Where a repo lives: a plain folder, or a ``models--org--name`` folder of a Hugging Face cache."""

    repo_type: str  # "model" or "dataset"
    repo_id: str
    base: Path
    layout: str  # "plain" or "cache"


@dataclass
class _Listing:
    """The index of one listed folder (a plain repo, or one cached commit) and the snapshot built from it."""

    index: FolderIndex
    snapshot: Snapshot | None = None
    built_from: int = -1  # the index generation the snapshot reflects
    lock: threading.Lock = field(default_factory=threading.Lock)


class RepoStore:
    """Looks repos up under ``root`` and keeps their snapshots, rebuilt only when their files change."""

    def __init__(
        self, root: str | os.PathLike[str], checksums: ChecksumCache, *, max_listings: int = MAX_LISTINGS
    ) -> None:
        self.root = Path(root)
        self.confinement = Confinement(root)
        self.checksums = checksums
        self.max_listings = max_listings
        self._listings: collections.OrderedDict[Path, _Listing] = collections.OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ lookup

    def find(self, repo_type: str, repo_id: str) -> RepoLocation | None:
        """The repo's location, or None if there is no such repo (or its id is malformed), or if the
        team mirror marked it restricted (:data:`RESTRICTED_MARKER`): gated or private content that
        a token fetched must not be handed to anyone by a server that cannot ask the upstream."""
        if repo_type not in _CACHE_PREFIX or not is_valid_repo_id(repo_id):
            return None
        cache_dir = self.root / f"{_CACHE_PREFIX[repo_type]}--{repo_id.replace('/', '--')}"
        if self.confinement.contains(cache_dir) and (cache_dir / "snapshots").is_dir():
            if (cache_dir / RESTRICTED_MARKER).exists():
                return None
            return RepoLocation(repo_type, repo_id, cache_dir, "cache")
        top = self.root / "datasets" if repo_type == "dataset" else self.root
        parts = repo_id.split("/")
        if repo_type == "model" and parts[0] == "datasets":
            return None  # ROOT/datasets holds datasets, never a model org
        base = top.joinpath(*parts)
        if not self.confinement.contains(base) or not base.is_dir():
            return None
        if len(parts) == 1 and not _has_regular_file(base):
            return None  # an org folder, not a repo
        if len(parts) == 2 and _has_regular_file(top / parts[0]):
            return None  # a sub-folder of a no-org repo, not a repo
        return RepoLocation(repo_type, repo_id, base, "plain")

    def discover(self, limit: int = 100_000) -> list[RepoLocation]:
        """The repos under ROOT now (at most ``limit``), sorted: what ``serve`` announces at start."""
        candidates: list[tuple[str, str]] = []
        for name in _visible_folders(self.root):
            if name.startswith(("models--", "datasets--")):
                kind, _, rest = name.partition("--")
                candidates.append((_REPO_TYPE_OF_PREFIX[kind], rest.replace("--", "/")))
            elif name == "datasets":
                candidates += _plain_candidates(self.root / "datasets", "dataset")
            else:
                candidates += _plain_candidates(self.root, "model", only=name)
            if len(candidates) >= limit:
                break
        found = {}
        for repo_type, repo_id in candidates[:limit]:
            location = self.find(repo_type, repo_id)
            if location is not None:
                found[(location.repo_type, location.repo_id)] = location
        return [found[key] for key in sorted(found)]

    # ------------------------------------------------------------------------------- snapshots

    def snapshot(self, location: RepoLocation, revision: str) -> Snapshot:
        """The repo at ``revision``. Blocking (may hash new files): call it from a worker thread.

        Costs one stat per folder of the repo while nothing changed.

        Raises:
            RevisionNotFoundError: if the revision is not ``main``/the commit (plain) or not in the cache.
        """
        listing, commit = self._listing(location, revision)
        listing.index.refresh()
        return self._current(location, listing, revision, commit)

    def resolve(self, location: RepoLocation, revision: str, path: str) -> tuple[Snapshot, FileInfo | None]:
        """The snapshot at ``revision`` and its entry for ``path`` (None if absent), checked against the
        file on disk now: a file rewritten in place gets its new size and checksum before it is served.

        Raises:
            RevisionNotFoundError: as :meth:`snapshot`.
        """
        listing, commit = self._listing(location, revision)
        listing.index.refresh()
        listing.index.check_file(path)
        snap = self._current(location, listing, revision, commit)
        return snap, snap.files.get(path)

    def _listing(self, location: RepoLocation, revision: str) -> tuple[_Listing, str | None]:
        """The kept listing of the folder that holds ``revision`` (made on first use), and its commit
        when the layout names it (a cache; None for a plain tree, whose commit comes from content)."""
        commit = None
        folder = location.base
        if location.layout == "cache":
            commit = self._cache_commit(location, revision)
            folder = location.base / "snapshots" / commit
        with self._lock:
            listing = self._listings.get(folder)
            if listing is None:
                listing = self._listings[folder] = _Listing(FolderIndex(folder, self.confinement))
                while len(self._listings) > self.max_listings:
                    self._listings.popitem(last=False)
            self._listings.move_to_end(folder)
        return listing, commit

    def _current(
        self, location: RepoLocation, listing: _Listing, revision: str, commit: str | None
    ) -> Snapshot:
        """The listing's snapshot, rebuilt first if its index changed since it was built."""
        with listing.lock:
            generation = listing.index.generation
            if listing.snapshot is None or listing.built_from != generation:
                listing.snapshot = self._build(location, listing, commit)
                listing.built_from = generation
            snap = listing.snapshot
        if commit is None and revision not in ("main", snap.commit):
            raise RevisionNotFoundError(f"revision {revision!r} not found in {location.repo_id}")
        return snap

    def _build(self, location: RepoLocation, listing: _Listing, commit: str | None) -> Snapshot:
        previous = listing.snapshot.files if listing.snapshot is not None else {}
        blobs = self.confinement.real(location.base / "blobs") if location.layout == "cache" else None
        scanned = listing.index.files()
        files = {}
        for entry in scanned:
            info = previous.get(entry.path)
            if info is None or not info.describes(entry):
                info = self._describe(entry, blobs)
            files[entry.path] = info
        if commit is None:  # a plain tree: the commit is a digest of the content, stable across restarts
            commit = hashlib.sha1(b"".join(f"{p}\0{f.etag}\n".encode() for p, f in files.items())).hexdigest()
        return _make_snapshot(location, commit, files, scanned)

    def _describe(self, entry: ScannedFile, blobs: Path | None) -> FileInfo:
        """A file's Hub checksums: a cache blob's name is already its ETag; anything else is hashed (once)."""
        name = entry.real.name
        if blobs is not None and entry.real.parent == blobs and (is_sha256(name) or is_git_sha1(name)):
            return FileInfo(entry.path, entry.real, entry.size, name, is_sha256(name), entry.mtime_ns)
        lfs = is_lfs_file(entry.path, entry.size)
        etag = self.checksums.digest(entry.real, SHA256 if lfs else GIT_SHA1)
        return FileInfo(entry.path, entry.real, entry.size, etag, lfs, entry.mtime_ns)

    def _cache_commit(self, location: RepoLocation, revision: str) -> str:
        """Map a branch (``refs/<revision>``) or a commit id to a snapshot folder name, inside ROOT."""
        missing = RevisionNotFoundError(f"revision {revision!r} not found in {location.repo_id}")
        commit = cached_commit(location.base, revision)  # a ref inside the repo's folder, or a commit id
        if commit is None:
            raise missing
        snapshot_dir = location.base / "snapshots" / commit
        if not self.confinement.contains(snapshot_dir) or not snapshot_dir.is_dir():
            raise missing
        return commit


_REPO_TYPE_OF_PREFIX = {"models": "model", "datasets": "dataset"}


def _visible_folders(folder: Path) -> list[str]:
    """Names of the non-hidden folders (or links to folders) directly in ``folder``, sorted."""
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    except OSError:
        return []


def _plain_candidates(top: Path, repo_type: str, *, only: str | None = None) -> list[tuple[str, str]]:
    """Repo ids a plain tree under ``top`` may hold: ``name`` and every ``name/sub`` (find() decides)."""
    result = []
    for name in [only] if only is not None else _visible_folders(top):
        result.append((repo_type, name))
        result += [(repo_type, f"{name}/{sub}") for sub in _visible_folders(top / name)]
    return result


def _has_regular_file(folder: Path) -> bool:
    """Whether a regular (non-hidden) file sits directly in ``folder``: the mark of a no-org repo."""
    try:
        with os.scandir(folder) as entries:
            return any(not e.name.startswith(".") and e.is_file() for e in entries)
    except OSError:
        return False


def _make_snapshot(
    location: RepoLocation, commit: str, files: dict[str, FileInfo], scanned: list[ScannedFile]
) -> Snapshot:
    last_modified = max((entry.mtime_ns for entry in scanned), default=0) / 1e9
    return snapshot_of(location.repo_type, location.repo_id, commit, files, last_modified)


def snapshot_of(
    repo_type: str, repo_id: str, commit: str, files: dict[str, FileInfo], last_modified: float
) -> Snapshot:
    """A snapshot of ``files`` (by path, sorted), with every folder they imply."""
    directories = {path.rsplit("/", 1)[0] for path in files if "/" in path}
    for directory in list(directories):  # add every ancestor: a/b/c.txt gives a and a/b
        parts = directory.split("/")
        directories.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return Snapshot(repo_type, repo_id, commit, files, last_modified, frozenset(directories))
