"""Progress on stderr: one overall bar (bytes, speed, ETA) and a bar per large file.

Bars appear only on a terminal and never with ``--quiet``; the final summary line is printed by the
CLI either way. tqdm is thread-safe, so transfer threads update bars directly.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

__all__ = ["Progress"]

# Files at least this large get a bar of their own.
PER_FILE_BAR_THRESHOLD = 64 * 1024 * 1024


class Progress:
    def __init__(self, *, total_bytes: int, already: int, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._lock = threading.Lock()
        self._file_bars: dict[str, Any] = {}
        self._overall: Any = None
        if self.enabled:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            self._overall = tqdm(
                total=total_bytes,
                initial=already,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="total",
                file=sys.stderr,
                dynamic_ncols=True,
                position=0,
            )

    def file_started(self, name: str, size: int, already: int) -> None:
        if not self.enabled or size < PER_FILE_BAR_THRESHOLD:
            return
        with self._lock:
            self._file_bars[name] = self._tqdm(
                total=size,
                initial=already,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=name[-40:],
                file=sys.stderr,
                dynamic_ncols=True,
                leave=False,
                position=len(self._file_bars) + 1,
            )

    def advance(self, name: str, count: int) -> None:
        if not self.enabled:
            return
        self._overall.update(count)
        bar = self._file_bars.get(name)
        if bar is not None:
            bar.update(count)

    def file_finished(self, name: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            bar = self._file_bars.pop(name, None)
        if bar is not None:
            bar.close()

    def close(self) -> None:
        if not self.enabled:
            return
        for name in list(self._file_bars):
            self.file_finished(name)
        self._overall.close()
