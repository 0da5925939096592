"""Hostile mirrors and a new user's first hour (issue 13): each fault found, as a test.

The misbehaving endpoint is :class:`tests.hostile.HostileServer` (answers scripted byte by byte);
the healthy one is the real server from the fixtures. A test here fails on the code before the fix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from hfmirror import constants
from hfmirror.cli import cli
from hfmirror.download import download
from hfmirror.endpoints import EndpointPool, redact_url
from hfmirror.errors import (
    EntryNotFoundError,
    NetworkError,
    RepoNotFoundError,
    UnsafeListingError,
    UnsafePathError,
)
from hfmirror.listing import list_repo
from hfmirror.paths import validate_relative_path
from hfmirror.policy import Asked, error_for_answer
from hfmirror.verify import verify
from tests.hostile import (
    Exchange,
    HostileServer,
    close,
    endless,
    fake_repo,
    forward,
    hang,
    html,
    json_body,
    status,
    trickle,
)
from tests.servers import free_port, start_process
from tests.support import files_under, make_repo, run_cli

REPO = Path(__file__).resolve().parent.parent
NESTED = "tiny/nested"  # README.md, a/b/c.txt, a/top.txt, config.json, data/big.bin (see conftest)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "BACKOFF_BASE", 0.01)
    monkeypatch.setattr(constants, "BACKOFF_MAX", 0.05)


def finishes(call: Callable[[], Any], within: float = 60.0) -> Any:
    """Run ``call`` and return (or raise) what it does; fail if it is still going after ``within`` s.

    A bound on a wait, not a timing check: the calls here take a second or two when they work, and
    would hang for many minutes (or for ever) on the faults they guard against.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within)
    assert not thread.is_alive(), f"still running after {within:.0f} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def run_model_download(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "model_download.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=300,
    )


# ======================================================================== security: names


@pytest.mark.parametrize(
    "name",
    [
        ".git",
        ".git/config",
        "sub/.git/config",
        "a/b/.git/HEAD",
        ".cache/x",
        "a/.cache/x",
        ".GIT/config",
        ".git./x",
    ],
)
def test_git_and_cache_are_refused_as_any_segment(name: str) -> None:
    with pytest.raises(UnsafePathError, match="reserved"):
        validate_relative_path(name)


@pytest.mark.parametrize(
    "name", [".gitattributes", ".github/workflows/ci.yml", "a/.cachex", "git/x", "x.git"]
)
def test_names_that_merely_look_alike_are_fine(name: str) -> None:
    assert validate_relative_path(name) == name


def test_a_segment_longer_than_a_file_name_can_be_is_refused() -> None:
    assert validate_relative_path("a" * 255) == "a" * 255
    with pytest.raises(UnsafePathError, match="255 bytes"):
        validate_relative_path("d/" + "a" * 256)
    with pytest.raises(UnsafePathError, match="255 bytes"):
        validate_relative_path("日" * 86)  # 258 bytes in UTF-8


FSMONITOR = b"[core]\n\tfsmonitor = touch /tmp/pwned-by-mirror\n"


@pytest.mark.parametrize("planted", [".git/config", "sub/.git/config"])
def test_a_mirror_cannot_plant_a_git_repository(tmp_path: Path, planted: str) -> None:
    target = tmp_path / "target"
    (target / ".git").mkdir(parents=True)
    real_config = b"[core]\n\trepositoryformatversion = 0\n"
    (target / ".git" / "config").write_bytes(real_config)
    files = {"README.md": b"# hello\n", ".git/HEAD": b"ref: refs/heads/main\n", planted: FSMONITOR}
    with HostileServer() as bad:
        fake_repo(bad, "evil/repo", files)
        with pytest.raises(UnsafeListingError, match="reserved"):
            download("evil/repo", endpoints=[bad.url], local_dir=target, progress=False)
        assert not bad.requests("*/resolve/*"), "a byte was asked for before the listing was refused"
        out = run_model_download(
            "--repo_id", "evil/repo", "--endpoint", bad.url, "--local_dir", str(target), cwd=tmp_path
        )
    assert out.returncode == 8, out.stderr
    assert "Traceback" not in out.stderr
    assert (target / ".git" / "config").read_bytes() == real_config
    assert not (target / "sub").exists() and not (target / "README.md").exists()


# ======================================================================== security: credentials


@pytest.mark.slow
def test_endpoint_credentials_are_never_shown(hub_server, tmp_path: Path) -> None:
    secret = "pa55w0rd-never-shown"
    with_password = hub_server.url.replace("http://", f"http://user:{secret}@")
    dead = f"http://user:{secret}@127.0.0.1:{free_port()}"
    cache = str(tmp_path / "cache")

    out = run_cli("download", NESTED, "--endpoint", with_password, "--cache-dir", cache, "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["endpoint"] == redact_url(with_password) and "***@127.0.0.1" in summary["endpoint"]
    assert secret not in out.stdout + out.stderr
    pool = EndpointPool.from_urls([with_password], max_concurrency=2, failover_after=3)
    with requests.Session() as session:
        listing = list_repo(pool, NESTED, repo_type="model", revision="main", token=None, session=session)
    assert secret not in repr(listing)

    # The summary line, and the notice of a failover from an endpoint with a password.
    out = run_cli("download", NESTED, "--endpoint", dead, "--endpoint", with_password, "--cache-dir", cache)
    assert out.returncode == 0, out.stderr
    assert "switching to" in out.stderr and secret not in out.stdout + out.stderr

    # An error naming the endpoint, and a malformed one.
    out = run_cli("download", NESTED, "--endpoint", dead, "--cache-dir", str(tmp_path / "empty"))
    assert out.returncode == 5 and "***@127.0.0.1" in out.stderr and secret not in out.stderr, out.stderr
    out = run_cli("download", NESTED, "--endpoint", f"ftp://user:{secret}@host", "--cache-dir", cache)
    assert out.returncode == 2 and secret not in out.stderr, out.stderr


@pytest.mark.slow
def test_upstream_credentials_are_never_shown_by_serve(hub_server, tmp_path: Path) -> None:
    """``serve --upstream`` with a password in the upstream URLs: neither its start-up lines nor its
    log (a failover from a dead upstream, a fill from the live one) show the password."""
    secret = "pa55w0rd-never-shown"
    dead = f"http://user:{secret}@127.0.0.1:{free_port()}"
    live = hub_server.url.replace("http://", f"http://user:{secret}@")
    argv = [sys.executable, "-m", "hfmirror", "serve", str(tmp_path / "cache"), "--port", "0"]
    argv += ["--upstream", dead, "--upstream", live, "--state-dir", str(tmp_path / "state")]
    with start_process(argv, tmp_path / "serve.log", r"serving on (http://127\.0\.0\.1:\d+)") as mirror:
        result = download(NESTED, endpoints=[mirror.url], cache_dir=tmp_path / "client", progress=False)
        assert files_under(result.path) == files_under(hub_server.root / NESTED)
    log = mirror.log()
    assert "filling from http://***@127.0.0.1:" in log, log
    assert secret not in log, log


def test_a_token_found_on_this_machine_goes_only_where_the_user_chose(
    hub_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_TOKEN and the login token are for huggingface.co: a default mirror the user never named
    must not receive them (every user's Hub token would reach it). A --token, or a mirror the user
    chose, is another matter."""
    from huggingface_hub import constants as hub_constants

    secret = "hf_stored_token_meant_for_the_hub"

    def tokens_since(server: HostileServer, first: int) -> set[str | None]:
        return {seen.headers.get("authorization") for seen in server.requests()[first:]}

    with HostileServer(behind=hub_server.url) as mirror, HostileServer(behind=hub_server.url) as hub:
        monkeypatch.setattr(constants, "DEFAULT_ENDPOINTS", (mirror.url, hub.url))  # as if hf-mirror.com
        monkeypatch.setattr(constants, "HUB_ENDPOINT", hub.url)  # as if huggingface.co

        # HF_TOKEN, the default endpoints: the mirror serves the whole run, and never sees the token.
        monkeypatch.setenv("HF_TOKEN", secret)
        result = download(NESTED, cache_dir=tmp_path / "a", progress=False)
        assert result.endpoint == mirror.url and len(mirror.requests()) > 1
        assert tokens_since(mirror, 0) == {None} and not hub.requests()

        # A mirror the user chose (HF_ENDPOINT, or --endpoint) gets it; any endpoint gets a --token.
        asked = len(mirror.requests())
        chosen = CliRunner().invoke(
            cli,
            ["download", NESTED, "--cache-dir", str(tmp_path / "b"), "-q"],
            env={"HF_ENDPOINT": mirror.url},
        )
        assert chosen.exit_code == 0, chosen.output
        assert tokens_since(mirror, asked) == {f"Bearer {secret}"}
        asked = len(mirror.requests())
        download(NESTED, token="hf_given", cache_dir=tmp_path / "c", progress=False)
        assert tokens_since(mirror, asked) == {"Bearer hf_given"}

        # The login token file, and the default mirror says the repo is gated: its "no" to a request
        # without the token is not final; huggingface.co is asked, with the token.
        monkeypatch.delenv("HF_TOKEN")
        token_file = tmp_path / "stored-token"
        token_file.write_text(secret)
        monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(token_file))
        mirror.answer("/api/*", json_body({"error": "gated"}, 403, {"X-Error-Code": "GatedRepo"}))
        asked = len(mirror.requests())
        result = download(NESTED, cache_dir=tmp_path / "d", progress=False)
        assert result.endpoint == hub.url and files_under(result.path) == files_under(
            hub_server.root / NESTED
        )
        assert tokens_since(hub, 0) == {f"Bearer {secret}"} and tokens_since(mirror, asked) == {None}


# ======================================================================== bounded listings


def test_a_listing_that_never_ends_is_cut_off(hub_server, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(constants, "LISTING_MAX_BYTES", 1024 * 1024)
    with HostileServer() as bad:
        bad.answer("/api/*", endless())
        result = finishes(
            lambda: download(NESTED, endpoints=[bad.url, hub_server.url], cache_dir=tmp_path, progress=False)
        )
        sent = bad.requests("/api/*")[0].bytes_sent
    assert result.endpoint == hub_server.url and result.failovers == 1
    # What went out before we hung up: the cap, plus what socket buffers hold; not the endless rest.
    assert sent < 32 * 1024 * 1024, sent
    assert files_under(result.path) == files_under(hub_server.root / NESTED)


def test_a_listing_trickled_a_byte_at_a_time_is_cut_off(hub_server, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(constants, "LISTING_DEADLINE", 1.0)
    listing = json.dumps({"sha": "1" * 40, "siblings": []}).encode().ljust(5000)  # 5000 s at 1 byte/s
    with HostileServer() as bad:
        bad.answer("/api/*", trickle(listing, every=0.05))
        result = finishes(
            lambda: download(NESTED, endpoints=[bad.url, hub_server.url], cache_dir=tmp_path, progress=False)
        )
    assert result.endpoint == hub_server.url
    left = {e["url"]: e["abandoned"] for e in result.endpoints}[bad.url]
    assert "did not arrive within 1 s" in left, result.endpoints


@pytest.mark.parametrize("body", ["endless", "trickled"])
@pytest.mark.parametrize("asked", ["/api/*", "*/resolve/*/a/top.txt"], ids=["listing", "file"])
def test_an_error_answer_whose_body_never_ends_is_given_up(
    hub_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, asked: str, body: str
) -> None:
    """A 503's body is read only so that its connection can serve again: bounded in size and time,
    then the connection is dropped and the request retried on a new one."""
    monkeypatch.setattr(constants, "ERROR_BODY_DEADLINE", 0.5)
    if body == "endless":
        answer = endless(code=503)
    else:
        answer = trickle(b"x" * 10_000, every=0.05, code=503)  # 500 s to send in full
    with HostileServer(behind=hub_server.url) as bad:
        bad.answer(asked, answer, methods=("GET",), times=1)
        result = finishes(lambda: download(NESTED, endpoints=[bad.url], cache_dir=tmp_path, progress=False))
        seen = bad.requests(asked, "GET")
    assert files_under(result.path) == files_under(hub_server.root / NESTED)
    assert [s.status for s in seen[:2]] == [503, 200] and seen[1].peer != seen[0].peer, seen
    # What went out before we hung up: ERROR_BODY_MAX plus what socket buffers hold, not the rest.
    assert seen[0].bytes_sent < 32 * 1024 * 1024, seen[0].bytes_sent


# ======================================================================== failover that sticks


def test_a_mirror_answering_429_to_everything_is_left_for_the_whole_run(
    fault_server, faults, tmp_path
) -> None:
    with HostileServer() as bad:
        bad.answer("*", status(429, {"Retry-After": "0"}, b'{"error": "slow down"}'))
        result = finishes(
            lambda: download(
                NESTED, endpoints=[bad.url, fault_server.url], cache_dir=tmp_path, progress=False
            )
        )
        listings_asked = len(bad.requests("/api/*"))
        files_asked = len(bad.requests("*/resolve/*"))
    assert files_under(result.path) == files_under(fault_server.root / NESTED)
    assert listings_asked == constants.RATE_LIMITED_FAILOVER_AFTER and files_asked == 0
    assert result.failovers == 1 and result.endpoint == fault_server.url
    assert result.rate_limited == listings_asked
    outcome = {e["url"]: e for e in result.to_dict()["endpoints"]}
    assert outcome[bad.url]["rate_limited"] == listings_asked and "429" in outcome[bad.url]["abandoned"]
    assert f"endpoint {fault_server.url}" in result.describe() and f"left: {bad.url}" in result.describe()


def test_a_dead_first_endpoint_costs_only_the_listing_its_tries(fault_server, faults, tmp_path) -> None:
    with HostileServer() as bad:
        bad.answer("*", close())
        result = download(NESTED, endpoints=[bad.url, fault_server.url], cache_dir=tmp_path, progress=False)
        asked = len(bad.requests())
    assert files_under(result.path) == files_under(fault_server.root / NESTED)
    # The listing failed over after FAILOVER_AFTER tries; no file asked the dead endpoint again.
    assert asked == constants.FAILOVER_AFTER, asked
    assert result.endpoint == fault_server.url and result.failovers == 1


# ======================================================================== answers that are not the Hub's


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (html(), "an HTML page"),
        (status(200, {"Content-Type": "application/json"}, b"{not json"), "not JSON"),
        (json_body({"id": "x", "siblings": []}), "without a valid commit id"),
        (json_body({"sha": "1" * 40 + "\n", "siblings": []}), "without a valid commit id"),  # a folder name
        (json_body([1, 2, 3]), "not a JSON object"),
        (json_body({"sha": "1" * 40, "siblings": "all of them"}), "not a list"),
        # A mirror that ignores ?blobs=true: names without sizes or checksums, nothing to verify.
        (json_body({"sha": "1" * 40, "siblings": [{"rfilename": "README.md"}]}), "without a valid size"),
        (
            json_body({"sha": "1" * 40, "siblings": [{"rfilename": "README.md", "size": 39}]}),
            "without a checksum",
        ),
        (json_body({"sha": "1" * 40, "siblings": ["README.md"]}), "a file entry that is not an object"),
    ],
    ids=[
        "html",
        "not-json",
        "no-commit",
        "commit-and-a-newline",
        "not-an-object",
        "siblings-not-a-list",
        "no-sizes",
        "no-checksums",
        "entry-not-an-object",
    ],
)
def test_a_listing_that_is_not_a_hub_answer_fails_over(hub_server, tmp_path: Path, answer, said: str) -> None:
    with HostileServer() as bad:
        bad.answer("/api/*", answer)
        result = download(NESTED, endpoints=[bad.url, hub_server.url], cache_dir=tmp_path, progress=False)
        with pytest.raises(NetworkError, match=said):  # with nowhere else to go, a clear network error
            download(NESTED, endpoints=[bad.url], cache_dir=tmp_path / "alone", progress=False)
    assert result.endpoint == hub_server.url
    assert said in {e["url"]: e["abandoned"] for e in result.endpoints}[bad.url]


def test_an_html_page_for_the_listing_exits_5_not_8(tmp_path: Path) -> None:
    with HostileServer() as bad:
        bad.answer("*", html())
        out = run_cli("download", NESTED, "--endpoint", bad.url, "--cache-dir", str(tmp_path))
    assert out.returncode == 5, out.stderr
    assert "HTML page" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_a_file_of_another_size_is_not_the_file(fault_server, faults, tmp_path: Path) -> None:
    with HostileServer(behind=fault_server.url) as bad:
        bad.answer("*/resolve/*/config.json", html("<html>login</html>"))
        result = download(NESTED, endpoints=[bad.url, fault_server.url], cache_dir=tmp_path, progress=False)
    assert files_under(result.path) == files_under(fault_server.root / NESTED)
    assert result.failovers == 1 and result.verify_failures == 0


# ======================================================================== not found here, found there


REPO_NOT_FOUND = json_body({"error": "Repository not found"}, 401, {"X-Error-Code": "RepoNotFound"})
ENTRY_NOT_FOUND = json_body({"error": "Entry not found"}, 404, {"X-Error-Code": "EntryNotFound"})


def test_a_repo_missing_on_the_first_mirror_is_asked_of_the_next(hub_server, tmp_path: Path) -> None:
    with HostileServer() as bad:
        bad.answer("/api/*", REPO_NOT_FOUND)
        result = download(NESTED, endpoints=[bad.url, hub_server.url], cache_dir=tmp_path, progress=False)
    assert result.endpoint == hub_server.url
    assert files_under(result.path) == files_under(hub_server.root / NESTED)


def test_a_file_missing_on_the_first_mirror_is_asked_of_the_next(fault_server, faults, tmp_path) -> None:
    with HostileServer(behind=fault_server.url) as bad:
        bad.answer("*/resolve/*/a/top.txt", ENTRY_NOT_FOUND)
        result = download(NESTED, endpoints=[bad.url, fault_server.url], cache_dir=tmp_path, progress=False)
        through_bad = {s.path.rsplit("/resolve/", 1)[1].split("/", 1)[1] for s in bad.requests("*/resolve/*")}
    assert files_under(result.path) == files_under(fault_server.root / NESTED)
    # Only that file went elsewhere: the run stayed with the first mirror for every other one.
    assert result.failovers == 0 and result.endpoint == bad.url
    assert through_bad == {"README.md", "a/b/c.txt", "a/top.txt", "config.json", "data/big.bin"}


def test_not_found_everywhere_names_what_each_endpoint_said(hub_server, tmp_path: Path) -> None:
    with HostileServer() as first, HostileServer() as second:
        first.answer("/api/*", REPO_NOT_FOUND)
        second.answer("/api/*", json_body({"error": "no"}, 404))
        with pytest.raises(RepoNotFoundError) as caught:
            download(NESTED, endpoints=[first.url, second.url], cache_dir=tmp_path, progress=False)
        out = run_cli(
            "download",
            NESTED,
            "--endpoint",
            first.url,
            "--endpoint",
            second.url,
            "--cache-dir",
            str(tmp_path),
        )
    message = str(caught.value)
    assert f"{first.url}: RepoNotFound (HTTP 401)" in message and f"{second.url}: HTTP 404" in message
    assert "--token" in message
    assert out.returncode == 3 and first.url in out.stderr and second.url in out.stderr


def test_a_file_missing_everywhere_names_each_endpoint(hub_server, tmp_path: Path) -> None:
    with HostileServer(behind=hub_server.url) as first, HostileServer(behind=hub_server.url) as second:
        for server in (first, second):
            server.answer("*/resolve/*/a/top.txt", ENTRY_NOT_FOUND)
        with pytest.raises(EntryNotFoundError) as caught:
            download(NESTED, endpoints=[first.url, second.url], cache_dir=tmp_path, progress=False)
    assert f"{first.url}: EntryNotFound (HTTP 404)" in str(caught.value)
    assert f"{second.url}: EntryNotFound (HTTP 404)" in str(caught.value)


def test_a_401_without_a_hub_error_code_means_the_same_to_the_listing_and_a_transfer(
    fault_server, faults, tmp_path: Path
) -> None:
    """The Hub answers 401 for a repo that does not exist as for one that is private: not found."""
    listing = Asked("org/x", "main", "http://e")
    transfer = Asked("org/x", "1" * 40, "http://e", filename="w.bin")
    assert (
        type(error_for_answer(401, {}, listing))
        is type(error_for_answer(401, {}, transfer))
        is RepoNotFoundError
    )
    faults.fail(401, path="/api/*", times=1)
    with pytest.raises(RepoNotFoundError, match="--token"):
        download(NESTED, endpoints=[fault_server.url], cache_dir=tmp_path, progress=False)
    faults.fail(401, path="*/resolve/*/config.json", times=1)
    with pytest.raises(RepoNotFoundError, match="--token"):
        download(NESTED, endpoints=[fault_server.url], cache_dir=tmp_path, progress=False)


# ======================================================================== waits, said and bounded


@pytest.mark.slow
def test_a_hanging_endpoint_is_left_and_the_wait_is_said(hub_server, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(constants, "LISTING_TIMEOUT", 1.0)
    monkeypatch.setattr(constants, "SILENCE_NOTICE_SECONDS", 0.3)
    with HostileServer() as bad:
        bad.answer("/api/*", hang())
        args = ["download", NESTED, "--endpoint", bad.url, "--endpoint", hub_server.url]
        loud = CliRunner().invoke(cli, [*args, "--cache-dir", str(tmp_path / "a")])
        quiet = CliRunner().invoke(cli, [*args, "--cache-dir", str(tmp_path / "b"), "-q"])
    assert loud.exit_code == 0 and quiet.exit_code == 0, loud.output + quiet.output
    assert f"still waiting for {bad.url}" in loud.stderr
    assert f"{bad.url} no answer within 1 s; switching to {hub_server.url}" in loud.stderr
    assert "waiting" not in quiet.stderr and "switching" not in quiet.stderr


@pytest.mark.slow
def test_a_long_wait_is_said_and_a_retry_after_beyond_the_limit_is_not_waited_out(
    hub_server, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(constants, "NOTICE_WAIT_SECONDS", 1.0)
    with HostileServer(behind=hub_server.url) as bad:
        bad.answer("/api/*", status(429, {"Retry-After": "2"}), times=1)
        told = CliRunner().invoke(
            cli, ["download", NESTED, "--endpoint", bad.url, "--cache-dir", str(tmp_path)]
        )
    assert told.exit_code == 0, told.output
    assert f"{bad.url} asked us to wait 2 s (HTTP 429)" in told.stderr

    with HostileServer() as bad:
        bad.answer("*", status(429, {"Retry-After": "3600"}))
        refused = finishes(
            lambda: CliRunner().invoke(
                cli, ["download", NESTED, "--endpoint", bad.url, "--cache-dir", str(tmp_path / "x")]
            )
        )
        moved = finishes(
            lambda: download(
                NESTED, endpoints=[bad.url, hub_server.url], cache_dir=tmp_path / "y", progress=False
            )
        )
    assert refused.exit_code == 5, refused.output
    assert "asked us to wait 3600 s (HTTP 429), more than the 300 s we wait" in refused.stderr
    assert moved.endpoint == hub_server.url and moved.failovers == 1


def quota_spent_for_a_day(base_url: str) -> Callable[[Exchange], None]:
    """Relay ``base_url``'s answers, each one saying the request quota is used up for 86400 s."""
    relay = forward(base_url)

    def answer(exchange: Exchange) -> None:
        send = exchange.body
        exchange.body = lambda code, headers, content: send(  # type: ignore[method-assign]
            code, {**headers, "RateLimit": '"api";r=0;t=86400'}, content
        )
        relay(exchange)

    return answer


def test_a_quota_announced_spent_for_longer_than_we_wait_is_not_waited_out(
    hub_server, tmp_path: Path
) -> None:
    # A file served (200) with word that no request is left for a day: the other files are not waited
    # for. One connection at a time, so that the second request is asked for after the first answer.
    with HostileServer() as bad:
        bad.answer("*", quota_spent_for_a_day(hub_server.url))
        args = ["download", NESTED, "--endpoint", bad.url, "--max-connections", "1"]
        refused = finishes(lambda: CliRunner().invoke(cli, [*args, "--cache-dir", str(tmp_path / "x")]))
        files_asked_of_bad = len(bad.requests("*/resolve/*"))
        moved = finishes(
            lambda: download(
                NESTED,
                endpoints=[bad.url, hub_server.url],
                cache_dir=tmp_path / "y",
                progress=False,
                max_connections=1,
            )
        )
    assert refused.exit_code == 5, refused.output
    assert "announced its request quota is used up for 86400 s, more than the 300 s we wait" in refused.stderr
    assert files_asked_of_bad == 1
    assert moved.endpoint == hub_server.url and moved.failovers == 1
    assert {f.status for f in verify(NESTED, cache_dir=tmp_path / "y").files} == {"ok"}


def test_a_long_wait_ends_at_once_on_ctrl_c(tmp_path: Path) -> None:
    lines: list[str] = []
    announced = threading.Event()
    command = [sys.executable, "-m", "hfmirror", "download", NESTED, "--cache-dir", str(tmp_path)]
    with HostileServer() as bad:
        bad.answer("*", status(429, {"Retry-After": "200"}))
        with subprocess.Popen(
            [*command, "--endpoint", bad.url], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        ) as process:

            def read_stderr() -> None:
                assert process.stderr is not None
                for line in process.stderr:
                    lines.append(line)
                    if "asked us to wait 200 s" in line:
                        announced.set()

            reader = threading.Thread(target=read_stderr, daemon=True)
            reader.start()
            try:
                assert announced.wait(60), "".join(lines)
                process.send_signal(signal.SIGINT)
                process.wait(30)  # a bound on the wait, far from the 200 s asked for
            finally:
                process.kill()
                reader.join(10)
    assert process.returncode == 130, "".join(lines)
    assert "interrupted" in "".join(lines)


# ======================================================================== offline: only what was asked


@pytest.mark.slow
def test_offline_answers_only_with_the_files_asked_for(hub_server, tmp_path: Path) -> None:
    download(
        NESTED, filenames=["config.json"], endpoints=[hub_server.url], cache_dir=tmp_path, progress=False
    )
    dead = f"http://127.0.0.1:{free_port()}"
    base = ["download", NESTED, "--cache-dir", str(tmp_path), "-q"]
    for how in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": dead}):
        out = run_cli(*base, "a/top.txt", env=how)
        assert out.returncode == 5 and "a/top.txt" in out.stderr, (how, out.stderr)
        out = run_cli(*base, env=how)  # the whole repo: the cache knows its listing, and lacks most of it
        assert out.returncode == 5 and "lacks what was asked for" in out.stderr, (how, out.stderr)
        out = run_cli(*base, "config.json", env=how)
        assert out.returncode == 0, out.stderr
        assert (Path(out.stdout.strip()) / "config.json").is_file()
    result = download(NESTED, include=["*.json"], endpoints=[dead], cache_dir=tmp_path, progress=False)
    assert [f.path for f in result.files] == ["config.json"]
    with pytest.raises(EntryNotFoundError, match="nope.txt"):  # the recorded listing says it does not exist
        download(NESTED, filenames=["nope.txt"], endpoints=[dead], cache_dir=tmp_path, progress=False)


def test_an_offline_dry_run_shows_what_is_here_and_what_is_missing(hub_server, tmp_path: Path) -> None:
    """A dry run only looks, offline too: it lists the commit's files (from the recorded listing),
    present or not, instead of failing; it is what `compare REPO_ID` plans its fetches with."""
    first = download(NESTED, endpoints=[hub_server.url], cache_dir=tmp_path, progress=False)
    download(
        NESTED,
        filenames=["config.json"],
        endpoints=[hub_server.url],
        cache_dir=tmp_path / "some",
        progress=False,
    )
    dead = f"http://127.0.0.1:{free_port()}"
    plan = download(NESTED, endpoints=[dead], cache_dir=tmp_path / "some", dry_run=True, progress=False)
    statuses = {f.path: f.status for f in plan.files}
    assert set(statuses) == {f.path for f in first.files}
    assert statuses.pop("config.json") == "present" and set(statuses.values()) == {"would-download"}
    with pytest.raises(NetworkError, match="lacks what was asked for"):  # not a dry run: still an error
        download(NESTED, endpoints=[dead], cache_dir=tmp_path / "some", progress=False)


def test_offline_is_honoured_with_a_local_dir_and_by_model_download(
    fault_server, faults, tmp_path: Path
) -> None:
    target = tmp_path / "dataroot" / "models" / "tiny" / "nested"
    first = download(NESTED, endpoints=[fault_server.url], local_dir=target, progress=False)
    faults.reset()
    offline = {"HF_HUB_OFFLINE": "1"}
    out = run_cli(
        "download", NESTED, "--endpoint", fault_server.url, "--local-dir", str(target), "-q", env=offline
    )
    assert out.returncode == 0 and out.stdout.strip() == str(first.path), out.stderr
    out = run_model_download(
        "--repo_id", NESTED, "--endpoint", fault_server.url, "--quiet", cwd=tmp_path, env=offline
    )
    assert out.returncode == 0 and out.stdout.strip() == str(target), out.stderr
    assert faults.records == [], "a request went out in offline mode"

    (target / "a" / "top.txt").unlink()
    out = run_model_download("--repo_id", NESTED, "--endpoint", fault_server.url, cwd=tmp_path, env=offline)
    assert out.returncode == 5 and "a/top.txt" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert faults.records == []


# ======================================================================== long names, storage errors


LONG_NAMES = {
    "a" * 251 + ".txt": b"long ascii name\n",
    "d/" + "日" * 85: b"long utf-8 name\n",
    "config.json": b"{}",
}


@pytest.mark.parametrize("layout", ["cache", "local-dir"])
def test_names_up_to_the_hubs_limit_work_in_both_layouts(hub_server, tmp_path: Path, layout: str) -> None:
    make_repo(hub_server.root, "limits/long-names", LONG_NAMES)
    where = {"cache_dir": tmp_path} if layout == "cache" else {"local_dir": tmp_path / "plain"}
    result = download("limits/long-names", endpoints=[hub_server.url], progress=False, **where)
    assert files_under(result.path) == LONG_NAMES
    again = download("limits/long-names", endpoints=[hub_server.url], progress=False, **where)
    assert {f.status for f in again.files} == {"present"}
    # verify finds each of them by its record, hashed name or not, and finds them right.
    checked = verify("limits/long-names", progress=False, **where)
    assert {f.path: f.status for f in checked.files} == dict.fromkeys(LONG_NAMES, "ok")


@pytest.mark.parametrize(
    "obstacle",
    [
        "a-folder-where-a-file-goes",
        "a-file-where-a-folder-goes",
        "a-link-loop-where-a-file-goes",
        "locks-blocked",
    ],
)
def test_os_errors_while_putting_files_in_place_are_storage_errors(
    hub_server, tmp_path: Path, obstacle: str
) -> None:
    target = tmp_path / "dataroot" / "models" / "tiny" / "nested"
    if obstacle == "a-folder-where-a-file-goes":
        (target / "config.json").mkdir(parents=True)
        args = ["--local-dir", str(target)]
    elif obstacle == "a-file-where-a-folder-goes":
        target.mkdir(parents=True)
        (target / "a").write_text("in the way")
        args = ["--local-dir", str(target)]
    elif obstacle == "a-link-loop-where-a-file-goes":  # checking whether the file is there fails
        target.mkdir(parents=True)
        (target / "config.json").symlink_to("config.json")
        args = ["--local-dir", str(target)]
    else:
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / ".locks").write_text("not a folder")
        args = ["--cache-dir", str(tmp_path / "cache")]
    out = run_cli("download", NESTED, "--endpoint", hub_server.url, "-q", *args)
    assert out.returncode == 7, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    if obstacle != "locks-blocked":
        out = run_model_download("--repo_id", NESTED, "--endpoint", hub_server.url, "--quiet", cwd=tmp_path)
        assert out.returncode == 7 and "Traceback" not in out.stderr, out.stderr
