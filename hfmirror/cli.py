"""The ``hfmirror`` command line. The only place where errors become messages and exit codes.

Exit codes (also in the README):

====  =====================================================================
0     success
1     ``compare`` found a stage that does not match; or an unexpected bug
2     bad input: usage errors, malformed repo id, unsafe names, unsupported model or checkpoint, an
      optional extra (``serve``, ``compare``, ``report``) that is not installed; ``serve``: a port
      already in use
3     not found: repository, revision or file, on every endpoint; or another definite 4xx answer
4     access denied: gated or private repository (try ``--token``)
5     network: no endpoint reachable or giving Hub answers, retries ran out, a Retry-After (or a
      spent quota's reset) over the limit; or offline without every file asked for
6     integrity: a file's size or checksum never matched; ``verify`` found a file that does not match
7     storage: no disk space, the target is not writable, or something on disk is in the way
8     the server sent a listing with unsafe names (outside the target, ``.git``, ``.cache``) or a
      name twice
130   interrupted (Ctrl-C); partial data is kept and a re-run resumes
====  =====================================================================

Heavy modules (torch, transformers, the server stack) are imported inside the commands that need
them, so ``hfmirror --help`` stays instant.

What the library wants a user to know while it runs (a long wait, a failover) it logs as a warning on
the ``hfmirror`` logger; :func:`notices_on_stderr` is what shows those, one line each, on stderr.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import (
    AccessDeniedError,
    BadInputError,
    CompareError,
    DownloadInterrupted,
    HfMirrorError,
    IntegrityError,
    MissingExtraError,
    NetworkError,
    RemoteError,
    StorageError,
    UnsafeListingError,
    UnsupportedModelError,
    WeightLoadError,
)
from .extras import require_extras

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_FOUND = 3
EXIT_ACCESS_DENIED = 4
EXIT_NETWORK = 5
EXIT_INTEGRITY = 6
EXIT_STORAGE = 7
EXIT_UNSAFE_LISTING = 8
EXIT_INTERRUPTED = 130

# Most specific first: the first class an error is an instance of decides its exit code.
_EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (UnsafeListingError, EXIT_UNSAFE_LISTING),
    (AccessDeniedError, EXIT_ACCESS_DENIED),
    (RemoteError, EXIT_NOT_FOUND),
    (BadInputError, EXIT_BAD_INPUT),
    (UnsupportedModelError, EXIT_BAD_INPUT),
    (WeightLoadError, EXIT_BAD_INPUT),
    (CompareError, EXIT_BAD_INPUT),
    (MissingExtraError, EXIT_BAD_INPUT),
    (NetworkError, EXIT_NETWORK),
    (IntegrityError, EXIT_INTEGRITY),
    (StorageError, EXIT_STORAGE),
    (DownloadInterrupted, EXIT_INTERRUPTED),
]


def exit_code_for(error: BaseException) -> int:
    """The documented exit code for an error (1 for anything unexpected)."""
    for error_class, code in _EXIT_CODES:
        if isinstance(error, error_class):
            return code
    return EXIT_MISMATCH


class _NoticeHandler(logging.Handler):
    """Writes each record as ``<prefix>: <message>`` on the stderr of the moment (above any progress bar)."""

    def __init__(self, prefix: str) -> None:
        super().__init__(logging.WARNING)
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(f"{self.prefix}: {record.getMessage()}", file=sys.stderr)
        except Exception:  # a notice must never break a download
            self.handleError(record)


@contextlib.contextmanager
def notices_on_stderr(enabled: bool, *, prefix: str = "hfmirror") -> Iterator[None]:
    """While the block runs, show the library's warnings on stderr; with ``enabled`` False (``-q``,
    ``--json``), show none, not even through Python's last-resort handler."""
    logger = logging.getLogger("hfmirror")
    handler: logging.Handler = _NoticeHandler(prefix) if enabled else logging.NullHandler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn hfmirror errors into one line on stderr and an exit code; tracebacks only with --debug.

    --debug adds the traceback and changes nothing else: scripts that look at the exit code get the
    documented one either way.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(click.get_current_context().find_root().params.get("debug"))
        try:
            return command(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            _fail("hfmirror: interrupted.", EXIT_INTERRUPTED, debug)
        except HfMirrorError as error:
            _fail(f"hfmirror: error: {error}", exit_code_for(error), debug)
        except Exception as error:  # a bug: still one line unless asked for more
            hint = "" if debug else " (re-run with --debug for details)"
            _fail(f"hfmirror: unexpected error: {type(error).__name__}: {error}{hint}", EXIT_MISMATCH, debug)

    return wrapper


def _fail(message: str, code: int, debug: bool) -> None:
    """Print the traceback of the error being handled (with --debug), then the message; exit."""
    if debug:
        traceback.print_exc(file=sys.stderr)
    click.echo(message, err=True)
    sys.exit(code)


def _needs_extras(*extras: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Before the command runs (and touches the network), check its extras are installed; if not,
    say which ``pip install`` fixes it (hfmirror.extras)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            require_extras(*extras)
            return command(*args, **kwargs)

        return wrapper

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hfmirror")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Download Hugging Face models through mirrors, resumably; serve them; and check a
    from-scratch transformer against the transformers library.

    \b
    Examples:
      hfmirror download Qwen/Qwen-7B
      hfmirror download bert-base-uncased config.json --local-dir ./bert
      hfmirror verify Qwen/Qwen-7B
      hfmirror serve ./models --port 8000
      hfmirror compare bert-base-uncased
      hfmirror demo
    """


# --------------------------------------------------------------------------------------- download

# Options several commands share.
_repo_type_option = click.option(
    "--repo-type",
    type=click.Choice(["model", "dataset"]),
    default="model",
    show_default=True,
    help="What kind of repository REPO_ID names.",
)
_cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Hugging Face cache folder "
    "[default: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub].",
)


@cli.command()
@click.argument("repo_id")
@click.argument("filenames", nargs=-1)
@click.option("--revision", default="main", show_default=True, help="Branch, tag or commit sha.")
@_repo_type_option
@click.option("--include", multiple=True, metavar="GLOB", help="Only files matching GLOB (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files matching GLOB (repeatable).")
@click.option(
    "--local-dir",
    type=click.Path(file_okay=False),
    help="Write plain files into DIR instead of the Hugging Face cache.",
)
@_cache_dir_option
@click.option(
    "--endpoint",
    "endpoints",
    multiple=True,
    metavar="URL",
    help="Mirror to use; repeat for failover order "
    "[default: HF_ENDPOINT, else https://hf-mirror.com then https://huggingface.co].",
)
@click.option(
    "--token",
    help="Access token, sent to every endpoint of the run [default: HF_TOKEN, else huggingface_hub's "
    "stored token, sent only to huggingface.co and to endpoints you name with --endpoint or HF_ENDPOINT].",
)
@click.option(
    "--max-workers", type=click.IntRange(1, 64), default=8, show_default=True, help="Files at once."
)
@click.option(
    "--connections",
    type=click.IntRange(1, 64),
    default=8,
    show_default=True,
    help="Most connections at once within one large file (more than one only if one is slow).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1, 256),
    default=16,
    show_default=True,
    help="Most connections at once to one mirror, shared by all files (--max-workers and "
    "--connections count within it).",
)
@click.option(
    "--stall-timeout",
    type=click.FloatRange(0.1, 3600),
    default=30.0,
    show_default=True,
    help="Seconds without a byte before a connection is dropped and resumed.",
)
@click.option("--dry-run", is_flag=True, help="Show what would be fetched, and what is already here.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars; only errors and the final path.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary as JSON.")
@_handle_errors
def download(
    repo_id: str,
    filenames: tuple[str, ...],
    revision: str,
    repo_type: str,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    local_dir: str | None,
    cache_dir: str | None,
    endpoints: tuple[str, ...],
    token: str | None,
    max_workers: int,
    connections: int,
    max_connections: int,
    stall_timeout: float,
    dry_run: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Download REPO_ID (or only FILENAMES from it), resuming whatever was left unfinished.

    Prints the snapshot (or --local-dir) path last on stdout.

    \b
    Examples:
      hfmirror download Qwen/Qwen-7B
      hfmirror download Qwen/Qwen-7B --include "*.json" --include "*.py"
      hfmirror download bert-base-uncased --local-dir ./bert --endpoint http://127.0.0.1:8000
      hfmirror download wikitext --repo-type dataset --dry-run
    """
    from .download import download as run_download

    with notices_on_stderr(not (quiet or as_json)):
        result = run_download(
            repo_id,
            filenames=list(filenames) or None,
            revision=revision,
            repo_type=repo_type,
            include=list(include) or None,
            exclude=list(exclude) or None,
            local_dir=local_dir,
            cache_dir=cache_dir,
            endpoints=list(endpoints) or None,
            token=token,
            max_workers=max_workers,
            connections=connections,
            max_connections=max_connections,
            stall_timeout=stall_timeout,
            dry_run=dry_run,
            progress=not (quiet or as_json),
        )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif not quiet:
        click.echo(result.describe(), err=True)
    if not as_json:
        click.echo(str(result.path))


# ----------------------------------------------------------------------------------------- verify


@cli.command()
@click.argument("repo_id", required=False)
@click.option(
    "--local-dir",
    type=click.Path(file_okay=False),
    help="Verify the files downloaded into DIR (with --local-dir) instead of the cache.",
)
@_repo_type_option
@click.option("--revision", help="Branch, tag or commit in the cache [default: main].")
@_cache_dir_option
@click.option("--repair", is_flag=True, help="Fetch again what is wrong or missing (needs the network).")
@click.option(
    "--endpoint",
    "endpoints",
    multiple=True,
    metavar="URL",
    help="With --repair: mirror to use; repeat for failover order [default: as for download].",
)
@click.option(
    "--token",
    help="With --repair: access token [default: HF_TOKEN, else the stored token; either is sent only "
    "to huggingface.co and to endpoints you name].",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar; print only problems and errors.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict on every file as JSON.")
@_handle_errors
def verify(
    repo_id: str | None,
    local_dir: str | None,
    repo_type: str,
    revision: str | None,
    cache_dir: str | None,
    repair: bool,
    endpoints: tuple[str, ...],
    token: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Hash the downloaded files of REPO_ID again (or of --local-dir DIR) and compare each with the
    checksum recorded when it was downloaded. Offline; exit 6 naming the files that do not match.

    In the cache a blob's name is its checksum and the snapshot's links say which files belong to the
    revision; in a local dir, .cache/huggingface/download/<file>.metadata records it. With --repair,
    what is wrong is removed and fetched again from the same commit, then verified once more.

    \b
    Examples:
      hfmirror verify Qwen/Qwen-7B
      hfmirror verify bert-base-uncased --revision v1.0 --json
      hfmirror verify --local-dir ./bert
      hfmirror verify bert-base-uncased --local-dir ./bert --repair
    """
    from .verify import repair as run_repair
    from .verify import verify as run_verify

    progress = not (quiet or as_json)
    report = run_verify(
        repo_id,
        local_dir=local_dir,
        repo_type=repo_type,
        revision=revision,
        cache_dir=cache_dir,
        progress=progress,
    )
    if repair and report.wrong:
        if not as_json:
            for line in report.problem_lines():
                click.echo(line, err=True)
            click.echo(f"repairing {len(report.wrong)} files...", err=True)
        report = run_repair(report, endpoints=list(endpoints) or None, token=token, progress=progress)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report.problem_lines(unchecked=not quiet):
            click.echo(line)
        if not quiet:
            click.echo(report.summary())
    if report.wrong:
        names = ", ".join(f.path for f in report.wrong[:10])
        more = f" and {len(report.wrong) - 10} more" if len(report.wrong) > 10 else ""
        hint = "" if repair else " (--repair fetches them again)"
        raise IntegrityError(f"{len(report.wrong)} files do not match their download: {names}{more}{hint}")


# ------------------------------------------------------------------------------------------ serve


@cli.command()
@click.argument("root", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free)."
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    help="Where remembered checksums are kept [default: ~/.cache/hfmirror].",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1, 1_000_000),
    default=1000,  # server.guard.DEFAULT_MAX_CONNECTIONS, not imported: --help stays light
    show_default=True,
    help="Most connections at once (lowered to fit the open-file limit); the longest-stalled go first.",
)
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    metavar="URL",
    help="Fill ROOT (a Hugging Face cache, made if missing) from this mirror; repeat for failover order.",
)
@click.option(
    "--revision-ttl",
    type=click.FloatRange(0, 86400 * 365),
    default=300.0,
    show_default=True,
    help="Seconds a branch stays pinned to a commit before the upstream is asked again.",
)
@click.option(
    "--upstream-timeout",
    type=click.FloatRange(0.1, 3600),
    default=10.0,
    show_default=True,
    help="Seconds a client waits on the upstream before a cached answer, or a 504.",
)
@click.option("--allow", multiple=True, metavar="GLOB", help="Serve only repos matching GLOB (repeatable).")
@click.option("--deny", multiple=True, metavar="GLOB", help="Never serve repos matching GLOB (repeatable).")
@click.option("--max-size", metavar="SIZE", help="Keep the cache under SIZE (e.g. 500G), evicting LRU files.")
@click.option(
    "--connections",
    type=click.IntRange(1, 64),
    default=8,
    show_default=True,
    help="Most upstream connections within one file being fetched.",
)
@click.option(
    "--serve-seeded-offline",
    is_flag=True,
    help="With the upstream unreachable, also serve snapshots another tool put in ROOT (may be gated).",
)
@_handle_errors
@_needs_extras("serve")
def serve(
    root: str,
    host: str,
    port: int,
    state_dir: str | None,
    max_connections: int,
    upstreams: tuple[str, ...],
    revision_ttl: float,
    upstream_timeout: float,
    allow: tuple[str, ...],
    deny: tuple[str, ...],
    max_size: str | None,
    connections: int,
    serve_seeded_offline: bool,
) -> None:
    """Serve the models under ROOT with the Hugging Face Hub's HTTP API.

    ROOT is a plain tree (ROOT/org/name/..., ROOT/datasets/org/name/..., ROOT/name/...) or a
    Hugging Face cache folder (models--org--name/snapshots/...). A folder right under ROOT (or
    ROOT/datasets) is a repo without an org when a file sits directly in it, else an org whose
    sub-folders are repos. Point clients at it with HF_ENDPOINT=http://HOST:PORT.

    With --upstream, ROOT is a Hugging Face cache that fills itself: what is not cached is fetched
    from the upstream once, streamed to the clients asking for it, and kept.

    \b
    Examples:
      hfmirror serve ./models
      hfmirror serve ~/.cache/huggingface/hub --host 0.0.0.0 --port 8080
      hfmirror serve /data/hf-cache --upstream https://hf-mirror.com --host 0.0.0.0 --max-size 2T
    """
    from .endpoints import redact_url
    from .server.runner import prepare_server

    mirror_only = {
        "--allow": allow,
        "--deny": deny,
        "--max-size": max_size,
        "--serve-seeded-offline": serve_seeded_offline,
    }
    if not upstreams:
        given = [name for name, value in mirror_only.items() if value]
        if given:
            raise BadInputError(f"{', '.join(given)} only apply with --upstream")
        if not Path(root).is_dir():
            raise BadInputError(f"not a folder: {root}")
        from .server.app import create_app

        app = create_app(root, state_dir=state_dir)
    else:
        from .server.eviction import parse_size
        from .server.mirror import create_mirror_app

        try:
            limit = parse_size(max_size) if max_size else None
        except ValueError as error:
            raise BadInputError(f"--max-size: {error}") from None
        app = create_mirror_app(
            root,
            list(upstreams),
            state_dir=state_dir,
            revision_ttl=revision_ttl,
            upstream_timeout=upstream_timeout,
            allow=list(allow),
            deny=list(deny),
            max_size=limit,
            connections=connections,
            serve_seeded_offline=serve_seeded_offline,
        )
    server = prepare_server(app, host=host, port=port, max_connections=max_connections)
    _announce_repos(root, server.app.state.store.discover(), filling=bool(upstreams))
    if upstreams:
        shown = ", ".join(redact_url(url) for url in upstreams)  # an upstream URL may hold user:password
        click.echo(f"hfmirror: filling from {shown}", err=True)
    click.echo(f"hfmirror: serving on {server.url} (clients: HF_ENDPOINT={server.url})", err=True)
    server.run()


def _announce_repos(root: str, repos: list[Any], *, filling: bool, shown: int = 20) -> None:
    """Say which repos ``serve`` found, so a wrong layout shows at once rather than as 404s."""
    if not repos and filling:
        click.echo(f"hfmirror: the cache {root} is empty so far", err=True)
        return
    if not repos:
        click.echo(
            f"hfmirror: warning: no repos found under {root}. Expected ROOT/org/name/<files>, "
            "ROOT/name/<files>, ROOT/datasets/org/name/<files>, or a Hugging Face cache "
            "(ROOT/models--org--name/snapshots/...).",
            err=True,
        )
        return
    click.echo(f"hfmirror: {len(repos)} repo{'s' if len(repos) != 1 else ''} under {root}:", err=True)
    for location in repos[:shown]:
        where = "cache" if location.layout == "cache" else "folder"
        click.echo(f"  {location.repo_type:<8} {location.repo_id}  ({where})", err=True)
    if len(repos) > shown:
        click.echo(f"  ... and {len(repos) - shown} more", err=True)


# ---------------------------------------------------------------------------------------- compare


def _register_compare() -> None:
    """Add ``compare`` with this module's error handling, leaving the imported command untouched."""
    import copy

    from .compare_command import compare

    command = copy.copy(compare)
    command.callback = _handle_errors(_needs_extras("compare")(compare.callback))
    cli.add_command(command)


_register_compare()


# ------------------------------------------------------------------------------------------- demo


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep the demo's files here.")
@click.option("--keep", is_flag=True, help="Keep the temporary folder afterwards.")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False),
    help="Where to write the comparison's HTML page [default: hfmirror-demo-report.html in the "
    "current folder].",
)
@_handle_errors
@_needs_extras("serve", "compare", "report")
def demo(workdir: str | None, keep: bool, html_path: str | None) -> None:
    """Run the whole story offline: make a small BERT, serve it, download it (killing the first
    download half-way and resuming it), compare our from-scratch BERT with transformers, and write
    that comparison as an HTML page.

    \b
    Example:
      hfmirror demo
    """
    from .demo import run_demo

    if not run_demo(workdir, keep=keep, echo=click.echo, report_path=html_path):
        sys.exit(EXIT_MISMATCH)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="hfmirror")


if __name__ == "__main__":
    main()
