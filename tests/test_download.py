"""The downloader against the real server: layouts, interop with huggingface_hub, CLI, bad input.

Faults (drops, 429, stalls, corruption...) are in test_download_faults.py; resume after kill -9 and
concurrent processes in test_download_resume.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hfmirror import constants
from hfmirror import layout as layout_module
from hfmirror.cli import cli
from hfmirror.download import download
from hfmirror.errors import (
    EntryNotFoundError,
    InsufficientSpaceError,
    NetworkError,
    NotWritableError,
    RepoNotFoundError,
    RevisionNotFoundError,
)
from tests.servers import free_port
from tests.support import files_under, make_repo, run_cli

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ layouts


@pytest.mark.slow
def test_cache_layout_is_the_hubs_and_transformers_loads_it_offline(hub_server, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    result = download("tiny/bert", endpoints=[hub_server.url], cache_dir=cache, progress=False)
    source = hub_server.root / "tiny" / "bert"
    assert files_under(result.path) == files_under(source)
    repo_dir = cache / "models--tiny--bert"
    assert result.path == repo_dir / "snapshots" / result.commit
    assert (repo_dir / "refs" / "main").read_text() == result.commit
    for entry in result.path.iterdir():
        assert entry.is_symlink() and not os.path.isabs(os.readlink(entry))
        assert Path(os.path.realpath(entry)).parent == repo_dir / "blobs"

    code = (
        "import sys; from transformers import AutoModel; "
        "m = AutoModel.from_pretrained('tiny/bert', local_files_only=True); "
        "from huggingface_hub import scan_cache_dir; info = scan_cache_dir(); "
        "repo = [r for r in info.repos if r.repo_id == 'tiny/bert'][0]; "
        "print(type(m).__name__, repo.nb_files, len(info.warnings))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["BertModel", str(len(files_under(source))), "0"]


def test_local_dir_gets_plain_files_and_hub_metadata(hub_server, tmp_path: Path) -> None:
    target = tmp_path / "plain"
    result = download("tiny/nested", endpoints=[hub_server.url], local_dir=target, progress=False)
    assert result.path == target
    assert files_under(target) == files_under(hub_server.root / "tiny" / "nested")
    assert not any(p.is_symlink() for p in target.rglob("*"))
    meta = target / ".cache" / "huggingface" / "download" / "a" / "b" / "c.txt.metadata"
    commit, etag, _ = meta.read_text().splitlines()
    assert commit == result.commit and len(etag) == 40
    # Nothing half-done is left behind.
    assert not list(target.rglob("*" + constants.PARTIAL_SUFFIX))


def test_dataset_repo_and_filters(hub_server, tmp_path: Path) -> None:
    result = download(
        "tiny/data",
        repo_type="dataset",
        endpoints=[hub_server.url],
        cache_dir=tmp_path,
        progress=False,
        include=["*.json*", "*.csv"],
        exclude=["*.jsonl"],
    )
    expected = {
        k: v
        for k, v in files_under(hub_server.root / "datasets" / "tiny" / "data").items()
        if (k.endswith((".json", ".csv")))
    }
    assert expected and files_under(result.path) == expected
    assert (tmp_path / "datasets--tiny--data").is_dir()


def test_second_run_fetches_nothing(fault_server, faults, tmp_path: Path) -> None:
    first = download("tiny/nested", endpoints=[fault_server.url], cache_dir=tmp_path, progress=False)
    served = faults.bytes_sent("*/resolve/*")
    assert served >= sum(f.size for f in first.files)
    second = download("tiny/nested", endpoints=[fault_server.url], cache_dir=tmp_path, progress=False)
    assert {f.status for f in second.files} == {"present"}
    assert second.bytes_downloaded == 0
    assert faults.bytes_sent("*/resolve/*") == served


def test_commit_revision_needs_no_ref(hub_server, tmp_path: Path) -> None:
    first = download("tiny/nested", endpoints=[hub_server.url], cache_dir=tmp_path / "a", progress=False)
    pinned = download(
        "tiny/nested",
        revision=first.commit,
        endpoints=[hub_server.url],
        cache_dir=tmp_path / "b",
        progress=False,
    )
    assert pinned.commit == first.commit
    assert not (tmp_path / "b" / "models--tiny--nested" / "refs").exists()


# ---------------------------------------------------------------------- interop with huggingface_hub


def test_huggingface_hub_reuses_our_cache_without_downloading(fault_server, faults, tmp_path: Path) -> None:
    from huggingface_hub import snapshot_download

    download("tiny/bert", endpoints=[fault_server.url], cache_dir=tmp_path, progress=False)
    gets_before = len(faults.requests("*.safetensors", "GET"))
    path = snapshot_download("tiny/bert", cache_dir=tmp_path, endpoint=fault_server.url)
    assert files_under(Path(path)) == files_under(fault_server.root / "tiny" / "bert")
    assert len(faults.requests("*.safetensors", "GET")) == gets_before


def test_we_reuse_huggingface_hubs_cache_without_downloading(fault_server, faults, tmp_path: Path) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download("tiny/bert", cache_dir=tmp_path, endpoint=fault_server.url)
    served = faults.bytes_sent("*/resolve/*")
    result = download("tiny/bert", endpoints=[fault_server.url], cache_dir=tmp_path, progress=False)
    assert {f.status for f in result.files} == {"present"}
    assert faults.bytes_sent("*/resolve/*") == served


def test_huggingface_hub_local_dir_is_recognised(fault_server, faults, tmp_path: Path) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download("tiny/nested", local_dir=tmp_path, endpoint=fault_server.url)
    served = faults.bytes_sent("*/resolve/*")
    result = download("tiny/nested", endpoints=[fault_server.url], local_dir=tmp_path, progress=False)
    assert {f.status for f in result.files} == {"present"}
    assert faults.bytes_sent("*/resolve/*") == served


def test_a_damaged_local_file_is_fetched_again(hub_server, tmp_path: Path, monkeypatch) -> None:
    download("tiny/nested", endpoints=[hub_server.url], local_dir=tmp_path, progress=False)
    victim = tmp_path / "data" / "big.bin"
    good = victim.read_bytes()
    damaged = bytearray(good)
    damaged[100] ^= 0xFF
    victim.write_bytes(bytes(damaged))
    os.utime(victim, (1e10, 1e10))  # newer than the metadata: the metadata no longer vouches for it
    hashed: list[Path] = []
    real_digest = layout_module.file_digest

    def counting_digest(path, expected):
        hashed.append(Path(path))
        return real_digest(path, expected)

    monkeypatch.setattr(layout_module, "file_digest", counting_digest)
    result = download("tiny/nested", endpoints=[hub_server.url], local_dir=tmp_path, progress=False)
    assert victim.read_bytes() == good
    assert {f.path: f.status for f in result.files}["data/big.bin"] == "downloaded"
    # Found wrong once, before any lock; the look under the lock trusts that while the file is unchanged.
    assert hashed.count(victim) == 1


# ----------------------------------------------------------------------------------- failover


@pytest.mark.slow
def test_fails_over_from_a_dead_endpoint(hub_server, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    result = download("tiny/nested", endpoints=[dead, hub_server.url], cache_dir=tmp_path, progress=False)
    assert result.endpoint == hub_server.url
    assert files_under(result.path) == files_under(hub_server.root / "tiny" / "nested")


def test_no_endpoint_reachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "BACKOFF_BASE", 0.01)
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    with pytest.raises(NetworkError, match="no endpoint reachable"):
        download("tiny/nested", endpoints=dead, cache_dir=tmp_path, progress=False)


# -------------------------------------------------------------------------------------- errors


def test_remote_errors_map_to_our_errors(hub_server, tmp_path: Path) -> None:
    kwargs = {"endpoints": [hub_server.url], "cache_dir": tmp_path, "progress": False}
    with pytest.raises(RepoNotFoundError, match="--token"):
        download("nobody/nothing", **kwargs)
    with pytest.raises(RevisionNotFoundError):
        download("tiny/nested", revision="no-such-branch", **kwargs)
    with pytest.raises(EntryNotFoundError, match="missing.txt"):
        download("tiny/nested", filenames=["missing.txt"], **kwargs)


def test_not_enough_space_is_found_before_downloading(
    fault_server, faults, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(constants, "FREE_SPACE_MARGIN", 1 << 60)
    with pytest.raises(InsufficientSpaceError, match="not enough disk space"):
        download("tiny/nested", endpoints=[fault_server.url], cache_dir=tmp_path, progress=False)
    assert faults.bytes_sent("*/resolve/*") == 0


def test_target_that_cannot_be_written(hub_server, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    with pytest.raises(NotWritableError):
        download("tiny/nested", endpoints=[hub_server.url], local_dir=blocker / "sub", progress=False)


# --------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["a/b/c"], 2, "malformed repo id"),
        (["nobody/nothing"], 3, "not found"),
        (["tiny/nested", "--revision", "nope"], 3, "revision 'nope' not found"),
        (["tiny/nested", "missing.txt"], 3, "missing.txt"),
        (["tiny/nested", "--revision", "../../etc"], 2, "malformed revision"),
        (["tiny/nested", "--endpoint", "ftp://x"], 2, "not an http(s) endpoint"),
        # A selection that matches nothing is a mistake to point out, not an empty success.
        (
            ["tiny/nested", "--include", "*.gguf"],
            3,
            "none of the 5 files in the repository matches --include '*.gguf'",
        ),
        (["tiny/nested", "--include", "*.txt", "--exclude", "a/"], 3, "--include '*.txt' --exclude 'a/'"),
    ],
)
def test_cli_bad_input_gives_one_line_and_an_exit_code(hub_server, tmp_path, args, code, message) -> None:
    full = ["download", *args, "--cache-dir", str(tmp_path)]
    if "--endpoint" not in args:
        full += ["--endpoint", hub_server.url]
    result = CliRunner().invoke(cli, full)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_prints_the_path_last_and_a_json_summary(hub_server, tmp_path: Path) -> None:
    out = run_cli("download", "tiny/nested", "--endpoint", hub_server.url, "--cache-dir", str(tmp_path), "-q")
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    assert files_under(path) == files_under(hub_server.root / "tiny" / "nested")

    out = run_cli(
        "download", "tiny/nested", "--endpoint", hub_server.url, "--cache-dir", str(tmp_path), "--json"
    )
    summary = json.loads(out.stdout)
    assert summary["path"] == str(path)
    assert {f["status"] for f in summary["files"]} == {"present"}
    assert summary["bytes_downloaded"] == 0


def test_cli_dry_run_lists_without_fetching(fault_server, faults, tmp_path: Path) -> None:
    download(
        "tiny/nested",
        filenames=["README.md"],
        endpoints=[fault_server.url],
        cache_dir=tmp_path,
        progress=False,
    )
    served = faults.bytes_sent("*/resolve/*")
    result = CliRunner().invoke(
        cli,
        [
            "download",
            "tiny/nested",
            "--endpoint",
            fault_server.url,
            "--cache-dir",
            str(tmp_path),
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "present" in result.output and "would-download" in result.output
    assert "data/big.bin" in result.output and "to download" in result.output
    assert faults.bytes_sent("*/resolve/*") == served


def test_cli_hf_endpoint_environment_is_used(hub_server, tmp_path: Path) -> None:
    out = run_cli(
        "download",
        "tiny/nested",
        "README.md",
        "--cache-dir",
        str(tmp_path),
        "-q",
        env={"HF_ENDPOINT": hub_server.url},
    )
    assert out.returncode == 0, out.stderr
    assert (Path(out.stdout.strip()) / "README.md").read_bytes() == (
        hub_server.root / "tiny" / "nested" / "README.md"
    ).read_bytes()


def test_token_is_sent_to_the_endpoint_but_never_printed(fault_server, faults, tmp_path: Path) -> None:
    secret = "hf_SECRETtoken1234567890"
    out = run_cli(
        "download",
        "tiny/nested",
        "--endpoint",
        fault_server.url,
        "--cache-dir",
        str(tmp_path),
        "--token",
        secret,
        "--json",
    )
    assert out.returncode == 0, out.stderr
    assert secret not in out.stdout + out.stderr
    assert any(r.headers.get("authorization") == f"Bearer {secret}" for r in faults.records)


def test_the_login_token_is_used_and_no_token_means_no_header(fault_server, faults, tmp_path: Path) -> None:
    """Without --token, huggingface_hub's stored login token is sent, as hf_hub would; with none
    stored, nothing is (and huggingface_hub's heavy modules are not even imported to find that out)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    home = tmp_path / "hf_home"
    home.mkdir()
    probe = (
        "import sys; from hfmirror.download import _stored_token; "
        "print(_stored_token(), 'huggingface_hub.utils' in sys.modules)"
    )
    env = {**clean, "HF_HOME": str(home)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["None", "False"], out.stderr
    args = ["download", "tiny/nested", "--endpoint", fault_server.url, "--cache-dir", str(tmp_path / "c")]
    assert subprocess.run([sys.executable, "-m", "hfmirror", *args], env=env, timeout=300).returncode == 0
    assert not any("authorization" in r.headers for r in faults.records)

    faults.reset()
    (home / "token").write_text("hf_STOREDtoken0987654321\n")
    out = subprocess.run(
        [sys.executable, "-m", "hfmirror", *args[:-1], str(tmp_path / "c2")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "hf_STORED" not in out.stdout + out.stderr
    assert any(r.headers.get("authorization") == "Bearer hf_STOREDtoken0987654321" for r in faults.records)


# ------------------------------------------------------------------------------ model_download.py


def test_model_download_py_with_a_qwen_stand_in(hub_server, tmp_path: Path) -> None:
    """The aliendao-style script on a sharded, remote-code repo served under Qwen/Qwen-7B's name."""
    shard_a, shard_b = os.urandom(3 << 20), os.urandom(2 << 20)
    index = {
        "metadata": {"total_size": len(shard_a) + len(shard_b)},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    make_repo(
        hub_server.root,
        "Qwen/Qwen-7B",
        {
            "config.json": b'{"model_type": "qwen", "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}}',
            "modeling_qwen.py": b"# remote code\nclass QWenLMHeadModel: ...\n",
            "tokenization_qwen.py": b"# remote code\n",
            "qwen.tiktoken": os.urandom(40_000),
            "model-00001-of-00002.safetensors": shard_a,
            "model-00002-of-00002.safetensors": shard_b,
            "model.safetensors.index.json": json.dumps(index).encode(),
        },
    )
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "model_download.py"),
            "--repo_id",
            "Qwen/Qwen-7B",
            "--endpoint",
            hub_server.url,
            "--quiet",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    target = tmp_path / "dataroot" / "models" / "Qwen" / "Qwen-7B"
    assert out.stdout.strip().splitlines()[-1] == str(target)
    assert files_under(target) == files_under(hub_server.root / "Qwen" / "Qwen-7B")

    bad = subprocess.run(
        [
            sys.executable,
            str(REPO / "model_download.py"),
            "--repo_id",
            "Qwen/Nope",
            "--endpoint",
            hub_server.url,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 3 and "Traceback" not in bad.stderr and "not found" in bad.stderr


@pytest.mark.slow
def test_offline_falls_back_to_the_cached_snapshot(hub_server, tmp_path: Path) -> None:
    first = download("tiny/nested", endpoints=[hub_server.url], cache_dir=tmp_path, progress=False)
    dead = f"http://127.0.0.1:{free_port()}"
    again = download("tiny/nested", endpoints=[dead], cache_dir=tmp_path, progress=False)
    assert again.path == first.path and again.endpoint.startswith("(offline")
    assert {f.path for f in again.files} == {f.path for f in first.files}
    out = run_cli("download", "tiny/nested", "--cache-dir", str(tmp_path), "-q", env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and out.stdout.strip() == str(first.path)
    # A revision the cache has never seen is still an error, offline.
    with pytest.raises(NetworkError):
        download("tiny/nested", revision="other", endpoints=[dead], cache_dir=tmp_path, progress=False)


def test_offline_a_named_file_the_cache_lacks_is_an_error(hub_server, tmp_path: Path, monkeypatch) -> None:
    """The cached snapshot answers offline only if it holds what was asked for (hf_hub_download too
    raises when the file is not cached): success without the file would be a lie."""
    download(
        "tiny/nested", include=["*.json"], endpoints=[hub_server.url], cache_dir=tmp_path, progress=False
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    present = download("tiny/nested", filenames=["config.json"], cache_dir=tmp_path, progress=False)
    assert [f.path for f in present.files if f.path == "config.json"] == ["config.json"]
    with pytest.raises(NetworkError):
        download("tiny/nested", filenames=["config.json", "a/top.txt"], cache_dir=tmp_path, progress=False)


def test_dry_run_writes_nothing(hub_server, tmp_path: Path) -> None:
    """A dry run only looks: no metadata recorded, no snapshot links made, nothing removed."""
    import shutil

    download("tiny/nested", endpoints=[hub_server.url], local_dir=tmp_path / "plain", progress=False)
    shutil.rmtree(tmp_path / "plain" / ".cache")  # correct files that nothing vouches for any more
    plan = download("tiny/nested", endpoints=[hub_server.url], local_dir=tmp_path / "plain", dry_run=True)
    assert {f.status for f in plan.files} == {"present"}
    assert not (tmp_path / "plain" / ".cache").exists()

    first = download("tiny/nested", endpoints=[hub_server.url], cache_dir=tmp_path / "hub", progress=False)
    shutil.rmtree(first.path)  # blobs stay, the snapshot's links are gone
    plan = download("tiny/nested", endpoints=[hub_server.url], cache_dir=tmp_path / "hub", dry_run=True)
    assert {f.status for f in plan.files} == {"present"}
    assert not first.path.exists()
