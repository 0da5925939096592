"""Unit tests of the small pieces the downloader and the server are built from."""

from __future__ import annotations

import email.utils
import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hfmirror import constants
from hfmirror.endpoints import EndpointPool, RateGovernor, normalize_endpoint
from hfmirror.errors import BadInputError, EntryNotFoundError, UnsafePathError
from hfmirror.hashing import ContentHasher, file_digest, git_blob_sha1, git_blob_sha1_of_file
from hfmirror.listing import RemoteFile, filter_files, validate_repo_id
from hfmirror.pagecache import PageRecycler
from hfmirror.paths import safe_join, validate_relative_path
from hfmirror.retry import backoff_delay, server_requested_delay
from hfmirror.segments import ConnectionRamp, cut_into_pieces

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
    # The clock starts before the pause is set, so the bound holds however late this thread runs.
    started = time.monotonic()
    governor.on_overloaded(0.3)
    governor.acquire()
    governor.release()
    assert time.monotonic() - started >= 0.3


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


def _hub_accepts(repo_id: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate

    try:
        hub_validate(repo_id)
    except HFValidationError:
        return False
    return True


def _ours_accepts(repo_id: str) -> bool:
    try:
        validate_repo_id(repo_id)
    except BadInputError:
        return False
    return True


_REPO_ID_CHARS = "aZ09-_./ é\n"


@settings(max_examples=600, deadline=None)
@given(
    st.one_of(
        st.text(alphabet=_REPO_ID_CHARS, max_size=12),
        st.builds("/".join, st.lists(st.text(alphabet="ab-_.", min_size=0, max_size=100), max_size=3)),
        st.sampled_from(
            ["Qwen/Qwen-7B", "bert-base-uncased", "a" * 96, "a" * 97, "x/y.git", "-a", "a_", "a-", "_a/b"]
        ),
    )
)
def test_repo_ids_are_judged_as_huggingface_hub_judges_them(repo_id: str) -> None:
    """Our copy of the Hub's rule (kept to spare the import at start) must agree with the original,
    in the downloader and in the servers alike (the servers had a rule of their own, which let
    ``x/y.git`` and ``a-`` through)."""
    from hfmirror.server.repos import is_valid_repo_id

    hub = _hub_accepts(repo_id)
    assert _ours_accepts(repo_id) == hub and is_valid_repo_id(repo_id) == hub, repo_id


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
    # Globs that leave nothing name themselves; an empty repository with no globs is no error.
    with pytest.raises(
        EntryNotFoundError, match=r"none of the 4 files .* --include '\*\.gguf' --exclude 'sub/'"
    ):
        filter_files(files, include=["*.gguf"], exclude=["sub/"])
    with pytest.raises(EntryNotFoundError, match="none of the 1 files named matches --include"):
        filter_files(files, filenames=["sub/a.py"], include=["*.json"])
    assert filter_files([], include=["*.json"]) == [] and filter_files(files, filenames=[]) == files


# ---------------------------------------------------------------------------------- resume state


def test_pieces_cover_the_range_in_order_within_bounds() -> None:
    pieces = cut_into_pieces(5, 5 + (100 << 20), connections=4)
    assert len(pieces) >= 4
    assert pieces[0].start == 5 and pieces[-1].end == 5 + (100 << 20)
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:], strict=False))
    assert all(constants.MIN_SEGMENT <= p.end - p.start <= constants.MAX_PIECE for p in pieces)
    assert len(cut_into_pieces(0, 1000, connections=4)) == 1


def test_the_ramp_opens_every_connection_when_the_first_is_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "FAST_CONNECTION", 100_000)
    monkeypatch.setattr(constants, "RAMP_PROBE_SECONDS", 0.1)
    monkeypatch.setattr(constants, "RAMP_WINDOW_SECONDS", 1.0)
    slow = ConnectionRamp(8, now=0.0)
    assert slow.allowed == 1 and slow.probing  # small reads until the first judgement
    assert not slow.observe(1_000, now=0.05)  # too early to judge
    assert slow.observe(1_000, now=0.1)  # 2 kB in 0.1 s = 20 kB/s: far slower than 100 kB/s
    assert slow.allowed == 8 and slow.open and not slow.probing
    assert slow.read_block() == constants.READ_BLOCK  # many slow connections: small reads, little lost
    assert not slow.observe(1, now=5.0)  # opened once, it stays open

    fast = ConnectionRamp(8, now=0.0)
    assert fast.read_block() == constants.PROBE_READ_BLOCK  # heard from within the probe
    assert not fast.observe(20_000, now=0.1)  # 200 kB/s: one connection is enough
    assert fast.allowed == 1 and not fast.probing
    assert fast.read_block() == constants.FAST_READ_BLOCK  # one fast connection: large, cheap reads
    # A short hiccup inside the next (one-second) window is not a slow link ...
    assert not fast.observe(0, now=0.5)
    assert not fast.observe(150_000, now=1.1)
    assert fast.allowed == 1
    # ... a whole slow window is.
    assert fast.observe(50_000, now=2.1)
    assert fast.allowed == 8


def test_a_first_connection_not_clearly_slow_is_judged_again_before_more_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a fast link the first 30 ms (the request, TCP's slow start, threads starting on a busy CPU)
    can fall just short of FAST_CONNECTION; opening eight connections on that then cost a 1 GiB
    download on loopback up to 0.9 s of CPU. Clearly slow (a per-connection cap) still opens at once."""
    monkeypatch.setattr(constants, "FAST_CONNECTION", 100_000)
    monkeypatch.setattr(constants, "RAMP_PROBE_SECONDS", 0.1)
    monkeypatch.setattr(constants, "RAMP_PROBE_SECONDS_MAX", 0.4)
    borderline = ConnectionRamp(8, now=0.0)
    assert not borderline.observe(6_000, now=0.1)  # 60 kB/s: short of 100 kB/s, not below a quarter
    assert borderline.probing and borderline.allowed == 1  # still on probation ...
    assert borderline.read_block() == constants.FAST_READ_BLOCK  # ... on a link that fills large reads
    assert not borderline.observe(20_000, now=0.3)
    assert not borderline.observe(20_000, now=0.4)  # 46 kB in 0.4 s... is 115 kB/s: fast after all
    assert borderline.allowed == 1 and not borderline.probing

    slow_start_slow_link = ConnectionRamp(8, now=0.0)
    assert not slow_start_slow_link.observe(6_000, now=0.1)
    assert slow_start_slow_link.observe(20_000, now=0.4)  # 26 kB in 0.4 s = 65 kB/s: slow
    assert slow_start_slow_link.allowed == 8

    capped = ConnectionRamp(8, now=0.0)
    assert capped.observe(2_000, now=0.1)  # 20 kB/s, below a quarter: no second look
    assert capped.allowed == 8


def test_time_a_connection_waited_for_the_hash_does_not_count_against_the_link(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection that waits for a buffer the hash still holds brings nothing meanwhile; counted as
    link time, that once made a 1 GiB download on loopback open eight connections for nothing."""
    monkeypatch.setattr(constants, "FAST_CONNECTION", 100_000)
    monkeypatch.setattr(constants, "RAMP_PROBE_SECONDS", 0.1)
    ramp = ConnectionRamp(8, now=0.0)
    assert not ramp.observe(11_000, now=0.2, waited=0.1)  # 11 kB in 0.1 s of link time: fast
    assert ramp.allowed == 1


def test_the_ramp_opens_at_once_when_asked_or_when_there_is_one_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ConnectionRamp(1, now=0.0).open
    monkeypatch.setattr(constants, "RAMP_PROBE_SECONDS", 0)
    assert ConnectionRamp(8, now=0.0).allowed == 8


def test_the_page_recycler_drops_only_hashed_bytes_flushes_once_and_stops_before_the_file_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Page residency cannot be observed portably, so the advice itself is recorded: writing out is
    asked for exactly the hashed bytes, dropping only for those DROP_PAGES_LAG behind the hash."""
    monkeypatch.setattr(constants, "DROP_PAGES_LAG", 1000)
    asked: list[tuple[int, int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, n, advice: asked.append((offset, n, advice)))
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT)
    try:
        recycler = PageRecycler(fd)
        recycler.hashed_up_to(500)
        recycler.hashed_up_to(3000)
        recycler.hashed_up_to(2000)  # never backwards
        recycler.flush()  # the last byte is written: to disk now, once, however often asked
        recycler.flush()
        recycler.close()
        recycler.hashed_up_to(9000)  # after close: ignored
    finally:
        os.close(fd)
    assert recycler._thread is not None and not recycler._thread.is_alive()
    assert all(advice == os.POSIX_FADV_DONTNEED for _, _, advice in asked)
    # Each round asks the new hashed bytes out, then drops what is DROP_PAGES_LAG behind: two runs of
    # ranges, each contiguous from 0 (the first request of all is always a writing-out one).
    next_out = next_drop = 0
    for offset, n, _ in asked:
        if offset == next_out:
            next_out += n
        else:
            assert offset == next_drop, asked
            next_drop += n
            assert next_drop + 1000 <= next_out, f"dropped bytes the hash had not passed by 1000: {asked}"
    assert (next_out, next_drop) == (3000, 2000), asked
    assert (recycler.kicked, recycler.dropped) == (3000, 2000)
    assert synced == [fd] and recycler.flushed


def test_the_page_recycler_asks_in_batches_and_the_rest_on_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hash moves on a block at a time; asking the kernel per block cost two system calls and a
    thread wake-up per MiB, on the CPU the hash needs. Below PAGES_BATCH nothing is asked until close."""
    monkeypatch.setattr(constants, "DROP_PAGES_LAG", 100)
    monkeypatch.setattr(constants, "PAGES_BATCH", 1000)
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, n, advice: asked.append((offset, n)))
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT)
    try:
        recycler = PageRecycler(fd)
        for offset in (300, 600, 900):
            recycler.hashed_up_to(offset)
            time.sleep(0.05)  # time enough for a thread asked at once to ask: a batch is not due yet
        recycler.close()
    finally:
        os.close(fd)
    assert asked == [(0, 900), (0, 800)]  # written out once, and dropped once, DROP_PAGES_LAG behind


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


def test_sessions_of_different_threads_share_their_connections() -> None:
    """Each thread has its own session, but a socket one thread finished with carries the next
    thread's request: one pool for the downloader and the mirror's upstream side alike (each thread
    used to open sockets of its own in the mirror, which never reused them)."""
    from hfmirror.listing import RepoListing
    from hfmirror.server.upstream import Upstream
    from hfmirror.sessions import SessionFactory
    from tests.hostile import HostileServer, status

    def one_request_per_thread(send) -> None:
        for _ in range(2):
            thread = threading.Thread(target=send)
            thread.start()
            thread.join(30)
            assert not thread.is_alive()

    with HostileServer() as server:
        server.answer("/plain", status(200, {}, b"hello"))
        factory = SessionFactory(pool_size=4)
        one_request_per_thread(lambda: factory.get().get(f"{server.url}/plain", timeout=10).content)
        upstream = Upstream([server.url])
        listing = RepoListing("org/x", "model", "main", "1" * 40, ())
        file = RemoteFile("w.bin", 5, "2" * 40)
        one_request_per_thread(lambda: upstream.may_read(listing, file, None))  # a 404 here: False
        direct, probes = server.requests("/plain"), server.requests("*/resolve/*")
    assert len(direct) == 2 and len({seen.peer for seen in direct}) == 1, direct
    assert len(probes) == 2 and len({seen.peer for seen in probes}) == 1, probes
