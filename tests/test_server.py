"""The mirror server, checked on the wire and with the real clients (huggingface_hub, transformers)."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import requests
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

from hfmirror.hashing import git_blob_sha1, sha256_of_file
from hfmirror.server.app import create_app
from hfmirror.server.checksums import GIT_SHA1, SHA256, ChecksumCache
from hfmirror.server.repos import is_lfs_file
from tests.conftest import RunningServer
from tests.support import files_under, make_repo

REPO_ROOT = Path(__file__).resolve().parents[1]


def raw_get(url: str, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """Send ``path`` exactly as written (http.client does not normalise ``..``). Header names lower-cased."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


# ------------------------------------------------------------------------------------ repo info


def test_repo_info_lists_every_file_with_hub_checksums(hub_server: RunningServer) -> None:
    repo = hub_server.root / "tiny" / "bert"
    r = requests.get(
        f"{hub_server.url}/api/models/tiny/bert/revision/main", params={"blobs": "true"}, timeout=10
    )
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["id"] == "tiny/bert"
    assert re.fullmatch(r"[0-9a-f]{40}", info["sha"])
    assert info["private"] is False and info["gated"] is False and info["disabled"] is False
    siblings = {s["rfilename"]: s for s in info["siblings"]}
    assert set(siblings) == set(files_under(repo))
    weights = siblings["model.safetensors"]
    assert weights["size"] == (repo / "model.safetensors").stat().st_size
    assert weights["lfs"]["sha256"] == sha256_of_file(repo / "model.safetensors")
    config = siblings["config.json"]
    assert "lfs" not in config
    assert config["blobId"] == git_blob_sha1((repo / "config.json").read_bytes())


def test_repo_info_without_revision_and_by_commit(hub_server: RunningServer) -> None:
    main = requests.get(f"{hub_server.url}/api/models/bert-base-uncased", timeout=10).json()
    by_commit = requests.get(
        f"{hub_server.url}/api/models/bert-base-uncased/revision/{main['sha']}", timeout=10
    ).json()
    assert by_commit["sha"] == main["sha"]
    assert "size" not in main["siblings"][0]  # sizes only with ?blobs=true


def test_huggingface_hub_parses_model_and_dataset_info(hub_server: RunningServer) -> None:
    api = huggingface_hub.HfApi(endpoint=hub_server.url)
    model = api.model_info("tiny/nested", files_metadata=True)
    sizes = {s.rfilename: s.size for s in model.siblings or []}
    assert sizes["data/big.bin"] == (hub_server.root / "tiny/nested/data/big.bin").stat().st_size
    dataset = api.dataset_info("tiny/data")
    assert {s.rfilename for s in dataset.siblings or []} == {"README.md", "train.csv", "data/x.parquet"}
    assert dataset.sha is not None and len(dataset.sha) == 40 and dataset.sha != model.sha


def test_commit_depends_on_content_only(tmp_path: Path) -> None:
    from hfmirror.server.repos import RepoStore

    files: dict[str, bytes | int] = {"a.txt": b"alpha\n", "w.safetensors": 1000}
    make_repo(tmp_path / "one", "org/m", files)
    make_repo(tmp_path / "two", "org/m", files)
    checksums = ChecksumCache(tmp_path / "state")
    try:
        first, second = RepoStore(tmp_path / "one", checksums), RepoStore(tmp_path / "two", checksums)
        commit = first.snapshot(first.find("model", "org/m"), "main").commit  # type: ignore[arg-type]
        assert commit == second.snapshot(second.find("model", "org/m"), "main").commit  # type: ignore[arg-type]
        (tmp_path / "two" / "org" / "m" / "a.txt").write_bytes(b"beta\n")
        assert commit != second.snapshot(second.find("model", "org/m"), "main").commit  # type: ignore[arg-type]
    finally:
        checksums.close()


def test_lfs_rule() -> None:
    assert is_lfs_file("model.safetensors", 10)
    assert is_lfs_file("sub/pytorch_model.BIN", 10)
    assert is_lfs_file("notes.txt", 10 * 1024 * 1024)
    assert not is_lfs_file("config.json", 500)
    assert not is_lfs_file("README", 500)


# ---------------------------------------------------------------------------------------- tree


def test_tree_lists_files_and_folders(hub_server: RunningServer) -> None:
    base = f"{hub_server.url}/api/models/tiny/nested/tree/main"
    top = requests.get(base, timeout=10).json()
    assert {(e["type"], e["path"]) for e in top} == {
        ("file", "README.md"),
        ("file", "config.json"),
        ("directory", "a"),
        ("directory", "data"),
    }
    inside = requests.get(f"{base}/a", params={"recursive": "true"}, timeout=10).json()
    assert {e["path"] for e in inside} == {"a/b", "a/b/c.txt", "a/top.txt"}
    big = next(e for e in requests.get(f"{base}/data", timeout=10).json() if e["path"] == "data/big.bin")
    assert big["lfs"]["oid"] == sha256_of_file(hub_server.root / "tiny/nested/data/big.bin")
    assert big["lfs"]["size"] == big["size"] and big["lfs"]["pointerSize"] > 0
    missing = requests.get(f"{base}/nowhere", timeout=10)
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"


def test_tree_via_huggingface_hub_matches_disk(hub_server: RunningServer) -> None:
    api = huggingface_hub.HfApi(endpoint=hub_server.url)
    entries = list(api.list_repo_tree("tiny/nested", recursive=True))
    files = {e.path: e for e in entries if isinstance(e, huggingface_hub.hf_api.RepoFile)}
    on_disk = files_under(hub_server.root / "tiny" / "nested")
    assert set(files) == set(on_disk)
    assert files["a/b/c.txt"].blob_id == git_blob_sha1(on_disk["a/b/c.txt"])
    assert files["data/big.bin"].lfs is not None


def test_tree_is_paginated_with_link_header(hub_root: Path, serve: Callable[..., str]) -> None:
    url = serve(hub_root, page_size=2)
    pages = []
    next_url: str | None = f"{url}/api/models/tiny/nested/tree/main?recursive=true"
    while next_url:
        r = requests.get(next_url, timeout=10)
        assert r.status_code == 200
        assert len(r.json()) <= 2
        pages.append(r.json())
        next_url = r.links.get("next", {}).get("url")
    paths = [e["path"] for page in pages for e in page]
    assert len(pages) == 4 and len(paths) == len(set(paths)) == 8  # 5 files, 3 folders (a, a/b, data)
    api = huggingface_hub.HfApi(endpoint=url)
    assert sorted(e.path for e in api.list_repo_tree("tiny/nested", recursive=True)) == sorted(paths)
    bad = requests.get(f"{url}/api/models/tiny/nested/tree/main?cursor=abc", timeout=10)
    assert bad.status_code == 400


@pytest.mark.parametrize("host", ["evil.example/x?", "user@evil.example", "evil.example:http"])
def test_a_malformed_host_never_gets_into_a_page_link(
    hub_root: Path, serve: Callable[..., str], host: str
) -> None:
    url = serve(hub_root, page_size=2)
    r = requests.get(f"{url}/api/models/tiny/nested/tree/main", headers={"Host": host}, timeout=10)
    assert r.status_code == 200
    assert r.links["next"]["url"].startswith(f"{url}/api/models/tiny/nested/tree/main?")


# ------------------------------------------------------------------------------------- resolve


def test_head_gives_metadata_and_no_body(hub_server: RunningServer) -> None:
    path = hub_server.root / "tiny/bert/model.safetensors"
    r = requests.head(f"{hub_server.url}/tiny/bert/resolve/main/model.safetensors", timeout=10)
    assert r.status_code == 200 and r.content == b""
    sha = sha256_of_file(path)
    assert r.headers["ETag"] == f'"{sha}"' and r.headers["X-Linked-Etag"] == f'"{sha}"'
    assert int(r.headers["Content-Length"]) == int(r.headers["X-Linked-Size"]) == path.stat().st_size
    assert r.headers["Accept-Ranges"] == "bytes"
    info = requests.get(f"{hub_server.url}/api/models/tiny/bert", timeout=10).json()
    assert r.headers["X-Repo-Commit"] == info["sha"]
    small = requests.head(f"{hub_server.url}/tiny/bert/resolve/main/config.json", timeout=10)
    assert (
        small.headers["ETag"]
        == f'"{git_blob_sha1((hub_server.root / "tiny/bert/config.json").read_bytes())}"'
    )


def test_ranges(hub_server: RunningServer) -> None:
    data = (hub_server.root / "tiny/nested/data/big.bin").read_bytes()
    url = f"{hub_server.url}/tiny/nested/resolve/main/data/big.bin"
    r = requests.get(url, headers={"Range": "bytes=100-199"}, timeout=10)
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    assert r.content == data[100:200]
    tail = requests.get(url, headers={"Range": f"bytes={len(data) - 5000}-"}, timeout=10)
    assert tail.status_code == 206 and tail.content == data[-5000:]
    past = requests.get(url, headers={"Range": f"bytes={len(data)}-"}, timeout=10)
    assert past.status_code == 416
    assert past.headers["Content-Range"] == f"bytes */{len(data)}"
    etag = requests.head(url, timeout=10).headers["ETag"]
    same = requests.get(url, headers={"Range": "bytes=0-9", "If-Range": etag}, timeout=10)
    assert same.status_code == 206 and same.content == data[:10]
    changed = requests.get(url, headers={"Range": "bytes=0-9", "If-Range": '"0000"'}, timeout=10)
    assert changed.status_code == 200 and changed.content == data
    full = requests.get(url, timeout=10)
    assert full.status_code == 200 and full.content == data


def test_dataset_resolve(hub_server: RunningServer) -> None:
    r = requests.get(f"{hub_server.url}/datasets/tiny/data/resolve/main/train.csv", timeout=10)
    assert r.status_code == 200
    assert r.content == (hub_server.root / "datasets/tiny/data/train.csv").read_bytes()
    wrong_type = requests.get(f"{hub_server.url}/tiny/data/resolve/main/train.csv", timeout=10)
    assert wrong_type.status_code == 401 and wrong_type.headers["X-Error-Code"] == "RepoNotFound"


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/no/such/resolve/main/config.json", 401, "RepoNotFound"),
        ("/api/models/no/such", 401, "RepoNotFound"),
        ("/api/datasets//", 401, "RepoNotFound"),  # an empty name: the message must still be a valid header
        ("/api/models/tiny/bert/revision/v9", 404, "RevisionNotFound"),
        ("/tiny/bert/resolve/refs%2Fpr%2F1/config.json", 404, "RevisionNotFound"),
        ("/tiny/bert/resolve/main/nope.json", 404, "EntryNotFound"),
        ("/tiny/bert/resolve/main/a", 404, "EntryNotFound"),
    ],
)
def test_errors_on_the_wire(hub_server: RunningServer, path: str, status: int, code: str) -> None:
    got_status, headers, body = raw_get(hub_server.url, path)
    assert got_status == status
    assert headers["x-error-code"] == code
    assert headers["x-error-message"]
    assert b'"error"' in body


def test_huggingface_hub_raises_its_errors(hub_server: RunningServer, tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"endpoint": hub_server.url, "cache_dir": tmp_path / "cache"}
    with pytest.raises(RepositoryNotFoundError):
        huggingface_hub.hf_hub_download("nobody/nothing", "config.json", **kwargs)
    with pytest.raises(RevisionNotFoundError):
        huggingface_hub.hf_hub_download("tiny/bert", "config.json", revision="v9", **kwargs)
    with pytest.raises(EntryNotFoundError):
        huggingface_hub.hf_hub_download("tiny/bert", "missing.json", **kwargs)
    with pytest.raises(RepositoryNotFoundError):
        huggingface_hub.HfApi(endpoint=hub_server.url).model_info("nobody/nothing")


# ------------------------------------------------------------------------------ real clients


@pytest.mark.parametrize(
    ("repo_id", "repo_type", "folder"),
    [
        ("tiny/bert", "model", "tiny/bert"),
        ("tiny/nested", "model", "tiny/nested"),
        ("bert-base-uncased", "model", "bert-base-uncased"),
        ("tiny/data", "dataset", "datasets/tiny/data"),
    ],
)
def test_snapshot_download_is_byte_identical(
    hub_server: RunningServer, tmp_path: Path, repo_id: str, repo_type: str, folder: str
) -> None:
    expected = files_under(hub_server.root / folder)
    snapshot = huggingface_hub.snapshot_download(
        repo_id, repo_type=repo_type, endpoint=hub_server.url, cache_dir=tmp_path / "cache"
    )
    assert files_under(Path(snapshot)) == expected
    local = huggingface_hub.snapshot_download(
        repo_id, repo_type=repo_type, endpoint=hub_server.url, local_dir=tmp_path / "local"
    )
    assert files_under(Path(local)) == expected


def test_hf_hub_download_one_file(hub_server: RunningServer, tmp_path: Path) -> None:
    path = huggingface_hub.hf_hub_download(
        "tiny/nested", "a/b/c.txt", endpoint=hub_server.url, cache_dir=tmp_path / "cache"
    )
    assert Path(path).read_bytes() == b"deep inside\n"
    blob = Path(os.path.realpath(path)).name
    assert blob == git_blob_sha1(b"deep inside\n")  # the ETag named the blob


def _hf_env(url: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO_ROOT))
    return env


@pytest.mark.slow
def test_transformers_from_pretrained_through_the_server(hub_server: RunningServer, tmp_path: Path) -> None:
    script = """
import sys, torch, transformers
remote = transformers.AutoModel.from_pretrained("bert-base-uncased")
local = transformers.AutoModel.from_pretrained(sys.argv[1])
tok = transformers.AutoTokenizer.from_pretrained("bert-base-uncased")
ids = tok("the cat sat on the mat", return_tensors="pt")
with torch.no_grad():
    same = torch.equal(remote(**ids).last_hidden_state, local(**ids).last_hidden_state)
print("SAME" if same else "DIFFERENT", len(ids["input_ids"][0]))
"""
    result = subprocess.run(
        [sys.executable, "-c", script, str(hub_server.root / "bert-base-uncased")],
        env=_hf_env(hub_server.url, tmp_path / "hf-home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["SAME", "8"], result.stdout
    assert (tmp_path / "hf-home" / "hub" / "models--bert-base-uncased" / "refs" / "main").is_file()


# ------------------------------------------------------------------------------ safety


@pytest.fixture
def escape_root(tmp_path: Path) -> Path:
    """A ROOT with a secret next to it, symlinks pointing out of it, and hidden folders in a repo."""
    (tmp_path / "secret.txt").write_bytes(b"TOP SECRET")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "leak.txt").write_bytes(b"TOP SECRET")
    root = tmp_path / "root"
    repo = make_repo(root, "org/m", {"ok.txt": b"fine\n", ".gitattributes": b"*.bin filter=lfs\n"})
    (repo / "link-out.txt").symlink_to(tmp_path / "secret.txt")
    (repo / "dir-out").symlink_to(tmp_path / "outside", target_is_directory=True)
    (repo / "link-in.txt").symlink_to(repo / "ok.txt")
    for hidden in (".git/config", ".cache/huggingface/download/ok.txt.metadata"):
        (repo / hidden).parent.mkdir(parents=True, exist_ok=True)
        (repo / hidden).write_bytes(b"TOP SECRET")
    return root


def test_only_safe_files_are_listed(escape_root: Path, serve: Callable[..., str]) -> None:
    url = serve(escape_root)
    info = requests.get(f"{url}/api/models/org/m", timeout=10).json()
    assert sorted(s["rfilename"] for s in info["siblings"]) == [".gitattributes", "link-in.txt", "ok.txt"]


@pytest.mark.parametrize(
    "path",
    [
        "/org/m/resolve/main/../../../secret.txt",
        "/org/m/resolve/main/%2e%2e/%2e%2e/%2e%2e/secret.txt",
        "/org/m/resolve/main/%2E%2E%2F%2E%2E%2F%2E%2E%2Fsecret.txt",
        "/org/m/resolve/main//etc/passwd",
        "/org/m/resolve/main/%2Fetc%2Fpasswd",
        "/org/m/resolve/main/..%5C..%5C..%5Csecret.txt",
        "/org/m/resolve/main/link-out.txt",
        "/org/m/resolve/main/dir-out/leak.txt",
        "/org/m/resolve/main/.git/config",
        "/org/m/resolve/main/.cache/huggingface/download/ok.txt.metadata",
        "/org/%2e%2e/resolve/main/secret.txt",
        "/../secret.txt",
        "/org/m/resolve/main/ok.txt%00.png",
        "/org/m/resolve/main/%ff%fe",
        "/api/models/org/m/tree/main/%2e%2e",
        "/api/models/org/m/tree/main/..%2F..%2F",
        "/api/models/%2e%2e/%2e%2e/tree/main",
        "/api/models/org/m/tree/main?cursor=99999999999",
        "/datasets/%2e%2e/org/m/resolve/main/ok.txt",
        "/org/m/resolve/main/" + "x" * 5000,
    ],
)
def test_escapes_are_refused_without_bytes(escape_root: Path, serve: Callable[..., str], path: str) -> None:
    url = serve(escape_root)
    status, _, body = raw_get(url, path)
    assert 400 <= status < 500, (status, body[:200])
    assert b"TOP SECRET" not in body


def test_symlink_inside_root_is_served(escape_root: Path, serve: Callable[..., str]) -> None:
    url = serve(escape_root)
    status, _, body = raw_get(url, "/org/m/resolve/main/link-in.txt")
    assert (status, body) == (200, b"fine\n")


def test_other_methods_are_refused(hub_server: RunningServer) -> None:
    status, _, _ = raw_get(hub_server.url, "/tiny/bert/resolve/main/config.json", method="DELETE")
    assert status == 405


# ------------------------------------------------------------------------------ layouts


def test_org_folders_and_no_org_repos(tmp_path: Path, serve: Callable[..., str]) -> None:
    make_repo(tmp_path, "solo", {"config.json": b"{}", "onnx/model.onnx": 100})
    make_repo(tmp_path, "org/m", {"x.txt": b"x"})
    url = serve(tmp_path)
    assert requests.get(f"{url}/api/models/solo", timeout=10).status_code == 200
    assert requests.get(f"{url}/api/models/org/m", timeout=10).status_code == 200
    assert requests.get(f"{url}/api/models/org", timeout=10).status_code == 401  # an org is not a repo
    assert requests.get(f"{url}/api/models/solo/onnx", timeout=10).status_code == 401  # nor a repo's folder


def test_repos_added_while_running_are_found(tmp_path: Path, serve: Callable[..., str]) -> None:
    (tmp_path / "root").mkdir()
    url = serve(tmp_path / "root")
    assert requests.get(f"{url}/api/models/late/comer", timeout=10).status_code == 401
    make_repo(tmp_path / "root", "late/comer", {"a.txt": b"first"})
    first = requests.get(f"{url}/api/models/late/comer", timeout=10).json()["sha"]
    (tmp_path / "root/late/comer/a.txt").write_bytes(b"second version")
    assert requests.get(f"{url}/late/comer/resolve/main/a.txt", timeout=10).content == b"second version"
    assert requests.get(f"{url}/api/models/late/comer", timeout=10).json()["sha"] != first


def test_serving_a_hugging_face_cache(
    hub_server: RunningServer, tmp_path: Path, serve: Callable[..., str]
) -> None:
    cache = tmp_path / "cache"
    for repo_id, repo_type in (("tiny/bert", "model"), ("tiny/data", "dataset")):
        huggingface_hub.snapshot_download(
            repo_id, repo_type=repo_type, endpoint=hub_server.url, cache_dir=cache
        )
    commit = (cache / "models--tiny--bert" / "refs" / "main").read_text()
    url = serve(cache)
    info = requests.get(f"{url}/api/models/tiny/bert", timeout=10).json()
    assert info["sha"] == commit
    assert requests.get(f"{url}/api/models/tiny/bert/revision/{commit}", timeout=10).json()["sha"] == commit
    head = requests.head(f"{url}/tiny/bert/resolve/{commit}/model.safetensors", timeout=10)
    assert head.headers["ETag"].strip('"') == sha256_of_file(hub_server.root / "tiny/bert/model.safetensors")
    missing = requests.get(f"{url}/api/models/tiny/bert/revision/{'0' * 40}", timeout=10)
    assert missing.headers["X-Error-Code"] == "RevisionNotFound"
    again = huggingface_hub.snapshot_download("tiny/bert", endpoint=url, cache_dir=tmp_path / "cache2")
    assert files_under(Path(again)) == files_under(hub_server.root / "tiny/bert")
    assert Path(again).name == commit
    data = huggingface_hub.snapshot_download(
        "tiny/data", repo_type="dataset", endpoint=url, local_dir=tmp_path / "data"
    )
    assert files_under(Path(data)) == files_under(hub_server.root / "datasets/tiny/data")


# ------------------------------------------------------------------------------ checksums


def test_checksums_are_remembered_across_restarts(hub_root: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = create_app(hub_root, state_dir=state)
    second = create_app(hub_root, state_dir=state)
    try:
        for app in (first, second):
            store = app.state.store
            snap = store.snapshot(store.find("model", "tiny/nested"), "main")
            assert snap.files["data/big.bin"].etag == sha256_of_file(hub_root / "tiny/nested/data/big.bin")
        assert first.state.checksums.computed == 5  # one per file
        assert second.state.checksums.computed == 0  # all read back from the database
        assert (state / "checksums.sqlite3").is_file()
    finally:
        first.state.checksums.close()
        second.state.checksums.close()


def test_changed_file_is_hashed_again(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_bytes(b"one")
    cache = ChecksumCache(tmp_path / "state")
    try:
        assert cache.digest(target, GIT_SHA1) == git_blob_sha1(b"one")
        assert cache.digest(target, GIT_SHA1) == git_blob_sha1(b"one")
        assert cache.computed == 1
        target.write_bytes(b"two!")
        assert cache.digest(target, GIT_SHA1) == git_blob_sha1(b"two!")
        assert cache.digest(target, SHA256) == hashlib.sha256(b"two!").hexdigest()
        assert cache.computed == 3
    finally:
        cache.close()


# ------------------------------------------------------------------------------ the command


def test_hfmirror_serve_command_answers_and_stops_on_sigint(hub_root: Path, tmp_path: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hfmirror",
            "serve",
            str(hub_root),
            "--port",
            "0",
            "--state-dir",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            match = re.search(r"serving on http://127\.0\.0\.1:(\d+)", line)
            port = int(match.group(1)) if match else None
        assert port, "the server did not report its port"
        r = requests.get(f"http://127.0.0.1:{port}/tiny/bert/resolve/main/config.json", timeout=10)
        assert r.status_code == 200
        assert r.content == (hub_root / "tiny/bert/config.json").read_bytes()
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert "GET /tiny/bert/resolve/main/config.json" in output  # one access-log line per request
    assert "Traceback" not in output


def test_state_dir_is_created(tmp_path: Path) -> None:
    cache = ChecksumCache(tmp_path / "deep" / "state")
    cache.close()
    assert (tmp_path / "deep" / "state" / "checksums.sqlite3").is_file()
