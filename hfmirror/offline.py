"""Answers without the network: what the cache (or a ``--local-dir``) already holds of what was asked.

Used when no endpoint can be reached, and always with ``HF_HUB_OFFLINE=1``, as huggingface_hub does.
The answer must be what was asked for, not whatever happens to be there: every file named, and every
file of the commit that the globs select, must be present, or :class:`~hfmirror.errors.NetworkError`
names what is missing (a file the commit does not have at all is an
:class:`~hfmirror.errors.EntryNotFoundError`). Which files the commit has comes from
huggingface_hub's record of its listing, ``trees/<commit>.json``, which our downloads write too;
without one (an older cache), only the names given can be checked, and the globs select among the
files present.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import EntryNotFoundError, NetworkError, UnsafePathError
from .hashing import is_git_sha1
from .layout import cached_commit, local_dir_bookkeeping, repo_folder_name, tree_listing_path
from .listing import RemoteFile, filter_files

__all__ = ["OfflineAnswer", "offline_answer"]


@dataclass(frozen=True)
class OfflineAnswer:
    """Where the files asked for are, the commit they belong to, and each one's path and size.

    ``missing`` is only ever non-empty for a dry run: what was asked for and is not here.
    """

    path: Path
    commit: str
    files: list[tuple[str, int]]
    missing: list[tuple[str, int]]


def offline_answer(
    repo_id: str,
    *,
    repo_type: str,
    revision: str,
    filenames: list[str] | None,
    include: list[str] | None,
    exclude: list[str] | None,
    cache_dir: Path,
    local_dir: Path | None,
    reason: str,
    dry_run: bool = False,
) -> OfflineAnswer:
    """The files asked for, from the cache (``local_dir`` None) or from ``local_dir``.

    ``reason`` says why the network is not used ("offline mode (HF_HUB_OFFLINE is set)", or what the
    endpoints said); it begins every error message. A ``dry_run`` only looks: what is missing is
    returned in ``missing`` instead of raised (a plan may well show files that are not here yet).

    Raises:
        NetworkError: naming what is not here; EntryNotFoundError: a named file the commit lacks.
    """
    if local_dir is None:
        repo_dir = cache_dir / repo_folder_name(repo_id, repo_type)
        commit = cached_commit(repo_dir, revision) or ""
        root = repo_dir / "snapshots" / commit if commit else None
        if root is None or not root.is_dir():
            raise NetworkError(f"{reason}, and the cache has no copy of {repo_id} at {revision!r}")
        present = _files_under(root)
        listed = _read_listing(repo_dir, commit)
    else:
        root = local_dir
        if not root.is_dir():
            raise NetworkError(f"{reason}, and {root} does not exist")
        present, commit = _local_files(root, revision)
        listed = _read_listing(root / ".cache" / "huggingface", commit) if commit else None
    where = f"{repo_id} at {commit[:12] if commit else revision!r}"

    universe = listed if listed is not None else present
    named = list(dict.fromkeys(filenames or []))
    unknown = [name for name in named if name not in universe]
    if unknown and listed is not None:
        raise EntryNotFoundError(f"not in {where}: {', '.join(unknown)}")
    known = [name for name in named if name in universe]
    candidates = [RemoteFile(path, size, "") for path, size in universe.items()]
    chosen = filter_files(candidates, filenames=known, include=include, exclude=exclude)
    if named and not known:
        chosen = []  # filter_files reads an empty list of names as "every file"
    missing = unknown + [f.path for f in chosen if present.get(f.path) != f.size]
    if missing and dry_run and listed is not None:
        here = [(f.path, f.size) for f in chosen if f.path not in missing]
        absent = [(f.path, f.size) for f in chosen if f.path in missing]
        return OfflineAnswer(path=root, commit=commit, files=here, missing=absent)
    if missing:
        sample = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise NetworkError(f"{reason}, and the copy of {where} here lacks what was asked for: {sample}")
    if not chosen and listed is None:
        raise NetworkError(f"{reason}, and the copy of {where} here holds no file matching what was asked")
    return OfflineAnswer(path=root, commit=commit, files=[(f.path, f.size) for f in chosen], missing=[])


def _files_under(root: Path) -> dict[str, int]:
    """Every regular file under ``root`` (links followed), by repo path, with its size."""
    found: dict[str, int] = {}
    for path in sorted(root.rglob("*")):
        try:
            if path.is_file():
                found[path.relative_to(root).as_posix()] = path.stat().st_size
        except OSError:
            continue
    return found


def _local_files(root: Path, revision: str) -> tuple[dict[str, int], str]:
    """The files of a local folder outside its ``.cache/``, and the commit they belong to ("" if no
    metadata says). A folder may hold files of several commits (an update cut short): only those of
    the commit asked for, or of the commit most of them name, count."""
    files = {path: size for path, size in _files_under(root).items() if not path.startswith(".cache/")}
    commits: dict[str, str] = {}
    for path in files:
        try:
            metadata = local_dir_bookkeeping(root, path, ".metadata").read_text().splitlines()
        except (OSError, UnsafePathError):
            continue
        if metadata and is_git_sha1(metadata[0].strip()):
            commits[path] = metadata[0].strip()
    if is_git_sha1(revision):
        commit = revision
    elif commits:
        commit = Counter(commits.values()).most_common(1)[0][0]
    else:
        return files, ""
    return {path: size for path, size in files.items() if commits.get(path) == commit}, commit


def _read_listing(folder: Path, commit: str) -> dict[str, int] | None:
    """The commit's files and sizes as recorded in ``trees/<commit>.json``, or None if there is no
    usable record."""
    try:
        data = json.loads(tree_listing_path(folder, commit).read_text(encoding="utf-8"))
        if data.get("format_version") != 1:
            return None
        return {str(path): int(entry["size"]) for path, entry in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
