"""Servers of ours as real processes, for tests: started as users start them, their logs in files.

Every wait is bounded; a process that does not start fails the test with the end of its log.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


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
        """SIGINT (a clean stop), then SIGKILL if it takes longer than 20 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


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
