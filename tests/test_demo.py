"""`hfmirror demo` runs the whole story offline and says what happened."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_offline_and_resumes_and_compares(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hfmirror", "demo", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    kept = re.search(r"killed: ([\d.]+) MiB saved", text)
    assert kept and float(kept.group(1)) > 0, text
    ratio = re.search(r"\(([\d.]+)x the file size\)", text)
    # Resumed, not restarted: well under 1.5x, where a restart from zero would be about 1.45x or more.
    assert ratio and 1.0 <= float(ratio.group(1)) < 1.2, text
    assert "PASS: all" in text and "first failing" not in text
    snapshot = next((tmp_path / "cache").glob("models--demo--bert-small/snapshots/*"))
    assert (snapshot / "model.safetensors").is_symlink()
