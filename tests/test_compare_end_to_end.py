"""`hfmirror compare REPO_ID`: fetched with the downloader from the local mirror, then compared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hfmirror.server.app import ServerThread, create_app
from tests.test_compare_support import convert_qwen2_to_qwen_v1, remote_code_marker, save_random_decoder


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


@pytest.fixture(scope="module")
def qwen_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A mirror serving a tiny Qwen v1-format stand-in under the repo id ``Qwen/Qwen-7B``."""
    work = tmp_path_factory.mktemp("qwen-hub")
    original = save_random_decoder(work / "qwen2", "qwen2", seed=3, tokenizer=False, num_key_value_heads=4)
    served = convert_qwen2_to_qwen_v1(original, work / "root" / "Qwen" / "Qwen-7B")
    app = create_app(work / "root", state_dir=work / "state")
    thread = ServerThread(app).start()
    try:
        yield thread.url, served
    finally:
        thread.stop()
        app.state.checksums.close()


@pytest.mark.slow
def test_compare_qwen_7b_through_the_mirror(qwen_hub: tuple[str, Path], tmp_path: Path) -> None:
    """The README's first download example, compared: served, downloaded, Qwen v1 read, exit 0."""
    url, served = qwen_hub
    cache = tmp_path / "cache"
    out = run(
        "compare", "Qwen/Qwen-7B", "--endpoint", url, "--cache-dir", str(cache), "--text", "hello world"
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS: all 11 stages match" in out.stdout and "layer.1.attention_residual" in out.stdout
    assert "Qwen2ForCausalLM" in out.stdout and "conversion" in out.stdout  # what the reference is, said
    # Qwen's tokenizer is custom code: one line says so, random ids are used, and the code never ran.
    notes = [line for line in out.stderr.splitlines() if line.startswith("hfmirror: note:")]
    assert len(notes) == 1 and "never run" in notes[0] and "--tokenizer" in notes[0], out.stderr
    assert not remote_code_marker(served).exists()
    snapshots = list((cache / "models--Qwen--Qwen-7B" / "snapshots").iterdir())
    assert len(snapshots) == 1 and (snapshots[0] / "model.safetensors").is_file()

    out = run("compare", "Qwen/Qwen-7B", "--cache-dir", str(cache), "--json", env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["passed"] is True and report["model"] == "Qwen/Qwen-7B"
    assert report["next_token"]["agreement"] == 1.0 and len(report["top1"]["ours"]) == 2
