"""When to retry a request, how long to wait first, and what a server says about its rate limit.

Waits grow exponentially with full jitter (a random wait between 0 and the cap), so many clients
that failed together do not come back together. A server that says how long to wait, with
``Retry-After`` (seconds or an HTTP date) or ``RateLimit: "api";r=0;t=N``, is obeyed instead.

:func:`parse_ratelimit` reads the IETF rate-limit headers as the Hub sends them
(``RateLimit: "resolvers";r=<left>;t=<seconds to reset>`` and
``RateLimit-Policy: "fixed window";"resolvers";q=<quota>;w=<window seconds>``), and the older
separate ``RateLimit-Remaining`` / ``RateLimit-Reset`` / ``RateLimit-Limit`` form, so that requests
can be paced to a quota before any 429 (see ``endpoints.QuotaPacer``).
"""

from __future__ import annotations

import email.utils
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from . import constants

__all__ = ["RETRYABLE_STATUS", "RateLimitInfo", "backoff_delay", "parse_ratelimit", "server_requested_delay"]

# Statuses worth retrying: the same request may well succeed later.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

_PARAMETER = re.compile(r"(?:^|;)\s*([A-Za-z]+)\s*=\s*([0-9]+(?:\.[0-9]+)?)\s*(?=;|$)")
_QUOTED = re.compile(r'"([^"]*)"')


@dataclass(frozen=True)
class RateLimitInfo:
    """What an answer said about the quota it counts against (None: not said)."""

    name: str  # the quota's name ("resolvers", "api"), "" if unnamed
    remaining: int | None  # requests left in the current window
    reset: float | None  # seconds until the window resets
    quota: int | None = None  # requests per window
    window: float | None = None  # seconds per window


def _header(headers: Mapping[str, str], name: str) -> str:
    return (headers.get(name) or headers.get(name.lower()) or "").strip()


def _items(value: str) -> list[tuple[list[str], dict[str, float]]]:
    """A structured-field list, leniently: per comma-separated item, its quoted names and its
    numeric parameters (``r``, ``t``, ``q``, ``w``)."""
    items = []
    for item in value.split(","):
        names = _QUOTED.findall(item)
        unquoted = _QUOTED.sub("", item)
        params = {key.lower(): float(number) for key, number in _PARAMETER.findall(unquoted)}
        if names or params:
            items.append((names, params))
    return items


def parse_ratelimit(headers: Mapping[str, str]) -> RateLimitInfo | None:
    """The rate limit an answer announces, or None if it announces none.

    With several quotas in one ``RateLimit`` header, the one with the fewest requests left is the
    one that binds. Its quota and window come from the ``RateLimit-Policy`` item of the same name.
    """
    found: list[RateLimitInfo] = []
    for names, params in _items(_header(headers, "RateLimit")):
        if "r" in params or "t" in params:
            remaining = int(params["r"]) if "r" in params else None
            found.append(RateLimitInfo(names[0] if names else "", remaining, params.get("t")))
    if not found:
        remaining, reset = _header(headers, "RateLimit-Remaining"), _header(headers, "RateLimit-Reset")
        if not (remaining.isdigit() or reset.isdigit()):
            return None
        limit = _header(headers, "RateLimit-Limit").split(",")[0].split(";")[0].strip()
        return RateLimitInfo(
            "",
            int(remaining) if remaining.isdigit() else None,
            float(reset) if reset.isdigit() else None,
            quota=int(limit) if limit.isdigit() else None,
        )
    binding = min(found, key=lambda info: info.remaining if info.remaining is not None else 1 << 62)
    for names, params in _items(_header(headers, "RateLimit-Policy")):
        if (binding.name in names or not binding.name or len(found) == 1) and "q" in params:
            window = params.get("w")
            return RateLimitInfo(binding.name, binding.remaining, binding.reset, int(params["q"]), window)
    return binding


def backoff_delay(attempt: int, *, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max, base * 2**attempt)]."""
    cap = min(constants.BACKOFF_MAX, constants.BACKOFF_BASE * (2 ** max(attempt, 0)))
    return (rng or random).uniform(0, cap)


def server_requested_delay(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, from ``RateLimit`` or ``Retry-After``; None if it did not say.

    ``RateLimit: "api";r=0;t=55`` (the Hub's form) means 0 requests left, window resets in 55 s; it is
    the reason for a 429 only when nothing is left (a quota with room says nothing about this one).
    ``Retry-After`` is either delta-seconds (``120``) or an HTTP date.
    """
    ratelimit = parse_ratelimit(headers)
    if ratelimit is not None and ratelimit.reset is not None and not ratelimit.remaining:
        return ratelimit.reset
    retry_after = _header(headers, "Retry-After")
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
