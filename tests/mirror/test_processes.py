"""The team mirror as real processes: killed mid-fill, restarted, several on one cache; real clients."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.mirror.conftest import BIG, Mirror, Upstream
from tests.mirror.support import (
    MIB,
    REPO_ROOT,
    files_under,
    free_port,
    partial_fraction,
    python_env,
    start_mirror_process,
    start_upstream_process,
    wait_until,
)
from tests.support import run_cli

WEIGHTS = "/big/one/resolve/main/weights.bin"


def read_all(url: str, into: dict[str, bytes | BaseException]) -> None:
    """GET ``url`` to the end into ``into["body"]`` (or the error into ``into["error"]``)."""
    try:
        with requests.get(url, stream=True, timeout=(10, 120)) as response:
            response.raise_for_status()
            into["body"] = response.raw.read()
    except Exception as error:  # reported by the test
        into["error"] = error


@pytest.mark.slow
def test_the_upstream_killed_mid_fill_and_restarted(
    upstream_root: Path, mirror: Callable[..., Mirror], tmp_path: Path
) -> None:
    port = free_port()
    up = start_upstream_process(upstream_root, tmp_path, "--rate-per-conn", str(MIB), port=port)
    try:
        m = mirror(up.url, connections=4)  # 4 MiB/s: ~6 s for the file
        got: dict[str, bytes | BaseException] = {}
        client = threading.Thread(target=read_all, args=(m.url + WEIGHTS, got))
        client.start()
        wait_until(lambda: partial_fraction(m.root, "models--big--one", BIG) > 0.4)
        up.kill()  # mid-fill, no goodbye
        up = start_upstream_process(upstream_root, tmp_path, "--rate-per-conn", str(4 * MIB), port=port)
        client.join(180)
        assert not client.is_alive() and "error" not in got, got.get("error")
        assert got["body"] == (upstream_root / "big/one/weights.bin").read_bytes()
        # The fill resumed where it was (starting over would have cost at least 1.4 times the file).
        assert m.counter("upstream_bytes") <= BIG + 2 * MIB, m.counter("upstream_bytes") / MIB
    finally:
        up.kill()


@pytest.mark.slow
def test_the_mirror_killed_mid_fill_resumes_after_a_restart(upstream: Upstream, tmp_path: Path) -> None:
    # 8 connections at 512 KiB/s: ~6 s for the file, so the kill at half-way lands well before the end.
    upstream.plan.limit_bandwidth(MIB // 2, path="*/weights.bin")
    cache = tmp_path / "cache"
    first = start_mirror_process(cache, upstream.url, tmp_path)
    got: dict[str, bytes | BaseException] = {}
    client = threading.Thread(target=read_all, args=(first.url + WEIGHTS, got))
    client.start()
    wait_until(lambda: partial_fraction(cache, "models--big--one", BIG) > 0.5)
    first.kill()
    client.join(60)
    assert "error" in got or len(got.get("body", b"")) < BIG  # that client was cut off, as it must be
    sent_before = upstream.sent("*/weights.bin")
    second = start_mirror_process(cache, upstream.url, tmp_path)
    try:
        result = _download(second.url, tmp_path / "client")
        assert result == (upstream.root / "big/one/weights.bin").read_bytes()
    finally:
        second.stop()
    # What the first mirror had saved is kept: in all, the file and a few MiB (what arrived after the
    # last checkpoint, and what was in flight); starting over would have cost at least 1.5 times it.
    total = upstream.sent("*/weights.bin")
    assert sent_before >= BIG / 2 and total <= BIG + 6 * MIB, (sent_before / MIB, total / MIB)


def _download(url: str, cache: Path) -> bytes:
    """`hfmirror download big/one` through ``url`` (the command users run); the weights' bytes."""
    result = run_cli("download", "big/one", "--endpoint", url, "--cache-dir", str(cache), "-q", cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return (Path(result.stdout.strip().splitlines()[-1]) / "weights.bin").read_bytes()


@pytest.mark.slow
def test_two_mirror_processes_on_one_cache_fetch_each_file_once(upstream: Upstream, tmp_path: Path) -> None:
    upstream.plan.limit_bandwidth(2 * MIB, path="*/weights.bin")
    cache = tmp_path / "cache"
    replicas = [start_mirror_process(cache, upstream.url, tmp_path) for _ in range(2)]
    try:
        urls = [r.url + WEIGHTS for r in replicas for _ in range(2)]  # two clients on each
        with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
            bodies = list(pool.map(lambda url: requests.get(url, timeout=(10, 180)).content, urls))
    finally:
        for replica in replicas:
            replica.stop()
    expected = (upstream.root / "big/one/weights.bin").read_bytes()
    assert all(body == expected for body in bodies)
    assert BIG <= upstream.sent("*/weights.bin") <= BIG + 4 * MIB  # one transfer between them


@pytest.mark.slow
def test_transformers_from_pretrained_through_the_mirror(
    upstream: Upstream, mirror: Callable[..., Mirror], tmp_path: Path
) -> None:
    m = mirror(upstream.url)
    script = """
import sys, torch, transformers
remote = transformers.AutoModel.from_pretrained("tiny/bert")
local = transformers.AutoModel.from_pretrained(sys.argv[1])
ids = torch.tensor([[2, 30, 31, 3]])
with torch.no_grad():
    print("SAME" if torch.equal(remote(ids).last_hidden_state, local(ids).last_hidden_state) else "DIFFERENT")
"""
    result = subprocess.run(
        [sys.executable, "-c", script, str(upstream.root / "tiny" / "bert")],
        env=python_env(HF_ENDPOINT=m.url, HF_HOME=str(tmp_path / "hf-home")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["SAME"]
    snapshot = next((tmp_path / "hf-home/hub/models--tiny--bert/snapshots").iterdir())
    assert set(files_under(snapshot)) <= set(files_under(upstream.root / "tiny" / "bert"))
