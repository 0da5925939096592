"""Unit tests of the small pieces the downloader and the server are built from."""

from __future__ import annotations

import email.utils
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hfmirror import constants
from hfmirror.endpoints import EndpointPool, RateGovernor, normalize_endpoint
from hfmirror.errors import BadInputError, EntryNotFoundError, UnsafePathError
from hfmirror.hashing import ContentHasher, file_digest, git_blob_sha1, git_blob_sha1_of_file
from hfmirror.listing import RemoteFile, filter_files, validate_repo_id
from hfmirror.paths import safe_join, validate_relative_path
from hfmirror.retry import backoff_delay, server_requested_delay
from hfmirror.transfer import ResumeState, Segment

# ------------------------------------------------------------------------------------------ paths


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a/./b",
        "a//b",
        "a\\b",
        "C:/x",
        "c:x",
        "a/\x00b",
        "a/\nb",
        "..",
        "a/..",
        "./a",
        "a/",
    ],
)
def test_unsafe_relative_paths_are_refused(name: str) -> None:
    with pytest.raises(UnsafePathError):
        validate_relative_path(name)


@pytest.mark.parametrize(
    "name", ["config.json", "a/b/c.txt", "..a", "a..b/c", ".gitattributes", "日本/語.txt"]
)
def test_plain_relative_paths_are_accepted(name: str) -> None:
    assert validate_relative_path(name) == name


def test_safe_join_refuses_a_symlink_that_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside.txt").write_text("secret")
    (root / "link").symlink_to(tmp_path / "outside.txt")
    (root / "inside.txt").write_text("fine")
    (root / "good-link").symlink_to(root / "inside.txt")
    with pytest.raises(UnsafePathError):
        safe_join(root, "link")
    assert safe_join(root, "good-link").read_text() == "fine"
    assert safe_join(root, "new/file.bin") == root / "new" / "file.bin"


# --------------------------------------------------------------------------------------- hashing


def test_git_blob_sha1_matches_git(tmp_path: Path) -> None:
    data = b"hello world\n"
    expected = (
        subprocess.run(["git", "hash-object", "--stdin"], input=data, capture_output=True, check=True)
        .stdout.decode()
        .strip()
    )
    assert git_blob_sha1(data) == expected
    path = tmp_path / "f"
    path.write_bytes(data)
    assert file_digest(path, expected) == expected
    assert git_blob_sha1_of_file(path) == expected


def test_content_hasher_picks_the_algorithm_from_the_expected_value() -> None:
    data = b"x" * 1000
    sha256 = hashlib.sha256(data).hexdigest()
    hasher = ContentHasher(sha256, len(data))
    hasher.update(data[:10])
    hasher.update(data[10:])
    assert hasher.kind == "sha256" and hasher.hexdigest() == sha256
    sha1 = git_blob_sha1(data)
    hasher = ContentHasher(sha1, len(data))
    hasher.update(data)
    assert hasher.kind == "git-sha1" and hasher.hexdigest() == sha1
    with pytest.raises(ValueError):
        ContentHasher("not-hex", 3)


# ----------------------------------------------------------------------------------------- retry


def test_retry_after_seconds_and_http_date() -> None:
    assert server_requested_delay({"Retry-After": "7"}) == 7.0
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    delay = server_requested_delay({"Retry-After": date}, now=now)
    assert delay is not None and 28 <= delay <= 31
    assert (
        server_requested_delay({"Retry-After": email.utils.formatdate(now - 60, usegmt=True)}, now=now) == 0
    )
    assert server_requested_delay({"Retry-After": "soon"}) is None
    assert server_requested_delay({}) is None


def test_ratelimit_header_wins_over_retry_after() -> None:
    headers = {"RateLimit": '"api";r=0;t=55', "Retry-After": "3"}
    assert server_requested_delay(headers) == 55.0


def test_backoff_grows_and_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    rng = random.Random(1)
    first = [backoff_delay(0, rng=rng) for _ in range(200)]
    later = [backoff_delay(6, rng=rng) for _ in range(200)]
    assert max(first) <= constants.BACKOFF_BASE
    assert max(later) <= constants.BACKOFF_MAX
    assert sum(later) / len(later) > 4 * sum(first) / len(first)


# ------------------------------------------------------------------------------------- endpoints


def test_governor_halves_on_overload_and_recovers() -> None:
    governor = RateGovernor(8)
    assert governor.limit == 8
    governor.on_overloaded(0.0)
    governor.on_overloaded(0.0)
    assert governor.limit == 2
    for _ in range(40):
        governor.on_success()
    assert governor.limit == 8


def test_governor_waits_for_retry_after() -> None:
    governor = RateGovernor(4)
    governor.on_overloaded(0.3)
    started = time.monotonic()
    governor.acquire()
    governor.release()
    assert time.monotonic() - started >= 0.25


def test_pool_fails_over_after_repeated_failures() -> None:
    pool = EndpointPool.from_urls(
        ["http://a.invalid/", "http://b.invalid"], max_concurrency=2, failover_after=2
    )
    first = pool.current
    assert first.url == "http://a.invalid"
    pool.report_failure(first)
    assert pool.current is first
    pool.report_failure(first)
    assert pool.current.url == "http://b.invalid"
    # The last endpoint stays: its own retry budget decides when to give up.
    pool.report_failure(pool.current)
    pool.report_failure(pool.current)
    assert pool.current.url == "http://b.invalid"


@pytest.mark.parametrize("url", ["ftp://x", "hf-mirror.com", "http://", "http://x/?a=b"])
def test_bad_endpoints_are_refused(url: str) -> None:
    with pytest.raises(BadInputError):
        normalize_endpoint(url)


# --------------------------------------------------------------------------------------- listing


@pytest.mark.parametrize("repo_id", ["a/b/c", "", "a--b", "../x", "x y", "a/.."])
def test_malformed_repo_ids(repo_id: str) -> None:
    with pytest.raises(BadInputError, match="malformed repo id"):
        validate_repo_id(repo_id)


def test_filter_files_by_name_and_globs() -> None:
    files = [
        RemoteFile(p, 1, "0" * 40) for p in ["config.json", "model.safetensors", "sub/a.py", "sub/b.txt"]
    ]
    assert [f.path for f in filter_files(files, include=["*.json", "sub/"])] == [
        "config.json",
        "sub/a.py",
        "sub/b.txt",
    ]
    assert [f.path for f in filter_files(files, exclude=["*.safetensors", "sub/*.txt"])] == [
        "config.json",
        "sub/a.py",
    ]
    assert [f.path for f in filter_files(files, filenames=["sub/a.py"])] == ["sub/a.py"]
    with pytest.raises(EntryNotFoundError, match="nope.bin"):
        filter_files(files, filenames=["nope.bin"])


# ---------------------------------------------------------------------------------- resume state


def test_resume_state_round_trip_and_rejects_damage(tmp_path: Path) -> None:
    file = RemoteFile("w.bin", 100 << 20, "a" * 64)
    path = tmp_path / "w.json"
    state = ResumeState.fresh(path, file, connections=4)
    # Pieces in file order, covering the file, each within [MIN_SEGMENT, MAX_PIECE].
    assert len(state.segments) >= 4
    assert [s.start for s in state.segments] == sorted(s.start for s in state.segments)
    assert all(a.end == b.start for a, b in zip(state.segments, state.segments[1:], strict=False))
    assert state.segments[0].start == 0 and state.segments[-1].end == file.size
    assert all(constants.MIN_SEGMENT <= s.end - s.start <= constants.MAX_PIECE for s in state.segments)
    assert len(ResumeState.fresh(path, RemoteFile("s", 1000, "a" * 64), connections=4).segments) == 1
    state.segments[0].pos += 1000
    ResumeState.write(path, state.snapshot())
    loaded = ResumeState.load(path, file)
    assert loaded is not None and loaded.done_bytes == 1000 and loaded.prefix_end() == 1000
    # Another file's state, a hole in the table, or garbage: all mean "start over".
    assert ResumeState.load(path, RemoteFile("w.bin", file.size, "b" * 64)) is None
    snapshot = state.snapshot()
    snapshot["segments"] = snapshot["segments"][1:]  # type: ignore[index]
    path.write_text(json.dumps(snapshot))
    assert ResumeState.load(path, file) is None
    path.write_text("{not json")
    assert ResumeState.load(path, file) is None


def test_prefix_end_stops_at_the_first_unfinished_segment(tmp_path: Path) -> None:
    file = RemoteFile("w.bin", 300, "a" * 64)
    state = ResumeState(
        tmp_path / "s", file, [Segment(0, 100, 100), Segment(100, 150, 200), Segment(200, 300, 300)]
    )
    assert state.prefix_end() == 150
    assert state.done_bytes == 250


# ------------------------------------------------------------------------------------------- cli


def test_help_imports_no_torch_transformers_or_server_stack() -> None:
    code = (
        "import sys, time; t = time.perf_counter(); from hfmirror.cli import cli; "
        "from click.testing import CliRunner; r = CliRunner().invoke(cli, ['--help']); "
        "assert r.exit_code == 0, r.output; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'starlette')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
