"""The one request policy: what every answer, and every failed request, means for a download.

The listing (:mod:`hfmirror.listing`) and the file transfers (:mod:`hfmirror.transfer`) send their
requests differently, but judge what comes back here, so the same answer gets the same treatment
everywhere. A judgement is a :class:`Verdict`; its :class:`Action` is one of:

==============  ==================================================================================
``RETRY``       the same request again after a backoff (a refused or reset connection, a 500, a 409)
``BACK_OFF``    the server is overloaded (429, 503): wait as long as it asks, send fewer at once
``FAIL_OVER``   this endpoint cannot answer this: not found there, not a Hub answer (an HTML page,
                a listing that does not parse, a file of another size), no answer at all, or a
                ``Retry-After`` (or a spent quota's reset) beyond ``MAX_RETRY_AFTER``. Ask the next
                endpoint; with none left, ``error`` is the answer (or, for a hang, the last endpoint
                is retried)
``START_OVER``  the bytes already held cannot be continued (the file changed, ranges are ignored)
``FAIL``        a definite answer (access denied): raise ``error``
==============  ==================================================================================

:func:`error_for_answer` is the one mapping from an HTTP answer to our errors, following the Hub's
``X-Error-Code`` as huggingface_hub does. :func:`settle` books a ``RETRY`` or ``BACK_OFF`` (counters,
the endpoint's health, its rate governor) and says how long to wait; a wait of
``NOTICE_WAIT_SECONDS`` or more is announced with a warning on the ``hfmirror`` logger, which the CLI
shows on stderr. :func:`read_body` reads the bodies the downloader holds whole (listings, error
answers) with a size cap and an overall deadline: a hostile server can make us hold neither
gigabytes nor a connection forever.
"""

from __future__ import annotations

import enum
import http.client
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import requests
import urllib3

from . import constants
from .endpoints import Endpoint, EndpointPool
from .errors import (
    AccessDeniedError,
    EntryNotFoundError,
    HfMirrorError,
    NetworkError,
    QuotaExhaustedError,
    RemoteError,
    RepoNotFoundError,
    RevisionNotFoundError,
)
from .hashing import is_git_sha1, is_sha256
from .retry import RETRYABLE_STATUS, backoff_delay, server_requested_delay
from .text import printable

__all__ = [
    "TRANSPORT_ERRORS",
    "Action",
    "Asked",
    "BodyLimitExceeded",
    "TransferStats",
    "Verdict",
    "abandoned_verdict",
    "announce_retry",
    "combine_refusals",
    "drain_error_body",
    "error_for_answer",
    "judge_file_answer",
    "judge_status",
    "judge_transport_error",
    "not_a_hub_answer",
    "pause",
    "read_body",
    "settle",
]

logger = logging.getLogger(__name__)

# What sending a request, or reading its answer, raises when the connection fails (refused, reset,
# timed out, cut mid-body): requests' and urllib3's wrappers, http.client's own, and any socket OSError
# (a read can fail with any errno, EHOSTUNREACH included). Our own NetworkError and StorageError are
# OSErrors too, so a ``try`` that catches these must hold network calls only, never a disk write.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)

TOKEN_HINT = "if it is private or gated, pass --token or set HF_TOKEN"
# The Hub's X-Error-Message for a token it does not know: a 401 that is about the token, not the repo.
_INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


class Action(enum.Enum):
    RETRY = "retry"
    BACK_OFF = "back off"
    FAIL_OVER = "fail over"
    START_OVER = "start over"
    FAIL = "fail"


@dataclass(frozen=True)
class Verdict:
    """What to do about one answer (or one failed request), and why, in words for messages."""

    action: Action
    reason: str  # short, to follow an endpoint's name: "RepoNotFound (HTTP 401)", "an HTML page"
    error: HfMirrorError | None = None  # FAIL: raise it; FAIL_OVER: the answer if no endpoint is left
    delay: float | None = None  # BACK_OFF: seconds the server asked for (None: it did not say)
    endpoint_failed: bool = False  # RETRY: counts towards failing the endpoint over
    retry_if_last: bool = False  # FAIL_OVER: on the last endpoint, retry instead of failing
    ranges_supported: bool = True  # START_OVER: False when the server ignores Range


@dataclass(frozen=True)
class Asked:
    """What a request asked for, so that errors name it."""

    repo_id: str
    revision: str
    endpoint: str  # as shown: credentials masked
    filename: str | None = None  # None: the listing
    # A token was held back from this endpoint (found on this machine; the user did not choose this
    # endpoint): its "no" says nothing about what the token may read, so another endpoint is asked.
    withheld_token: bool = False

    @property
    def what(self) -> str:
        return f"{self.filename} in {self.repo_id}" if self.filename else self.repo_id


@dataclass
class TransferStats:
    """Counters shared by the listing and every transfer of one download (updated under ``lock``)."""

    bytes_fetched: int = 0
    retries: int = 0
    rate_limited: int = 0
    verify_failures: int = 0
    restarts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


# ------------------------------------------------------------------------------------ HTTP answers


def _server_said(status: int, headers: Mapping[str, str]) -> str:
    """``RepoNotFound (HTTP 401)``, or ``HTTP 404`` when the server gave no Hub error code."""
    code = printable(headers.get("X-Error-Code", ""), 40)
    return f"{code} (HTTP {status})" if code else f"HTTP {status}"


def error_for_answer(status: int, headers: Mapping[str, str], asked: Asked) -> HfMirrorError:
    """A 4xx answer as one of our errors, following the Hub's ``X-Error-Code``.

    Without a code, a 401 means what it means on the Hub, which answers 401 for a repository that does
    not exist *and* for one that is private or gated to this caller: not found, with a hint about the
    token. Only the Hub's "invalid credentials" message makes a 401 about the token itself.
    """
    code = headers.get("X-Error-Code", "")
    message = headers.get("X-Error-Message", "")
    where = f"on {asked.endpoint}"
    hint = _withheld_hint(asked) if asked.withheld_token else TOKEN_HINT
    if code == "GatedRepo":
        if asked.withheld_token:
            return AccessDeniedError(f"{asked.repo_id} is gated {where} ({hint})")
        return AccessDeniedError(f"{asked.repo_id} is gated {where}: accept its terms, then pass --token")
    if code == "RevisionNotFound":
        return RevisionNotFoundError(f"revision {asked.revision!r} not found in {asked.repo_id} {where}")
    if code == "EntryNotFound" or (not code and status in (404, 410) and asked.filename):
        return EntryNotFoundError(f"{asked.what} not found {where}")
    if status == 401 and not code and message == _INVALID_CREDENTIALS:
        return AccessDeniedError(f"{asked.endpoint} refused the token (invalid credentials): check --token")
    if code == "RepoNotFound" or (not code and status in (401, 404, 410)):
        return RepoNotFoundError(f"repository {asked.repo_id!r} not found {where} ({hint})")
    if status in (401, 403, 451):
        return AccessDeniedError(f"access to {asked.what} denied by {asked.endpoint} (HTTP {status}; {hint})")
    return RemoteError(f"{asked.endpoint} answered HTTP {status} for {asked.what}")


def _withheld_hint(asked: Asked) -> str:
    return (
        "the token found on this machine is sent only to huggingface.co and to endpoints you name with "
        f"--endpoint or HF_ENDPOINT; pass --token to send it to {asked.endpoint} too"
    )


def not_a_hub_answer(reason: str, asked: Asked) -> Verdict:
    """The endpoint answered, but not as the Hub does (a captive portal, a captcha, a broken mirror)."""
    return Verdict(
        Action.FAIL_OVER,
        reason,
        error=NetworkError(f"{asked.endpoint} did not answer as the Hub does for {asked.what}: {reason}"),
    )


def quota_spent(error: QuotaExhaustedError) -> Verdict:
    """The verdict on an endpoint whose announced quota stays spent beyond ``MAX_RETRY_AFTER`` (its
    governor raises ``error`` instead of waiting): the same as a ``Retry-After`` that long, for it is
    the same wait, announced on a successful answer instead of a 429."""
    return Verdict(Action.FAIL_OVER, error.reason, error=error)


def judge_status(status: int, headers: Mapping[str, str], asked: Asked) -> Verdict | None:
    """The verdict on an answer's status alone; None for 2xx (and 416), whose content decides.

    429 and 503 back off as the server asks, unless it asks for longer than ``MAX_RETRY_AFTER``: then
    the endpoint is given up for this run (see that constant for why). Not-found answers, and answers no
    Hub gives, fail over: another endpoint may well have what this one lacks. Access denied is final
    (every endpoint that gets the token gets the same one), unless this endpoint was not sent the
    token (``asked.withheld_token``): then another endpoint, which may be sent it, is asked.
    """
    if status in (429, 503):
        delay = server_requested_delay(headers)
        if delay is not None and delay > constants.MAX_RETRY_AFTER:
            limit = constants.MAX_RETRY_AFTER
            reason = f"asked us to wait {delay:.0f} s (HTTP {status}), more than the {limit:.0f} s we wait"
            error = NetworkError(f"{asked.endpoint} {reason}; try again later")
            return Verdict(Action.FAIL_OVER, reason, error=error)
        return Verdict(Action.BACK_OFF, f"HTTP {status}", delay=delay)
    if status in RETRYABLE_STATUS:
        return Verdict(Action.RETRY, f"HTTP {status}", endpoint_failed=status >= 500)
    if 300 <= status < 400:  # a redirect requests did not follow (no Location), or a 304 we never asked for
        return not_a_hub_answer(f"HTTP {status} without a usable Location", asked)
    if status >= 400 and status != 416:
        error = error_for_answer(status, headers, asked)
        if isinstance(error, AccessDeniedError) and not asked.withheld_token:
            return Verdict(Action.FAIL, _server_said(status, headers), error=error)
        return Verdict(Action.FAIL_OVER, _server_said(status, headers), error=error)
    if status < 200:
        return not_a_hub_answer(f"HTTP {status}", asked)
    return None


def judge_transport_error(error: BaseException, asked: Asked, *, timeout: float) -> Verdict:
    """The verdict on a request that got no answer at all.

    A refused or reset connection is cheap to try again (and ``FAILOVER_AFTER`` of them in a row fail
    the endpoint over); no answer within ``timeout`` already cost that long, so the run moves on at once
    when another endpoint is left (the last one is retried: the network may come back). A redirect loop
    or a redirect to something that is not http(s) is not a Hub answer.
    """
    name = type(error).__name__
    if isinstance(error, (requests.TooManyRedirects, requests.exceptions.InvalidSchema)):
        return not_a_hub_answer(f"a redirect that leads nowhere ({name})", asked)
    if isinstance(error, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema)):
        return not_a_hub_answer(f"a redirect to an invalid URL ({name})", asked)
    if isinstance(error, (requests.Timeout, TimeoutError, urllib3.exceptions.TimeoutError)):
        reason = f"no answer within {timeout:.0f} s"
        error_out = NetworkError(f"{asked.endpoint} gave {reason} for {asked.what}")
        return Verdict(Action.FAIL_OVER, reason, error=error_out, retry_if_last=True)
    return Verdict(Action.RETRY, f"connection failed ({name})", endpoint_failed=True)


def judge_file_answer(
    response: requests.Response,
    asked: Asked,
    *,
    sent: Mapping[str, str],
    start: int,
    size: int,
    oid: str,
) -> Verdict | None:
    """The verdict on an answer to a file request (``sent`` its headers, ``start`` the first byte
    asked for); None if its body is the bytes asked for and should be written.
    """
    status = response.status_code
    verdict = judge_status(status, response.headers, asked)
    if verdict is not None:
        return verdict
    if status == 416:
        return Verdict(Action.START_OVER, f"the range {sent.get('Range')} is past the end")
    named = _named_content(response)
    if named is not None and named != oid:
        return Verdict(Action.START_OVER, f"the server now serves different content ({named})")
    if status == 206:
        content_range = response.headers.get("Content-Range", "")
        total = content_range.rsplit("/", 1)[-1]
        if total not in (str(size), "*"):
            return not_a_hub_answer(
                f"a part of a {printable(total, 20) or '?'}-byte file, listed as {size}", asked
            )
        if not content_range.startswith(f"bytes {start}-"):
            return Verdict(
                Action.RETRY, f"Content-Range {printable(content_range, 60)!r} for {sent.get('Range')}"
            )
        return None
    if status == 200:
        if "Range" in sent:
            etag = response.headers.get("ETag", "")
            if sent.get("If-Range") and etag and etag != sent["If-Range"]:
                return Verdict(Action.START_OVER, "the remote file changed since the partial download began")
            return Verdict(Action.START_OVER, "the server ignores Range requests", ranges_supported=False)
        length = response.headers.get("Content-Length")
        if length is not None and length.strip() != str(size):
            html = "text/html" in response.headers.get("Content-Type", "")
            what = "an HTML page" if html else f"{printable(length, 20)} bytes"
            return not_a_hub_answer(f"{what} instead of the {size}-byte file", asked)
        return None
    return not_a_hub_answer(f"HTTP {status}", asked)


def _named_content(response: requests.Response) -> str | None:
    """The checksum the endpoint says it is sending (a hex ``X-Linked-Etag`` or ``ETag``), if any.

    Only the endpoint's own answer counts: after a redirect, the CDN's ETag means something else
    (an S3 md5, a Xet hash) and is ignored.
    """
    first_hop = response.history[0] if response.history else response
    for header in ("X-Linked-Etag", "ETag"):
        value = first_hop.headers.get(header, "").removeprefix("W/").strip('"').lower()
        if is_sha256(value) or is_git_sha1(value):
            return value
    return None


# ------------------------------------------------------------------------------ what to do about it


def settle(
    verdict: Verdict, endpoint: Endpoint, pool: EndpointPool, stats: TransferStats, *, attempt: int
) -> float:
    """Book a ``RETRY`` or ``BACK_OFF`` against ``endpoint``; return the seconds to wait before trying again.

    A 429/503 pauses the whole endpoint (its governor) for as long as the server asked, or a backoff if
    it did not say; the first request back from a pause announces it, when it is long enough to notice.
    """
    stats.add(retries=1)
    if verdict.action is Action.BACK_OFF:
        stats.add(rate_limited=1)
        wait = verdict.delay if verdict.delay is not None else backoff_delay(attempt)
        new_pause = endpoint.governor.on_overloaded(wait)
        if new_pause and wait >= constants.NOTICE_WAIT_SECONDS:
            logger.warning(
                "%s asked us to wait %.0f s (%s); waiting (Ctrl-C stops, a re-run resumes)",
                endpoint.shown,
                wait,
                verdict.reason,
            )
        pool.report_rate_limited(endpoint, new_pause=new_pause)
        return wait
    if verdict.endpoint_failed:
        pool.report_failure(endpoint)
    return backoff_delay(attempt)


def announce_retry(endpoint: Endpoint, verdict: Verdict, wait: float, attempt: int) -> None:
    """Say so before a backoff long enough to notice (a 429 pause is announced by :func:`settle`)."""
    if verdict.action is not Action.BACK_OFF and wait >= constants.NOTICE_WAIT_SECONDS:
        logger.warning(
            "%s: %s; trying again in %.0f s (try %d)", endpoint.shown, verdict.reason, wait, attempt + 1
        )


def abandoned_verdict(endpoint: Endpoint, asked: Asked) -> Verdict:
    """The refusal to record for an endpoint the pool gave up on (it kept failing, or kept saying 429)."""
    reason = endpoint.abandoned or "kept failing"
    return Verdict(
        Action.FAIL_OVER,
        reason,
        error=NetworkError(f"{endpoint.shown} {reason} ({asked.what})"),
        retry_if_last=True,
    )


def combine_refusals(refusals: list[tuple[Endpoint, Verdict]], asked: Asked) -> HfMirrorError:
    """The error a request ends with when no endpoint is left to ask, naming what each one said.

    It is a not-found (or other definite remote) error only if every endpoint said so; if any of them
    could not be reached or did not answer as the Hub does, it is a NetworkError: the thing may exist.
    """
    if not refusals:
        return NetworkError(f"no endpoint reachable for {asked.what}")
    if len(refusals) == 1 and refusals[0][1].error is not None:
        return refusals[0][1].error
    errors = [verdict.error for _, verdict in refusals]
    said = "; ".join(f"{endpoint.shown}: {verdict.reason}" for endpoint, verdict in refusals)
    if all(isinstance(error, RemoteError) for error in errors):
        last = errors[-1]
        hint = f" ({TOKEN_HINT})" if isinstance(last, RepoNotFoundError) else ""
        return type(last)(f"{asked.what} not found on any endpoint: {said}{hint}")
    everything_unreachable = all(v.endpoint_failed or v.retry_if_last for _, v in refusals)
    headline = "no endpoint reachable" if everything_unreachable else "no endpoint could give"
    return NetworkError(f"{headline} for {asked.what}: {said}")


def pause(seconds: float, cancel: threading.Event | None) -> None:
    """Wait ``seconds``, or less if ``cancel`` is set (Ctrl-C sets it; in the main thread it also
    interrupts the wait directly)."""
    if seconds <= 0:
        return
    if cancel is None:
        time.sleep(seconds)
    else:
        cancel.wait(seconds)


# ------------------------------------------------------------------------------ bounded body reads


class BodyLimitExceeded(Exception):
    """A body was larger than allowed, or did not arrive within its deadline."""


def read_body(response: requests.Response, *, limit: int, seconds: float) -> bytes:
    """Read a streamed response's whole body: at most ``limit`` bytes, within ``seconds`` in all.

    The read timeout of a request bounds each wait for a byte, not the whole: a server sending one byte
    every few seconds would never trip it. So each read here gets at most what is left of the deadline
    as its socket timeout, and asks for no more than one receive's worth (``read1``), so that it cannot
    block past the deadline filling a buffer. A body read to its end hands its connection back to the
    pool; one cut off leaves it to be closed with the response.

    Raises:
        BodyLimitExceeded: the body is too large or too slow; OSError or http.client.HTTPException if
        the connection fails.
    """
    declared = response.headers.get("Content-Length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise BodyLimitExceeded(f"a body of {declared} bytes, more than the {limit} we read")
    inner = getattr(response.raw, "_fp", None)
    reader = inner if isinstance(inner, http.client.HTTPResponse) else None
    if reader is None:  # not a streamed urllib3 answer over http.client (should not happen): bounded anyway
        return _read_plain(response, limit=limit, seconds=seconds)
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    normal_timeout = sock.gettimeout() if sock is not None else None
    deadline = time.monotonic() + seconds
    chunks: list[bytes] = []
    received = 0
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BodyLimitExceeded(f"the body did not arrive within {seconds:.0f} s")
            if sock is not None:
                sock.settimeout(left if normal_timeout is None else min(left, normal_timeout))
            try:
                chunk = reader.read1(min(64 * 1024, limit + 1 - received))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise BodyLimitExceeded(f"the body did not arrive within {seconds:.0f} s") from None
                raise
            if not chunk:
                break
            received += len(chunk)
            if received > limit:
                raise BodyLimitExceeded(f"a body of more than the {limit} bytes we read")
            chunks.append(chunk)
    finally:
        if sock is not None:
            try:
                sock.settimeout(normal_timeout)
            except OSError:
                pass
    if reader.length == 0 and not reader.isclosed():
        reader.read()  # read1 never marks a body complete at its end (read and readinto do): mark it
    if reader.isclosed():
        response.raw.release_conn()
    return b"".join(chunks)


def _read_plain(response: requests.Response, *, limit: int, seconds: float) -> bytes:
    deadline = time.monotonic() + seconds
    chunks: list[bytes] = []
    received = 0
    for chunk in response.iter_content(64 * 1024):
        received += len(chunk)
        if received > limit:
            raise BodyLimitExceeded(f"a body of more than the {limit} bytes we read")
        if time.monotonic() > deadline:
            raise BodyLimitExceeded(f"the body did not arrive within {seconds:.0f} s")
        chunks.append(chunk)
    return b"".join(chunks)


def drain_error_body(response: requests.Response) -> None:
    """Read a small error answer's body so that its connection can serve the next request.

    A body too large or too slow, or a failing connection, is simply given up: the connection is then
    closed with the response instead of reused.
    """
    try:
        read_body(response, limit=constants.ERROR_BODY_MAX, seconds=constants.ERROR_BODY_DEADLINE)
    except (BodyLimitExceeded, *TRANSPORT_ERRORS):
        pass
