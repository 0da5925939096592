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
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import constants
from .hashing import file_digest
from .listing import RemoteFile, RepoListing
from .paths import safe_join

__all__ = ["CacheLayout", "Layout", "LocalDirLayout", "repo_folder_name"]


def repo_folder_name(repo_id: str, repo_type: str) -> str:
    """``models--org--name``, as huggingface_hub names a repo's folder in the cache."""
    return f"{repo_type}s--" + repo_id.replace("/", "--")


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
        """Move a verified partial file into its final place, atomically."""
        raise NotImplementedError

    def finish_revision(self) -> None:
        """Anything to record once every file is in place."""

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
        os.replace(verified_partial, self.blob_path(file))
        self._link_snapshot(file)

    def _link_snapshot(self, file: RemoteFile) -> None:
        """``snapshots/<commit>/<path>`` -> relative symlink to ``blobs/<oid>`` (a copy if links fail)."""
        link = self.snapshot_path(file)
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(self.blob_path(file), link.parent)
        if link.is_symlink() and os.readlink(link) == target:
            return
        temporary = link.with_name(f".{link.name}.{os.getpid()}.tmp")
        try:
            temporary.unlink(missing_ok=True)
            os.symlink(target, temporary)
        except OSError:  # file systems without symlinks: copy, as huggingface_hub does
            shutil.copyfile(self.blob_path(file), temporary)
        os.replace(temporary, link)

    def finish_revision(self) -> None:
        """Record ``refs/<revision>`` -> commit, so from_pretrained(revision=...) works offline."""
        if self.listing.revision == self.listing.commit:
            return
        ref = safe_join(self.repo_dir / "refs", self.listing.revision, follow_last=False)
        ref.parent.mkdir(parents=True, exist_ok=True)
        temporary = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
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

    def _bookkeeping(self, file: RemoteFile, suffix: str) -> Path:
        return safe_join(
            self.local_dir / ".cache" / "huggingface" / "download", file.path + suffix, follow_last=False
        )

    def final_path(self, file: RemoteFile) -> Path:
        return safe_join(self.local_dir, file.path, follow_last=False)

    def partial_path(self, file: RemoteFile) -> Path:
        return self._bookkeeping(file, constants.PARTIAL_SUFFIX)

    def lock_path(self, file: RemoteFile) -> Path:
        return self._bookkeeping(file, ".lock")

    def metadata_path(self, file: RemoteFile) -> Path:
        return self._bookkeeping(file, ".metadata")

    def is_complete(self, file: RemoteFile, *, repair: bool = True) -> bool:
        """Complete if the metadata (ours or huggingface_hub's) vouches for the file as it is now, or if
        an unvouched file of the right size hashes to the right checksum (then, with ``repair``, the
        metadata is written so the next run need not hash it again)."""
        final = self.final_path(file)
        try:
            stat = final.stat()
        except FileNotFoundError:
            return False
        if stat.st_size != file.size:
            return False
        try:
            commit, etag, timestamp = self.metadata_path(file).read_text().splitlines()[:3]
            if etag.strip() == file.oid and stat.st_mtime - 1 <= float(timestamp):
                return True
        except (OSError, ValueError):
            pass
        signature = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
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
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(verified_partial, final)
        self._write_metadata(file)

    def _write_metadata(self, file: RemoteFile) -> None:
        path = self.metadata_path(file)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(f"{self.listing.commit}\n{file.oid}\n{time.time()}\n")
        os.replace(temporary, path)
