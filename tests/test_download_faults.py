"""The downloader against a hostile network: every fault the wrapper can inject ends with identical files.

Each test puts a fault on the wire (through the real fault-injecting server), downloads, and checks both
that the result is byte-identical and that the downloader did the right thing about the fault (the
retry happened, Retry-After was obeyed, only missing bytes were fetched again...).
"""

from __future__ import annotations

import email.utils
import errno
import os
import time
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from hfmirror import constants, transfer
from hfmirror.download import download
from hfmirror.errors import (
    AccessDeniedError,
    IntegrityError,
    NetworkError,
    RepoNotFoundError,
    StorageError,
    UnsafeListingError,
)
from hfmirror.segments import cut_into_pieces
from hfmirror.server.app import ServerThread
from tests.support import make_repo, range_start

LARGE = 6 * 1024 * 1024 + 12345  # several segments with the small MIN_SEGMENT below
REPO_ID = "faulty/model"
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def faulty_repo(fault_server) -> Path:
    return make_repo(
        fault_server.root,
        REPO_ID,
        {
            WEIGHTS: LARGE,
            "config.json": b'{"model_type": "bert"}',
            "sub/tokenizer.json": 200_000,
        },
    )


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small segments so a few MiB use several connections; short backoff so tests stay quick."""
    monkeypatch.setattr(constants, "MIN_SEGMENT", 1024 * 1024)
    monkeypatch.setattr(constants, "MULTI_CONNECTION_THRESHOLD", 2 * 1024 * 1024)
    monkeypatch.setattr(constants, "READ_BLOCK", 256 * 1024)
    monkeypatch.setattr(constants, "BACKOFF_BASE", 0.05)
    monkeypatch.setattr(constants, "BACKOFF_MAX", 0.5)
    # Every connection from the start (on loopback one would be fast enough): faults hit several.
    monkeypatch.setattr(constants, "RAMP_PROBE_SECONDS", 0)


def fetch(fault_server, tmp_path: Path, **kwargs):
    kwargs.setdefault("connections", 4)
    return download(REPO_ID, endpoints=[fault_server.url], cache_dir=tmp_path, progress=False, **kwargs)


def assert_identical(result, source: Path) -> None:
    for relative in (WEIGHTS, "config.json", "sub/tokenizer.json"):
        assert (result.path / relative).read_bytes() == (source / relative).read_bytes(), relative


def weights_gets(faults):
    return faults.requests(f"*/{WEIGHTS}", "GET")


# ------------------------------------------------------------------------------ transient faults


def test_dropped_connections_resume_without_refetching(fault_server, faults, faulty_repo, tmp_path) -> None:
    faults.drop(after_bytes=200_000, path=f"*/{WEIGHTS}", times=5)  # every piece is longer than this
    result = fetch(fault_server, tmp_path)
    assert_identical(result, faulty_repo)
    assert result.retries >= 5
    # Each drop costs at most the block that was in flight; nothing already written is asked for again.
    assert faults.bytes_sent(f"*/{WEIGHTS}") <= LARGE + 5 * constants.READ_BLOCK
    assert any(r.range for r in weights_gets(faults))


@pytest.mark.parametrize("form", ["seconds", "http-date", "ratelimit"])
def test_429_waits_as_long_as_the_server_asks(fault_server, faults, faulty_repo, tmp_path, form) -> None:
    if form == "http-date":
        retry_at = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: 1 to 2 s away
        faults.too_many_requests(retry_after=retry_at, path="*/resolve/*", times=1)
    elif form == "seconds":
        faults.too_many_requests(retry_after=1, path="*/resolve/*", times=1)
    else:
        faults.too_many_requests(retry_after=None, ratelimit_reset=1, path="*/resolve/*", times=1)
    # One request at a time, so none is already on its way when the 429 comes back: every later one
    # must wait, and the bound below holds however busy the machine is.
    result = fetch(fault_server, tmp_path, max_workers=1, connections=1)
    assert_identical(result, faulty_repo)
    assert result.rate_limited == 1
    resolves = faults.requests("*/resolve/*", "GET")
    limited = [r for r in resolves if r.status == 429]
    assert len(limited) == 1
    later = [r.started for r in resolves if r.started > limited[0].started]
    if form == "http-date":
        not_before = email.utils.parsedate_to_datetime(retry_at).timestamp()
    else:  # one second from when the 429 reached the client, which is after the server saw the request
        not_before = limited[0].started + 1.0
    # (0.01 s: the server's records use the wall clock, the client's pause the monotonic clock.)
    assert later and min(later) >= not_before - 0.01, (min(later, default=None), not_before)


def test_each_of_several_429s_is_waited_out(fault_server, faults, faulty_repo, tmp_path) -> None:
    # (That each 429 halves the endpoint's concurrency is RateGovernor's unit test.)
    faults.too_many_requests(retry_after=0, path=f"*/{WEIGHTS}", times=3)
    result = fetch(fault_server, tmp_path, connections=8)
    assert_identical(result, faulty_repo)
    assert result.rate_limited == 3


def test_503_and_500_are_retried(fault_server, faults, faulty_repo, tmp_path) -> None:
    faults.fail(503, path="*/config.json", times=2)
    faults.fail(500, path=f"*/{WEIGHTS}", times=2)
    result = fetch(fault_server, tmp_path)
    assert_identical(result, faulty_repo)
    assert result.retries >= 4


def test_a_stalled_connection_is_dropped_and_resumed(fault_server, faults, faulty_repo, tmp_path) -> None:
    stall = faults.stall(60, after_bytes=300_000, path=f"*/{WEIGHTS}", times=1)
    result = fetch(fault_server, tmp_path, stall_timeout=1.0)
    assert_identical(result, faulty_repo)
    assert stall.applied == 1 and result.retries >= 1


def test_a_corrupted_body_is_caught_and_fetched_again(fault_server, faults, faulty_repo, tmp_path) -> None:
    faults.corrupt(path=f"*/{WEIGHTS}", times=1)
    result = fetch(fault_server, tmp_path)
    assert_identical(result, faulty_repo)
    assert result.verify_failures == 1


def test_a_server_that_ignores_range_still_works(fault_server, faults, faulty_repo, tmp_path) -> None:
    faults.ignore_range(path=f"*/{WEIGHTS}")
    result = fetch(fault_server, tmp_path)
    assert_identical(result, faulty_repo)
    assert any(r.status == 200 and r.range for r in weights_gets(faults))
    assert result.restarts == 1  # once, to a single stream from byte 0, which then succeeds


def test_drops_from_a_server_that_ignores_range_keep_what_is_held(
    fault_server, faults, faulty_repo, tmp_path
):
    # One connection: the first GET (no Range) drops at 1 MiB; the next one asks for the rest, gets the
    # whole file (200) and starts over on a single stream; that drops at 1 MiB too, and so does the
    # one after it. Each new GET gets the file from byte 0, which must not be written at byte 1 MiB.
    faults.ignore_range(path=f"*/{WEIGHTS}")
    faults.drop(after_bytes=1024 * 1024, path=f"*/{WEIGHTS}", times=4)
    result = fetch(fault_server, tmp_path, connections=1)
    assert_identical(result, faulty_repo)
    assert result.restarts == 1 and result.verify_failures == 0
    assert len(weights_gets(faults)) == 5


def test_xet_headers_are_ignored_and_bytes_come_from_the_mirror(fault_server, faults, faulty_repo, tmp_path):
    faults.xet_headers(path="*")
    result = fetch(fault_server, tmp_path)
    assert_identical(result, faulty_repo)
    assert faults.bytes_sent(f"*/{WEIGHTS}") == LARGE


def test_several_connections_per_file_run_at_once(fault_server, faults, faulty_repo, tmp_path) -> None:
    faults.limit_bandwidth(3_000_000, path=f"*/{WEIGHTS}")
    result = fetch(fault_server, tmp_path, connections=4)
    assert_identical(result, faulty_repo)
    gets = weights_gets(faults)
    assert len({r.range for r in gets}) >= 4
    # At some moment, at least 3 of those requests were in flight together.
    most = max(sum(1 for o in gets if o.started <= r.started < o.started + o.duration) for r in gets)
    assert most >= 3


def test_the_slow_tail_is_split_across_connections(fault_server, faults, faulty_repo, tmp_path, monkeypatch):
    # The first piece crawls; the other connection finishes the rest and must take over half of what
    # the slow one has left, again and again: more requests than there are pieces.
    monkeypatch.setattr(constants, "MIN_SPLIT", 128 * 1024)
    faults.limit_bandwidth(300_000, path=f"*/{WEIGHTS}", times=1)
    result = fetch(fault_server, tmp_path, connections=2)
    assert_identical(result, faulty_repo)
    pieces = cut_into_pieces(0, LARGE, connections=2)
    gets = weights_gets(faults)
    piece_starts = {s.start for s in pieces}
    split_starts = [r.range for r in gets if r.range and range_start(r.range) not in piece_starts]
    assert split_starts, [r.range for r in gets]


def test_a_fast_link_is_not_split(fault_server, faults, faulty_repo, tmp_path, monkeypatch) -> None:
    """Splitting a segment that is about to finish only wastes the bytes in flight past the cut."""
    monkeypatch.setattr(constants, "MIN_SPLIT", 128 * 1024)
    result = fetch(fault_server, tmp_path, connections=2)
    assert_identical(result, faulty_repo)
    pieces = cut_into_pieces(0, LARGE, connections=2)
    assert len(weights_gets(faults)) == len(pieces)
    assert faults.bytes_sent(f"*/{WEIGHTS}") == LARGE


# ------------------------------------------------------------------------------ faults that last


def test_content_that_never_matches_gives_up_and_leaves_nothing(fault_server, faults, faulty_repo, tmp_path):
    faults.corrupt(path=f"*/{WEIGHTS}")
    with pytest.raises(IntegrityError, match=WEIGHTS):
        fetch(fault_server, tmp_path)
    repo_dir = tmp_path / "models--faulty--model"
    assert not list(repo_dir.glob(f"snapshots/*/{WEIGHTS}"))
    assert [p.name for p in (repo_dir / "blobs").iterdir() if len(p.name) == 64] == []


def test_a_server_that_keeps_failing_gives_up(
    fault_server, faults, faulty_repo, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(constants, "MAX_RETRIES", 2)
    faults.fail(502, path=f"*/{WEIGHTS}")
    with pytest.raises(NetworkError, match="gave up"):
        fetch(fault_server, tmp_path)


def test_access_denied_and_not_found_statuses(fault_server, faults, faulty_repo, tmp_path) -> None:
    faults.fail(403, path="/api/*", times=1)
    with pytest.raises(AccessDeniedError, match="--token"):
        fetch(fault_server, tmp_path)
    faults.fail(401, path=f"*/{WEIGHTS}", times=1)
    with pytest.raises(RepoNotFoundError):
        fetch(fault_server, tmp_path)


def test_disk_full_midway_keeps_partial_data_and_resumes(
    fault_server, faults, faulty_repo, tmp_path, monkeypatch
):
    real_pwrite = os.pwrite
    written = {"bytes": 0}

    def pwrite_until_full(fd, data, offset):
        if written["bytes"] > 2_000_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        written["bytes"] += len(data)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(transfer.os, "pwrite", pwrite_until_full)
    with pytest.raises(StorageError, match="disk full"):
        fetch(fault_server, tmp_path, connections=1)
    monkeypatch.setattr(transfer.os, "pwrite", real_pwrite)
    first = faults.bytes_sent(f"*/{WEIGHTS}")
    result = fetch(fault_server, tmp_path, connections=1)
    assert_identical(result, faulty_repo)
    # The bytes written before the disk filled up were kept.
    assert faults.bytes_sent(f"*/{WEIGHTS}") - first <= LARGE - 2_000_000 + constants.READ_BLOCK


# ---------------------------------------------------------------------------------- security


def test_token_is_not_forwarded_on_a_redirect_to_another_host(fault_server, faults, faulty_repo, tmp_path):
    other_host = fault_server.url.replace("127.0.0.1", "localhost")
    faults.redirect(other_host, path="*/resolve/*")
    result = fetch(fault_server, tmp_path, token="hf_secret_for_the_endpoint_only")
    assert_identical(result, faulty_repo)
    at_endpoint = [r for r in faults.records if r.headers.get("host", "").startswith("127.0.0.1")]
    at_other = [r for r in faults.records if r.headers.get("host", "").startswith("localhost")]
    assert at_other, "the redirect was not followed"
    assert all("authorization" not in r.headers for r in at_other)
    assert any(
        r.headers.get("authorization") == "Bearer hf_secret_for_the_endpoint_only" for r in at_endpoint
    )


@pytest.mark.parametrize(
    "evil_name",
    ["../escaped.txt", "/tmp/absolute.txt", "a/../../escaped.txt", "a\\..\\escaped.txt", ".cache/x"],
)
def test_a_hostile_listing_is_refused_and_nothing_is_written(tmp_path: Path, evil_name: str) -> None:
    sha = "1" * 40

    async def info(request):
        return JSONResponse(
            {
                "id": "evil/repo",
                "sha": sha,
                "private": False,
                "siblings": [
                    {"rfilename": "ok.txt", "size": 2, "blobId": "2" * 40},
                    {"rfilename": evil_name, "size": 5, "blobId": "3" * 40},
                ],
            }
        )

    app = Starlette(routes=[Route("/api/models/evil/repo/revision/main", info)])
    target = tmp_path / "target"
    with ServerThread(app) as server:
        with pytest.raises(UnsafeListingError):
            download("evil/repo", endpoints=[server.url], local_dir=target, progress=False)
    assert not target.exists() or not any(target.rglob("*.txt"))
    assert not (tmp_path / "escaped.txt").exists()


# ------------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize(
    ("fault", "code", "message"),
    [
        ("corrupt", 6, WEIGHTS),
        ("502", 5, "gave up"),
        ("403", 4, "--token"),
    ],
)
def test_cli_exit_codes_for_server_side_failures(
    fault_server, faults, faulty_repo, tmp_path, monkeypatch, fault, code, message
) -> None:
    from click.testing import CliRunner

    from hfmirror.cli import cli

    monkeypatch.setattr(constants, "MAX_RETRIES", 2)
    if fault == "corrupt":
        faults.corrupt(path=f"*/{WEIGHTS}")
    elif fault == "502":
        faults.fail(502, path=f"*/{WEIGHTS}")
    else:
        faults.fail(403, path="/api/*")
    result = CliRunner().invoke(
        cli, ["download", REPO_ID, "--endpoint", fault_server.url, "--cache-dir", str(tmp_path), "-q"]
    )
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output


def test_cli_exit_code_for_a_hostile_listing(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from hfmirror.cli import cli

    async def info(request):
        return JSONResponse(
            {
                "id": "evil/repo",
                "sha": "1" * 40,
                "siblings": [{"rfilename": "../../x", "size": 1, "blobId": "2" * 40}],
            }
        )

    app = Starlette(routes=[Route("/api/models/evil/repo/revision/main", info)])
    with ServerThread(app) as server:
        result = CliRunner().invoke(
            cli, ["download", "evil/repo", "--endpoint", server.url, "--local-dir", str(tmp_path)]
        )
    assert result.exit_code == 8, result.output
    assert "unsafe file name" in result.output


# ------------------------------------------------------------------------------ how many connections


def test_a_connection_fast_enough_alone_fetches_the_file_alone(
    fault_server, faults, faulty_repo, tmp_path, monkeypatch
) -> None:
    """No per-connection cap: the file comes in one request, as curl would fetch it."""
    monkeypatch.setattr(constants, "RAMP_PROBE_SECONDS", 0.05)
    monkeypatch.setattr(constants, "FAST_CONNECTION", 1)  # any loopback connection is fast enough
    result = fetch(fault_server, tmp_path, connections=4)
    assert_identical(result, faulty_repo)
    gets = weights_gets(faults)
    assert len(gets) == 1 and gets[0].range is None, [r.range for r in gets]
    assert faults.bytes_sent(f"*/{WEIGHTS}") == LARGE


def test_pieces_reuse_their_connections(fault_server, faults, faulty_repo, tmp_path) -> None:
    """Each connection asks for piece after piece over the same keep-alive socket: a new TCP (and, on
    a real mirror, TLS) handshake per piece would cost a round trip or more each time."""
    result = fetch(fault_server, tmp_path, connections=2)
    assert_identical(result, faulty_repo)
    gets = weights_gets(faults)
    assert len(gets) >= 4 and all(r.client for r in gets), [(r.range, r.client) for r in gets]
    # The run's sockets are shared by its files (a piece may come over one another file opened): at
    # most one per request that was ever in flight at once (two pieces, two small files), however
    # many pieces there are. A handshake per piece would make one socket per request.
    sockets = {r.client for r in faults.records}
    assert len(sockets) <= 4, f"{len(faults.records)} requests came over {len(sockets)} sockets"


def test_a_capped_connection_brings_in_the_others(fault_server, faults, faulty_repo, tmp_path, monkeypatch):
    """Behind a per-connection cap the first connection is slow: every connection opens, and together
    they fetch the file in ranged pieces, in parallel, without fetching any byte twice."""
    monkeypatch.setattr(constants, "RAMP_PROBE_SECONDS", 0.05)
    faults.limit_bandwidth(2_000_000, path=f"*/{WEIGHTS}")
    result = fetch(fault_server, tmp_path, connections=4)
    assert_identical(result, faulty_repo)
    gets = weights_gets(faults)
    assert len(gets) >= 4, [r.range for r in gets]
    overlapping = [
        (a, b) for a in gets for b in gets if a is not b and a.started < b.started < a.started + a.duration
    ]
    assert overlapping, "the pieces were fetched one after another, not in parallel"
    # The first request asked for the whole file and was cut short where the pieces begin.
    assert gets[0].range is None and gets[0].bytes_sent < LARGE
    assert faults.bytes_sent(f"*/{WEIGHTS}") <= LARGE + 4 * constants.READ_BLOCK


def test_the_resume_state_is_saved_while_the_hash_is_held_up(
    fault_server, tmp_path: Path, monkeypatch
) -> None:
    """The hash runs on a thread of its own, so a save of the resume state never waits for it. When
    one thread did both, a hash that stalled (a slow read-back, a busy core) held back the saves a
    kill -9 relies on, and a save's rename, waiting for the file system's journal, held up the hash."""
    import threading

    from hfmirror.hashing import ContentHasher
    from hfmirror.resume import ResumeState

    size = 16 * 1024 * 1024
    folder = make_repo(fault_server.root, "faulty/held-hash", {WEIGHTS: size})
    release = threading.Event()
    hash_once = ContentHasher.update

    def held_up(self: ContentHasher, data) -> None:
        if threading.current_thread().name.startswith("hfmirror-"):  # the download's, not the server's
            release.wait(60)
        hash_once(self, data)

    monkeypatch.setattr(ContentHasher, "update", held_up)
    outcome: list[object] = []
    worker = threading.Thread(
        target=lambda: outcome.append(
            download("faulty/held-hash", endpoints=[fault_server.url], cache_dir=tmp_path, progress=False)
        ),
        daemon=True,
    )
    worker.start()
    try:
        deadline = time.monotonic() + 60
        saved = 0
        while saved < size and time.monotonic() < deadline:
            states = list(tmp_path.rglob("*" + constants.STATE_SUFFIX))
            saved = ResumeState.saved_bytes(states[0]) if states else 0
            time.sleep(0.05)
        assert saved == size, "the resume state stopped being saved while the hash was held up"
    finally:
        release.set()
        worker.join(60)
    assert outcome and not isinstance(outcome[0], BaseException)
    blob = next((tmp_path / "models--faulty--held-hash" / "blobs").glob("*[0-9a-f]"))
    assert blob.read_bytes() == (folder / WEIGHTS).read_bytes()
