"""When to retry a request, and how long to wait first.

Waits grow exponentially with full jitter (a random wait between 0 and the cap), so many clients
that failed together do not come back together. A server that says how long to wait, with
``Retry-After`` (seconds or an HTTP date) or ``RateLimit: "api";r=0;t=N``, is obeyed instead.
"""

from __future__ import annotations

import email.utils
import random
import re
import time
from collections.abc import Mapping

from . import constants

__all__ = ["RETRYABLE_STATUS", "backoff_delay", "server_requested_delay"]

# Statuses worth retrying: the same request may well succeed later.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

_RATELIMIT_RESET = re.compile(r"(?:^|[;,\s])t\s*=\s*(\d+)")


def backoff_delay(attempt: int, *, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max, base * 2**attempt)]."""
    cap = min(constants.BACKOFF_MAX, constants.BACKOFF_BASE * (2 ** max(attempt, 0)))
    return (rng or random).uniform(0, cap)


def server_requested_delay(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, from ``RateLimit`` or ``Retry-After``; None if it did not say.

    ``RateLimit: "api";r=0;t=55`` (the Hub's form) means 0 requests left, window resets in 55 s.
    ``Retry-After`` is either delta-seconds (``120``) or an HTTP date.
    """
    ratelimit = headers.get("RateLimit") or headers.get("ratelimit")
    if ratelimit:
        match = _RATELIMIT_RESET.search(ratelimit)
        if match:
            return float(match.group(1))
    retry_after = (headers.get("Retry-After") or headers.get("retry-after") or "").strip()
    if not retry_after:
        return None
    if retry_after.isdigit():
        return float(retry_after)
    try:
        when = email.utils.parsedate_to_datetime(retry_after)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)
