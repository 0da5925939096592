"""Progress bars on a terminal, none when piped or --quiet; the summary line either way."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

from tests.support import download_command


def run_with_terminal_stderr(args: list[str]) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal (as in an interactive shell) and stdout on a pipe."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # rows, columns
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=terminal, text=True)
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(controller)
    out, _ = process.communicate(timeout=300)
    return process.returncode, out, b"".join(chunks).decode(errors="replace")


def test_bars_on_a_terminal(hub_server, tmp_path: Path) -> None:
    code, out, err = run_with_terminal_stderr(download_command(hub_server.url, "tiny/nested", tmp_path))
    assert code == 0, err
    assert "total" in err and "100%" in err  # the overall bar reached the end
    assert "downloaded" in err and hub_server.url in err  # the summary names the endpoint
    assert Path(out.strip().splitlines()[-1]).is_dir()


def test_no_bars_when_piped_and_nothing_but_the_path_when_quiet(hub_server, tmp_path: Path) -> None:
    base = download_command(hub_server.url, "tiny/nested", tmp_path)
    piped = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert "%|" not in piped.stderr and "files (" in piped.stderr
    code, out, err = run_with_terminal_stderr([*base, "--quiet"])
    assert code == 0 and err.strip() == ""
    assert out.strip() == piped.stdout.strip()


def test_large_files_get_a_bar_of_their_own(monkeypatch) -> None:
    import io

    from hfmirror import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setenv("COLUMNS", "120")
    bars = progress.Progress(total_bytes=progress.PER_FILE_BAR_THRESHOLD + 10, already=0, enabled=True)
    bars.file_started("weights/model-big.safetensors", progress.PER_FILE_BAR_THRESHOLD, 0)
    bars.file_started("config.json", 10, 0)
    bars.advance("weights/model-big.safetensors", progress.PER_FILE_BAR_THRESHOLD)
    bars.file_finished("weights/model-big.safetensors")
    bars.close()
    drawn = screen.getvalue()
    assert "model-big.safetensors" in drawn and "total" in drawn
    assert "config.json" not in drawn
