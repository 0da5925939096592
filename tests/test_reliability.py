"""Reliability suite: the downloader and the server under kills, faults, fuzzing, contention and load.

1. ``kill -9`` at ten seeded-random points of one CLI download, then a final run: the file ends
   byte-identical, no final path ever holds wrong bytes, and the bytes served stay within what the
   checkpoints allow to be lost.
2. A fault matrix: every fault kind of :mod:`hfmirror.server.faults`, alone and combined, on files of
   0 bytes, 1 byte, a small json and several segments: always byte-identical within the retry budget.
3. Property-based fuzzing (hypothesis): (a) hostile URL paths never make the server answer 5xx or leak
   a canary file placed beside its root; (b) hostile listings and answers never make ``download()``
   raise anything but an :class:`~hfmirror.errors.HfMirrorError`, nor write outside its target.
4. Four CLI processes on one repo and cache: all succeed, one intact copy, the big file served once.
5. The server under load: 32 clients for ``LOAD_SECONDS`` fetching random ranges, HEADs and listings,
   every byte checked against the file on disk.

Everything runs on 127.0.0.1; the CLI runs in real subprocesses where process death matters.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hfmirror import constants
from hfmirror.download import download
from hfmirror.errors import HfMirrorError
from hfmirror.hashing import git_blob_sha1
from hfmirror.resume import ResumeState
from hfmirror.server.app import ServerThread, create_app
from hfmirror.server.repos import is_lfs_file
from tests.support import download_command, make_repo

WEIGHTS = "model.safetensors"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hub_etag(path: str, data: bytes) -> str:
    """The checksum the Hub names a file by: sha256 for LFS files, git blob sha1 for the others."""
    return sha256(data) if is_lfs_file(path, len(data)) else git_blob_sha1(data)


def repo_dir(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def start_cli(url: str, repo_id: str, cache: Path, *extra: str) -> subprocess.Popen:
    """``hfmirror download`` in a real process, as a user runs it."""
    return subprocess.Popen(
        download_command(url, repo_id, cache, "-q", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def commit_of(url: str, repo_id: str) -> str:
    response = requests.get(f"{url}/api/models/{repo_id}/revision/main", timeout=30)
    response.raise_for_status()
    return response.json()["sha"]


# ====================================================================== 1. kill -9 at random points

KILL_SIZE = 15 * 1024 * 1024 + 777
# One connection (--connections 1), so the file is one segment read in READ_BLOCK steps: the bound on
# lost bytes below is then per kill, not per kill and connection. (With more connections the slow-tail
# re-split would cut even this file in two.)
KILL_CONNECTIONS = "1"
KILL_RATE = 1_500_000  # bytes per second on that connection: the transfer alone takes about 10 s
KILLS = 10
KILL_SEED = 20240611
# The transfer coordinator sleeps at most this long between looks at the clock (transfer._Pass.run).
COORDINATOR_WAKE = 0.2


def saved_bytes(state: Path) -> int:
    """Bytes the resume state vouches for (0 if there is none, or it is being replaced)."""
    return ResumeState.saved_bytes(state)


def final_content(path: Path) -> bytes | None:
    """What a final path holds, or None if there is nothing there (yet)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_kill_9_at_ten_random_points_then_finish(fault_server, faults, tmp_path: Path) -> None:
    repo_id = "reliability/kill-nine"
    folder = make_repo(fault_server.root, repo_id, {WEIGHTS: KILL_SIZE, "config.json": b'{"kills": 10}\n'})
    good = (folder / WEIGHTS).read_bytes()
    oid = sha256(good)
    faults.limit_bandwidth(KILL_RATE, path=f"*/{WEIGHTS}")
    blobs = repo_dir(tmp_path, repo_id) / "blobs"
    blob, partial = blobs / oid, blobs / (oid + constants.PARTIAL_SUFFIX)
    state = partial.with_name(partial.name + constants.STATE_SUFFIX)
    snapshot_file = repo_dir(tmp_path, repo_id) / "snapshots" / commit_of(fault_server.url, repo_id) / WEIGHTS
    checks = 0

    def watch_final_paths() -> None:
        """Each final path is absent or exactly right, at every moment we look."""
        nonlocal checks
        for path in (blob, snapshot_file):
            content = final_content(path)
            assert content is None or content == good, f"{path} holds {len(content)} wrong bytes"
        checks += 1

    # The saved count moves in READ_BLOCK steps (one step per block read on the one connection), so the
    # random kill points are drawn as (1) a seeded-random set of distinct block counts to reach, and
    # (2) a seeded-random pause after reaching it, so the kill lands anywhere inside the next block.
    rng = random.Random(KILL_SEED)
    block_seconds = constants.READ_BLOCK / KILL_RATE
    # The saved count only moves at checkpoints, so leave two checkpoints' worth at the end: a target
    # closer to the end could be passed by the run's final save and the download would just finish.
    checkpoint_spacing = min(KILL_RATE * constants.CHECKPOINT_INTERVAL, constants.CHECKPOINT_BYTES)
    last_target = int((KILL_SIZE - 2 * checkpoint_spacing) // constants.READ_BLOCK) - 1
    targets = sorted(rng.sample(range(1, last_target), KILLS))
    kill_points = []
    for target in targets:
        at_start = saved_bytes(state)
        goal = max(target * constants.READ_BLOCK, at_start + 1)  # every run must get somewhere
        process = start_cli(fault_server.url, repo_id, tmp_path, "--connections", KILL_CONNECTIONS)
        deadline = time.monotonic() + 120
        while saved_bytes(state) < goal:
            watch_final_paths()
            assert process.poll() is None, f"download ended before the kill: {process.communicate()}"
            assert time.monotonic() < deadline, "download made no progress"
            time.sleep(0.02)
        pause = rng.uniform(0, 0.8 * block_seconds)
        until = time.monotonic() + pause
        while time.monotonic() < until:
            watch_final_paths()
            time.sleep(0.02)
        assert process.poll() is None, f"download finished before the kill at {goal}: {process.communicate()}"
        process.kill()  # SIGKILL: no cleanup code runs
        process.communicate()
        kill_points.append(saved_bytes(state))
        watch_final_paths()
        assert partial.exists() and final_content(blob) is None

    process = start_cli(fault_server.url, repo_id, tmp_path, "--connections", KILL_CONNECTIONS)
    while process.poll() is None:
        watch_final_paths()
        time.sleep(0.02)
    out, err = process.communicate()
    assert process.returncode == 0, err
    snapshot = Path(out.strip().splitlines()[-1])
    assert snapshot == snapshot_file.parent
    assert (snapshot / WEIGHTS).read_bytes() == good and blob.read_bytes() == good
    assert not partial.exists() and not state.exists()
    assert checks > 100, checks
    assert kill_points == sorted(kill_points) and kill_points[-1] < KILL_SIZE, kill_points

    # What one kill can cost, from the constants and the rate:
    # * the block being read when the process dies (at most READ_BLOCK), in memory, never written;
    # * what was written since the last checkpoint. A checkpoint is saved once CHECKPOINT_INTERVAL
    #   seconds (noticed within COORDINATOR_WAKE) or CHECKPOINT_BYTES have passed, and writes land a
    #   READ_BLOCK at a time, so that is at most min(RATE * (INTERVAL + WAKE), CHECKPOINT_BYTES) plus
    #   one READ_BLOCK.
    # Ten restarts from zero would cost the sum of the kill points (about 10 x half the file) instead.
    lost_per_kill = (
        constants.READ_BLOCK
        + min(KILL_RATE * (constants.CHECKPOINT_INTERVAL + COORDINATOR_WAKE), constants.CHECKPOINT_BYTES)
        + constants.READ_BLOCK
    )
    served = faults.bytes_sent(f"*/{WEIGHTS}")
    bound = KILL_SIZE + KILLS * lost_per_kill
    assert KILL_SIZE <= served <= bound, (
        f"served {served} bytes for a {KILL_SIZE}-byte file; bound {bound:.0f}"
    )
    # Every run after the first one resumed with a Range from what was saved.
    resumed = [
        r for r in faults.requests(f"*/{WEIGHTS}", "GET") if r.range and not r.range.startswith("bytes=0-")
    ]
    assert len(resumed) >= KILLS, [r.range for r in faults.requests(f"*/{WEIGHTS}", "GET")]


# ====================================================================== 2. the fault matrix

MATRIX_REPO = "reliability/matrix"
MATRIX_FILES: dict[str, bytes | int] = {
    "empty.txt": b"",
    "one.txt": b"x",
    "config.json": json.dumps({"model_type": "bert", "hidden_size": 32, "layers": [1, 2, 3]}).encode(),
    # With MIN_SEGMENT patched to 256 KiB, this is cut into 8 pieces fetched over 4 connections.
    "weights.safetensors": 2 * 1024 * 1024 + 333,
}


def _drop(plan, glob, size):
    return [plan.drop(after_bytes=min(size // 3, 100_000), path=glob, times=3)]


def _too_many(plan, glob, size):
    return [plan.too_many_requests(retry_after=1, path=glob, times=1)]


def _unavailable(plan, glob, size):
    return [plan.fail(503, path=glob, times=2)]


def _stall(plan, glob, size):
    return [plan.stall(3.0, after_bytes=min(size // 2, 100_000), path=glob, times=1)]


def _corrupt(plan, glob, size, skip=0):
    return [plan.corrupt(path=glob, times=1, skip=skip)]


def _ignore_range(plan, glob, size):
    return [plan.ignore_range(path=glob)]


def _xet(plan, glob, size):
    return [plan.xet_headers(path="*")]


def _bandwidth(plan, glob, size):
    return [plan.limit_bandwidth(4_000_000, path=glob)]


FAULT_KINDS = {
    "drop": [_drop],
    "429-retry-after": [_too_many],
    "503": [_unavailable],
    "stall": [_stall],
    "corrupt": [_corrupt],
    "ignore-range": [_ignore_range],
    "xet-headers": [_xet],
    "bandwidth": [_bandwidth],
    # Each rule counts every matching request, so the corruption skips the three the others answer.
    "drop+503+corrupt": [_drop, _unavailable, lambda plan, glob, size: _corrupt(plan, glob, size, skip=3)],
    "429+stall+ignore-range": [_too_many, _stall, _ignore_range],
    "bandwidth+drop+xet": [_bandwidth, _drop, _xet],
    "listing-503+drop": [_drop, lambda plan, glob, size: [plan.fail(503, path="/api/*", times=1)]],
}


@pytest.fixture(scope="module")
def matrix_repo(fault_server) -> Path:
    return make_repo(fault_server.root, MATRIX_REPO, MATRIX_FILES)


@pytest.mark.parametrize("name", list(MATRIX_FILES))
@pytest.mark.parametrize("kind", list(FAULT_KINDS))
def test_fault_matrix_ends_byte_identical(
    fault_server,
    faults,
    matrix_repo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    name: str,
) -> None:
    monkeypatch.setattr(constants, "MIN_SEGMENT", 256 * 1024)
    monkeypatch.setattr(constants, "MULTI_CONNECTION_THRESHOLD", 512 * 1024)
    monkeypatch.setattr(constants, "READ_BLOCK", 32 * 1024)
    monkeypatch.setattr(constants, "BACKOFF_BASE", 0.01)
    monkeypatch.setattr(constants, "BACKOFF_MAX", 0.05)
    good = (matrix_repo / name).read_bytes()
    glob = f"*/resolve/*/{name}"
    applied = [fault for add in FAULT_KINDS[kind] for fault in add(faults, glob, len(good))]

    started = time.monotonic()
    result = download(
        MATRIX_REPO,
        filenames=[name],
        endpoints=[fault_server.url],
        cache_dir=tmp_path,
        connections=4,
        # Short only where a stall is injected: elsewhere a busy machine's pause of half a second
        # would drop a healthy connection and re-send bytes that the xet case counts exactly.
        stall_timeout=0.5 if "stall" in kind else 10.0,
        progress=False,
    )
    elapsed = time.monotonic() - started

    assert (result.path / name).read_bytes() == good
    blobs = sorted(p.name for p in (repo_dir(tmp_path, MATRIX_REPO) / "blobs").iterdir())
    assert blobs == [hub_etag(name, good)], blobs  # no partial or state file left behind
    # A hang guard, not a speed check: the faults ask for at most 4 s of waiting in all.
    assert elapsed < 60, f"{kind} on {name} took {elapsed:.1f}s"
    if good:  # an empty file needs no request, so no fault can reach it
        assert all(fault.applied >= 1 for fault in applied), [(f.kind, f.seen, f.applied) for f in applied]
        if "corrupt" in kind:
            assert result.verify_failures >= 1
        if "429" in kind or "503" in kind:
            assert result.rate_limited >= 1 or kind.startswith("listing")
        if kind in ("drop", "stall"):
            assert result.retries >= 1
        if kind == "xet-headers":
            # The Xet headers were ignored: every byte came from the mirror, exactly once.
            assert faults.bytes_sent(glob) == len(good)


def test_a_server_ignoring_range_with_many_connections_still_works(
    fault_server, faults, matrix_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every connection of the first attempt gets a 200 for its Range; the file must restart as one stream.

    When one worker's 200 restarts the file, the other workers of that attempt are still running; they
    must not touch the next attempt (its error slot, its stop flag, its file).
    """
    monkeypatch.setattr(constants, "MIN_SEGMENT", 256 * 1024)
    monkeypatch.setattr(constants, "MULTI_CONNECTION_THRESHOLD", 512 * 1024)
    monkeypatch.setattr(constants, "READ_BLOCK", 32 * 1024)
    name = "weights.safetensors"
    good = (matrix_repo / name).read_bytes()
    faults.ignore_range(path=f"*/resolve/*/{name}")
    for run in range(5):
        result = download(
            MATRIX_REPO,
            filenames=[name],
            endpoints=[fault_server.url],
            cache_dir=tmp_path / f"run-{run}",
            connections=8,
            progress=False,
        )
        assert (result.path / name).read_bytes() == good


# ====================================================================== 3a. fuzzing the server's paths


class RawConnection(http.client.HTTPConnection):
    """http.client that sends the request target byte for byte: no validation, no normalisation."""

    def _validate_path(self, url: str) -> None:
        pass

    def _encode_request(self, request: str) -> bytes:
        return request.encode("utf-8", "surrogatepass")


def raw_request(
    url: str, method: str, target: str, headers: dict[str, str]
) -> tuple[int | None, bytes, bytes]:
    """(status, raw headers, body); status None if the server closed the connection without answering."""
    host, port = url.removeprefix("http://").split(":")
    conn = RawConnection(host, int(port), timeout=10)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        try:
            response = conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return None, b"", b""
        raw_headers = "\n".join(f"{k}: {v}" for k, v in response.getheaders()).encode("utf-8", "replace")
        return response.status, raw_headers, response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def canary_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A served ROOT with canary files beside it, and symlinks in it that point at them."""
    base = tmp_path_factory.mktemp("canary")
    marker = f"CANARY-{uuid.uuid4().hex}".encode()
    (base / "canary.txt").write_bytes(marker + b" beside the root\n")
    (base / "outside").mkdir()
    (base / "outside" / "canary.txt").write_bytes(marker + b" in a folder beside the root\n")
    root = base / "root"
    repo = make_repo(root, "org/m", {"ok.txt": b"fine\n", "weights.bin": 3000})
    make_repo(root, "datasets/org/d", {"data.csv": b"a,b\n1,2\n"})
    (repo / "link-out.txt").symlink_to(base / "canary.txt")
    (repo / "dir-out").symlink_to(base / "outside", target_is_directory=True)
    (root / "org" / "link-repo").symlink_to(base / "outside", target_is_directory=True)
    assert (repo / "link-out.txt").read_bytes().startswith(marker)  # the canary is really reachable on disk
    app = create_app(root, state_dir=base / "state")
    with ServerThread(app) as server:
        assert raw_request(server.url, "GET", "/org/m/resolve/main/ok.txt", {})[::2] == (200, b"fine\n")
        yield {"url": server.url, "marker": marker, "base": base, "root": root}
    app.state.checksums.close()


_PREFIXES = [
    "/org/m/resolve/main/",
    "/org/m/resolve/",
    "/datasets/org/d/resolve/main/",
    "/api/models/org/m/tree/main/",
    "/api/models/org/m/revision/",
    "/api/models/org/",
    "/api/datasets/",
    "/api/models/",
    "/org/",
    "/",
    "//",
    "",
]
_TRICKY_SEGMENTS = [
    "..",
    ".",
    "",
    "...",
    "%2e%2e",
    "%2E%2E",
    "%2e",
    ".%2e",
    "%2e.",
    "%252e%252e",
    "%c0%ae%c0%ae",
    "..;",
    "..%2f..%2f..%2fcanary.txt",
    "..%2F..%2Fcanary.txt",
    "..\\..\\canary.txt",
    "..%5c..%5ccanary.txt",
    "%2fetc%2fpasswd",
    "canary.txt",
    "outside",
    "link-out.txt",
    "dir-out",
    "link-repo",
    "root",
    "org",
    "m",
    "main",
    "resolve",
    "api",
    "models",
    "datasets",
    "tree",
    "revision",
    "ok.txt",
    "weights.bin",
    "%00",
    "ok.txt%00.png",
    "\x00",
    "%ff%fe",
    "%",
    "%%",
    "%zz",
    "C:",
    "C:%5c",
    "~",
    "é",
    "日本",
    "\ud800",
    "?recursive=true",
    "#frag",
    ";",
    "a" * 300,
    "b" * 5000,
]
_JOINERS = ["/", "/", "/", "//", "%2f", "%2F", "\\", "%5c", "%5C"]


@st.composite
def hostile_targets(draw, canary_paths: list[str]) -> str:
    prefix = draw(st.sampled_from(_PREFIXES))
    segment = st.one_of(
        st.sampled_from(_TRICKY_SEGMENTS),
        st.sampled_from(canary_paths),
        st.text(max_size=20),
        st.text(max_size=20).map(lambda s: quote(s, safe="")),
    )
    parts = draw(st.lists(segment, max_size=8))
    target = prefix
    for part in parts:
        target += part + draw(st.sampled_from(_JOINERS))
    if draw(st.booleans()):
        target = target.rstrip("/\\")
    return target or "/"


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_paths_never_5xx_and_never_leak_the_canary(canary_server: dict[str, Any], data) -> None:
    base: Path = canary_server["base"]
    canary_paths = [
        str(base / "canary.txt"),
        str(base / "outside" / "canary.txt"),
        quote(str(base / "canary.txt"), safe=""),
        "../" * 12 + str(base / "canary.txt").lstrip("/"),
        "%2e%2e%2f" * 12 + quote(str(base / "canary.txt").lstrip("/"), safe=""),
    ]
    target = data.draw(hostile_targets(canary_paths), label="target")
    method = data.draw(st.sampled_from(["GET", "HEAD"]), label="method")
    headers = data.draw(
        st.sampled_from([{}, {"Range": "bytes=0-"}, {"Range": "bytes=-100"}]), label="headers"
    )
    status, raw_headers, body = raw_request(canary_server["url"], method, target, headers)
    marker = canary_server["marker"]
    assert marker not in body and marker not in raw_headers, (target, status)
    # uvicorn may close the connection on a request line it cannot parse at all; the app never answers 5xx.
    assert status is None or 200 <= status < 500, (target, status, body[:300])
    if status is None:
        assert any(ch in target for ch in " \x00#\ud800") or any(
            ord(ch) < 0x20 or ord(ch) > 0x7E for ch in target
        ), target


# ====================================================================== 3b. fuzzing the downloader's listings

_HEX = "0123456789abcdef"
_EVIL_NAMES = [
    "../escaped.txt",
    "../../escaped.txt",
    "a/../../escaped.txt",
    "a/b/../../../escaped.txt",
    "./escaped.txt",
    "a/./b.txt",
    "a//b.txt",
    "a/",
    "/",
    ".",
    "..",
    "",
    "\\escaped.txt",
    "..\\escaped.txt",
    "a\\..\\..\\escaped.txt",
    "C:\\escaped.txt",
    "C:/escaped.txt",
    "c:escaped.txt",
    "x\x00y.txt",
    "x\ny.txt",
    ".cache/huggingface/download/x.metadata",
    ".cache/x",
    "%2e%2e/escaped.txt",
    "~/escaped.txt",
    "a" * 300,
    "a" * 5000,
    "d/" * 2100 + "x",
    "é/日本.txt",
    "config.json",
    "a",
    "a/b",
    "a/b/c.bin",
]


def _content_for(index: int, size: int) -> bytes:
    """Deterministic bytes for a sibling (cheap: no hypothesis draw per byte)."""
    return random.Random(index).randbytes(size)


@st.composite
def hostile_listing(draw, absolute_name: str) -> dict[str, Any]:
    """A listing (JSON body) and, per file name, what its resolve URL answers."""
    json_scalar = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=10),
    )
    names = st.one_of(
        st.sampled_from(_EVIL_NAMES + [absolute_name, absolute_name.replace("/", "\\")]),
        st.from_regex(r"[a-z]{1,8}(/[a-z]{1,8}){0,2}\.(txt|json|bin|safetensors)", fullmatch=True),
        st.text(max_size=30),
        json_scalar,
    )
    sizes = st.one_of(
        st.integers(0, 3000),
        st.integers(0, 3000),
        st.integers(-(2**40), -1),
        st.integers(2**40, 2**80),
        json_scalar,
        st.just([1]),
        st.just({"size": 1}),
    )
    hex40 = st.text(_HEX, min_size=40, max_size=40)
    hex64 = st.text(_HEX, min_size=64, max_size=64)
    checksums = st.one_of(st.just("VALID"), st.just("VALID"), hex40, hex64, hex40.map(str.upper), json_scalar)
    # Half the examples are plausible listings (safe unique names, real sizes and checksums), so that the
    # downloads get as far as the hostile file answers; the other half are hostile from the first byte.
    plausible = draw(st.booleans(), label="plausible")
    if plausible:
        safe_names = st.from_regex(
            r"[a-z]{1,8}(/[a-z]{1,8}){0,2}\.(txt|json|bin|safetensors)", fullmatch=True
        )
        chosen = draw(st.lists(safe_names, max_size=4, unique=True), label="names")
        sizes = st.integers(0, 3000)
        checksums = st.sampled_from(["VALID"] * 9 + ["0" * 40])
    siblings = []
    responses: dict[str, Any] = {}
    count = len(chosen) if plausible else draw(st.integers(0, 4))
    for index in range(count):
        name = chosen[index] if plausible else draw(names, label="name")
        size = draw(sizes, label="size")
        declared = size if isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= 3000 else 7
        content = _content_for(index, declared)
        sibling: dict[str, Any] = {}
        if plausible or draw(st.integers(0, 19), label="rfilename present?"):
            sibling["rfilename"] = name
        if plausible or draw(st.booleans(), label="size present?"):
            sibling["size"] = size
        blob_id = draw(checksums, label="blobId")
        sibling["blobId"] = git_blob_sha1(content) if blob_id == "VALID" else blob_id
        lfs_kinds = (
            ["none", "valid"]
            if plausible
            else ["none", "none", "valid", "garbage", "missing-keys", "not-a-dict"]
        )
        lfs_kind = draw(st.sampled_from(lfs_kinds), label="lfs")
        if lfs_kind == "valid":
            sha = draw(checksums, label="lfs sha256")
            sibling["lfs"] = {
                "sha256": sha256(content) if sha == "VALID" else sha,
                "size": size,
                "pointerSize": 134,
            }
        elif lfs_kind == "garbage":
            sibling["lfs"] = {
                "sha256": draw(json_scalar),
                "size": draw(sizes),
                "pointerSize": draw(json_scalar),
            }
        elif lfs_kind == "missing-keys":
            sibling["lfs"] = {"sha256": sha256(content)}
        elif lfs_kind == "not-a-dict":
            sibling["lfs"] = draw(st.one_of(st.text(min_size=1, max_size=5), st.integers(1, 5), st.just([1])))
        siblings.append(sibling)
        answer = draw(
            st.sampled_from(["exact", "exact", "garbage", "short", "long", "status", "headers", "redirect"])
        )
        status = draw(st.sampled_from([206, 301, 302, 400, 401, 403, 404, 416, 429, 500, 503]))
        if isinstance(name, str):
            responses[name] = {"answer": answer, "content": content, "status": status}
    commit = "1" * 40 if plausible else draw(st.one_of(st.just("1" * 40), hex40, json_scalar), label="sha")
    body: Any = {"id": "evil/repo", "sha": commit, "private": False, "siblings": siblings}
    shape = (
        "normal"
        if plausible
        else draw(st.sampled_from(["normal"] * 5 + ["no-siblings", "siblings-not-a-list", "not-an-object"]))
    )
    if shape == "no-siblings":
        del body["siblings"]
    elif shape == "siblings-not-a-list":
        body["siblings"] = draw(json_scalar)
    elif shape == "not-an-object":
        body = siblings
    return {"body": body, "responses": responses}


class HostileHub:
    """A tiny Starlette app whose listing and file answers are whatever the current example says."""

    def __init__(self) -> None:
        self.example: dict[str, Any] = {"body": {}, "responses": {}}
        self.app = Starlette(
            routes=[
                Route("/api/models/evil/repo/revision/{revision:path}", self.info),
                Route("/{rest:path}", self.resolve, methods=["GET", "HEAD"]),
            ]
        )

    async def info(self, request: Request) -> Response:
        return JSONResponse(self.example["body"])

    async def resolve(self, request: Request) -> Response:
        raw = request.scope["raw_path"].decode("latin-1")
        _, found, tail = raw.partition("/evil/repo/resolve/")
        name = unquote(tail.partition("/")[2]) if found else ""
        spec = self.example["responses"].get(name)
        if spec is None:
            return JSONResponse(
                {"error": "not found"}, status_code=404, headers={"X-Error-Code": "EntryNotFound"}
            )
        content: bytes = spec["content"]
        answer = spec["answer"]
        if answer == "garbage":
            return Response(bytes(b ^ 0x5A for b in content) or b"?")
        if answer == "short":
            return Response(content[: len(content) // 2])
        if answer == "long":
            return Response(content + b"trailing garbage")
        if answer == "status":
            return Response(
                b"{}", status_code=spec["status"], headers={"Retry-After": "99999", "Location": "/../../x"}
            )
        if answer == "headers":
            headers = {
                "ETag": '"' + "f" * 64 + '"',
                "X-Linked-Etag": "nonsense",
                "Content-Range": "bytes 5-2/1",
                "X-Xet-Hash": "0" * 64,
                "Link": '<http://127.0.0.1:1/x>; rel="xet-auth"',
            }
            return Response(content, status_code=206 if spec["status"] == 206 else 200, headers=headers)
        if answer == "redirect":
            return Response(b"", status_code=302, headers={"Location": "http://127.0.0.1:1/nowhere"})
        return Response(content)


@pytest.fixture(scope="module")
def hostile_hub() -> Iterator[tuple[HostileHub, str]]:
    hub = HostileHub()
    with ServerThread(hub.app) as server:
        yield hub, server.url


@pytest.fixture(scope="module")
def listing_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("listing-fuzz")


def _outside_listing(base: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``base`` except inside the download targets: path -> (size, mtime), folders (-1, 0)."""
    seen = {}
    for folder, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if d != "target"]
        for name in dirs + files:
            path = Path(folder, name)
            info = path.lstat()
            # A folder's own mtime changes when the target is created in it; its entries are what count.
            seen[str(path.relative_to(base))] = (-1, 0) if name in dirs else (info.st_size, info.st_mtime_ns)
    return seen


_example_counter = iter(range(10**9))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@pytest.mark.slow
@given(data=st.data())
def test_hostile_listings_raise_only_our_errors_and_write_only_inside_the_target(
    hostile_hub: tuple[HostileHub, str], listing_sandbox: Path, data
) -> None:
    hub, url = hostile_hub
    absolute_name = str(listing_sandbox / "absolute-escape.txt")
    example = data.draw(hostile_listing(absolute_name), label="example")
    hub.example = example
    parent = listing_sandbox / f"example-{next(_example_counter)}"
    parent.mkdir()
    (parent / "sentinel.txt").write_bytes(b"must stay as it is\n")
    target = parent / "target"
    before = _outside_listing(listing_sandbox)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "MAX_RETRIES", 2)
        patch.setattr(constants, "BACKOFF_BASE", 0.001)
        patch.setattr(constants, "BACKOFF_MAX", 0.01)
        patch.setattr(constants, "MAX_RETRY_AFTER", 0.05)
        patch.setattr(constants, "FAILOVER_AFTER", 1)
        outcome: Any
        try:
            outcome = download(
                "evil/repo", endpoints=[url], local_dir=target, stall_timeout=2.0, progress=False
            )
        except HfMirrorError as error:
            outcome = error
        # Anything else (KeyError, TypeError, AttributeError...) propagates and fails the example.
    event(f"{type(outcome).__name__} with {len(getattr(outcome, 'files', []))} files")
    assert _outside_listing(listing_sandbox) == before, f"written outside the target (outcome: {outcome!r})"
    assert not os.path.lexists(absolute_name)
    if not isinstance(outcome, HfMirrorError):
        # A success means every listed file is in place with the content the listing vouched for.
        for file in outcome.files:
            assert (target / file.path).stat().st_size == file.size
            assert Path(target / file.path).resolve().is_relative_to(target.resolve())


# ====================================================================== 4. four processes, one cache

CONCURRENT_SIZE = 6 * 1024 * 1024 + 4321
CONCURRENT_RATE = 2_000_000  # the big file takes about 3 s, so the four processes overlap


@pytest.mark.slow
def test_four_processes_on_one_repo_and_cache_leave_one_intact_copy(
    fault_server, faults, tmp_path: Path
) -> None:
    repo_id = "reliability/four-processes"
    files: dict[str, bytes | int] = {
        WEIGHTS: CONCURRENT_SIZE,
        "config.json": b'{"processes": 4}\n',
        "vocab/tokens.txt": 5000,
    }
    folder = make_repo(fault_server.root, repo_id, files)
    faults.limit_bandwidth(CONCURRENT_RATE, path=f"*/{WEIGHTS}")
    processes = [start_cli(fault_server.url, repo_id, tmp_path) for _ in range(4)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, outputs
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1, paths
    snapshot = Path(paths.pop())

    expected = {name: (folder / name).read_bytes() for name in files}
    for name, content in expected.items():
        assert (snapshot / name).read_bytes() == content, name
        assert (snapshot / name).is_symlink()
    blobs = sorted(p.name for p in (repo_dir(tmp_path, repo_id) / "blobs").iterdir())
    assert blobs == sorted(hub_etag(name, content) for name, content in expected.items()), blobs
    leftovers = [
        p
        for p in repo_dir(tmp_path, repo_id).rglob("*")
        if p.name.endswith((".tmp", constants.PARTIAL_SUFFIX))
    ]
    assert not leftovers, leftovers

    # The four listings all arrived while the (only) transfer of the big file was still running: they overlapped.
    gets = faults.requests(f"*/{WEIGHTS}", "GET")
    listings = faults.requests("/api/*", "GET")
    assert len(listings) >= 4 and gets
    assert max(r.started for r in listings) < max(r.started + r.duration for r in gets)
    # Bound: exactly one copy. The per-blob file lock lets one process fetch it while the other three
    # wait, then find it complete; a second fetch would add CONCURRENT_SIZE, a duplicate range a READ_BLOCK.
    served = faults.bytes_sent(f"*/{WEIGHTS}")
    assert served == CONCURRENT_SIZE, f"served {served} bytes for one {CONCURRENT_SIZE}-byte file"


# ====================================================================== 5. the server under load

LOAD_SECONDS = 60
LOAD_CLIENTS = 32
LOAD_FILES = [
    ("tiny/nested", "data/big.bin"),
    ("tiny/nested", "config.json"),
    ("tiny/nested", "a/b/c.txt"),
    ("tiny/bert", "model.safetensors"),
    ("tiny/bert", "config.json"),
]


@pytest.mark.slow
def test_server_under_load_serves_every_range_exactly(hub_server) -> None:
    contents = {(repo, name): (hub_server.root / repo / name).read_bytes() for repo, name in LOAD_FILES}
    commits = {repo: commit_of(hub_server.url, repo) for repo, _ in LOAD_FILES}
    deadline = time.monotonic() + LOAD_SECONDS
    lock = threading.Lock()
    counts = {"requests": 0, "range": 0, "full": 0, "head": 0, "api": 0}
    problems: list[str] = []

    def check_one(session: requests.Session, rng: random.Random) -> str:
        repo, name = rng.choice(LOAD_FILES)
        data = contents[(repo, name)]
        url = f"{hub_server.url}/{repo}/resolve/main/{name}"
        op = rng.choices(["range", "full", "head", "api"], weights=[70, 10, 10, 10])[0]
        if op == "api":
            response = session.get(f"{hub_server.url}/api/models/{repo}/revision/main?blobs=true", timeout=60)
            info = response.json()
            sizes = {s["rfilename"]: s["size"] for s in info["siblings"]}
            if response.status_code != 200 or info["sha"] != commits[repo] or sizes.get(name) != len(data):
                raise AssertionError(
                    f"listing of {repo}: {response.status_code} {info.get('sha')} {sizes.get(name)}"
                )
        elif op == "head":
            response = session.head(url, timeout=60)
            got = (response.status_code, response.headers.get("X-Linked-Size"), response.headers.get("ETag"))
            if got != (200, str(len(data)), f'"{hub_etag(name, data)}"') or response.content:
                raise AssertionError(f"HEAD {name}: {got}")
        elif op == "full":
            response = session.get(url, timeout=60)
            if response.status_code != 200 or response.content != data:
                raise AssertionError(f"GET {name}: {response.status_code}, {len(response.content)} bytes")
        else:
            size = len(data)
            form = rng.random()
            if form < 0.1:  # suffix: the last n bytes
                n = rng.randint(1, size)
                header, start, end = f"bytes=-{n}", size - n, size - 1
            elif form < 0.2:  # open-ended
                start = rng.randrange(size)
                header, end = f"bytes={start}-", size - 1
            else:
                start = rng.randrange(size)
                end = min(size - 1, start + rng.randint(0, 256 * 1024))
                header = f"bytes={start}-{end}"
            response = session.get(url, headers={"Range": header}, timeout=60)
            expected_range = f"bytes {start}-{end}/{size}"
            if (response.status_code, response.headers.get("Content-Range")) != (206, expected_range):
                raise AssertionError(
                    f"{header} of {name}: {response.status_code} {response.headers.get('Content-Range')}"
                )
            if response.content != data[start : end + 1]:
                raise AssertionError(f"{header} of {name}: wrong bytes")
        return op

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as session:
            while time.monotonic() < deadline:
                try:
                    op = check_one(session, rng)
                except Exception as error:  # every failure is counted and reported, none stops the run
                    with lock:
                        problems.append(f"{type(error).__name__}: {error}")
                    continue
                with lock:
                    counts["requests"] += 1
                    counts[op] += 1

    threads = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(LOAD_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LOAD_SECONDS + 120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    summary = f"{counts['requests']} requests by {LOAD_CLIENTS} clients in {LOAD_SECONDS}s: {counts}"
    print(summary)
    assert not problems, f"{len(problems)} errors/mismatches ({summary}); first: {problems[:5]}"
    assert counts["requests"] >= LOAD_CLIENTS * 10, summary
    assert min(counts[op] for op in ("range", "full", "head", "api")) > 0, summary
