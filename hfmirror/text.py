"""Text from the network, made safe to show: in a message, a log line, or a header value.

A header, a path or an error code sent by a peer may hold anything: terminal escape sequences that
rewrite what a user sees, newlines that forge extra log lines, megabytes of one value. Whatever we
show of it goes through :func:`printable` first, in the downloader and in the server alike.
"""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: str, limit: int) -> str:
    """``text`` as one line of printable ASCII, at most ``limit`` characters long.

    Every other character is escaped (``\\x1b``, ``\\x0a``, ``\\u65e5``), not dropped, so that a reader
    sees that something odd was there; spaces at either end go (a header value may not carry them), and
    what is longer than ``limit`` is cut, ending in ``...``.
    """
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")  # non-ASCII: \xe9, \u65e5
    escaped = "".join(ch if " " <= ch <= "~" else f"\\x{ord(ch):02x}" for ch in escaped).strip()
    return escaped if len(escaped) <= limit else escaped[: max(0, limit - 3)] + "..."
