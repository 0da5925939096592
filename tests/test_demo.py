"""`hfmirror demo` runs the whole story offline, says what happened, and checks what it says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

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
    # The page, where it says, in the folder it was started from (not the work folder it may delete).
    written = re.search(r"Report: (\S+)", text)
    assert written and Path(written.group(1)) == here / demo.REPORT_NAME, text
    page = BeautifulSoup(Path(written.group(1)).read_text(encoding="utf-8"), "html.parser")
    assert page.select_one("#verdict").get_text().startswith("PASS: all 27 stages match")
    assert "demo/bert-small" in page.select_one("dl.facts dd").get_text() and snapshot.name in page.get_text()
    assert [t.get_text() for t in page.select("#tokens .tok")] == ["[CLS]", "hello", "world", "[SEP]"]


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory: pytest.TempPathFactory):
    from compare.runner import compare_model_dir

    model = demo.make_demo_model(tmp_path_factory.mktemp("demo-model") / "bert")
    return compare_model_dir(model, texts=demo.DEMO_TEXTS, keep_attention=True, attention_cells=10_000)


def test_the_page_is_checked_after_it_is_written(demo_report, tmp_path: Path, monkeypatch) -> None:
    import compare.html_report

    assert demo._write_page(tmp_path / "report.html", demo_report) is None
    assert "cannot write the HTML report" in demo._write_page(tmp_path / "nowhere" / "r.html", demo_report)
    # A page that was written but is not this comparison's is no page at all.
    monkeypatch.setattr(compare.html_report, "write_report", lambda path, report: path.write_text("<p>"))
    assert "does not hold the comparison's verdict" in demo._write_page(tmp_path / "other.html", demo_report)


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
