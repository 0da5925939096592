"""The ``hfmirror`` command line as a whole: --debug, and optional extras that are not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def hfmirror(*args: str, hide: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``hfmirror ARGS`` in a real process, as if the packages in ``hide`` were not installed.

    ``sys.modules[name] = None`` is how Python marks a module as unimportable: ``import name`` then
    raises ModuleNotFoundError and ``importlib.util.find_spec(name)`` returns None, exactly as for a
    package that was never installed.
    """
    code = (
        "import sys\n"
        f"for name in {list(hide)!r}:\n"
        "    sys.modules[name] = None\n"
        "from hfmirror.cli import main\n"
        f"sys.argv = ['hfmirror', *{list(args)!r}]\n"
        "main()\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["download", "nobody/nothing"], 3, "not found"),
        (["download", "a/b/c"], 2, "malformed repo id"),
        (["verify", "nobody/nothing"], 3, "not in the cache"),
    ],
)
def test_debug_shows_the_traceback_and_keeps_the_exit_code(
    hub_server, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    where = ["--cache-dir", str(tmp_path)] + (["--endpoint", hub_server.url] if args[0] == "download" else [])
    plain = hfmirror(*args, *where)
    debug = hfmirror("--debug", *args, *where)
    assert plain.returncode == debug.returncode == code, (plain.stderr, debug.stderr)
    assert "Traceback" not in plain.stderr and "Traceback (most recent call last)" in debug.stderr
    assert (
        message in plain.stderr.strip().splitlines()[-1] and message in debug.stderr.strip().splitlines()[-1]
    )


@pytest.mark.parametrize(
    "args, hide, extra",
    [
        (["serve", "{tmp}"], ("uvicorn",), "serve"),
        (["serve", "{tmp}"], ("starlette",), "serve"),
        (["compare", "org/model", "--endpoint", "{dead}"], ("torch",), "compare"),
        (["compare", "{tmp}"], ("transformers", "safetensors"), "compare"),
        (["demo", "--workdir", "{tmp}/demo"], ("torch",), "compare"),
        (
            ["compare", "org/model", "--endpoint", "{dead}", "--html", "{tmp}/r.html"],
            ("matplotlib",),
            "report",
        ),
        (["compare", "{tmp}", "--html", "{tmp}/r.html"], ("PIL",), "report"),
        (["demo", "--workdir", "{tmp}/demo"], ("matplotlib",), "report"),
    ],
)
def test_a_missing_extra_says_which_pip_install_fixes_it(
    tmp_path: Path, args: list[str], hide: tuple[str, ...], extra: str
) -> None:
    # (An endpoint nobody listens on: had the command gone to the network first, it would exit 5.)
    args = [a.replace("{tmp}", str(tmp_path)).replace("{dead}", "http://127.0.0.1:9") for a in args]
    result = hfmirror(*args, hide=hide)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert f"pip install 'hfmirror[{extra}]'" in line and all(name in line for name in hide)
    assert not (tmp_path / "demo").exists() and not (tmp_path / "r.html").exists()  # refused at once


def test_model_download_py_debug_keeps_the_exit_code_too(hub_server, tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "model_download.py"), "--repo_id", "nobody/nothing"]
    command += ["--endpoint", hub_server.url, "--local_dir", str(tmp_path / "m")]
    plain = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert plain.returncode == debug.returncode == 3, (plain.stderr, debug.stderr)
    assert "Traceback" not in plain.stderr and "Traceback (most recent call last)" in debug.stderr
    assert "not found" in debug.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("entry", ["hfmirror download", "model_download.py"])
def test_a_real_download_imports_neither_torch_nor_transformers(
    hub_server, tmp_path: Path, entry: str
) -> None:
    """Not only --help: a whole download of a model (weights, config, tokenizer), as users run it,
    never imports torch or transformers (the downloader must work where they are not installed, and
    they would cost it seconds of start-up)."""
    model = tmp_path / "model"
    if entry == "hfmirror download":
        command = ["-m", "hfmirror", "download", "tiny/bert", "--endpoint", hub_server.url, "--quiet"]
        command += ["--local-dir", str(model)]
    else:
        command = [str(REPO / "model_download.py"), "--repo_id", "tiny/bert", "--endpoint", hub_server.url]
        command += ["--quiet", "--local_dir", str(model)]
    out = subprocess.run(
        [sys.executable, "-X", "importtime", *command],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (model / "model.safetensors").is_file() and (model / "config.json").is_file()
    # -X importtime writes "import time: self | cumulative | module" on stderr for every import.
    imported = {
        line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")
    }
    assert {"hfmirror.download", "requests"} <= imported  # the list is the download's own
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "transformers"))
    assert heavy == [], heavy
