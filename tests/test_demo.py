"""`hfmirror demo` runs the whole story offline, says what happened, and checks what it says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hfmirror import demo


@pytest.mark.slow
def test_demo_runs_offline_and_resumes_and_compares(tmp_path: Path) -> None:
    # Started as the `hfmirror` console script is (its own folder first on sys.path, not the current
    # one), from a folder holding a folder named `hfmirror` that Python would import instead of ours
    # (a clone's parent does, with an editable install): the demo's download process must still
    # import this hfmirror.
    script = tmp_path / "bin" / "hfmirror"
    script.parent.mkdir()
    script.write_text("import sys\nfrom hfmirror.cli import main\nsys.argv[0] = 'hfmirror'\nmain()\n")
    here = tmp_path / "projects"
    (here / "hfmirror").mkdir(parents=True)
    (here / "hfmirror" / "__init__.py").write_text("raise ImportError('the wrong hfmirror')\n")
    out = subprocess.run(
        [sys.executable, str(script), "demo", "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=here,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    kept = re.search(r"killed: ([\d.]+) MiB saved", text)
    assert kept and float(kept.group(1)) > 0, text
    ratio = re.search(r"\(([\d.]+)x the file size\)", text)
    # Resumed, not restarted: well under 1.5x, where a restart from zero would be about 1.45x or more.
    assert ratio and 1.0 <= float(ratio.group(1)) < 1.2, text
    assert "PASS: all" in text and "first failing" not in text and "FAILED" not in text
    snapshot = next((tmp_path / "work" / "cache").glob("models--demo--bert-small/snapshots/*"))
    assert (snapshot / "model.safetensors").is_symlink()


def test_a_download_step_that_fails_is_reported_as_a_failure(tmp_path: Path, monkeypatch) -> None:
    """The first download dies at once: the demo says so, shows why, and claims no kill or resume."""
    failing = [
        sys.executable,
        "-c",
        "import sys; sys.stderr.write('ImportError: no hfmirror here'); sys.exit(1)",
    ]
    monkeypatch.setattr(demo, "download_command", lambda url, cache: failing)
    lines: list[str] = []
    assert demo.run_demo(tmp_path, echo=lines.append) is False
    story = "\n".join(lines)
    assert "FAILED: the download ended (exit 1)" in story and "no hfmirror here" in story
    assert not re.search(r"killed: [\d.]+ MiB saved", story) and "4. Downloading again" not in story
