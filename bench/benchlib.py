"""Helpers for bench/run.py: machine details, test data, the benchmark server, timed subprocesses.

Only the standard library is used here (the bench must not need pytest, py-spy or any other extra).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / "work"
MIB = 1024 * 1024

# Every process the bench starts, so that a Ctrl-C (or an error) can end them all by pid.
_LIVE: dict[int, subprocess.Popen] = {}


# ------------------------------------------------------------------------------------ small helpers


def median(values: list[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table, or an em dash."""
    return "—" if value is None else f"{value:.{digits}f}"


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fresh_dir(path: Path) -> Path:
    """Remove ``path`` if it exists and create it empty."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def tool_path(name: str) -> str | None:
    """Where a command-line tool is, or None."""
    return shutil.which(name)


def console_script(name: str) -> str:
    """The console script installed beside this interpreter (not a pyenv shim, which adds ~50 ms)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def install_tools(packages: list[str]) -> str:
    """apt-get install the Debian packages (root only); returns a note of what happened."""
    if os.geteuid() != 0:
        return f"--install-tools needs root; not installing {', '.join(packages)}"
    subprocess.run(["apt-get", "install", "-y", "-q", *packages], check=False, capture_output=True)
    return f"ran apt-get install {' '.join(packages)}"


# ------------------------------------------------------------------------------------ machine details


def _first_line(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / MIB
    except OSError:
        pass
    return None


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, RAM, OS, and the versions of everything measured."""
    git = _first_line(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"])
    # The bench's own output files do not count: a run with --only rewrites them before the next.
    outputs = [":(exclude)bench/RESULTS.md", ":(exclude)bench/results.json"]
    dirty = _first_line(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", ".", *outputs])
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(_ram_gib() or 0, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "git": f"{git}{' (uncommitted changes)' if dirty else ''}" if git else None,
        "versions": {
            "hfmirror": _package_version("hfmirror"),
            "huggingface_hub": _package_version("huggingface_hub"),
            "transformers": _package_version("transformers"),
            "torch": _package_version("torch"),
            "requests": _package_version("requests"),
            "urllib3": _package_version("urllib3"),
            "uvicorn": _package_version("uvicorn"),
            "starlette": _package_version("starlette"),
            "aria2c": _first_line(["aria2c", "--version"]) if tool_path("aria2c") else None,
            "curl": _first_line(["curl", "--version"]) if tool_path("curl") else None,
        },
    }


# ------------------------------------------------------------------------------------ test data


def make_random_file(path: Path, size: int) -> None:
    """Write ``size`` random bytes to ``path`` once; an existing file of the right size is reused."""
    if path.exists() and path.stat().st_size == size:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MIB)
            f.write(os.urandom(n))
            left -= n
    tmp.replace(path)


def make_small_files(folder: Path, count: int, size: int) -> None:
    """``count`` random files of ``size`` bytes named ``part_000.bin``... (reused if present)."""
    for i in range(count):
        make_random_file(folder / f"part_{i:04d}.bin", size)
    for extra in folder.glob("part_*.bin"):  # a previous run with more files must not linger
        if int(extra.stem.split("_")[1]) >= count:
            extra.unlink()


# ------------------------------------------------------------------------------------ processes


@dataclass
class ProcResult:
    """One finished (or killed) subprocess: wall time, its own CPU time and peak RSS, its output."""

    argv: list[str]
    returncode: int
    wall: float
    cpu: float  # user + system seconds of the process and its waited-for children
    maxrss_mib: float
    stdout: str
    stderr: str
    server_cpu: float | None = None  # seconds of benchmark-server CPU during the run
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def start(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdout: Any = subprocess.DEVNULL,
    stderr: Any = subprocess.DEVNULL,
) -> subprocess.Popen:
    """Start a tracked subprocess (ended by :func:`cleanup` if the bench stops early)."""
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=stdout, stderr=stderr)
    _LIVE[proc.pid] = proc
    return proc


def wait(proc: subprocess.Popen, timeout: float | None = None) -> tuple[int, resource.struct_rusage]:
    """Wait for ``proc`` with os.wait4, which gives that child's own rusage (CPU, peak RSS)."""
    timer = None
    if timeout is not None:
        timer = threading.Timer(timeout, lambda: _kill(proc, signal.SIGKILL))
        timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        if timer is not None:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    _LIVE.pop(proc.pid, None)
    return proc.returncode, usage


def run(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 1800,
    server: BenchServer | None = None,
) -> ProcResult:
    """Run a command to the end and measure it (wall, CPU, peak RSS, server CPU during it)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        server_before = server.cpu_seconds() if server else None
        began = time.perf_counter()
        proc = start(argv, env=env, cwd=cwd, stdout=out, stderr=err)
        code, usage = wait(proc, timeout)
        wall = time.perf_counter() - began
        server_cpu = server.cpu_seconds() - server_before if server and server_before is not None else None
        out.seek(0)
        err.seek(0)
        return ProcResult(
            argv=argv,
            returncode=code,
            wall=wall,
            cpu=usage.ru_utime + usage.ru_stime,
            maxrss_mib=usage.ru_maxrss / 1024,  # KiB on Linux
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            server_cpu=server_cpu,
        )


def _kill(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass


def terminate(proc: subprocess.Popen, grace: float = 10) -> None:
    """End a tracked process: SIGTERM, then SIGKILL if it is still there after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _LIVE.pop(proc.pid, None)


def cleanup() -> None:
    """End every process the bench started and has not waited for (by pid)."""
    for pid, proc in list(_LIVE.items()):
        _kill(proc, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            _kill(proc, signal.SIGKILL)
            proc.wait()
        _LIVE.pop(pid, None)


def clean_env(**overrides: str) -> dict[str, str]:
    """os.environ without Hugging Face settings or tokens, plus ``overrides``.

    Python keeps its compiled modules, as it does by default on a user's machine: a sandbox that sets
    PYTHONDONTWRITEBYTECODE would otherwise charge every run of hfmirror ~20 ms of compiling.
    """
    drop = ("HF_", "HUGGING_FACE", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_XET="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(overrides)
    return env


# ------------------------------------------------------------------------------------ the server


class BenchServer:
    """``python -m hfmirror.server.faults`` on a free loopback port, reconfigured over HTTP per scenario."""

    def __init__(self, root: Path, state_dir: Path, log_path: Path) -> None:
        self.root = root
        self.state_dir = state_dir
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> BenchServer:
        """Start the server and wait until its control endpoint answers."""
        self.port = free_port()
        self._log = open(self.log_path, "ab")
        argv = [
            sys.executable,
            "-m",
            "hfmirror.server.faults",
            str(self.root),
            "--port",
            str(self.port),
            "--state-dir",
            str(self.state_dir),
        ]
        self.proc = start(argv, cwd=REPO_DIR, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"benchmark server exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                self.stats()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"benchmark server did not start in {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        if self.proc is not None:
            terminate(self.proc)
        if self._log is not None:
            self._log.close()

    def _call(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def stats(self) -> dict[str, Any]:
        """GET /_faults/stats: totals and per-path requests, bytes and statuses since the last reset."""
        return self._call("GET", "/_faults/stats")

    def plan(
        self,
        *,
        rate: float | None = None,
        max_rps: float | None = None,
        quota: tuple[int, float] | None = None,
        link_rate: float | None = None,
    ) -> None:
        """Reset the records and apply a per-connection bandwidth cap, a request-rate limit, a
        fixed-window quota of file requests announced in RateLimit headers (limit, window seconds),
        and/or a cap on the whole link, as asked."""
        faults = [{"kind": "bandwidth", "rate": rate, "path": "*"}] if rate else []
        plan: dict[str, Any] = {"reset": True, "faults": faults, "max_rps": max_rps, "link_rate": link_rate}
        plan["quota"] = {"limit": quota[0], "window": quota[1]} if quota else None
        self._call("POST", "/_faults/plan", plan)

    def records(self) -> list[dict[str, Any]]:
        """GET /_faults/requests: every request since the last reset (method, path, client, timing...)."""
        return self._call("GET", "/_faults/requests")

    def warm(self, repo_id: str, timeout: float = 600.0) -> None:
        """Ask for the repo once, so the server hashes its files before anything is timed."""
        self._call("GET", f"/api/models/{repo_id}/revision/main?blobs=true", timeout=timeout)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server process has used so far (from /proc)."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class SocketSampler:
    """The most TCP connections open at once to a local port, sampled from /proc/net/tcp (Linux).

    Counts the server's end of each ESTABLISHED connection (local port == ``port``), idle keep-alive
    ones included: what a mirror sees. Use as a context manager around a run; read ``most`` after.
    """

    def __init__(self, port: int, interval: float = 0.01) -> None:
        self.port = port
        self.interval = interval
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="socket-sampler")

    def open_now(self) -> int:
        """ESTABLISHED connections to the port now, each counted once by its client's address: the
        kernel hands /proc/net/tcp out a page at a time, so a socket that moves in its table between
        two pages can be listed twice in one read."""
        hex_port = f"{self.port:04X}"
        clients: set[tuple[str, str]] = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if len(fields) > 3 and fields[1].endswith(":" + hex_port) and fields[3] == "01":
                    clients.add((table, fields[2]))
        return len(clients)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.most = max(self.most, self.open_now())

    def __enter__(self) -> SocketSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def bytes_for(stats: dict[str, Any], path_suffix: str) -> int:
    """Body bytes the server sent for paths ending with ``path_suffix``."""
    return sum(p["bytes"] for path, p in stats["paths"].items() if path.endswith(path_suffix))


def status_count(stats: dict[str, Any], status: str) -> int:
    """How many answers had this status, over all paths."""
    return sum(p["statuses"].get(status, 0) for p in stats["paths"].values())
