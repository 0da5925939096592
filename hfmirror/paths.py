"""Safe handling of file names that come from the network.

Both the server (names in a URL) and the downloader (names in a listing) take relative file names
from untrusted peers and join them onto a root folder. Everything that could make such a name leave
its root is refused here, in one place: absolute paths, ``..`` and ``.`` segments, empty segments,
backslashes, drive letters, NUL and other control characters, and symlinks that resolve elsewhere.

The Hub's own rules are applied too, so that nothing the Hub itself would refuse is ever written:
``.git`` and ``.cache`` are refused as any segment (a planted ``.git/config`` runs its
``core.fsmonitor`` command on the next ``git status``; ``.cache/huggingface`` holds the bookkeeping of
a ``--local-dir``), and so is a segment longer than 255 bytes, the most a file name can be on the
file systems people use (ext4, XFS, APFS, NTFS).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UnsafePathError

__all__ = ["MAX_SEGMENT_BYTES", "safe_join", "validate_relative_path"]

_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
_MAX_NAME_LENGTH = 4096
# Bytes in one segment (one file or folder name), as the Hub and common file systems allow.
MAX_SEGMENT_BYTES = 255
# Segments the Hub refuses anywhere in a path. Compared without case and without trailing dots and
# spaces, which case-insensitive (macOS, Windows) or trailing-dot-stripping (Windows) file systems
# would make the same folder.
_RESERVED_SEGMENTS = frozenset({".git", ".cache"})


def validate_relative_path(name: str) -> str:
    """Return ``name`` if it is a plain, relative, forward-slash path that stays inside its root.

    Raises:
        UnsafePathError: naming the offending input, if it could leave the root or is malformed.
    """
    if not isinstance(name, str) or not name:
        raise UnsafePathError("empty file name")
    shown = name if len(name) <= 200 else name[:200] + "..."
    if len(name) > _MAX_NAME_LENGTH:
        raise UnsafePathError(f"file name too long: {shown!r}")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise UnsafePathError(f"control character in file name: {shown!r}")
    if "\\" in name:
        raise UnsafePathError(f"backslash in file name: {shown!r}")
    if name.startswith("/") or _DRIVE_LETTER.match(name):
        raise UnsafePathError(f"absolute file name: {shown!r}")
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            raise UnsafePathError(f"file name with an empty, '.' or '..' segment: {shown!r}")
        if segment.rstrip(". ").casefold() in _RESERVED_SEGMENTS:
            raise UnsafePathError(f"file name with a reserved '.git' or '.cache' segment: {shown!r}")
        if len(segment.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
            raise UnsafePathError(f"file name with a segment over {MAX_SEGMENT_BYTES} bytes: {shown!r}")
    return name


def safe_join(root: str | os.PathLike[str], name: str, *, follow_last: bool = True) -> Path:
    """Join a validated relative ``name`` onto ``root`` and check the result is still inside ``root``.

    Symlinks along the way are followed: a link that points outside ``root`` is refused, a link that
    stays inside is fine. The path need not exist. With ``follow_last=False`` only the parent folders
    are checked: right for a path that is about to be *replaced* (``os.replace`` swaps a symlink itself,
    never writes through it), such as a snapshot entry that links into the cache's ``blobs/``.

    Raises:
        UnsafePathError: if ``name`` is malformed or the joined path resolves outside ``root``.
    """
    validate_relative_path(name)
    real_root = Path(os.path.realpath(root))
    joined = Path(root, *name.split("/"))
    real = Path(os.path.realpath(joined if follow_last else joined.parent)) / (
        "" if follow_last else joined.name
    )
    if real != real_root and real_root not in real.parents:
        raise UnsafePathError(f"file name resolves outside its root: {name!r}")
    return joined
