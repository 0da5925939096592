"""Where files go on disk: the Hugging Face cache, or a plain local folder.

Both layouts are the ones huggingface_hub itself writes, so each tool finds the other's files:

* **Cache** (default): ``{cache}/models--org--name/blobs/<oid>`` holds the content, named by its
  checksum; ``snapshots/<commit>/<path>`` is a relative symlink into ``blobs/``; ``refs/<revision>``
  holds the commit. Locks live at ``{cache}/.locks/models--org--name/<oid>.lock``, the same files
  huggingface_hub locks, so the two never write one blob at once.
* **Local folder** (``--local-dir``): plain files at ``{dir}/<path>``, with huggingface_hub's
  bookkeeping in ``{dir}/.cache/huggingface/download/<path>.metadata`` (commit, etag, time).

Partial data lives next to where the final file will appear (same file system, so the final step is an
atomic rename) with the ``.hfmirror.incomplete`` suffix, and its resume state in ``.hfmirror.json``.

Names up to the Hub's limit (255 bytes per segment) fit in both layouts: a bookkeeping name that
would be longer with its suffix is made from a hash of the file's name instead (huggingface_hub
cannot write those files at all), and temporary files get short names of their own.

Once every file is in place, the listing is recorded as huggingface_hub records it,
``trees/<commit>.json`` (in the repo's cache folder, or ``{dir}/.cache/huggingface/``): that is how
either tool, offline, can tell a complete snapshot from a partial one (:mod:`hfmirror.offline`).

Whatever the file system refuses while files are put in place (a folder where a file goes, a file
where a folder goes, no permission) is raised as :class:`~hfmirror.errors.StorageError`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import constants
from .errors import HfMirrorError, StorageError, UnsafePathError
from .hashing import file_digest, is_git_sha1, is_sha256
from .listing import RemoteFile, RepoListing
from .paths import MAX_SEGMENT_BYTES, safe_join

__all__ = [
    "CacheLayout",
    "Layout",
    "LocalDirLayout",
    "cached_commit",
    "fitting_name",
    "local_dir_bookkeeping",
    "recorded_path",
    "repo_folder_name",
    "snapshot_origin",
    "tree_listing_path",
]

logger = logging.getLogger(__name__)

# huggingface_hub's own record of a commit's files (huggingface_hub._tree_cache, format 1).
TREE_FORMAT_VERSION = 1
# The longest suffix a bookkeeping name gets: the resume state of a partial file, while it is saved.
_LONGEST_SUFFIX = constants.PARTIAL_SUFFIX + constants.STATE_SUFFIX + ".tmp"


def repo_folder_name(repo_id: str, repo_type: str) -> str:
    """``models--org--name``, as huggingface_hub names a repo's folder in the cache."""
    return f"{repo_type}s--" + repo_id.replace("/", "--")


# A ref holds a 40-character commit id and a newline; more is not a ref, and is not read.
_MAX_REF_BYTES = 100


def cached_commit(repo_dir: Path, revision: str) -> str | None:
    """The commit ``revision`` names in a repo's cache folder, as huggingface_hub reads it:
    ``refs/<revision>`` if there is such a ref, else ``revision`` itself if it is a commit id.

    A ref that cannot be read, or whose path would leave ``repo_dir`` (a crafted revision, a symlink
    out), is no ref; a ref that does not hold a commit id names nothing (None). The one reader of
    ``refs/``: the downloader offline, ``verify``, and both servers ask it.
    """
    fallback = revision if is_git_sha1(revision) else None
    try:
        with open(safe_join(repo_dir, f"refs/{revision}"), "rb") as f:
            content = f.read(_MAX_REF_BYTES).decode("ascii", errors="replace").strip()
    except (OSError, UnsafePathError):
        return fallback
    return content if is_git_sha1(content) else None


def snapshot_origin(folder: Path) -> tuple[str, str] | None:
    """(repo id, commit) of a model snapshot folder of a Hugging Face cache,
    ``{cache}/models--org--name/snapshots/<commit>``; None for any other folder.

    The inverse of :func:`repo_folder_name`: the Hub forbids ``--`` in repo ids, so ``--`` in the
    folder name can only be the ``/``.
    """
    folder = Path(folder).absolute()
    repo_folder = folder.parent.parent.name
    if folder.parent.name != "snapshots" or not repo_folder.startswith("models--"):
        return None
    if len(folder.name) != 40 or any(c not in "0123456789abcdef" for c in folder.name):
        return None  # a commit is 40 lowercase hex digits
    return repo_folder.removeprefix("models--").replace("--", "/"), folder.name


def tree_listing_path(folder: Path, commit: str) -> Path:
    """Where huggingface_hub keeps the listing of ``commit``: ``{folder}/trees/<commit>.json``, ``folder``
    being the repo's cache folder or ``{local_dir}/.cache/huggingface``."""
    return folder / "trees" / f"{commit}.json"


def fitting_name(name: str, suffix: str, *, room: str = "") -> str:
    """``name + suffix``, or, if ``name`` plus ``room`` (default: the suffix; give the longest suffix
    the name will ever get) is longer than a file name can be, a hash of ``name`` (as huggingface_hub
    names its own incomplete files) plus ``suffix``."""
    if len((name + (room or suffix)).encode("utf-8", "surrogatepass")) <= MAX_SEGMENT_BYTES:
        return name + suffix
    digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).digest()
    return base64.urlsafe_b64encode(digest).decode() + suffix


def local_dir_bookkeeping(local_dir: Path, path: str, suffix: str, *, room: str = "") -> Path:
    """``{dir}/.cache/huggingface/download/<path><suffix>`` (huggingface_hub's names), with a hashed
    last segment when the name is too long for that (see :func:`fitting_name`)."""
    folder, _, name = path.rpartition("/")
    fitted = fitting_name(name, suffix, room=room)
    if folder:
        fitted = f"{folder}/{fitted}"
    return safe_join(local_dir / ".cache" / "huggingface" / "download", fitted, follow_last=False)


def recorded_path(download_records: Path, metadata: Path) -> str:
    """The repo path a local dir's ``<path>.metadata`` is the record of (``download_records`` being
    ``{dir}/.cache/huggingface/download``): its own name, or, for a hashed name, the path written on
    its fourth line."""
    name = metadata.relative_to(download_records).as_posix().removesuffix(".metadata")
    try:
        lines = metadata.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return name
    if len(lines) >= 4:
        folder, _, _ = name.rpartition("/")
        written = lines[3].strip()
        if written.rpartition("/")[0] == folder and fitting_name(written.rpartition("/")[2], ".metadata") == (
            metadata.name
        ):
            return written
    return name


def _temporary_beside(path: Path) -> Path:
    """A short, unique name in ``path``'s folder to write to before an atomic rename onto ``path``
    (a name built from ``path``'s own could be too long)."""
    return path.with_name(f".hfmirror-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Raise what the file system refuses while doing ``what`` as a StorageError with a plain message."""
    try:
        yield
    except HfMirrorError:
        raise
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        raise StorageError(f"cannot {what}: {error.strerror or error}{where}") from None


def _obstacle(root: Path, target: Path) -> str | None:
    """What stands in the way of a file at ``target`` under ``root``: a folder where the file goes, or a
    file (not a folder) where one of its folders goes. None if nothing does."""
    try:
        info = target.lstat()
        if stat.S_ISDIR(info.st_mode):
            return f"{target} is a folder, where a file of the repository goes"
    except FileNotFoundError:
        pass
    except NotADirectoryError:
        pass
    folder = target.parent
    while folder != root and root in folder.parents:
        try:
            if not folder.is_dir() and folder.exists():
                return f"{folder} is a file, where a folder of the repository goes"
        except OSError:
            pass
        folder = folder.parent
    return None


def write_tree_listing(folder: Path, listing: RepoListing) -> None:
    """Record the commit's full listing as huggingface_hub does, unless it is there already.

    Skipped when the listing lacks the git blob id of an LFS file: the record would not be faithful.
    A failure to write is not an error (the files are in place); offline answers are then less sure.
    """
    path = tree_listing_path(folder, listing.commit)
    if path.exists():
        return
    entries: dict[str, dict[str, object]] = {}
    for file in listing.files:
        if is_sha256(file.oid):
            if not file.blob_id:
                return
            entries[file.path] = {"size": file.size, "blob_id": file.blob_id, "lfs_sha256": file.oid}
            entries[file.path]["lfs_size"] = file.size
        else:
            entries[file.path] = {"size": file.size, "blob_id": file.oid}
    body = {"format_version": TREE_FORMAT_VERSION, "files": dict(sorted(entries.items()))}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = _temporary_beside(path)
        temporary.write_text(json.dumps(body, indent=1), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:
        logger.info("could not record the listing in %s: %s", path, error)


@dataclass(frozen=True)
class Layout:
    """What every layout provides; see the two subclasses."""

    listing: RepoListing

    @property
    def result_path(self) -> Path:
        """The folder a user (or from_pretrained) opens: snapshot folder or local dir."""
        raise NotImplementedError

    def partial_path(self, file: RemoteFile) -> Path:
        raise NotImplementedError

    def lock_path(self, file: RemoteFile) -> Path:
        raise NotImplementedError

    def state_path(self, file: RemoteFile) -> Path:
        return self.partial_path(file).with_name(self.partial_path(file).name + constants.STATE_SUFFIX)

    def is_complete(self, file: RemoteFile, *, repair: bool = True) -> bool:
        """True if a verified copy is already in place.

        With ``repair`` (the default) it also tidies up what it finds: makes missing links, records
        missing metadata, removes a blob of the wrong size. ``repair=False`` only looks (dry runs).
        """
        raise NotImplementedError

    def finalize(self, file: RemoteFile, verified_partial: Path) -> None:
        """Move a verified partial file into its final place, atomically.

        Raises:
            StorageError: if the file system refuses (see :func:`storage_errors`).
        """
        raise NotImplementedError

    def obstacle(self, file: RemoteFile) -> str | None:
        """What on disk would stop ``file`` from being put in place (checked before fetching it)."""
        raise NotImplementedError

    def finish_revision(self) -> None:
        """Anything to record once every file is in place (the listing, refs)."""

    def storage_root(self) -> Path:
        """A folder that will hold the data (for free-space and writability checks)."""
        raise NotImplementedError


@dataclass(frozen=True)
class CacheLayout(Layout):
    cache_dir: Path

    @property
    def repo_dir(self) -> Path:
        return self.cache_dir / repo_folder_name(self.listing.repo_id, self.listing.repo_type)

    @property
    def result_path(self) -> Path:
        return self.repo_dir / "snapshots" / self.listing.commit

    def storage_root(self) -> Path:
        return self.repo_dir / "blobs"

    def blob_path(self, file: RemoteFile) -> Path:
        return self.repo_dir / "blobs" / file.oid

    def snapshot_path(self, file: RemoteFile) -> Path:
        return safe_join(self.result_path, file.path, follow_last=False)

    def partial_path(self, file: RemoteFile) -> Path:
        return self.repo_dir / "blobs" / (file.oid + constants.PARTIAL_SUFFIX)

    def lock_path(self, file: RemoteFile) -> Path:
        folder = repo_folder_name(self.listing.repo_id, self.listing.repo_type)
        return self.cache_dir / ".locks" / folder / f"{file.oid}.lock"

    def is_complete(self, file: RemoteFile, *, repair: bool = True) -> bool:
        blob = self.blob_path(file)
        try:
            if blob.stat().st_size != file.size:
                # Not ours to trust: a blob must match its listed size. Fetch it again.
                if repair:
                    blob.unlink()
                return False
        except FileNotFoundError:
            return False
        if repair:
            self._link_snapshot(file)
        return True

    def finalize(self, file: RemoteFile, verified_partial: Path) -> None:
        with storage_errors(f"put {file.path} in place in {self.repo_dir}"):
            os.replace(verified_partial, self.blob_path(file))
            self._link_snapshot(file)

    def obstacle(self, file: RemoteFile) -> str | None:
        return _obstacle(self.result_path, self.snapshot_path(file))

    def _link_snapshot(self, file: RemoteFile) -> None:
        """``snapshots/<commit>/<path>`` -> relative symlink to ``blobs/<oid>`` (a copy if links fail)."""
        link = self.snapshot_path(file)
        with storage_errors(f"link {file.path} into {self.result_path}"):
            link.parent.mkdir(parents=True, exist_ok=True)
            target = os.path.relpath(self.blob_path(file), link.parent)
            if link.is_symlink() and os.readlink(link) == target:
                return
            temporary = _temporary_beside(link)
            try:
                os.symlink(target, temporary)
            except OSError:  # file systems without symlinks: copy, as huggingface_hub does
                shutil.copyfile(self.blob_path(file), temporary)
            os.replace(temporary, link)

    def finish_revision(self) -> None:
        """Record the listing, and ``refs/<revision>`` -> commit so from_pretrained(revision=...) works
        offline."""
        write_tree_listing(self.repo_dir, self.listing)
        if self.listing.revision == self.listing.commit:
            return
        with storage_errors(f"record the revision {self.listing.revision!r} in {self.repo_dir}"):
            ref = safe_join(self.repo_dir / "refs", self.listing.revision, follow_last=False)
            ref.parent.mkdir(parents=True, exist_ok=True)
            temporary = _temporary_beside(ref)
            temporary.write_text(self.listing.commit)
            os.replace(temporary, ref)


@dataclass(frozen=True)
class LocalDirLayout(Layout):
    local_dir: Path
    # Files hashed and found wrong, by path: (device, inode, size, mtime) as they were then. The check
    # under the file's lock then need not hash the same unchanged file again (a 15 GB file: ~10 s).
    # Only verdicts of "wrong" are kept: a stale one can cost a fetch, never let a bad file through.
    _found_wrong: dict[Path, tuple[int, ...]] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    @property
    def result_path(self) -> Path:
        return self.local_dir

    def storage_root(self) -> Path:
        return self.local_dir

    def final_path(self, file: RemoteFile) -> Path:
        return safe_join(self.local_dir, file.path, follow_last=False)

    def partial_path(self, file: RemoteFile) -> Path:
        return local_dir_bookkeeping(
            self.local_dir, file.path, constants.PARTIAL_SUFFIX, room=_LONGEST_SUFFIX
        )

    def lock_path(self, file: RemoteFile) -> Path:
        # huggingface_hub's own lock, so that the two tools never write one file at once.
        return local_dir_bookkeeping(self.local_dir, file.path, ".lock")

    def metadata_path(self, file: RemoteFile) -> Path:
        return local_dir_bookkeeping(self.local_dir, file.path, ".metadata")

    def obstacle(self, file: RemoteFile) -> str | None:
        return _obstacle(self.local_dir, self.final_path(file))

    def is_complete(self, file: RemoteFile, *, repair: bool = True) -> bool:
        """Complete if the metadata (ours or huggingface_hub's) vouches for the file as it is now, or if
        an unvouched file of the right size hashes to the right checksum (then, with ``repair``, the
        metadata is written so the next run need not hash it again)."""
        final = self.final_path(file)
        try:
            info = final.stat()
        except (FileNotFoundError, NotADirectoryError):
            return False
        if not stat.S_ISREG(info.st_mode) or info.st_size != file.size:
            return False
        try:
            commit, etag, timestamp = self.metadata_path(file).read_text().splitlines()[:3]
            if etag.strip() == file.oid and info.st_mtime - 1 <= float(timestamp):
                return True
        except (OSError, ValueError):
            pass
        signature = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        if self._found_wrong.get(final) == signature:
            return False
        if file_digest(final, file.oid) != file.oid:
            self._found_wrong[final] = signature
            return False
        if repair:
            self._write_metadata(file)
        return True

    def finalize(self, file: RemoteFile, verified_partial: Path) -> None:
        final = self.final_path(file)
        with storage_errors(f"put {file.path} in place in {self.local_dir}"):
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(verified_partial, final)
            self._write_metadata(file)

    def _write_metadata(self, file: RemoteFile) -> None:
        """huggingface_hub's three lines (commit, etag, time); under a hashed name, also the file's path,
        which the name no longer says (see :func:`recorded_path`)."""
        path = self.metadata_path(file)
        record = f"{self.listing.commit}\n{file.oid}\n{time.time()}\n"
        if path.name != file.path.rpartition("/")[2] + ".metadata":
            record += f"{file.path}\n"
        with storage_errors(f"record the metadata of {file.path}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = _temporary_beside(path)
            temporary.write_text(record)
            os.replace(temporary, path)

    def finish_revision(self) -> None:
        """Record the listing where huggingface_hub keeps it for a local folder."""
        write_tree_listing(self.local_dir / ".cache" / "huggingface", self.listing)
