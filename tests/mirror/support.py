"""Two-tier test rigs for the team mirror: an upstream ``hfmirror serve`` wrapped by the fault injector,
and ``hfmirror serve --upstream`` in front of it, in this process or as real processes.

Everything listens on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import requests

from hfmirror.resume import ResumeState
from tests.servers import REPO_ROOT, Process, free_port, python_env, start_process, wait_until
from tests.support import files_under

__all__ = [
    "MIB",
    "REPO_ROOT",
    "Process",
    "bytes_for",
    "fault_stats",
    "files_under",
    "free_port",
    "partial_fraction",
    "python_env",
    "start_mirror_process",
    "start_upstream_process",
    "wait_until",
]

MIB = 1024 * 1024


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
    """How much of a file being filled into ``root`` its resume state vouches for (0 if none yet)."""
    states = (root / repo_folder / "blobs").glob("*.hfmirror.json")
    return max((ResumeState.saved_bytes(state) for state in states), default=0) / size
