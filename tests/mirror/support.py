"""Two-tier test rigs for the team mirror: an upstream ``hfmirror serve`` wrapped by the fault injector,
and ``hfmirror serve --upstream`` in front of it, in this process or as real processes.

Everything listens on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` outside hidden folders (relative path -> bytes)."""
    result = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in rel.split("/")[:-1]):
            result[rel] = path.read_bytes()
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], Any], *, timeout: float = 60.0, every: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy (returned), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout:.0f} s")


def python_env(**extra: str) -> dict[str, str]:
    """This checkout first on the path, no Hugging Face settings from the caller's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


@dataclass
class Process:
    """A server process of ours whose log goes to a file and whose URL is read from that log."""

    process: subprocess.Popen
    log_path: Path
    url: str = ""

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no clean-up, no last checkpoint."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


def start_process(argv: list[str], log_path: Path, url_pattern: str, *, timeout: float = 60.0) -> Process:
    log = open(log_path, "ab")
    process = subprocess.Popen(argv, cwd=REPO_ROOT, env=python_env(), stdout=log, stderr=log)
    log.close()
    handle = Process(process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{argv[:4]} exited with {process.returncode}:\n{handle.log()[-3000:]}")
        match = re.search(url_pattern, handle.log())
        if match:
            handle.url = match.group(1)
            return handle
        time.sleep(0.05)
    handle.kill()
    raise AssertionError(f"{argv[:4]} did not start:\n{handle.log()[-3000:]}")


def start_mirror_process(root: Path, upstream_url: str, workdir: Path, *extra: str, port: int = 0) -> Process:
    """``hfmirror serve ROOT --upstream URL`` as users run it."""
    argv = [
        sys.executable,
        "-m",
        "hfmirror",
        "serve",
        str(root),
        "--upstream",
        upstream_url,
        "--port",
        str(port),
    ]
    argv += ["--state-dir", str(workdir / "mirror-state"), *extra]
    log_path = workdir / f"mirror-{time.monotonic_ns()}.log"
    return start_process(argv, log_path, r"serving on (http://127\.0\.0\.1:\d+)")


def start_upstream_process(root: Path, workdir: Path, *extra: str, port: int) -> Process:
    """``python -m hfmirror.server.faults ROOT`` (the fault-injecting upstream) on a known port."""
    argv = [sys.executable, "-m", "hfmirror.server.faults", str(root), "--port", str(port)]
    argv += ["--state-dir", str(workdir / "upstream-state"), *extra]
    log_path = workdir / f"upstream-{time.monotonic_ns()}.log"
    return start_process(argv, log_path, r"Uvicorn running on (http://127\.0\.0\.1:\d+)")


def fault_stats(url: str) -> dict[str, Any]:
    """The request records of a fault server in another process."""
    return requests.get(f"{url}/_faults/stats", timeout=10).json()


def bytes_for(stats: dict[str, Any], suffix: str) -> int:
    return sum(p["bytes"] for path, p in stats["paths"].items() if path.endswith(suffix))


def partial_fraction(root: Path, repo_folder: str, size: int) -> float:
    """How much of a file being filled into ``root`` its resume state says is written (0 if none yet)."""
    import json

    total = 0
    for state in (root / repo_folder / "blobs").glob("*.hfmirror.json"):
        try:
            table = json.loads(state.read_text())["segments"]
        except (OSError, ValueError, KeyError):
            continue
        total = max(total, sum(pos - start for start, pos, _ in table))
    return total / size
