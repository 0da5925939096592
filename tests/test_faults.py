"""The fault injector: every kind of fault observed on the wire, and the request records."""

from __future__ import annotations

import hashlib
import http.client
import re
import signal
import subprocess
import sys
import threading
import time
from email.utils import formatdate
from pathlib import Path

import huggingface_hub
import pytest
import requests
from huggingface_hub.errors import HfHubHTTPError

from hfmirror.server.faults import Fault, FaultPlan, Quota
from tests.conftest import RunningServer

REPO_ROOT = Path(__file__).resolve().parents[1]
BIG = "/tiny/nested/resolve/main/data/big.bin"
README = "/tiny/nested/resolve/main/README.md"


def big_bytes(server: RunningServer) -> bytes:
    return (server.root / "tiny/nested/data/big.bin").read_bytes()


def get_raw(
    url: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes, bool]:
    """GET with http.client: (status, headers, body, complete); a truncated body is not complete."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        found = {k.lower(): v for k, v in response.getheaders()}
        try:
            return response.status, found, response.read(), True
        except http.client.IncompleteRead as error:
            return response.status, found, error.partial, False
    finally:
        conn.close()


def test_drop_truncates_the_body_then_recovers(fault_server: RunningServer, faults: FaultPlan) -> None:
    rule = faults.drop(after_bytes=100_000, path="*/data/big.bin", times=1)
    data = big_bytes(fault_server)
    status, headers, body, complete = get_raw(fault_server.url, BIG)
    assert status == 200 and int(headers["content-length"]) == len(data)
    assert not complete and body == data[:100_000]
    status, _, body, complete = get_raw(fault_server.url, BIG)
    assert complete and body == data
    assert (rule.seen, rule.applied) == (2, 1)


def test_drop_inside_a_range_answer(fault_server: RunningServer, faults: FaultPlan) -> None:
    faults.drop(after_bytes=10, path="*/data/big.bin")
    status, _, body, complete = get_raw(fault_server.url, BIG, {"Range": "bytes=1000-2999"})
    assert status == 206 and not complete
    assert body == big_bytes(fault_server)[1000:1010]


def test_too_many_requests_with_retry_after(fault_server: RunningServer, faults: FaultPlan) -> None:
    faults.too_many_requests(3, ratelimit_reset=7, path="*README.md", times=1)
    date = formatdate(time.time() + 30, usegmt=True)
    faults.too_many_requests(date, path="*config.json", times=1)
    r = requests.get(fault_server.url + README, timeout=10)
    assert r.status_code == 429
    assert r.headers["Retry-After"] == "3"
    assert r.headers["RateLimit"] == '"api";r=0;t=7'
    assert requests.get(fault_server.url + README, timeout=10).status_code == 200
    r = requests.get(f"{fault_server.url}/tiny/nested/resolve/main/config.json", timeout=10)
    assert (r.status_code, r.headers["Retry-After"]) == (429, date)


def test_status_fault_with_skip_and_times(fault_server: RunningServer, faults: FaultPlan) -> None:
    faults.fail(503, path="*README.md", skip=1, times=2)
    codes = [requests.get(fault_server.url + README, timeout=10).status_code for _ in range(4)]
    assert codes == [200, 503, 503, 200]
    assert requests.head(fault_server.url + README, timeout=10).status_code == 200  # times used up


def test_huggingface_hub_sees_the_503(fault_server: RunningServer, faults: FaultPlan, tmp_path: Path) -> None:
    # huggingface_hub does not retry a failed GET of the file body: one 503 fails the call.
    faults.fail(503, path="*/a/b/c.txt", methods=("GET",), times=1)
    kwargs = {"endpoint": fault_server.url, "cache_dir": tmp_path / "cache"}
    with pytest.raises(HfHubHTTPError, match="503"):
        huggingface_hub.hf_hub_download("tiny/nested", "a/b/c.txt", **kwargs)
    path = huggingface_hub.hf_hub_download("tiny/nested", "a/b/c.txt", **kwargs)
    assert Path(path).read_bytes() == b"deep inside\n"
    assert [r.status for r in faults.requests("*/a/b/c.txt", "GET")] == [503, 200]


def test_stall_before_headers(fault_server: RunningServer, faults: FaultPlan) -> None:
    faults.stall(1.0, path="*README.md", times=1)
    start = time.monotonic()
    r = requests.get(fault_server.url + README, timeout=10)
    assert r.status_code == 200 and time.monotonic() - start >= 0.8


@pytest.mark.slow
def test_stall_mid_body(fault_server: RunningServer, faults: FaultPlan) -> None:
    faults.stall(3.0, after_bytes=5000, path="*/data/big.bin", times=1)
    start = time.monotonic()
    with requests.get(fault_server.url + BIG, stream=True, timeout=10) as r:
        first = r.raw.read(5000)
        # We hold the first 5000 bytes; the server is pausing with exactly those sent, not a byte more
        # (the next line runs well within the 3 s pause, however busy the machine).
        sent_while_we_hold_them = faults.requests("*/data/big.bin")[-1].bytes_sent
        rest = r.raw.read()
    total = time.monotonic() - start
    assert first + rest == big_bytes(fault_server)
    assert sent_while_we_hold_them == 5000
    assert total >= 2.9  # the whole took at least the pause (noise only makes it longer)


def test_corrupt_keeps_the_length(fault_server: RunningServer, faults: FaultPlan) -> None:
    faults.corrupt(path="*/data/big.bin", times=1)
    data = big_bytes(fault_server)
    r = requests.get(fault_server.url + BIG, timeout=10)
    assert r.status_code == 200 and len(r.content) == len(data)
    assert r.content != data


def test_ignore_range_gives_full_200(fault_server: RunningServer, faults: FaultPlan) -> None:
    faults.ignore_range(path="*/data/big.bin")
    r = requests.get(fault_server.url + BIG, headers={"Range": "bytes=100-"}, timeout=10)
    assert r.status_code == 200 and r.content == big_bytes(fault_server)
    assert "Content-Range" not in r.headers
    assert faults.requests("*/data/big.bin")[0].range == "bytes=100-"


def test_bandwidth_cap(fault_server: RunningServer, faults: FaultPlan) -> None:
    rate = 1_000_000
    faults.limit_bandwidth(rate, path="*/data/big.bin")
    size = 1_200_000
    start = time.monotonic()
    r = requests.get(fault_server.url + BIG, headers={"Range": f"bytes=0-{size - 1}"}, timeout=30)
    elapsed = time.monotonic() - start
    assert r.status_code == 206 and r.content == big_bytes(fault_server)[:size]
    assert elapsed >= size / rate * 0.8


def test_xet_headers_on_resolve_only(fault_server: RunningServer, faults: FaultPlan) -> None:
    faults.xet_headers()
    head = requests.head(fault_server.url + BIG, timeout=10)
    assert re.fullmatch(r"[0-9a-f]{64}", head.headers["X-Xet-Hash"])
    assert "xet-auth" in head.links
    api = requests.get(f"{fault_server.url}/api/models/tiny/nested", timeout=10)
    assert api.status_code == 200 and "X-Xet-Hash" not in api.headers


def test_redirect_to_another_host_and_token_not_forwarded(
    fault_server: RunningServer, faults: FaultPlan, tmp_path: Path
) -> None:
    other = fault_server.url.replace("127.0.0.1", "localhost")
    faults.redirect(other, path="*/resolve/*")
    head = requests.head(fault_server.url + README, allow_redirects=False, timeout=10)
    assert head.status_code == 302
    assert head.headers["Location"] == other + README
    assert head.headers["X-Linked-Etag"] and head.headers["X-Repo-Commit"]
    faults.reset()
    faults.redirect(other, path="*/resolve/*")
    path = huggingface_hub.hf_hub_download(
        "tiny/nested",
        "README.md",
        endpoint=fault_server.url,
        cache_dir=tmp_path / "c",
        token="hf_secret_token",
    )
    assert Path(path).read_bytes() == (fault_server.root / "tiny/nested/README.md").read_bytes()
    on_mirror = [r for r in faults.records if r.headers.get("host", "").startswith("127.0.0.1")]
    on_other = [r for r in faults.records if r.headers.get("host", "").startswith("localhost")]
    assert on_mirror and all(r.headers.get("authorization") == "Bearer hf_secret_token" for r in on_mirror)
    assert on_other and all("authorization" not in r.headers for r in on_other)
    assert any(r.method == "GET" and r.status == 200 for r in on_other)


def test_counters_per_file_method_and_range(fault_server: RunningServer, faults: FaultPlan) -> None:
    size = len(big_bytes(fault_server))
    requests.head(fault_server.url + BIG, timeout=10)
    requests.get(fault_server.url + BIG, timeout=10)
    requests.get(fault_server.url + BIG, headers={"Range": "bytes=0-99"}, timeout=10)
    entry = faults.stats["paths"][BIG]
    assert entry["requests"] == 3
    assert entry["methods"] == {"HEAD": 1, "GET": 2}
    assert entry["bytes"] == size + 100 == faults.bytes_sent("*big.bin")
    assert entry["ranges"] == ["bytes=0-99"]
    assert entry["statuses"] == {"200": 2, "206": 1}
    assert faults.stats["requests"] == 3


def test_request_rate_limit(fault_server: RunningServer, faults: FaultPlan) -> None:
    faults.limit_requests(5)
    with requests.Session() as session:
        answers = [session.get(fault_server.url + README, timeout=10) for _ in range(12)]
    codes = [a.status_code for a in answers]
    assert codes.count(200) >= 5 and codes.count(429) >= 1
    assert all(a.headers["Retry-After"] == "1" for a in answers if a.status_code == 429)


def test_a_fixed_window_quota_announces_itself_and_refuses_beyond_it() -> None:
    quota = Quota(limit=3, window=2.0)
    answers = [quota.take(now) for now in (10.0, 10.5, 11.0, 11.5)]
    assert answers[:3] == [(True, 2, 2.0), (True, 1, 1.5), (True, 0, 1.0)]
    assert answers[3] == (False, 0, 0.5)  # a refused request does not count
    assert quota.take(12.0) == (True, 2, 2.0)  # the next window, from where the first one began
    assert quota.take(17.9)[:2] == (True, 2)  # windows follow one another, whether used or not
    assert quota.headers(1, 0.2) == {
        "RateLimit": '"resolvers";r=1;t=1',  # rounded up: never earlier than the reset
        "RateLimit-Policy": '"fixed window";"resolvers";q=3;w=2',
    }


def test_the_quota_over_http(fault_server: RunningServer, faults: FaultPlan) -> None:
    faults.request_quota(3, 60)
    with requests.Session() as session:
        answers = [session.get(fault_server.url + README, timeout=10) for _ in range(4)]
        listing = session.get(f"{fault_server.url}/api/models/tiny/nested", timeout=10)
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["RateLimit"].split(";")[1] for a in answers] == ["r=2", "r=1", "r=0", "r=0"]
    assert answers[0].headers["RateLimit-Policy"] == '"fixed window";"resolvers";q=3;w=60'
    assert 1 <= int(answers[3].headers["Retry-After"]) <= 60
    assert listing.status_code == 200 and "RateLimit" not in listing.headers  # only file requests count
    assert faults.requests(README)[-1].faults == ["quota"]
    plan = {"quota": {"limit": 1, "window": 60}}
    assert requests.post(f"{fault_server.url}/_faults/plan", json=plan, timeout=10).status_code == 200
    assert requests.get(fault_server.url + README, timeout=10).status_code == 200
    assert requests.get(fault_server.url + README, timeout=10).status_code == 429
    bad = requests.post(f"{fault_server.url}/_faults/plan", json={"quota": {"limit": 0}}, timeout=10)
    assert bad.status_code == 400


def test_a_link_cap_is_shared_by_every_connection(fault_server: RunningServer, faults: FaultPlan) -> None:
    rate, size = 1_000_000, 600_000
    faults.limit_link(rate)
    data = big_bytes(fault_server)
    got: list[bytes] = []

    def fetch(start: int) -> None:
        headers = {"Range": f"bytes={start}-{start + size - 1}"}
        got.append(requests.get(fault_server.url + BIG, headers=headers, timeout=60).content)

    started = time.monotonic()
    threads = [threading.Thread(target=fetch, args=(offset,)) for offset in (0, size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    elapsed = time.monotonic() - started
    assert sorted(got) == sorted([data[:size], data[size : 2 * size]])
    # Two connections, each free to go as fast as it likes, share one link: together no faster than it.
    assert elapsed >= 2 * size / rate * 0.8


def test_control_endpoints(fault_server: RunningServer, faults: FaultPlan) -> None:
    plan = {"reset": True, "faults": [{"kind": "status", "status": 502, "path": "*README.md", "times": 1}]}
    assert requests.post(f"{fault_server.url}/_faults/plan", json=plan, timeout=10).status_code == 200
    assert requests.get(fault_server.url + README, timeout=10).status_code == 502
    assert requests.get(fault_server.url + README, timeout=10).status_code == 200
    stats = requests.get(f"{fault_server.url}/_faults/stats", timeout=10).json()
    assert stats["paths"][README]["statuses"] == {"502": 1, "200": 1}
    records = requests.get(f"{fault_server.url}/_faults/requests", timeout=10).json()
    assert [r["status"] for r in records] == [502, 200]
    bad = requests.post(f"{fault_server.url}/_faults/plan", json={"faults": [{"kind": "nope"}]}, timeout=10)
    assert bad.status_code == 400
    assert requests.post(f"{fault_server.url}/_faults/reset", timeout=10).status_code == 200
    assert faults.records == [] and faults.faults == []


def test_fault_validation() -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("explode")
    with pytest.raises(ValueError, match="rate"):
        Fault("bandwidth")
    assert Fault("corrupt").methods == ("GET",)
    assert Fault("status").methods == ("GET", "HEAD")


def test_faults_module_runs_as_a_process(hub_root: Path, tmp_path: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable, "-m", "hfmirror.server.faults", str(hub_root),
            "--port", "0", "--state-dir", str(tmp_path), "--rate-per-conn", "5000000", "--xet",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        port = None
        while port is None:
            line = process.stdout.readline()
            if not line:
                break
            match = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            port = int(match.group(1)) if match else None
        assert port, "the fault server did not report its port"
        r = requests.get(f"http://127.0.0.1:{port}{README}", timeout=10)
        assert r.status_code == 200 and "X-Xet-Hash" in r.headers
        assert (
            hashlib.sha256(r.content).digest()
            == hashlib.sha256((hub_root / "tiny/nested/README.md").read_bytes()).digest()
        )
        stats = requests.get(f"http://127.0.0.1:{port}/_faults/stats", timeout=10).json()
        assert stats["requests"] == 1 and {f["kind"] for f in stats["faults"]} == {"bandwidth", "xet"}
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
