"""The team mirror (`hfmirror serve ROOT --upstream URL`), two-tier on loopback.

The upstream is `hfmirror serve` wrapped by the fault injector; the mirror runs in this process
(fast, its counters readable) unless a test needs to kill it. Clients are huggingface_hub,
transformers and `hfmirror download`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import re
import threading
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import pytest
import requests
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hfmirror.download import download
from hfmirror.errors import DownloadInterrupted
from hfmirror.server import mirror as mirror_module
from hfmirror.server.app import ServerThread, create_app
from hfmirror.server.streaming import HOLD_BACK
from hfmirror.server.upstream import FAILBACK_SECONDS
from hfmirror.server.upstream import Upstream as UpstreamEndpoints
from tests.mirror.conftest import BIG, Mirror, Upstream, hub
from tests.mirror.support import MIB, REPO_ROOT, files_under, start_mirror_process, wait_until
from tests.support import make_repo, range_start, run_cli

# ------------------------------------------------------------------------------------ cold and warm


def test_cold_then_warm_downloads_are_byte_identical_and_cross_the_upstream_once(
    upstream: Upstream, mirror: Callable[..., Mirror], tmp_path: Path
) -> None:
    m = mirror(upstream.url)
    expected = files_under(upstream.root / "tiny" / "bert")
    cold = huggingface_hub.snapshot_download("tiny/bert", **hub(endpoint=m.url, cache_dir=tmp_path / "c1"))
    assert files_under(Path(cold)) == expected
    sent = upstream.sent("*/resolve/*")
    assert sent == sum(len(content) for content in expected.values())  # each file once
    warm = huggingface_hub.snapshot_download("tiny/bert", **hub(endpoint=m.url, cache_dir=tmp_path / "c2"))
    assert files_under(Path(warm)) == expected
    one = huggingface_hub.hf_hub_download(
        "tiny/bert", "config.json", **hub(endpoint=m.url, cache_dir=tmp_path / "c3")
    )
    assert Path(one).read_bytes() == expected["config.json"]
    ours = download("tiny/bert", endpoints=[m.url], cache_dir=tmp_path / "c4", progress=False)
    assert files_under(ours.path) == expected
    assert upstream.sent("*/resolve/*") == sent  # the warm clients cost the upstream nothing
    assert m.counter("cache_hits") > 0 and m.counter("fills_started") == len(expected)

    # ROOT is an ordinary Hugging Face cache now: huggingface_hub offline, and `serve` without --upstream.
    offline = huggingface_hub.snapshot_download("tiny/bert", cache_dir=m.root, local_files_only=True)
    assert files_under(Path(offline)) == expected
    plain = create_app(m.root, state_dir=tmp_path / "plain-state")
    with ServerThread(plain) as server:
        again = huggingface_hub.snapshot_download(
            "tiny/bert", **hub(endpoint=server.url, cache_dir=tmp_path / "c5")
        )
    plain.state.checksums.close()
    assert files_under(Path(again)) == expected


def test_a_dataset_and_hub_errors_pass_through(
    upstream: Upstream, mirror: Callable[..., Mirror], tmp_path: Path
) -> None:
    m = mirror(upstream.url)
    data = huggingface_hub.snapshot_download(
        "tiny/data", **hub(repo_type="dataset", endpoint=m.url, cache_dir=tmp_path / "c")
    )
    assert files_under(Path(data)) == files_under(upstream.root / "datasets" / "tiny" / "data")
    kwargs = hub(endpoint=m.url, cache_dir=tmp_path / "c")
    with pytest.raises(RepositoryNotFoundError):
        huggingface_hub.hf_hub_download("nobody/nothing", "config.json", **kwargs)
    with pytest.raises(RevisionNotFoundError):
        huggingface_hub.hf_hub_download("tiny/bert", "config.json", revision="v9", **kwargs)
    with pytest.raises(EntryNotFoundError):
        huggingface_hub.hf_hub_download("tiny/bert", "missing.json", **kwargs)


def test_four_concurrent_cold_clients_cost_one_upstream_transfer(
    upstream: Upstream, mirror: Callable[..., Mirror], tmp_path: Path
) -> None:
    upstream.plan.limit_bandwidth(2 * MIB, path="*/weights.bin")  # ~2 s: every client arrives mid-fill
    m = mirror(upstream.url)
    expected = (upstream.root / "big" / "one" / "weights.bin").read_bytes()

    def client(i: int) -> bytes:
        path = huggingface_hub.hf_hub_download(
            "big/one", "weights.bin", **hub(endpoint=m.url, cache_dir=tmp_path / f"client-{i}")
        )
        return Path(path).read_bytes()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(client, range(4)))
    assert all(result == expected for result in results)
    assert m.counter("fills_started") == 1
    # One transfer: each byte once, give or take what a re-split connection had in flight.
    assert BIG <= upstream.sent("*/weights.bin") <= BIG + 4 * MIB


def test_a_range_of_a_file_being_filled_is_served_from_what_is_there(
    upstream: Upstream, mirror: Callable[..., Mirror]
) -> None:
    # The upstream stops halfway through the file for a minute; the mirror gives up on that
    # connection after its 5 s stall timeout and fetches the rest. Until then the file can only be
    # read from its partial copy, however fast or slow this machine is.
    stall = upstream.plan.stall(60, after_bytes=BIG // 2, path="*/weights.bin", times=1)
    m = mirror(upstream.url, connections=1, stall_timeout=5, upstream_timeout=60)
    data = (upstream.root / "big" / "one" / "weights.bin").read_bytes()
    blob = m.root / "models--big--one" / "blobs" / hashlib.sha256(data).hexdigest()
    commit = requests.get(f"{m.url}/api/models/big/one", timeout=30).json()["sha"]
    url = f"{m.url}/big/one/resolve/{commit}/weights.bin"
    with requests.get(url, stream=True, timeout=60) as first:  # starts the fill
        assert first.status_code == 200
        head = requests.get(url, headers={"Range": "bytes=0-99"}, timeout=60)
        assert head.status_code == 206 and head.content == data[:100]
        assert head.headers["Content-Range"] == f"bytes 0-99/{BIG}"
        assert not blob.exists()  # answered from the partial file
        # A range far ahead waits for its bytes; the file's last block waits for the checksum.
        tail = requests.get(url, headers={"Range": f"bytes={BIG - 5000}-"}, timeout=90)
        assert tail.status_code == 206 and tail.content == data[-5000:]
        assert blob.is_file()  # the last block came only once the file was verified and in place
        body = first.raw.read()
    assert body == data
    # All three answers came through the fill (a cached blob would have counted as a hit).
    assert (m.counter("cache_misses"), m.counter("cache_hits")) == (1 + 3, 0)  # the listing, the files
    assert stall.applied == 1 and len(upstream.plan.requests("*/weights.bin", method="GET")) >= 2
    assert upstream.sent("*/weights.bin") <= BIG + 4 * MIB


@pytest.mark.slow
def test_upstream_drops_429s_and_503s_are_absorbed_not_passed_on(
    upstream: Upstream, mirror: Callable[..., Mirror], tmp_path: Path
) -> None:
    # What olah forwards to its clients: here the mirror's downloader retries, backs off, resumes.
    upstream.plan.too_many_requests(1, path="/api/models/big/one/*", times=1)
    upstream.plan.fail(503, path="*/config.json", times=1)
    # Less than any piece the mirror asks for, so that the drop lands mid-body however it splits the file.
    upstream.plan.drop(after_bytes=MIB // 2, path="*/weights.bin", times=1)
    upstream.plan.too_many_requests(1, path="*/weights.bin", skip=1, times=1)
    m = mirror(upstream.url)
    path = huggingface_hub.snapshot_download("big/one", **hub(endpoint=m.url, cache_dir=tmp_path / "c"))
    assert files_under(Path(path)) == files_under(upstream.root / "big" / "one")
    statuses = [r.status for r in upstream.plan.records]
    assert 429 in statuses and 503 in statuses  # the faults did happen upstream
    # The drop was resumed, not restarted: no later answer starts where the dropped one did. (A byte
    # count cannot tell: pieces cut short when another connection takes over their rest leave the
    # bytes already in flight counted as sent, and a restart would re-send only half a MiB.)
    gets = [r for r in upstream.plan.requests("*/weights.bin", "GET") if r.status in (200, 206)]
    dropped = [r for r in gets if "drop" in r.faults]
    assert len(dropped) == 1 and dropped[0].bytes_sent == MIB // 2, [(r.range, r.faults) for r in gets]
    later = [r for r in gets if r.started > dropped[0].started]
    assert later and all(range_start(r.range) != range_start(dropped[0].range) for r in later), [
        (r.range, r.bytes_sent) for r in gets
    ]
    assert upstream.sent("*/weights.bin") < 2 * BIG  # and the file did not come twice
    assert m.counter("errors") == 0
    scraped = requests.get(f"{m.url}/metrics", timeout=10).text
    assert re.search(r"^hfmirror_upstream_rate_limited_total [1-9]", scraped, re.MULTILINE), scraped


def test_a_listings_429_reaches_the_metrics(upstream: Upstream, mirror: Callable[..., Mirror]) -> None:
    upstream.plan.too_many_requests(1, path="/api/models/tiny/bert/*", times=1)
    m = mirror(upstream.url)
    assert requests.get(f"{m.url}/api/models/tiny/bert", timeout=60).status_code == 200
    assert [r.status for r in upstream.plan.requests("/api/models/tiny/bert/*")] == [429, 200]
    scraped = requests.get(f"{m.url}/metrics", timeout=10).text
    assert re.search(r"^hfmirror_upstream_rate_limited_total 1$", scraped, re.MULTILINE), scraped
    assert re.search(r"^hfmirror_upstream_retries_total 1$", scraped, re.MULTILINE), scraped


def test_shutdown_ends_a_listings_wait_on_the_upstream(upstream: Upstream) -> None:
    upstream.plan.too_many_requests(240, path="/api/models/tiny/bert/*", times=1)  # "come back in 4 min"
    up = UpstreamEndpoints([upstream.url])
    outcome: list[BaseException] = []

    def list_it() -> None:
        try:
            up.list("model", "tiny/bert", "main", None)
        except BaseException as error:  # noqa: BLE001 - what ended the call is the test's verdict
            outcome.append(error)

    waiting = threading.Thread(target=list_it)
    waiting.start()
    wait_until(lambda: upstream.plan.requests("/api/models/tiny/bert/*"), timeout=30)
    up.cancel.set()
    waiting.join(60)  # a hang guard far below the announced wait
    assert not waiting.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], DownloadInterrupted), outcome


def test_a_renewed_upstream_pool_goes_back_to_the_first_endpoint_with_the_same_governors() -> None:
    # No request is sent: the pool is renewed on the (fake) clock alone.
    now = [0.0]
    up = UpstreamEndpoints(["http://127.0.0.1:1", "http://127.0.0.1:2"], clock=lambda: now[0])
    old = up.pool
    assert old.fail_over(old.endpoints[0], "kept failing") and old.current is old.endpoints[1]
    assert old.endpoints[1].governor.acquire()  # a fill holding the old pool has a connection open
    now[0] = FAILBACK_SECONDS + 1
    new = up.pool
    assert new is not old and new.current.url == old.endpoints[0].url and new.current.abandoned is None
    # One cap, one pause, one quota per endpoint, whichever pool a fill holds.
    assert [e.governor for e in new.endpoints] == [e.governor for e in old.endpoints]
    assert new.endpoints[1].governor.in_flight == 1


@pytest.mark.parametrize("when", ["before the open", "after the headers are made"])
def test_a_blob_evicted_by_another_replica_while_it_is_answered_is_still_answered_whole(
    upstream: Upstream, mirror: Callable[..., Mirror], monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    m = mirror(upstream.url)
    url = f"{m.url}/evict/three/resolve/main/a.bin"
    content = (upstream.root / "evict/three/a.bin").read_bytes()
    assert requests.get(url, timeout=60).content == content  # cached now
    blob = m.root / "models--evict--three" / "blobs" / hashlib.sha256(content).hexdigest()
    assert blob.is_file()
    if when == "before the open":  # found cached, then unlinked: a miss after all, fetched again
        is_complete = mirror_module._is_complete

        def then_evicted(layout, file):  # type: ignore[no-untyped-def]
            found = is_complete(layout, file)
            blob.unlink()
            return found

        monkeypatch.setattr(mirror_module, "_is_complete", then_evicted)
    else:  # unlinked once the answer is made, before Starlette sends it

        class EvictedFirst(mirror_module.BigChunkFileResponse):
            async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
                blob.unlink()
                await super().__call__(scope, receive, send)

        monkeypatch.setattr(mirror_module, "BigChunkFileResponse", EvictedFirst)
    sent_before = upstream.sent("*/a.bin")
    answer = requests.get(url, timeout=60)
    assert answer.status_code == 200 and answer.content == content
    assert (upstream.sent("*/a.bin") > sent_before) == (when == "before the open")
    assert m.counter("errors") == 0


@pytest.mark.parametrize(
    "path",
    [
        "/api/models/tiny/bert/revision/..%2F..%2F..%2Fescaped",
        "/tiny/bert/resolve/..%2F..%2Fescaped/config.json",
        "/tiny/bert/resolve/main/..%2F..%2Fconfig.json",
        "/tiny/bert/resolve/main/.git/config",
        "/api/models/..%2F..%2Fescaped/revision/main",
    ],
)
def test_names_that_would_leave_the_cache_are_refused(
    upstream: Upstream, mirror: Callable[..., Mirror], tmp_path: Path, path: str
) -> None:
    m = mirror(upstream.url)
    conn = http.client.HTTPConnection("127.0.0.1", m.server.port, timeout=30)
    conn.request("GET", path)
    status = conn.getresponse().status
    conn.close()
    assert 400 <= status < 500, (path, status)
    assert not list(tmp_path.rglob("escaped*"))  # nothing written under any name from the URL
    assert not upstream.plan.requests("*escaped*")


# ------------------------------------------------------------------------------------ pins


def test_a_branch_stays_pinned_for_the_revision_ttl(tmp_path: Path, mirror: Callable[..., Mirror]) -> None:
    root = tmp_path / "upstream"
    repo = make_repo(root, "org/moving", {"config.json": b'{"v": 1}\n'})
    inner = create_app(root, state_dir=tmp_path / "up-state")
    with ServerThread(inner) as up:
        pinned = mirror(up.url, root=tmp_path / "cache-a", revision_ttl=3600)
        always = mirror(up.url, root=tmp_path / "cache-b", revision_ttl=0)
        first = requests.get(f"{pinned.url}/api/models/org/moving", timeout=10).json()["sha"]
        assert (
            requests.get(f"{pinned.url}/org/moving/resolve/main/config.json", timeout=10).status_code == 200
        )
        assert requests.get(f"{always.url}/api/models/org/moving", timeout=10).json()["sha"] == first
        (repo / "config.json").write_bytes(b'{"v": 2}\n')  # main moves upstream
        moved = requests.get(f"{up.url}/api/models/org/moving", timeout=10).json()["sha"]
        assert moved != first
        # Within the ttl: the old commit, and its file, whatever main is upstream now.
        assert requests.get(f"{pinned.url}/api/models/org/moving", timeout=10).json()["sha"] == first
        r = requests.get(f"{pinned.url}/org/moving/resolve/main/config.json", timeout=10)
        assert r.headers["X-Repo-Commit"] == first and r.content == b'{"v": 1}\n'  # from the cache
        # A ttl of 0 asks every time.
        assert requests.get(f"{always.url}/api/models/org/moving", timeout=10).json()["sha"] == moved
        r = requests.get(f"{always.url}/org/moving/resolve/main/config.json", timeout=10)
        assert r.content == b'{"v": 2}\n' and r.headers["X-Repo-Commit"] == moved
        assert (tmp_path / "cache-b" / "models--org--moving" / "refs" / "main").read_text() == moved
    inner.state.checksums.close()


# ------------------------------------------------------------------------------------ offline


def test_with_the_upstream_down_cached_revisions_are_served_and_the_rest_fails_fast(
    upstream: Upstream, mirror: Callable[..., Mirror], tmp_path: Path, unused_port: int
) -> None:
    online = mirror(upstream.url)
    expected = files_under(upstream.root / "tiny" / "bert")
    huggingface_hub.snapshot_download("tiny/bert", **hub(endpoint=online.url, cache_dir=tmp_path / "c1"))
    # A new mirror on the same cache, its upstream gone: nothing pinned in memory, nothing to ask.
    offline = mirror(f"http://127.0.0.1:{unused_port}", root=online.root, upstream_timeout=5)
    again = huggingface_hub.snapshot_download(
        "tiny/bert", **hub(endpoint=offline.url, cache_dir=tmp_path / "c2")
    )
    assert files_under(Path(again)) == expected
    assert offline.counter("stale_answers") > 0
    missing = requests.get(f"{offline.url}/big/one/resolve/main/config.json", timeout=60)
    assert missing.status_code == 504 and "upstream unreachable" in missing.headers["X-Error-Message"]


def test_a_hanging_upstream_costs_a_client_the_timeout_not_a_hang(
    upstream: Upstream, mirror: Callable[..., Mirror], tmp_path: Path
) -> None:
    first = mirror(upstream.url)
    assert requests.get(f"{first.url}/tiny/bert/resolve/main/config.json", timeout=30).status_code == 200
    upstream.plan.stall(600)  # accepts, then never answers
    second = mirror(upstream.url, root=first.root, upstream_timeout=1)
    cached = requests.get(f"{second.url}/tiny/bert/resolve/main/config.json", timeout=60)
    assert (
        cached.status_code == 200 and cached.content == (upstream.root / "tiny/bert/config.json").read_bytes()
    )
    uncached = requests.get(f"{second.url}/big/one/resolve/main/config.json", timeout=60)
    assert uncached.status_code == 504


def test_many_requests_for_a_hanging_listing_do_not_hold_up_other_repos(
    upstream: Upstream, mirror: Callable[..., Mirror]
) -> None:
    upstream.plan.stall(30, path="/api/models/big/one/*")  # this repo's listing never comes
    m = mirror(upstream.url, upstream_timeout=1)
    with concurrent.futures.ThreadPoolExecutor(40) as pool:  # more than the mirror's upstream threads
        statuses = list(
            pool.map(lambda _: requests.get(f"{m.url}/api/models/big/one", timeout=60).status_code, range(40))
        )
    assert statuses == [504] * 40
    assert len(upstream.plan.requests("/api/models/big/one/*")) == 1  # they all waited for one call
    r = requests.get(f"{m.url}/api/models/tiny/bert", timeout=60)  # needs the upstream too
    assert r.status_code == 200 and r.json()["id"] == "tiny/bert"


# ------------------------------------------------------------------------------------ integrity


def test_a_corrupted_upstream_body_never_reaches_a_client_as_a_complete_file(
    upstream: Upstream, mirror: Callable[..., Mirror]
) -> None:
    upstream.plan.corrupt(path="*/weights.bin")  # every answer, every attempt
    upstream.plan.limit_bandwidth(4 * MIB, path="*/weights.bin")
    m = mirror(upstream.url, connections=2)
    commit = requests.get(f"{m.url}/api/models/big/one", timeout=30).json()["sha"]
    url = f"{m.url}/big/one/resolve/{commit}/weights.bin"  # "main" would answer 302 to this URL
    status, received = _read_until_closed(url)
    # Streamed, then cut short: the last block never left before a checksum that never matched.
    assert status == 200 and 0 < len(received) <= BIG - HOLD_BACK
    assert not list((m.root / "models--big--one" / "blobs").glob("[0-9a-f]" * 64))
    status, received = _read_until_closed(url)  # a new fill, the same: never the whole wrong file
    assert status == 200 and 0 < len(received) <= BIG - HOLD_BACK


@pytest.mark.slow
def test_a_client_resuming_after_a_cut_starts_over_and_gets_the_right_file(
    upstream: Upstream, mirror: Callable[..., Mirror], tmp_path: Path
) -> None:
    upstream.plan.corrupt(path="*/weights.bin", times=2)  # the first attempt's requests only
    upstream.plan.limit_bandwidth(4 * MIB, path="*/weights.bin")
    m = mirror(upstream.url, connections=2)
    path = huggingface_hub.hf_hub_download(
        "big/one", "weights.bin", **hub(endpoint=m.url, cache_dir=tmp_path / "c")
    )
    assert (
        hashlib.sha256(Path(path).read_bytes()).hexdigest()
        == hashlib.sha256((upstream.root / "big/one/weights.bin").read_bytes()).hexdigest()
    )


def _read_until_closed(url: str) -> tuple[int, bytes]:
    """GET ``url``: the status and whatever body comes until the server closes (a cut shows as a
    short body)."""
    host, port = url.removeprefix("http://").split("/", 1)[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("GET", "/" + url.removeprefix("http://").split("/", 1)[1])
        response = conn.getresponse()
        chunks = []
        try:
            while chunk := response.read1(1 << 20):
                chunks.append(chunk)
        except (http.client.IncompleteRead, ConnectionError) as error:
            chunks.append(getattr(error, "partial", b""))
        return response.status, b"".join(chunks)
    finally:
        conn.close()


# ------------------------------------------------------------------------------------ Xet, tokens


def test_xet_headers_from_upstream_never_reach_clients(
    upstream: Upstream, mirror: Callable[..., Mirror], tmp_path: Path
) -> None:
    upstream.plan.xet_headers()
    m = mirror(upstream.url)
    head = requests.head(f"{m.url}/tiny/bert/resolve/main/config.json", timeout=30)
    assert not any(h.lower().startswith("x-xet") for h in head.headers) and "xet" not in head.headers.get(
        "Link", ""
    )
    # hf_xet is installed here: had the headers come through, huggingface_hub would have gone to Xet.
    path = huggingface_hub.snapshot_download("tiny/bert", **hub(endpoint=m.url, cache_dir=tmp_path / "c"))
    assert files_under(Path(path)) == files_under(upstream.root / "tiny" / "bert")


@pytest.mark.slow
def test_gated_content_goes_only_to_tokens_the_upstream_accepts(
    upstream: Upstream, mirror: Callable[..., Mirror], tmp_path: Path, unused_port: int
) -> None:
    upstream.plan.require_token("hf_good", path="*/gated/model/*")  # listings and files, as a private repo
    m = mirror(upstream.url)
    weights = (upstream.root / "gated/model/model.safetensors").read_bytes()
    path = huggingface_hub.hf_hub_download(
        "gated/model", "model.safetensors", endpoint=m.url, cache_dir=tmp_path / "good", token="hf_good"
    )
    assert Path(path).read_bytes() == weights
    assert upstream.plan.requests("*/gated/model/*")[0].headers["authorization"] == "Bearer hf_good"
    for token, status in ((None, 401), ("hf_bad", 403)):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        for route in ("/gated/model/resolve/main/model.safetensors", "/api/models/gated/model"):
            r = _refused(m, route, headers)
            assert r.status_code == status and r.headers["X-Error-Code"] == "GatedRepo", (token, route)
    with pytest.raises(GatedRepoError):
        huggingface_hub.hf_hub_download(
            "gated/model", "model.safetensors", **hub(endpoint=m.url, cache_dir=tmp_path / "anon")
        )
    again = requests.get(
        f"{m.url}/gated/model/resolve/main/model.safetensors",
        headers={"Authorization": "Bearer hf_good"},
        timeout=30,
    )
    assert again.content == weights and again.headers["Cache-Control"] == "private, no-store"
    # With the upstream gone, nobody's token can be checked: nobody gets the cached copy.
    cut_off = mirror(f"http://127.0.0.1:{unused_port}", root=m.root, upstream_timeout=3)
    for headers in ({"Authorization": "Bearer hf_good"}, {}):
        r = _refused(cut_off, "/gated/model/resolve/main/model.safetensors", headers)
        assert r.status_code == 504, headers


def _refused(m: Mirror, route: str, headers: dict[str, str]) -> requests.Response:
    """GET ``route`` of mirror ``m``, which must refuse it: by its own count, the only body bytes that
    went out are those of the JSON error (none of the file)."""
    requests_before, bytes_before = m.counter("requests"), m.counter("served_bytes")
    r = requests.get(m.url + route, headers=headers, timeout=60)
    # A request is counted as its handler returns, a moment after its last byte went out.
    wait_until(lambda: m.counter("requests") > requests_before, timeout=10)
    assert m.counter("served_bytes") - bytes_before == len(r.content) and r.json()["error"], route
    return r


# ------------------------------------------------------------------------------------ operators


def test_allow_and_deny(upstream: Upstream, mirror: Callable[..., Mirror]) -> None:
    m = mirror(upstream.url, allow=["tiny/*", "datasets/tiny/*"], deny=["tiny/secret*"])
    assert requests.get(f"{m.url}/tiny/bert/resolve/main/config.json", timeout=30).status_code == 200
    assert requests.get(f"{m.url}/api/datasets/tiny/data", timeout=30).status_code == 200
    for route in (
        "/big/one/resolve/main/config.json",
        "/api/models/big/one",
        "/tiny/secret-model/resolve/main/x",
    ):
        r = requests.get(m.url + route, timeout=30)
        assert r.status_code == 403 and "not served by this mirror" in r.headers["X-Error-Message"], route
    assert not upstream.plan.requests("*big/one*") and not upstream.plan.requests("*secret*")


def test_max_size_evicts_whole_least_recently_used_files(
    upstream: Upstream, mirror: Callable[..., Mirror]
) -> None:
    m = mirror(upstream.url, max_size=int(2.5 * MIB))
    blobs = m.root / "models--evict--three" / "blobs"

    def get(name: str) -> bytes:
        r = requests.get(f"{m.url}/evict/three/resolve/main/{name}", timeout=30)
        assert r.status_code == 200
        return r.content

    get("a.bin")
    get("b.bin")
    get("a.bin")  # a is now used more recently than b
    get("c.bin")  # needs room: b goes
    expected = {
        name: (upstream.root / "evict/three" / name).read_bytes() for name in ("a.bin", "b.bin", "c.bin")
    }
    held = {p.name for p in blobs.iterdir() if "." not in p.name}
    assert held == {hashlib.sha256(expected[n]).hexdigest() for n in ("a.bin", "c.bin")}
    assert sum((blobs / name).stat().st_size for name in held) <= 2.5 * MIB
    snapshot = next((m.root / "models--evict--three" / "snapshots").iterdir())
    assert not (snapshot / "b.bin").is_symlink()  # no dangling link left behind
    assert m.counter("evictions") == 1
    assert get("b.bin") == expected["b.bin"]  # fetched again when asked for
    assert upstream.plan.bytes_sent("*/b.bin") == 2 * MIB


def test_metrics_are_prometheus_text_and_the_log_has_hit_or_miss_per_request(
    upstream: Upstream, mirror: Callable[..., Mirror]
) -> None:
    m = mirror(upstream.url)
    for _ in range(2):
        requests.get(f"{m.url}/tiny/bert/resolve/main/config.json", timeout=30).raise_for_status()
    size = (upstream.root / "tiny/bert/config.json").stat().st_size

    def scrape() -> str:
        text = requests.get(f"{m.url}/metrics", timeout=10).text
        # A request is counted as its handler returns, a moment after its last byte went out.
        return text if re.search(rf"^hfmirror_served_bytes_total {2 * size}$", text, re.MULTILINE) else ""

    text = wait_until(scrape, timeout=10)
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) hfmirror_\w+ .+", line), line
            continue
        name, value = line.split(" ")
        samples[name] = float(value)
    assert samples["hfmirror_cache_misses_total"] == 1 and samples["hfmirror_cache_hits_total"] == 1
    assert samples["hfmirror_upstream_bytes_total"] == size and samples["hfmirror_requests_total"] == 2
    assert "# TYPE hfmirror_cache_hits_total counter" in text
    assert (
        "# TYPE hfmirror_upstream_retries_total counter" in text
        and "# TYPE hfmirror_fills_running gauge" in text
    )


def test_cache_control_lets_http_caches_keep_commit_addressed_answers_only(
    upstream: Upstream, mirror: Callable[..., Mirror]
) -> None:
    m = mirror(upstream.url)
    commit = requests.get(f"{m.url}/api/models/tiny/bert", timeout=30).json()["sha"]
    immutable = "public, max-age=31536000, immutable"
    assert requests.get(f"{m.url}/api/models/tiny/bert", timeout=30).headers["Cache-Control"] == "no-cache"
    assert (
        requests.get(f"{m.url}/api/models/tiny/bert/revision/{commit}", timeout=30).headers["Cache-Control"]
        == immutable
    )
    by_commit = requests.get(f"{m.url}/tiny/bert/resolve/{commit}/config.json", timeout=30)
    assert by_commit.headers["Cache-Control"] == immutable
    assert (
        requests.get(f"{m.url}/tiny/bert/resolve/main/config.json", timeout=30).headers["Cache-Control"]
        == "no-cache"
    )
    # An LFS file under a branch goes, as on the Hub, to the URL whose bytes never change.
    lfs = requests.head(f"{m.url}/tiny/bert/resolve/main/model.safetensors", timeout=30)
    assert lfs.status_code == 302
    assert lfs.headers["Location"] == f"/tiny/bert/resolve/{commit}/model.safetensors"
    assert lfs.headers["X-Repo-Commit"] == commit and lfs.headers["X-Linked-Size"]


def test_tokens_never_reach_the_log(upstream: Upstream, tmp_path: Path) -> None:
    upstream.plan.require_token("hf_secret_0123456789", path="*/gated/model/*")
    m = start_mirror_process(tmp_path / "cache", upstream.url, tmp_path)
    try:
        for token in ("hf_secret_0123456789", "hf_wrong_9876543210"):
            requests.get(
                f"{m.url}/gated/model/resolve/main/config.json",
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
        for _ in range(2):
            requests.get(f"{m.url}/tiny/bert/resolve/main/config.json", timeout=30).raise_for_status()
    finally:
        m.stop()
    log = m.log()
    lines = [line for line in log.splitlines() if '"GET /tiny/bert/resolve/main/config.json"' in line]
    assert [line.rsplit(" ", 1)[-1] for line in lines] == ["miss", "hit"]  # one line per request, and which
    assert '"GET /gated/model/resolve/main/config.json"' in log
    assert "hf_secret" not in log and "hf_wrong" not in log and "Bearer" not in log


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--allow", "org/*"], "--allow only apply with --upstream"),
        (["--serve-seeded-offline"], "--serve-seeded-offline only apply with --upstream"),
        (["--upstream", "ftp://x", "--max-size", "1G"], "not an http(s) endpoint URL"),
        (["--upstream", "http://127.0.0.1:9", "--max-size", "lots"], "--max-size: not a size"),
    ],
)
def test_serve_refuses_bad_mirror_options_in_one_line(tmp_path: Path, extra: list[str], message: str) -> None:
    result = run_cli("serve", str(tmp_path / "cache"), "--port", "0", *extra, cwd=REPO_ROOT)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hfmirror: error:") and message in lines[0], lines


@pytest.mark.parametrize("mode", [[], ["--upstream", "http://127.0.0.1:9"]], ids=["plain", "mirror"])
def test_an_unusable_state_dir_is_a_storage_error_in_one_line(tmp_path: Path, mode: list[str]) -> None:
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "cache").mkdir()
    state_dir = tmp_path / "a-file" / "state"  # cannot be made, even by root
    result = run_cli(
        "serve", str(tmp_path / "cache"), "--port", "0", "--state-dir", str(state_dir), *mode, cwd=REPO_ROOT
    )
    assert result.returncode == 7, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hfmirror: error:") and str(state_dir.parent) in lines[0]
