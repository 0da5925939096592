"""`hfmirror compare REPO_ID`: fetched with the downloader from the local mirror, then compared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hfmirror", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_compare_bert_base_uncased_through_the_mirror(hub_server, tmp_path: Path) -> None:
    """A small stand-in served as `bert-base-uncased` (no org, BertForMaskedLM keys with `bert.` prefix)."""
    out = run(
        "compare",
        "bert-base-uncased",
        "--endpoint",
        hub_server.url,
        "--cache-dir",
        str(tmp_path),
        "--text",
        "hello world",
        "--text",
        "the cat sat on the mat",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # A masked-LM checkpoint has no pooler weights, so there is no pooler stage to compare.
    assert "layer.0.attention" in out.stdout and "last_hidden_state" in out.stdout
    assert "PASS: all" in out.stdout
    assert (tmp_path / "models--bert-base-uncased" / "refs" / "main").is_file()

    # Second time: no network needed, the cache answers (HF_HUB_OFFLINE as huggingface_hub has it).
    out = run(
        "compare",
        "bert-base-uncased",
        "--cache-dir",
        str(tmp_path),
        "--json",
        env={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"},
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["passed"] is True and report["first_failing_stage"] is None
    assert report["model"] == "bert-base-uncased"
    assert {"torch", "transformers"} <= set(report["versions"])


def test_compare_with_hf_endpoint_and_an_unknown_repo(hub_server, tmp_path: Path) -> None:
    out = run("compare", "nobody/nothing", "--cache-dir", str(tmp_path), env={"HF_ENDPOINT": hub_server.url})
    assert out.returncode == 3
    assert "not found" in out.stderr and "Traceback" not in out.stderr
