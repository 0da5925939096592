"""Pacing to a server's announced quota, and one connection budget per endpoint for a whole run."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import requests

from hfmirror import constants
from hfmirror.download import download
from hfmirror.endpoints import EndpointPool, QuotaPacer, RateGovernor
from hfmirror.listing import list_repo
from hfmirror.retry import RateLimitInfo, parse_ratelimit, server_requested_delay
from tests.hostile import HostileServer, fake_repo
from tests.support import make_repo

# ------------------------------------------------------------------------------------ the headers


def test_the_hubs_rate_limit_headers_are_read() -> None:
    hub = {
        "RateLimit": '"api";r=480;t=120, "resolvers";r=12;t=55',
        "RateLimit-Policy": '"fixed window";"api";q=500;w=300, "fixed window";"resolvers";q=3000;w=300',
    }
    assert parse_ratelimit(hub) == RateLimitInfo("resolvers", 12, 55.0, 3000, 300.0)  # the one that binds
    older = {"RateLimit-Limit": "100", "RateLimit-Remaining": "7", "RateLimit-Reset": "30"}
    assert parse_ratelimit(older) == RateLimitInfo("", 7, 30.0, 100, None)
    assert parse_ratelimit({}) is None and parse_ratelimit({"RateLimit": "nonsense"}) is None
    # A 429's wait comes from a quota only if that quota is the one used up.
    assert server_requested_delay({"RateLimit": '"api";r=0;t=55', "Retry-After": "3"}) == 55.0
    assert server_requested_delay({"RateLimit": '"api";r=9;t=55', "Retry-After": "3"}) == 3.0


# ------------------------------------------------------------------------------------ the pacer


def announced(left: int, reset: float, quota: int | None = 3, window: float | None = 2.0) -> RateLimitInfo:
    return RateLimitInfo("resolvers", left, reset, quota, window)


def test_without_announcements_the_pacer_holds_nothing_back() -> None:
    pacer = QuotaPacer()
    for now in range(100):
        assert pacer.delay(float(now)) == 0.0
        pacer.sent(float(now))


def test_a_quota_is_spent_at_full_speed_then_waited_out_until_the_reset() -> None:
    pacer = QuotaPacer()
    pacer.sent(0.0)
    pacer.observe(announced(2, 2.0), sent_at=0.0, now=0.1)  # window resets by 0.1 + 2 s at the latest
    assert pacer.delay(0.1) == 0.0
    pacer.sent(0.1)
    pacer.sent(0.1)
    assert pacer.delay(0.2) == pytest.approx(1.9)  # used up: nothing until the reset
    assert pacer.delay(2.1) == 0.0 and pacer.remaining == 3  # a new window, with the policy's quota
    for _ in range(3):
        pacer.sent(2.2)
    assert pacer.delay(2.3) == pytest.approx(1.8)  # the next reset, a window later


def test_requests_in_flight_are_not_counted_twice_and_fewer_left_is_believed() -> None:
    pacer = QuotaPacer()
    for now in (0.0, 0.01, 0.02, 0.03):
        pacer.sent(now)
    # The answer to the first request says 9 are left; the three sent after it may not be counted yet.
    pacer.observe(announced(9, 2.0, quota=None, window=None), sent_at=0.0, now=0.05)
    assert pacer.remaining == 6
    # Someone else shares the quota: a later answer says only 1 is left. Believed.
    pacer.observe(announced(1, 2.0, quota=None, window=None), sent_at=0.03, now=0.06)
    assert pacer.remaining == 1


def test_the_earliest_reset_any_answer_allows_is_kept_and_stale_answers_ignored() -> None:
    pacer = QuotaPacer()
    pacer.sent(0.0)
    pacer.observe(announced(0, 2.0), sent_at=0.0, now=0.5)  # resets by 2.5
    pacer.observe(announced(0, 2.0), sent_at=0.0, now=0.9)  # by 2.9: the first bound is the tighter
    assert pacer.reset_at == pytest.approx(2.5)
    assert pacer.delay(2.6) == 0.0  # the new window
    pacer.observe(announced(0, 1.0), sent_at=0.0, now=2.7)  # answers a request of the old window
    assert pacer.remaining == 3 and pacer.delay(2.7) == 0.0


# ------------------------------------------------------------------------------------ the budget


def test_a_freed_slot_goes_to_the_waiting_request_with_the_most_work_left() -> None:
    governor = RateGovernor(1)
    assert governor.acquire()
    order: list[float] = []
    threads = []
    for priority in (1.0, 5.0, 3.0):

        def wait_for_a_slot(priority: float = priority) -> None:
            assert governor.acquire(priority=priority)
            order.append(priority)
            governor.release()

        threads.append(threading.Thread(target=wait_for_a_slot))
        threads[-1].start()
    for _ in range(1000):  # every one is waiting before the slot frees (bounded poll)
        if governor.waiting == 3:
            break
        threading.Event().wait(0.01)
    assert governor.waiting == 3
    governor.release()
    for thread in threads:
        thread.join(30)
    assert order == [5.0, 3.0, 1.0]


def test_a_listing_waiting_for_a_slot_goes_before_any_transfer() -> None:
    # A transfer of a file with a lot of work left and a listing both wait for the one slot: the
    # listing is short and what comes next waits for it, so it takes the slot first.
    with HostileServer() as server:
        fake_repo(server, "org/repo", {"a.txt": b"a"})
        pool = EndpointPool.from_urls([server.url], max_concurrency=1, failover_after=3)
        governor = pool.current.governor
        assert governor.acquire()
        listing_seen_first: list[bool] = []

        def transfer() -> None:
            assert governor.acquire(priority=1e9)
            listing_seen_first.append(bool(server.requests("/api/*")))
            governor.release()

        def listing() -> None:
            with requests.Session() as session:
                list_repo(pool, "org/repo", repo_type="model", revision="main", token=None, session=session)

        threads = [threading.Thread(target=transfer), threading.Thread(target=listing)]
        for thread in threads:
            thread.start()
            for _ in range(1000):  # each one is waiting before the next starts (bounded poll)
                if governor.waiting == threads.index(thread) + 1:
                    break
                threading.Event().wait(0.01)
        assert governor.waiting == 2
        governor.release()
        for thread in threads:
            thread.join(30)
    assert listing_seen_first == [True]


def test_a_cancelled_wait_takes_no_slot_and_leaves_the_line() -> None:
    governor = RateGovernor(1)
    assert governor.acquire()
    cancel = threading.Event()
    cancel.set()
    assert governor.acquire(cancel) is False and governor.waiting == 0 and governor.in_flight == 1


# ------------------------------------------------------------------------------------ end to end


def fetch_intact(fault_server, tmp_path: Path, repo_id: str, source: Path, files: dict, **options):
    """Download ``repo_id`` from the fault server into a cache under ``tmp_path`` and check that every
    file arrived byte-identical to ``source``; the download's result."""
    result = download(repo_id, endpoints=[fault_server.url], cache_dir=tmp_path, progress=False, **options)
    assert all((result.path / name).read_bytes() == (source / name).read_bytes() for name in files)
    return result


@pytest.mark.slow
def test_many_small_files_use_an_announced_quota_without_tripping_it(fault_server, faults, tmp_path) -> None:
    files = {f"part_{i:03d}.bin": 2000 + i for i in range(40)}
    source = make_repo(fault_server.root, "pacing/many-small", files)
    faults.request_quota(10, 1.0)  # 40 files: four windows of 10
    result = fetch_intact(fault_server, tmp_path, "pacing/many-small", source, files)
    refused = [r for r in faults.requests("*/resolve/*") if r.status == 429]
    # Pacing to the quota the answers announce: a 429 at most where a window's reset was misjudged.
    assert len(refused) <= 1, [(r.path, r.started) for r in refused]
    assert result.rate_limited == len(refused)


@pytest.mark.slow
def test_a_listing_neither_spends_nor_waits_for_the_file_request_quota(
    fault_server, faults, tmp_path
) -> None:
    # The quota file answers announce counts file requests only (the Hub's "resolvers"; listings
    # count against "api"): a listing counted in it would leave one file fewer per window and, on a
    # repo of whole windows, cost one more window at the end.
    files = {f"part_{i}.bin": 1000 + i for i in range(5)}
    make_repo(fault_server.root, "pacing/one-window", files)
    quota = faults.request_quota(4, 2.0)
    assert quota is not None
    # One file at a time, so that each request goes out after the answers before it (with more, the
    # first ones all leave before any answer has told the quota).
    download(
        "pacing/one-window", endpoints=[fault_server.url], cache_dir=tmp_path, progress=False, max_workers=1
    )
    started = sorted(r.started for r in faults.requests("*/resolve/*") if r.status == 200)
    assert len(started) == len(files)
    in_first_window = [t for t in started if t < started[0] + 1.5]  # the window is 2 s; its 4 go at once
    assert len(in_first_window) == 4, [round(t - started[0], 3) for t in started]


def test_a_slow_large_file_gets_the_slots_before_small_ones(
    fault_server, faults, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A budget of one connection, a large file crawling behind a per-connection cap, small files
    waiting: each time the slot frees, the large file's next piece takes it (the most work left goes
    first), and the small files go once the large one has nothing more to ask. First come, first
    served would put the small files' requests, waiting from the start, before the large file's
    second piece, asked for only once its first connection proved slow (RAMP_PROBE_SECONDS)."""
    monkeypatch.setattr(constants, "MIN_SEGMENT", 256 * 1024)
    monkeypatch.setattr(constants, "MIN_SPLIT", 128 * 1024)
    monkeypatch.setattr(constants, "MULTI_CONNECTION_THRESHOLD", 512 * 1024)
    monkeypatch.setattr(constants, "RAMP_PROBE_SECONDS", 0.3)
    files: dict[str, bytes | int] = {"large.bin": 1024 * 1024}
    files.update({f"small-{i}.txt": 1000 + i for i in range(6)})
    source = make_repo(fault_server.root, "pacing/one-large", files)
    faults.limit_bandwidth(512_000, path="*/large.bin")
    fetch_intact(
        fault_server,
        tmp_path,
        "pacing/one-large",
        source,
        files,
        max_workers=4,
        connections=2,
        max_connections=1,
    )
    asked = [
        r.path.rsplit("/", 1)[1]
        for r in sorted(faults.requests("*/resolve/*", "GET"), key=lambda r: r.started)
    ]
    large = [i for i, name in enumerate(asked) if name == "large.bin"]
    assert len(large) >= 2, asked  # it did come in pieces
    # From its first request to its last, the slot went to nothing but the large file.
    assert asked[large[0] : large[-1] + 1] == ["large.bin"] * (large[-1] - large[0] + 1), asked


def test_the_connection_budget_holds_for_the_whole_run(
    fault_server, faults, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four large capped files each wanting four connections, four files at once: never more than the
    budget of four connections to the endpoint."""
    monkeypatch.setattr(constants, "MIN_SEGMENT", 256 * 1024)
    monkeypatch.setattr(constants, "MULTI_CONNECTION_THRESHOLD", 512 * 1024)
    monkeypatch.setattr(constants, "RAMP_PROBE_SECONDS", 0)  # every file wants all its connections at once
    files: dict[str, bytes | int] = {f"shard-{i}.safetensors": 2 * 1024 * 1024 + i for i in range(4)}
    files.update({"config.json": b"{}", "tokenizer.json": 30_000})
    source = make_repo(fault_server.root, "pacing/sharded", files)
    faults.limit_bandwidth(3_000_000, path="*/resolve/*")
    fetch_intact(
        fault_server,
        tmp_path,
        "pacing/sharded",
        source,
        files,
        max_workers=4,
        connections=4,
        max_connections=4,
    )
    gets = faults.requests("*/resolve/*", "GET")
    assert len(gets) > 8, [r.range for r in gets]  # the large files did come in several pieces each
    # HTTP/1.1 carries one request at a time per socket: no more sockets than the budget, ever, also
    # bounds the requests in flight. (Without a shared pool, each thread opened sockets of its own.)
    sockets = {r.client for r in faults.records}
    assert len(sockets) <= 4, sorted(sockets)
