"""Stalled connections and floods: the connection guard, the bounded log, and `hfmirror serve` itself.

All on real sockets. Waits are bounded; nothing asserts how long something took.
"""

from __future__ import annotations

import io
import logging
import re
import resource
import select
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from hfmirror.server.app import ServerThread, create_app
from hfmirror.server.logs import (
    LOG_BURST_BYTES,
    LOG_BYTES_PER_SECOND,
    MAX_RECORD_CHARS,
    BoundedLogHandler,
    printable,
)
from tests.servers import Process, start_process
from tests.support import make_repo, run_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
HALF_REQUEST = b"GET /org/m/resolve/main/a.txt HTTP/1.1\r\nHost: x\r\n"  # no blank line: never complete


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def closed_by_server(sock: socket.socket, within: float = 20.0) -> bool:
    """True if the server closes ``sock`` (EOF or reset) within ``within`` seconds, reading what it sends."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            break
        try:
            if not sock.recv(65536):
                return True
        except ConnectionError:
            return True
    return False


def still_open(sock: socket.socket) -> bool:
    """True if the server has neither closed nor answered ``sock`` (nothing to read right now)."""
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


@pytest.fixture
def small_root(tmp_path: Path) -> Path:
    make_repo(tmp_path / "root", "org/m", {"a.txt": b"hello\n", "big.bin": 64 * 1024 * 1024})
    return tmp_path / "root"


@pytest.fixture
def guarded(small_root: Path, tmp_path: Path) -> Iterator[Any]:
    """Start the app with a chosen cap and header deadline: ``server = guarded(max_connections=4)``."""
    started = []

    def start(**kwargs: Any) -> ServerThread:
        app = create_app(small_root, state_dir=tmp_path / "state")
        server = ServerThread(app, **kwargs).start()
        started.append((server, app))
        return server

    yield start
    for server, app in started:
        server.stop()
        app.state.checksums.close()


# ------------------------------------------------------------------------------ the guard


def test_a_connection_that_never_completes_its_headers_is_closed(guarded: Any) -> None:
    server = guarded(header_timeout=0.5)
    with connect(server.port) as sock:
        sock.sendall(HALF_REQUEST)
        assert closed_by_server(sock)
    assert server.guard.counters.header_timeouts == 1


def test_trickling_header_bytes_does_not_extend_the_deadline(guarded: Any) -> None:
    server = guarded(header_timeout=0.5)
    header = HALF_REQUEST + b"X-Pad: " + b"a" * 400  # at one byte per 50 ms: 20 s, forty deadlines
    with connect(server.port) as sock:
        closed = False
        for byte in header:
            try:
                sock.sendall(bytes([byte]))
            except ConnectionError:
                closed = True
                break
            if closed_by_server(sock, within=0.05):
                closed = True
                break
        assert closed, "the server kept a connection that trickled its headers"


def test_over_the_cap_the_longest_stalled_connection_makes_room(guarded: Any) -> None:
    server = guarded(max_connections=4, header_timeout=60)
    stalled = [connect(server.port) for _ in range(4)]
    try:
        for sock in stalled:
            sock.sendall(HALF_REQUEST)
        assert closed_by_server(stalled[0], within=0.2) is False  # under the cap: nobody is closed
        r = requests.get(f"{server.url}/org/m/resolve/main/a.txt", timeout=20)
        assert (r.status_code, r.content) == (200, b"hello\n")
        assert closed_by_server(stalled[0])  # the oldest stalled one went
        assert all(still_open(sock) for sock in stalled[2:])  # the newer ones are still waiting
        assert server.guard.counters.shed >= 1 and server.guard.counters.refused == 0
    finally:
        for sock in stalled:
            sock.close()


def test_connections_being_answered_are_never_shed(guarded: Any) -> None:
    server = guarded(max_connections=2, header_timeout=60)
    request = b"GET /org/m/resolve/main/big.bin HTTP/1.1\r\nHost: x\r\n\r\n"
    busy = [connect(server.port) for _ in range(2)]
    try:
        for sock in busy:
            sock.sendall(request)
            sock.recv(1)  # the answer has started; 64 MiB cannot fit in the socket buffers
        with connect(server.port) as newcomer:
            assert closed_by_server(newcomer)  # no room, and nobody to shed
        for sock in busy:  # both downloads still complete
            received = b""
            sock.settimeout(30)
            while b"\r\n\r\n" not in received:
                received += sock.recv(65536)
            head, _, body_start = received.partition(b"\r\n\r\n")
            length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
            left = length - len(body_start)
            while left > 0:
                chunk = sock.recv(min(left, 1 << 20))
                assert chunk, "a busy connection was cut"
                left -= len(chunk)
        assert server.guard.counters.refused == 1 and server.guard.counters.shed == 0
    finally:
        for sock in busy:
            sock.close()


def test_keep_alive_and_pipelined_requests_still_work(guarded: Any) -> None:
    server = guarded(header_timeout=2)
    with connect(server.port) as sock:
        sock.sendall(
            b"GET /org/m/resolve/main/a.txt HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /org/m/resolve/main/a.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        received = b""
        sock.settimeout(20)
        while chunk := sock.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 200 OK") == 2 and received.count(b"hello\n") == 2
    session = requests.Session()
    for _ in range(3):  # one connection, re-armed after each response
        assert session.get(f"{server.url}/org/m/resolve/main/a.txt", timeout=10).content == b"hello\n"


# ------------------------------------------------------------------------------ the log


def test_the_log_handler_spends_a_byte_budget_and_reports_what_it_dropped() -> None:
    now = [0.0]
    stream = io.StringIO()
    handler = BoundedLogHandler(stream, rate=1000, burst=5000, clock=lambda: now[0])
    log = logging.getLogger("tests.bounded")
    log.handlers, log.propagate, log.level = [handler], False, logging.INFO
    for i in range(1000):
        log.info("request %04d %s", i, "x" * 86)  # 100 characters each
    written = stream.getvalue().splitlines()
    assert len(written) == 47 and written[-1].startswith("INFO: request 0046")  # 106 bytes a line
    now[0] = 10.0  # the budget refills
    log.info("after the flood")
    log.info("evil\r\nINFO: forged line")
    log.info("y" * 20_000)
    lines = stream.getvalue().splitlines()[47:]
    assert lines[0] == "hfmirror: log rate limit: 953 log records dropped"
    assert lines[1] == "INFO: after the flood"
    assert lines[2] == "INFO: evil\\x0d\\x0aINFO: forged line"  # one line, not two
    assert len(lines) == 4 and len(lines[3]) == MAX_RECORD_CHARS
    assert printable("a\nb\x1b[31m", 100) == "a\\x0ab\\x1b[31m"


@pytest.mark.slow
def test_serve_logs_one_bounded_line_per_request_and_cannot_be_flooded(tmp_path: Path) -> None:
    make_repo(tmp_path / "root", "org/m", {"a.txt": b"hello\n"})
    started = time.monotonic()
    dropped = re.compile(r"^hfmirror: log rate limit: \d+ log records dropped$", re.MULTILINE)
    with serve_command(tmp_path / "root", tmp_path) as serve:
        session = requests.Session()
        assert session.get(f"{serve.url}/org/m/resolve/main/a.txt", timeout=10).status_code == 200
        long_path = "/org/m/resolve/main/" + "x" * 4000
        # Each access line is cut to ~360 bytes, so only the byte budget stops a long enough flood:
        # past the burst, at more than ~100 requests a second, records are dropped and reported.
        for sent in range(1, 20_001):
            assert session.get(serve.url + long_path, timeout=10).status_code in (400, 404)
            if sent % 500 == 0 and dropped.search(serve.log()):
                break
    lifetime = time.monotonic() - started
    log = serve.log()
    assert dropped.search(log), f"no drop report after {sent} requests"
    assert re.search(r'"GET /org/m/resolve/main/a\.txt" 200 6 ', log)
    assert len(log) <= LOG_BURST_BYTES + LOG_BYTES_PER_SECOND * lifetime + 8192
    assert max(len(line) for line in log.splitlines()) <= MAX_RECORD_CHARS


# ------------------------------------------------------------------------------ the command


def serve_command(
    root: Path, workdir: Path, *, ulimit: str | None = None, extra: tuple[str, ...] = ()
) -> Process:
    """``hfmirror serve ROOT --port 0`` in a subprocess (optionally under a shell ``ulimit``), started."""
    argv = [sys.executable, "-m", "hfmirror", "serve", str(root), "--port", "0"]
    argv += ["--state-dir", str(workdir / "serve-state"), *extra]
    if ulimit is not None:
        argv = ["bash", "-c", f'ulimit {ulimit} && exec "$@"', "bash", *argv]
    log_path = workdir / f"serve-{time.monotonic_ns()}.log"
    return start_process(argv, log_path, r"serving on (http://127\.0\.0\.1:\d+)")


def open_file_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


@pytest.fixture
def many_sockets() -> Iterator[int]:
    """Let this test process open a few thousand sockets (its soft limit raised, then restored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 4096) if hard != resource.RLIM_INFINITY else 4096
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield max(soft, wanted)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
def test_slowloris_under_ulimit_1024_does_not_stop_other_clients(tmp_path: Path, many_sockets: int) -> None:
    # The numbers: 1,100 connections that send half a request, against `ulimit -n 1024` (soft
    # and hard: raising the limit cannot help here), while 3 ordinary clients ask for a file.
    server_limit = min(1024, many_sockets - 300)
    attackers = server_limit + 76
    make_repo(tmp_path / "root", "org/m", {"a.txt": b"hello\n"})
    with serve_command(tmp_path / "root", tmp_path, ulimit=f"-n {server_limit}") as serve:
        assert open_file_limits(serve.process.pid) == (server_limit, server_limit)
        stalled = []
        try:
            for _ in range(attackers):
                try:
                    sock = connect(serve.port, timeout=10)
                    sock.sendall(HALF_REQUEST)
                    stalled.append(sock)
                except OSError:
                    break  # the server closed one we were still setting up: fine, it is defending
            assert len(stalled) >= server_limit, "could not even open the attack's connections"
            for _ in range(3):
                r = requests.get(f"{serve.url}/org/m/resolve/main/a.txt", timeout=(10, 30))
                assert (r.status_code, r.content) == (200, b"hello\n")
        finally:
            for sock in stalled:
                sock.close()
    log = serve.log()
    # The connection cap keeps the server clear of its open-file limit, where asyncio's accept loop
    # would log an error per backlog slot, thousands a second.
    assert len(log) < 64 * 1024, log[-2000:]
    assert "Traceback" not in log


def test_serve_announces_its_repos_and_raises_the_open_file_limit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_repo(root, "org/model-a", {"config.json": b"{}"})
    make_repo(root, "solo", {"config.json": b"{}", "onnx/model.onnx": 10})
    make_repo(root, "org/data", {"train.csv": b"a\n"}, repo_type="dataset")
    snapshot = root / "models--cached--b" / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_bytes(b"{}")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with serve_command(root, tmp_path, ulimit="-S -n 1024") as serve:
        soft_now, hard_now = open_file_limits(serve.process.pid)
        requests.get(f"{serve.url}/api/models/solo", timeout=10).raise_for_status()
    assert soft_now == hard_now == hard
    out = serve.log()
    assert "4 repos under" in out
    for kind, name in (
        ("model", "org/model-a"),
        ("model", "solo"),
        ("dataset", "org/data"),
        ("model", "cached/b"),
    ):
        assert re.search(rf"^  {kind} +{re.escape(name)}  \(", out, re.MULTILINE), out
    assert "onnx" not in out  # a folder of a no-org repo is not a repo
    assert serve.process.returncode == 0 and "Traceback" not in out


def test_serve_warns_when_it_finds_no_repos(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with serve_command(tmp_path / "empty", tmp_path) as serve:
        pass
    assert "no repos found under" in serve.log() and "ROOT/org/name" in serve.log()


def test_serve_refuses_a_port_in_use_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_cli("serve", str(tmp_path / "root"), "--port", str(port), cwd=REPO_ROOT)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"hfmirror: error: port {port} on 127.0.0.1 is already in use (another server is listening "
        "there); choose another with --port"
    ]
