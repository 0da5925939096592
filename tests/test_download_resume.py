"""Resume across process death, Ctrl-C, and concurrent processes, with the real CLI in subprocesses.

The server caps each connection's bandwidth so a download takes a few seconds and can be hit
mid-file; the fault wrapper counts every byte it sent, which is how "bytes already on disk are never
fetched again" is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hfmirror import constants
from hfmirror.resume import ResumeState
from tests.support import download_command, make_repo

SIZE = 12 * 1024 * 1024
RATE = 3_000_000  # bytes per second per connection
WEIGHTS = "model.safetensors"


@pytest.fixture
def slow_repo(fault_server, faults, request) -> tuple[str, Path, str]:
    """A fresh repo (per test) with one 12 MiB file served at RATE bytes/s per connection."""
    repo_id = f"resume/{request.node.name.replace('_', '-')[:60]}"
    folder = make_repo(fault_server.root, repo_id, {WEIGHTS: SIZE, "config.json": b"{}"})
    faults.limit_bandwidth(RATE, path=f"*/{WEIGHTS}")
    oid = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    return repo_id, folder, oid


def start_download(url: str, repo_id: str, cache: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        download_command(url, repo_id, cache, "--connections", "1", "-q", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def paths_for(cache: Path, repo_id: str, oid: str) -> tuple[Path, Path, Path]:
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    partial = repo_dir / "blobs" / (oid + constants.PARTIAL_SUFFIX)
    state = partial.with_name(partial.name + constants.STATE_SUFFIX)
    return repo_dir / "blobs" / oid, partial, state


def saved_bytes(state: Path) -> int:
    return ResumeState.saved_bytes(state)


def wait_until_saved(process: subprocess.Popen, state: Path, at_least: int, blob: Path, good: bytes) -> None:
    """Poll until the resume state claims ``at_least`` bytes; meanwhile the final blob must never be wrong."""
    deadline = time.monotonic() + 120
    while saved_bytes(state) < at_least:
        if process.poll() is not None:
            pytest.fail(f"download ended early: {process.communicate()}")
        assert not blob.exists() or blob.read_bytes() == good
        assert time.monotonic() < deadline, "download made no progress"
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_twice_then_resume_fetches_each_byte_about_once(
    fault_server, faults, slow_repo, tmp_path
) -> None:
    repo_id, folder, oid = slow_repo
    good = (folder / WEIGHTS).read_bytes()
    blob, partial, state = paths_for(tmp_path, repo_id, oid)
    kills = 0
    for fraction in (0.3, 0.6):
        process = start_download(fault_server.url, repo_id, tmp_path)
        wait_until_saved(process, state, int(SIZE * fraction), blob, good)
        process.kill()  # SIGKILL: no cleanup code runs
        process.communicate()
        kills += 1
        assert partial.exists() and not blob.exists()

    process = start_download(fault_server.url, repo_id, tmp_path)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    snapshot = Path(out.strip().splitlines()[-1])
    assert (snapshot / WEIGHTS).read_bytes() == good
    assert not partial.exists() and not state.exists()
    # Each kill may lose what arrived since the last checkpoint, plus a block in flight. A restart from
    # zero would cost 30% + 60% of the file more than this bound allows.
    lost_per_kill = RATE * constants.CHECKPOINT_INTERVAL + 2 * constants.READ_BLOCK
    served = faults.bytes_sent(f"*/{WEIGHTS}")
    assert SIZE <= served <= SIZE + kills * lost_per_kill, (served, SIZE)
    # And it really resumed with Range + If-Range.
    resumed = [r for r in faults.requests(f"*/{WEIGHTS}", "GET") if r.range and r.range != "bytes=0-"]
    assert len(resumed) >= kills
    assert all(r.headers.get("if-range") == f'"{oid}"' for r in resumed)


@pytest.mark.slow
def test_ctrl_c_keeps_partial_data_and_says_how_to_resume(fault_server, faults, slow_repo, tmp_path) -> None:
    repo_id, folder, oid = slow_repo
    good = (folder / WEIGHTS).read_bytes()
    blob, partial, state = paths_for(tmp_path, repo_id, oid)
    process = start_download(fault_server.url, repo_id, tmp_path)
    wait_until_saved(process, state, SIZE // 4, blob, good)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert "resume" in err and "Traceback" not in err
    kept = saved_bytes(state)
    assert kept >= SIZE // 4 and partial.exists() and not blob.exists()

    before = faults.bytes_sent(f"*/{WEIGHTS}")
    process = start_download(fault_server.url, repo_id, tmp_path)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert (Path(out.strip()) / WEIGHTS).read_bytes() == good
    assert faults.bytes_sent(f"*/{WEIGHTS}") - before <= SIZE - kept + constants.READ_BLOCK


def test_a_changed_remote_file_restarts_that_file(fault_server, faults, slow_repo, tmp_path) -> None:
    """State saved for other content (another oid) is never continued: the file starts over."""
    repo_id, folder, oid = slow_repo
    blob, partial, state = paths_for(tmp_path, repo_id, oid)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * SIZE)
    state.write_text(
        json.dumps(
            {
                "version": 1,
                "path": WEIGHTS,
                "oid": "f" * 64,
                "size": SIZE,
                "ranges_supported": True,
                "validators": {},
                "segments": [[0, SIZE // 2, SIZE]],
            }
        )
    )
    faults.reset()
    process = start_download(fault_server.url, repo_id, tmp_path)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert (Path(out.strip()) / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()
    assert faults.bytes_sent(f"*/{WEIGHTS}") == SIZE


@pytest.mark.slow
def test_two_processes_on_the_same_repo_both_succeed_with_one_copy(fault_server, faults, slow_repo, tmp_path):
    repo_id, folder, oid = slow_repo
    first = start_download(fault_server.url, repo_id, tmp_path)
    second = start_download(fault_server.url, repo_id, tmp_path)
    outs = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outs
    snapshot = Path(outs[0][0].strip())
    assert Path(outs[1][0].strip()) == snapshot
    assert (snapshot / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()
    blobs = [p.name for p in (snapshot.parent.parent / "blobs").iterdir()]
    assert blobs.count(oid) == 1 and not [b for b in blobs if b.endswith(constants.PARTIAL_SUFFIX)]
    # One process waited for the other's lock instead of fetching the file a second time.
    assert faults.bytes_sent(f"*/{WEIGHTS}") <= SIZE + constants.READ_BLOCK
    os.stat(snapshot / WEIGHTS)
