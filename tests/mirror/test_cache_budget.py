"""--max-size on a cache laid out as huggingface_hub lays it out: what goes, what stays."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hfmirror.errors import InsufficientSpaceError
from hfmirror.server.eviction import CacheBudget, InUse, parse_size
from hfmirror.server.metrics import Metrics

KIB = 1024


def cached_blob(root: Path, name: str, size: int, accessed: float) -> Path:
    """A blob of ``size`` bytes in ``models--org--m``, linked from a snapshot, last read at ``accessed``."""
    repo = root / "models--org--m"
    blob = repo / "blobs" / (name * 64)[:64]
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(b"x" * size)
    os.utime(blob, (accessed, accessed))
    link = repo / "snapshots" / ("c" * 40) / f"{name}.bin"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    return blob


def test_least_recently_used_goes_first_but_never_one_in_use(tmp_path: Path) -> None:
    a = cached_blob(tmp_path, "a", 100 * KIB, accessed=1000)  # oldest, but being served
    b = cached_blob(tmp_path, "b", 100 * KIB, accessed=2000)
    c = cached_blob(tmp_path, "c", 100 * KIB, accessed=3000)
    in_use, metrics = InUse(), Metrics()
    budget = CacheBudget(tmp_path, 350 * KIB, in_use, metrics)
    incoming = tmp_path / "models--org--m" / "blobs" / ("d" * 64 + ".hfmirror.incomplete")
    with in_use.holding(a):
        budget.make_room(100 * KIB, incoming)
    assert a.exists() and not b.exists() and c.exists()
    assert not (tmp_path / "models--org--m/snapshots" / ("c" * 40) / "b.bin").is_symlink()
    assert (metrics.value("evictions"), metrics.value("evicted_bytes")) == (1, 100 * KIB)
    budget.release(incoming)


def test_a_partial_file_counts_and_is_never_evicted(tmp_path: Path) -> None:
    a = cached_blob(tmp_path, "a", 100 * KIB, accessed=1000)
    partial = tmp_path / "models--org--m" / "blobs" / ("e" * 64 + ".hfmirror.incomplete")
    partial.write_bytes(b"\0" * 200 * KIB)  # a fill in progress (its file has its full size at once)
    budget = CacheBudget(tmp_path, 250 * KIB, InUse(), Metrics())
    assert budget.used_bytes() == 300 * KIB
    other = tmp_path / "models--org--m" / "blobs" / ("f" * 64 + ".hfmirror.incomplete")
    with pytest.raises(InsufficientSpaceError):
        budget.make_room(100 * KIB, other)  # even with a evicted, 200 + 100 > 250
    assert partial.exists() and not a.exists()


def test_room_reserved_for_a_fill_is_counted_until_it_ends(tmp_path: Path) -> None:
    cached_blob(tmp_path, "a", 100 * KIB, accessed=1000)
    budget = CacheBudget(tmp_path, 250 * KIB, InUse(), Metrics())
    first = tmp_path / "models--org--m" / "blobs" / ("1" * 64 + ".hfmirror.incomplete")
    second = tmp_path / "models--org--m" / "blobs" / ("2" * 64 + ".hfmirror.incomplete")
    budget.make_room(100 * KIB, first)  # fits beside a; its file does not exist yet
    budget.make_room(100 * KIB, second)  # a must go: the first fill's room is taken
    assert budget.used_bytes() == 0
    budget.release(first)
    budget.release(second)


def test_sizes() -> None:
    assert parse_size("500G") == 500 << 30
    assert parse_size("1.5T") == int(1.5 * (1 << 40))
    assert parse_size("800MiB") == 800 << 20
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("lots")
