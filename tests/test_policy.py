"""Unit tests of the request policy and the endpoint pool: what each answer means, and where the run goes."""

from __future__ import annotations

import errno
import http.client
import ssl

import pytest
import requests
import urllib3

from hfmirror import constants
from hfmirror.endpoints import EndpointPool, RateGovernor, redact_url
from hfmirror.errors import (
    AccessDeniedError,
    EntryNotFoundError,
    NetworkError,
    RemoteError,
    RepoNotFoundError,
    RevisionNotFoundError,
)
from hfmirror.layout import fitting_name
from hfmirror.policy import (
    TRANSPORT_ERRORS,
    Action,
    Asked,
    TransferStats,
    Verdict,
    combine_refusals,
    error_for_answer,
    judge_status,
    judge_transport_error,
    settle,
)
from hfmirror.text import printable

LISTING = Asked("org/x", "main", "http://e")
FILE = Asked("org/x", "1" * 40, "http://e", filename="w.bin")


def pool_of(*urls: str, failover_after: int = 3) -> EndpointPool:
    return EndpointPool.from_urls(list(urls), max_concurrency=4, failover_after=failover_after)


# ------------------------------------------------------------------------------ answers to errors


@pytest.mark.parametrize(
    ("status", "headers", "asked", "expected"),
    [
        (401, {"X-Error-Code": "RepoNotFound"}, LISTING, RepoNotFoundError),
        (401, {}, LISTING, RepoNotFoundError),
        (401, {}, FILE, RepoNotFoundError),
        (404, {}, LISTING, RepoNotFoundError),
        (404, {}, FILE, EntryNotFoundError),
        (404, {"X-Error-Code": "EntryNotFound"}, FILE, EntryNotFoundError),
        (404, {"X-Error-Code": "RevisionNotFound"}, LISTING, RevisionNotFoundError),
        (403, {"X-Error-Code": "GatedRepo"}, LISTING, AccessDeniedError),
        (403, {}, FILE, AccessDeniedError),
        (401, {"X-Error-Message": "Invalid credentials in Authorization header"}, LISTING, AccessDeniedError),
        (400, {}, LISTING, RemoteError),
    ],
)
def test_one_mapping_from_answers_to_errors(status, headers, asked, expected) -> None:
    assert type(error_for_answer(status, headers, asked)) is expected


@pytest.mark.parametrize(
    ("status", "headers", "action"),
    [
        (429, {"Retry-After": "5"}, Action.BACK_OFF),
        (503, {}, Action.BACK_OFF),
        (429, {"Retry-After": "3600"}, Action.FAIL_OVER),
        (429, {"RateLimit": '"api";r=0;t=900'}, Action.FAIL_OVER),
        (500, {}, Action.RETRY),
        (409, {}, Action.RETRY),
        (404, {}, Action.FAIL_OVER),
        (401, {"X-Error-Code": "RepoNotFound"}, Action.FAIL_OVER),
        (400, {}, Action.FAIL_OVER),
        (403, {}, Action.FAIL),
        (302, {}, Action.FAIL_OVER),
    ],
)
def test_what_each_status_calls_for(status, headers, action) -> None:
    verdict = judge_status(status, headers, LISTING)
    assert verdict is not None and verdict.action is action


def test_content_decides_for_2xx_and_a_long_retry_after_says_why() -> None:
    assert judge_status(200, {}, FILE) is None and judge_status(206, {}, FILE) is None
    verdict = judge_status(429, {"Retry-After": "3600"}, LISTING)
    assert verdict is not None and isinstance(verdict.error, NetworkError)
    assert f"3600 s (HTTP 429), more than the {constants.MAX_RETRY_AFTER:.0f} s" in str(verdict.error)
    backing_off = judge_status(429, {"Retry-After": "7"}, LISTING)
    assert backing_off is not None and backing_off.delay == 7.0


def test_what_a_server_says_is_shown_escaped_on_one_line() -> None:
    """A terminal escape or a newline in a header must neither act on the terminal nor vanish unseen."""
    verdict = judge_status(404, {"X-Error-Code": "Entry\x1b[2J\nNotFound"}, FILE)
    assert verdict is not None and verdict.reason == "Entry\\x1b[2J\\x0aNotFound (HTTP 404)"
    assert printable("  caf\u00e9 \u65e5 ", 40) == "caf\\xe9 \\u65e5"
    assert printable("x" * 50, 10) == "xxxxxxx..." and printable("", 5) == ""


@pytest.mark.parametrize(
    "failure",
    [
        requests.ConnectionError("refused"),
        urllib3.exceptions.ProtocolError("reset"),
        http.client.IncompleteRead(b"", 10),
        ConnectionResetError(errno.ECONNRESET, "reset"),
        TimeoutError("timed out"),
        ssl.SSLError("bad record mac"),
        OSError(errno.EHOSTUNREACH, "No route to host"),
    ],
    ids=lambda failure: type(failure).__name__,
)
def test_one_set_of_transport_errors_for_the_listing_the_transfers_and_the_mirror(failure) -> None:
    """Each way a connection fails is a transport error everywhere; before, the transfer's own set
    left out a plain socket OSError and http.client's errors, the mirror's access check all but
    requests' (a disk error is kept out by where the set is caught, test_disk_full_midway_keeps_partial_data_and_resumes)."""
    assert isinstance(failure, TRANSPORT_ERRORS)
    verdict = judge_transport_error(failure, FILE, timeout=30)
    assert verdict.action in (Action.RETRY, Action.FAIL_OVER)


def test_what_each_transport_failure_calls_for() -> None:
    hang = judge_transport_error(requests.ReadTimeout(), LISTING, timeout=30)
    assert hang.action is Action.FAIL_OVER and hang.retry_if_last and "30 s" in hang.reason
    refused = judge_transport_error(requests.ConnectionError(), LISTING, timeout=30)
    assert refused.action is Action.RETRY and refused.endpoint_failed
    loop = judge_transport_error(requests.TooManyRedirects(), LISTING, timeout=30)
    assert loop.action is Action.FAIL_OVER and not loop.retry_if_last


def test_the_final_error_is_not_found_only_when_every_endpoint_said_so() -> None:
    first, second = pool_of("http://a", "http://b").endpoints
    not_here = judge_status(404, {}, FILE)
    gone = judge_status(401, {"X-Error-Code": "RepoNotFound"}, FILE)
    assert not_here is not None and gone is not None
    error = combine_refusals([(first, not_here), (second, gone)], FILE)
    assert type(error) is RepoNotFoundError
    assert "http://a: HTTP 404" in str(error) and "http://b: RepoNotFound (HTTP 401)" in str(error)
    unreachable = judge_transport_error(requests.ConnectionError(), FILE, timeout=1)
    mixed = combine_refusals([(first, not_here), (second, unreachable)], FILE)
    assert type(mixed) is NetworkError and "http://a" in str(mixed) and "http://b" in str(mixed)


# ------------------------------------------------------------------------------ where the run goes


def test_failover_sticks_and_the_last_endpoint_is_never_abandoned() -> None:
    pool = pool_of("http://a", "http://b", "http://c")
    a, b, c = pool.endpoints
    assert pool.fail_over(a, "sent an HTML page") and pool.current is b and pool.failovers == 1
    assert pool.in_service() == [b, c]
    pool.use(b)  # the endpoint that answered the listing
    assert pool.in_service() == [b, c] and a.abandoned == "sent an HTML page"
    assert pool.fail_over(c, "lacks everything")  # a later one, asked for one file: just not asked again
    assert pool.current is b and pool.in_service() == [b] and pool.failovers == 1
    assert not pool.fail_over(b, "hangs") and pool.current is b and b.abandoned is None


def test_a_429_is_not_a_failure_but_429_after_every_pause_is() -> None:
    pool = pool_of("http://a", "http://b")
    a, b = pool.endpoints
    stats = TransferStats()
    limited = Verdict(Action.BACK_OFF, "HTTP 429", delay=0.0)
    for _ in range(constants.RATE_LIMITED_FAILOVER_AFTER - 1):
        settle(limited, a, pool, stats, attempt=1)
    assert pool.current is a and a.consecutive_failures == 0
    pool.report_success(a)  # a success between pauses: the mirror is pacing us, not refusing us
    for _ in range(constants.RATE_LIMITED_FAILOVER_AFTER - 1):
        settle(limited, a, pool, stats, attempt=1)
    assert pool.current is a
    settle(limited, a, pool, stats, attempt=1)
    assert pool.current is b and "429" in (a.abandoned or "")
    assert stats.rate_limited == a.rate_limited == 2 * constants.RATE_LIMITED_FAILOVER_AFTER - 1


def test_429s_that_come_back_together_are_one_pause() -> None:
    governor = RateGovernor(8)
    assert governor.on_overloaded(5.0) is True
    assert governor.on_overloaded(5.0) is False  # sent together, answered together: the same episode
    assert governor.limit == 4


# ------------------------------------------------------------------------------ names shown and written


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:secret@mirror.example/", "https://***@mirror.example/"),
        ("http://hf_TOKEN@127.0.0.1:8000", "http://***@127.0.0.1:8000"),
        ("https://hf-mirror.com", "https://hf-mirror.com"),
    ],
)
def test_credentials_in_endpoint_urls_are_masked(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert pool_of(url).current.shown == shown.rstrip("/")


def test_bookkeeping_names_fit_in_a_file_name() -> None:
    assert fitting_name("config.json", ".lock") == "config.json.lock"
    long = "a" * 250
    hashed = fitting_name(long, ".lock")
    assert (
        hashed.endswith(".lock")
        and len(hashed.encode()) <= 255
        and hashed != fitting_name("b" * 250, ".lock")
    )
    # Room for the longest suffix a name will get later, even when this one fits.
    assert fitting_name("a" * 230, ".x", room=".x" * 20) != "a" * 230 + ".x"
