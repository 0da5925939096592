"""``hfmirror demo``: the whole story, offline, in well under a minute.

1. Make a small BERT with ``transformers`` (random weights, a real tokenizer, real file formats).
2. Serve it with the Hub-compatible server on a free loopback port, each connection capped in speed
   as a real mirror would.
3. Download it with ``hfmirror download`` in a separate process, and ``kill -9`` that process half-way.
4. Download again: it resumes from the saved ranges, and the server's byte count shows that almost
   nothing was fetched twice. Every file is verified before it gets its final name.
5. Run ``hfmirror compare`` on the result: our from-scratch BERT against transformers, stage by stage.
6. Write that comparison as an HTML page (``hfmirror compare --html``) and say where it is.

Every step checks what it then reports: a download process that fails (its stderr is shown), a kill
that came too late, a second run that did not resume, a comparison that does not pass, or a page
that was not written (or does not hold the verdict) each end the demo with a line saying ``FAILED``
and what went wrong, never with a claim it did not check.
"""

from __future__ import annotations

import html
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["run_demo"]

REPO_ID = "demo/bert-small"
WEIGHTS = "model.safetensors"
# bytes/s per connection: the download's 4 connections take about 5 s for the 43 MB file, so the kill
# has seconds, not a fraction of one, to land between KILL_AT and the end on a busy machine.
PER_CONNECTION_RATE = 2_000_000
KILL_AT = 0.45
REPORT_NAME = "hfmirror-demo-report.html"  # written in the current folder unless told otherwise

_WORDS = (
    "the a cat dog sat on mat hello world is good bad ran runs quick brown fox jumps over lazy "
    "model weights mirror download resume attention query key value layer norm token"
).split()
DEMO_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _WORDS + ["##s", "##ing", "##ed", "."]
DEMO_TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog.", "attention is good"]


def _mib(count: float) -> str:
    return f"{count / 2**20:.1f} MiB"


def make_demo_model(folder: Path) -> Path:
    """A BERT of about 43 MB (6 layers, hidden 384, 6 heads), saved with its tokenizer."""
    import torch
    import transformers

    config = transformers.BertConfig(
        vocab_size=len(DEMO_VOCAB),
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        intermediate_size=1536,
        max_position_embeddings=128,
        hidden_act="gelu",
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer = transformers.BertTokenizer(vocab={token: i for i, token in enumerate(DEMO_VOCAB)})
    tokenizer.save_pretrained(folder)
    return folder


def download_command(url: str, cache: Path) -> list[str]:
    """The first download, as a user would type it (run in another process, to be killed)."""
    return [
        sys.executable,
        "-m",
        "hfmirror",
        "download",
        REPO_ID,
        "--endpoint",
        url,
        "--cache-dir",
        str(cache),
        "--connections",
        "4",
        "-q",
    ]


def _same_code_environment() -> dict[str, str]:
    """The environment for a child process that must import this very hfmirror.

    ``python -m`` puts the current folder first on ``sys.path``: run from a folder holding a folder named
    ``hfmirror`` (a clone's parent), the child would import that instead, and fail. So the child runs in
    the demo's own folder, with PYTHONSAFEPATH (Python 3.11+: no current folder on the path at all), and
    with the folder this package was imported from first on PYTHONPATH.
    """
    package_parent = str(Path(__file__).resolve().parent.parent)
    paths = [package_parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONSAFEPATH": "1"}


def _end_of_file(path: Path, limit: int = 64 * 1024) -> str:
    """The last ``limit`` bytes of a file, as text (a child's stderr has no bound of its own)."""
    with path.open("rb") as file:
        file.seek(max(0, path.stat().st_size - limit))
        return file.read().decode("utf-8", errors="replace")


def _tail(text: str, lines: int = 5) -> str:
    return "\n".join("   | " + line for line in text.strip().splitlines()[-lines:]) or "   | (nothing)"


def _write_page(page: Path, report: Any) -> str | None:
    """Write the report's page and read it back; what went wrong, or None if the page is there and
    says the verdict."""
    from compare.html_report import write_report

    from .errors import HfMirrorError

    try:
        write_report(page, report)
        written = page.read_text(encoding="utf-8")
    except (HfMirrorError, OSError) as error:
        return str(error)
    if html.escape(report.verdict(), quote=True) not in written:
        return f"{page} does not hold the comparison's verdict"
    return None


def run_demo(
    workdir: str | Path | None = None,
    *,
    keep: bool = False,
    echo: Callable[[str], None] = print,
    report_path: str | Path | None = None,
) -> bool:
    """Run the demo; True if every step did what it says (the comparison and its page included).
    ``echo`` receives each line of the story; ``report_path`` is where the page goes (default:
    ``REPORT_NAME`` in the current folder, which outlives the demo's temporary folder)."""
    from compare.html_attention import MAX_DRAWN_CELLS
    from compare.runner import compare_model_dir

    from .download import download
    from .hashing import sha256_of_file
    from .layout import CacheLayout
    from .listing import RemoteFile, RepoListing
    from .resume import ResumeState
    from .server.app import ServerThread, create_app
    from .server.faults import FaultInjector, FaultPlan

    base = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="hfmirror-demo-"))
    served, cache = base / "served", base / "cache"
    started = time.monotonic()
    try:
        echo(f"1. Making a small BERT with transformers in {served / REPO_ID}")
        model_dir = make_demo_model(served / REPO_ID)
        size = (model_dir / WEIGHTS).stat().st_size
        oid = sha256_of_file(model_dir / WEIGHTS)

        plan = FaultPlan()
        plan.limit_bandwidth(PER_CONNECTION_RATE, path=f"*/{WEIGHTS}")
        app = FaultInjector(create_app(served, state_dir=base / "server-state"), plan)
        with ServerThread(app) as server:
            echo(f"2. Serving it at {server.url} (each connection capped at {_mib(PER_CONNECTION_RATE)}/s)")

            echo(
                f"3. Downloading {REPO_ID} in another process, and killing it (kill -9) at about "
                f"{KILL_AT:.0%} of {WEIGHTS} ({_mib(size)})"
            )
            # Where the download keeps the weights' resume state: a blob's place needs no commit id.
            weights = RemoteFile(WEIGHTS, size, oid)
            pinned = RepoListing(REPO_ID, "model", "main", "", (weights,))
            state_file = CacheLayout(pinned, cache).state_path(weights)
            # Its stderr goes to a file: a pipe nobody reads while we poll would fill and stop it.
            errors_path = base / "first-download.stderr"
            with errors_path.open("w", encoding="utf-8") as errors_file:
                process = subprocess.Popen(
                    download_command(server.url, cache),
                    stdout=subprocess.DEVNULL,
                    stderr=errors_file,
                    cwd=base,
                    env=_same_code_environment(),
                )
                deadline = time.monotonic() + 60
                while ResumeState.saved_bytes(state_file) < KILL_AT * size and process.poll() is None:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
                ended_by_itself = process.poll() is not None
                process.kill()
                process.wait()
            errors = _end_of_file(errors_path)
            kept = ResumeState.saved_bytes(state_file)
            sent_before = plan.bytes_sent(f"*/{WEIGHTS}")
            if ended_by_itself:
                echo(f"FAILED: the download ended (exit {process.returncode}) before it could be killed:")
                echo(_tail(errors))
                return False
            if kept <= 0:
                echo("FAILED: the download saved nothing in 60 s before it was killed; its stderr said:")
                echo(_tail(errors))
                return False
            echo(f"   killed: {_mib(kept)} saved with their ranges; the server had sent {_mib(sent_before)}")

            echo("4. Downloading again: it resumes, fetching only what is missing, and verifies every file")
            result = download(REPO_ID, endpoints=[server.url], cache_dir=cache, progress=True)
            sent_total = plan.bytes_sent(f"*/{WEIGHTS}")
            echo(f"   {result.describe()}")
            resumed = {f.path: f.resumed_bytes for f in result.files}.get(WEIGHTS, 0)
            if resumed <= 0:
                echo(f"FAILED: the second download did not resume {WEIGHTS}: it started again from zero")
                return False
            echo(
                f"   {WEIGHTS}: {_mib(size)} file, {_mib(resumed)} kept from the first run; "
                f"{_mib(sent_total)} sent by the server in both runs ({sent_total / size:.3f}x the file size)"
            )
            echo(f"   files are in {result.path}")

        echo("5. Comparing our from-scratch BERT with transformers on the downloaded checkpoint")
        report = compare_model_dir(
            result.path,
            texts=DEMO_TEXTS,
            model_name=REPO_ID,
            keep_attention=True,
            attention_cells=MAX_DRAWN_CELLS,
        )
        echo(report.render_table())
        if not report.passed:
            echo("FAILED: our BERT does not match transformers (see the first failing stage above)")
            return False

        page = Path(report_path) if report_path is not None else Path.cwd() / REPORT_NAME
        echo(f"6. Writing the comparison as a page (hfmirror compare --html): {page.absolute()}")
        problem = _write_page(page, report)
        if problem:
            echo(f"FAILED: the HTML report was not written: {problem}")
            return False
        echo(
            f"   {page.stat().st_size / 1e6:.2f} MB, self-contained: open it in any browser, offline "
            "(the error of every stage, and each head's attention on the first text)"
        )
        echo(f"Demo finished in {time.monotonic() - started:.1f}s. Report: {page.absolute()}")
        return True
    finally:
        if workdir is None and not keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            echo(f"(work folder kept: {base})")
