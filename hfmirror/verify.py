"""``hfmirror verify``: hash what is on disk again and compare it with what was recorded at download time.

Offline: no server is asked (``hf cache verify`` asks the Hub for the checksums). What was recorded:

* **In the cache**, a blob's name *is* its checksum (sha256 for LFS files, git blob sha1 otherwise),
  and the links in ``snapshots/<commit>/`` say which files make up the revision. So each link is
  followed to its blob, and the blob hashed and compared with its own name. A link to a blob that is
  gone is reported as missing, a link out of ``blobs/`` as wrong.
* **In a local dir**, ``.cache/huggingface/download/<path>.metadata`` (written by huggingface_hub and
  by us) holds the commit and the ETag, which is the checksum. A record whose file is gone is
  reported as missing. Files without a record were not downloaded into this folder: they are counted,
  not judged.

A file with nothing to compare against (a snapshot entry that is a plain copy, a record whose ETag
is not a checksum) is reported as unchecked; it does not make the verdict fail.

:func:`repair` then removes what is wrong (under the same lock a download takes, so it never races
one) and fetches those files again through :func:`hfmirror.download.download`, by commit, so the same
version comes back. A file is therefore right, or absent; never wrong and in place.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from . import constants
from .errors import BadInputError, RepoNotFoundError, RevisionNotFoundError, UnsafePathError
from .hashing import ContentHasher, is_git_sha1, is_sha256
from .layout import CacheLayout, LocalDirLayout, cached_commit, recorded_path, repo_folder_name
from .listing import RemoteFile, RepoListing, validate_repo_id, validate_revision
from .paths import safe_join
from .progress import Progress

__all__ = ["FileCheck", "VerifyReport", "repair", "verify"]

OK, MISMATCH, MISSING, UNCHECKED = "ok", "mismatch", "missing", "unchecked"
_READ_BLOCK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileCheck:
    """The verdict on one file of the revision (cache) or one recorded file (local dir)."""

    path: str  # relative path, as in the repository
    status: str  # OK, MISMATCH, MISSING or UNCHECKED
    detail: str = ""  # why, for anything but OK
    expected: str | None = None  # the checksum recorded at download time
    actual: str | None = None  # the checksum of what is on disk now
    size: int | None = None  # bytes on disk
    commit: str | None = None  # the commit the file was downloaded from
    # Where the content is (the blob, or the local file), and its (inode, size, mtime) when hashed:
    # repair removes it only if it is still the very file found wrong.
    location: Path | None = field(default=None, compare=False, repr=False)
    signature: tuple[int, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def wrong(self) -> bool:
        return self.status in (MISMATCH, MISSING)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "status": self.status,
            "detail": self.detail,
            "expected": self.expected,
            "actual": self.actual,
            "size": self.size,
            "commit": self.commit,
        }


@dataclass
class VerifyReport:
    """What :func:`verify` found; ``path`` is the snapshot folder or the local dir."""

    layout: str  # "cache" or "local-dir"
    path: Path
    repo_id: str | None
    repo_type: str
    revision: str | None
    commit: str | None  # the snapshot's commit (cache); None for a local dir
    files: list[FileCheck]
    unrecorded: int = 0  # local dir: files with no download record, not checked
    repaired: list[str] = field(default_factory=list)

    @property
    def wrong(self) -> list[FileCheck]:
        return [f for f in self.files if f.wrong]

    @property
    def unchecked(self) -> list[FileCheck]:
        return [f for f in self.files if f.status == UNCHECKED]

    @property
    def bytes_checked(self) -> int:
        return sum(f.size or 0 for f in self.files if f.status in (OK, MISMATCH))

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "path": str(self.path),
            "repo_id": self.repo_id,
            "repo_type": self.repo_type,
            "revision": self.revision,
            "commit": self.commit,
            "ok": not self.wrong,
            "files": [f.to_dict() for f in self.files],
            "wrong": [f.path for f in self.wrong],
            "unchecked": [f.path for f in self.unchecked],
            "unrecorded": self.unrecorded,
            "repaired": self.repaired,
            "bytes_checked": self.bytes_checked,
        }

    def problem_lines(self, *, unchecked: bool = True) -> list[str]:
        """One line per wrong file (and, with ``unchecked``, per file that could not be checked)."""
        ordered = self.wrong + (self.unchecked if unchecked else [])
        return [f"{f.status.upper():<9} {f.path}: {f.detail}" for f in ordered]

    def summary(self) -> str:
        """One line: what was checked, and the verdict."""
        what = self.repo_id or str(self.path)
        where = f"{what} @ {self.commit[:12]}" if self.commit else what
        checked = len(self.files) - len(self.unchecked)
        line = f"{where} ({self.layout}): {checked} files checked ({self.bytes_checked / 2**20:.1f} MiB)"
        if self.repaired:
            line += f", {len(self.repaired)} repaired"
        line += f"; {len(self.wrong)} wrong" if self.wrong else "; all match"
        if self.unchecked:
            line += f"; {len(self.unchecked)} unchecked (nothing recorded to compare with)"
        if self.unrecorded:
            line += f"; {self.unrecorded} files without a download record were not checked"
        return line


# ---------------------------------------------------------------------------------------- verify


def verify(
    repo_id: str | None = None,
    *,
    local_dir: str | os.PathLike[str] | None = None,
    repo_type: str = "model",
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    only: set[str] | None = None,
) -> VerifyReport:
    """Hash every file of a cached revision (or every recorded file of a local dir) and compare.

    Args:
        repo_id: the repository (needed for the cache; optional with ``local_dir``).
        local_dir: verify this folder instead of the cache.
        repo_type: ``"model"`` or ``"dataset"``.
        revision: branch, tag or commit in the cache (default ``main``); not for a local dir, where
            each file's record names its own commit.
        cache_dir: the cache folder (default HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub).
        progress: a progress bar (bytes hashed) on a terminal.
        only: check only these paths (used after a repair).

    Raises:
        BadInputError: malformed arguments.
        RepoNotFoundError, RevisionNotFoundError: nothing downloaded there to verify.
    """
    if repo_type not in ("model", "dataset"):
        raise BadInputError(f"repo type must be 'model' or 'dataset', not {repo_type!r}")
    if repo_id is not None:
        validate_repo_id(repo_id)
    if local_dir is not None:
        if revision is not None:
            raise BadInputError("--revision is for the cache; in a local dir each file records its commit")
        if cache_dir is not None:
            raise BadInputError("give --local-dir or --cache-dir, not both")
        return _verify_local_dir(repo_id, repo_type, Path(local_dir).expanduser().absolute(), progress, only)
    if repo_id is None:
        raise BadInputError("name a repository (REPO_ID), or a folder with --local-dir")
    revision = validate_revision(revision or "main")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else constants.default_cache_dir()
    return _verify_cache(repo_id, repo_type, revision, cache.absolute(), progress, only)


def _verify_cache(
    repo_id: str, repo_type: str, revision: str, cache: Path, progress: bool, only: set[str] | None
) -> VerifyReport:
    repo_dir = cache / repo_folder_name(repo_id, repo_type)
    if not repo_dir.is_dir():
        raise RepoNotFoundError(f"{repo_id} is not in the cache {cache} (nothing to verify)")
    commit = _cached_commit(repo_dir, repo_id, revision)
    snapshot = repo_dir / "snapshots" / commit
    blobs = repo_dir / "blobs"
    entries = [e for e in _snapshot_entries(snapshot) if only is None or e in only]

    targets = {name: _blob_of(snapshot / name, blobs) for name in entries}
    sizes = {blob: _size(blob) for blob, status, _ in targets.values() if blob is not None and not status}
    hashed: dict[Path, tuple[str | None, tuple[int, ...] | None]] = {}
    files = []
    with _HashProgress(sum(s for s in sizes.values() if s is not None), progress) as bar:
        for name in entries:
            blob, status, detail = targets[name]
            if status:  # wrong, missing or unchecked before any hashing
                files.append(FileCheck(name, status, detail, commit=commit, location=blob))
                continue
            assert blob is not None
            if blob not in hashed:  # several paths may share one blob: hash it once
                hashed[blob] = _hash(blob, blob.name, bar.advance)
            files.append(_verdict(name, blob.name, blob, *hashed[blob], sizes.get(blob), commit))
    return VerifyReport("cache", snapshot, repo_id, repo_type, revision, commit, files)


def _cached_commit(repo_dir: Path, repo_id: str, revision: str) -> str:
    """The commit a revision names in the cache: a snapshot folder, or ``refs/<revision>``."""
    snapshots = repo_dir / "snapshots"
    commit = cached_commit(repo_dir, revision)
    if commit is not None and (snapshots / commit).is_dir():
        return commit
    refs = sorted(
        p.relative_to(repo_dir / "refs").as_posix() for p in (repo_dir / "refs").rglob("*") if p.is_file()
    )
    here = sorted(p.name for p in snapshots.iterdir()) if snapshots.is_dir() else []
    found = f"refs: {', '.join(refs) or 'none'}; snapshots: {', '.join(c[:12] for c in here) or 'none'}"
    raise RevisionNotFoundError(f"no snapshot of {repo_id} at {revision!r} in the cache ({found})")


def _snapshot_entries(snapshot: Path) -> list[str]:
    """Every file or link in a snapshot, as a relative path (links to folders included, not followed)."""
    entries = []
    for folder, dirs, names in os.walk(snapshot):
        base = Path(folder)
        linked_dirs = [d for d in dirs if (base / d).is_symlink()]
        dirs[:] = [d for d in dirs if d not in linked_dirs]
        for name in names + linked_dirs:
            entries.append((base / name).relative_to(snapshot).as_posix())
    return sorted(entries)


def _blob_of(entry: Path, blobs: Path) -> tuple[Path | None, str, str]:
    """(the blob a snapshot entry links to, a status if it cannot simply be hashed, why).

    The link is read, not followed: a blob is a plain file directly in this repo's ``blobs/``, and a
    link that goes anywhere else is wrong, whatever is there.
    """
    if not entry.is_symlink():
        if entry.is_file():
            return None, UNCHECKED, "a plain file, not a link to a blob"
        return None, MISMATCH, "not a file"
    target = Path(os.path.normpath(entry.parent / os.readlink(entry)))
    if os.path.realpath(target.parent) != os.path.realpath(blobs):
        return None, MISMATCH, f"links outside the cache's blobs/ folder (to {os.readlink(entry)})"
    if not os.path.lexists(target):
        return target, MISSING, f"dangling link: blobs/{target.name} is gone"
    if target.is_symlink() or not target.is_file():
        return target, MISMATCH, f"blobs/{target.name} is not a plain file"
    return target, "", ""


def _verify_local_dir(
    repo_id: str | None, repo_type: str, local_dir: Path, progress: bool, only: set[str] | None
) -> VerifyReport:
    records = local_dir / ".cache" / "huggingface" / "download"
    if not local_dir.is_dir():
        raise RepoNotFoundError(f"no folder {local_dir} (nothing to verify)")
    if not records.is_dir():
        raise RepoNotFoundError(
            f"no download records in {local_dir} (.cache/huggingface/download): "
            "was it downloaded there with --local-dir?"
        )
    recorded: dict[str, Path] = {}
    for metadata in sorted(records.rglob("*.metadata")):
        name = recorded_path(records, metadata)  # a record under a hashed name says whose it is
        if only is None or name in only:
            recorded[name] = metadata
    plans = {name: _read_record(local_dir, name, metadata) for name, metadata in recorded.items()}
    total = sum(plan[3] or 0 for plan in plans.values() if not plan[2])
    files = []
    with _HashProgress(total, progress) as bar:
        for name, (final, record, problem, size) in plans.items():
            commit, expected = record
            if problem:
                files.append(FileCheck(name, problem[0], problem[1], expected, commit=commit, location=final))
                continue
            assert final is not None and expected is not None
            files.append(_verdict(name, expected, final, *_hash(final, expected, bar.advance), size, commit))
    unrecorded = 0 if only is not None else _count_unrecorded(local_dir, set(recorded))
    return VerifyReport("local-dir", local_dir, repo_id, repo_type, None, None, files, unrecorded)


def _read_record(
    local_dir: Path, name: str, metadata: Path
) -> tuple[Path | None, tuple[str | None, str | None], tuple[str, str] | None, int | None]:
    """(the file, (commit, checksum) recorded, (status, why) if it cannot be hashed, its size)."""
    try:
        final = safe_join(local_dir, name)
    except UnsafePathError as error:
        return None, (None, None), (UNCHECKED, f"a download record for an unsafe path: {error}"), None
    try:
        lines = metadata.read_text().splitlines()
        commit, etag = lines[0].strip(), lines[1].strip().lower()
    except (OSError, UnicodeDecodeError, IndexError):
        return final, (None, None), (UNCHECKED, "its download record cannot be read"), None
    if not os.path.lexists(final):
        return final, (commit, etag), (MISSING, "recorded as downloaded, but the file is gone"), None
    if not (is_sha256(etag) or is_git_sha1(etag)):
        return final, (commit, None), (UNCHECKED, f"the recorded ETag {etag[:20]!r} is not a checksum"), None
    if not final.is_file():
        return final, (commit, etag), (MISMATCH, "not a plain file"), None
    return final, (commit, etag), None, _size(final)


def _count_unrecorded(local_dir: Path, recorded: set[str]) -> int:
    count = 0
    for folder, dirs, names in os.walk(local_dir):
        if Path(folder) == local_dir:
            dirs[:] = [d for d in dirs if d != ".cache"]
        for name in names:
            if (Path(folder) / name).relative_to(local_dir).as_posix() not in recorded:
                count += 1
    return count


def _verdict(
    name: str,
    expected: str,
    location: Path,
    actual: str | None,
    signature: tuple[int, ...] | None,
    size: int | None,
    commit: str | None,
) -> FileCheck:
    common = {"expected": expected, "actual": actual, "size": size, "commit": commit}
    if actual is None:
        return FileCheck(name, MISSING, "vanished while being verified", location=location, **common)
    if not (is_sha256(expected) or is_git_sha1(expected)):
        return FileCheck(name, UNCHECKED, f"blob name {expected[:20]!r} is not a checksum", **common)
    if actual == expected:
        return FileCheck(name, OK, location=location, signature=signature, **common)
    kind = "sha256" if is_sha256(expected) else "git sha1"
    detail = f"{kind} is {actual[:12]}..., recorded {expected[:12]}... ({size} bytes on disk)"
    return FileCheck(name, MISMATCH, detail, location=location, signature=signature, **common)


def _hash(
    path: Path, expected: str, on_bytes: Callable[[int], None]
) -> tuple[str | None, tuple[int, ...] | None]:
    """(checksum of the file in the algorithm ``expected`` is written in, its signature); None if gone.

    A name that is not a checksum is returned as it is (the caller reports it as unchecked).
    """
    if not (is_sha256(expected) or is_git_sha1(expected)):
        return expected, None
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            hasher = ContentHasher(expected, stat.st_size)
            while block := f.read(_READ_BLOCK):
                hasher.update(block)
                on_bytes(len(block))
    except FileNotFoundError:
        return None, None
    return hasher.hexdigest(), _signature(stat)


def _signature(stat: os.stat_result) -> tuple[int, ...]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _listing(repo_id: str | None, repo_type: str, revision: str | None, commit: str | None) -> RepoListing:
    """A listing with no files: what the layouts need to name a repo's paths and locks."""
    return RepoListing(repo_id or "", repo_type, revision or "", commit or "", ())


class _HashProgress:
    """A bar of bytes hashed, on a terminal only (see hfmirror.progress)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = Progress(total_bytes=total, already=0, enabled=enabled)

    def __enter__(self) -> _HashProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()

    def advance(self, count: int) -> None:
        self._bar.advance("", count)


# ---------------------------------------------------------------------------------------- repair


def repair(
    report: VerifyReport,
    *,
    endpoints: list[str] | None = None,
    token: str | None = None,
    progress: bool = False,
) -> VerifyReport:
    """Remove what ``report`` found wrong and fetch it again; return the report with those files
    verified again (and named in ``repaired``).

    Each wrong file is removed under its download lock (if it is still the very file found wrong),
    then all of them are fetched by :func:`hfmirror.download.download`, from the commit they were
    downloaded from, and hashed once more here.

    Raises:
        BadInputError: a local dir without a repo id (its records do not name the repository).
        Any error of :func:`hfmirror.download.download` (network, not found, integrity...).
    """
    wrong = report.wrong
    if not wrong:
        return report
    if report.repo_id is None:
        raise BadInputError("--repair needs REPO_ID: a local dir's records do not say which repository")
    from .download import download

    in_cache = report.layout == "cache"
    cache_dir = report.path.parents[2] if in_cache else None  # {cache}/models--org--name/snapshots/<commit>
    local_dir = None if in_cache else report.path
    by_commit: dict[str, list[FileCheck]] = {}
    for check in wrong:
        if check.commit is None:
            raise BadInputError(f"cannot repair {check.path}: no commit is recorded for it")
        by_commit.setdefault(check.commit, []).append(check)
    for commit, checks in by_commit.items():
        listing = _listing(report.repo_id, report.repo_type, commit, commit)
        for check in checks:
            _remove_wrong(report, listing, check)
        download(
            report.repo_id,
            filenames=[c.path for c in checks],
            revision=commit,
            repo_type=report.repo_type,
            local_dir=local_dir,
            cache_dir=cache_dir,
            endpoints=endpoints,
            token=token,
            progress=progress,
        )
    names = {c.path for c in wrong}
    again = verify(
        report.repo_id,
        local_dir=local_dir,
        repo_type=report.repo_type,
        revision=report.commit,
        cache_dir=cache_dir,
        only=names,
    )
    fixed = {f.path: f for f in again.files}
    report.files = [fixed.get(f.path, f) if f.path in names else f for f in report.files]
    report.repaired = sorted(name for name in names if name in fixed and fixed[name].status == OK)
    return report


def _remove_wrong(report: VerifyReport, listing: RepoListing, check: FileCheck) -> None:
    """Delete the wrong thing behind ``check``, so a download puts the right one in its place.

    Content found wrong (it was hashed) is deleted under the file's download lock, and only if it is
    still the very file that was hashed. A wrong *entry* (a link out of ``blobs/``, something that is
    not a plain file) is unlinked itself, never what it points to. A missing file needs nothing.
    """
    if check.status == MISSING:
        return
    if check.signature is None:
        entry = report.path / check.path if report.layout == "cache" else check.location
        for path in (entry, check.location):
            if path is not None and (path.is_symlink() or (os.path.lexists(path) and not path.is_dir())):
                path.unlink()
        return
    assert check.location is not None
    file = RemoteFile(
        check.path, 0, check.location.name if report.layout == "cache" else check.expected or ""
    )
    if report.layout == "cache":
        lock_path = CacheLayout(listing, report.path.parents[2]).lock_path(file)
    else:
        lock_path = LocalDirLayout(listing, report.path).lock_path(file)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path)):
        try:
            if _signature(os.lstat(check.location)) == check.signature:
                check.location.unlink()
        except FileNotFoundError:
            pass
