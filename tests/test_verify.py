"""``hfmirror verify``: real downloads from the test server, then damaged on disk, found, and repaired.

Damage of every kind a disk or a person does: a flipped byte (with the mtime put back, so nothing but
the hash can tell), a truncated file, a deleted file, a link to a blob that is gone, a link out of
the cache. Both layouts, files written by us and by huggingface_hub.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from click.testing import CliRunner

from hfmirror.cli import cli
from hfmirror.download import download
from hfmirror.verify import MISMATCH, MISSING, OK, UNCHECKED, verify
from tests.servers import free_port
from tests.support import make_repo

REPO_ID = "verify/model"
FILES: dict[str, bytes | int] = {
    "config.json": b'{"model_type": "bert", "hidden_size": 32}\n',
    "README.md": b"# a repo to damage\n",
    "weights/model.safetensors": 2 * 1024 * 1024 + 77,  # an LFS file (sha256)
    "tokenizer/vocab.txt": b"[PAD]\n[UNK]\nhello\nworld\n",
    "same-as-readme.md": b"# a repo to damage\n",  # one blob, two paths
}


@pytest.fixture(scope="module")
def source(hub_root: Path) -> Path:
    """The repo as served (a new one in the shared root, as conftest asks)."""
    return make_repo(hub_root, REPO_ID, FILES)


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def as_json(*args: str) -> tuple[int, dict]:
    code, out, _ = run(*args, "--json")
    return code, json.loads(out)


def statuses(report: dict) -> dict[str, str]:
    return {f["path"]: f["status"] for f in report["files"]}


def flip_a_byte(path: Path, offset: int = 1000) -> None:
    """Change one byte in place and put the modification time back: only a hash can notice."""
    path = Path(os.path.realpath(path))
    stat = path.stat()
    with open(path, "r+b") as f:
        f.seek(min(offset, stat.st_size - 1))
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def truncate(path: Path) -> None:
    path = Path(os.path.realpath(path))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def dead_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"


def fetch_to_cache(url: str, cache: Path) -> Path:
    return download(REPO_ID, endpoints=[url], cache_dir=cache, progress=False).path


def fetch_to_local_dir(url: str, local: Path) -> Path:
    return download(REPO_ID, endpoints=[url], local_dir=local, progress=False).path


def same_as_source(folder: Path, source: Path) -> bool:
    return all((folder / name).read_bytes() == (source / name).read_bytes() for name in FILES)


# ---------------------------------------------------------------------------------------- intact


def test_an_intact_cache_download_verifies(hub_server, source, tmp_path: Path) -> None:
    snapshot = fetch_to_cache(hub_server.url, tmp_path)
    code, report = as_json("verify", REPO_ID, "--cache-dir", str(tmp_path))
    assert code == 0, report
    assert statuses(report) == {name: OK for name in FILES}
    assert report["layout"] == "cache" and report["path"] == str(snapshot) and report["ok"] is True
    assert report["commit"] == snapshot.name
    assert report["bytes_checked"] == sum(len((source / name).read_bytes()) for name in FILES)
    lfs = next(f for f in report["files"] if f["path"] == "weights/model.safetensors")
    assert len(lfs["expected"]) == 64 and lfs["actual"] == lfs["expected"]  # sha256, not git sha1

    code, out, _ = run("verify", REPO_ID, "--cache-dir", str(tmp_path))
    assert code == 0 and "5 files checked" in out and "all match" in out
    # The revision by commit, too.
    assert run("verify", REPO_ID, "--cache-dir", str(tmp_path), "--revision", snapshot.name)[0] == 0


def test_an_intact_local_dir_verifies_and_unrecorded_files_are_only_counted(
    hub_server, source, tmp_path: Path
) -> None:
    fetch_to_local_dir(hub_server.url, tmp_path)
    (tmp_path / "my-notes.txt").write_text("not downloaded, not judged\n")
    code, report = as_json("verify", "--local-dir", str(tmp_path))
    assert code == 0, report
    assert statuses(report) == {name: OK for name in FILES}
    assert report["unrecorded"] == 1 and report["layout"] == "local-dir"


def test_huggingface_hubs_own_downloads_verify(hub_server, source, tmp_path: Path) -> None:
    """Its cache (blobs named by ETag) and its local-dir records are what we read."""
    huggingface_hub.snapshot_download(REPO_ID, endpoint=hub_server.url, cache_dir=tmp_path / "cache")
    huggingface_hub.snapshot_download(REPO_ID, endpoint=hub_server.url, local_dir=tmp_path / "local")
    code, cached = as_json("verify", REPO_ID, "--cache-dir", str(tmp_path / "cache"))
    assert code == 0 and statuses(cached) == {name: OK for name in FILES}, cached
    code, local = as_json("verify", "--local-dir", str(tmp_path / "local"))
    assert code == 0 and statuses(local) == {name: OK for name in FILES}, local


def test_a_dataset(hub_server, tmp_path: Path) -> None:
    download("tiny/data", repo_type="dataset", endpoints=[hub_server.url], cache_dir=tmp_path, progress=False)
    code, report = as_json("verify", "tiny/data", "--repo-type", "dataset", "--cache-dir", str(tmp_path))
    assert code == 0 and set(statuses(report).values()) == {OK} and len(report["files"]) == 3


# ---------------------------------------------------------------------------------------- damage


def damage_the_cache(snapshot: Path) -> None:
    flip_a_byte(snapshot / "weights/model.safetensors")
    truncate(snapshot / "config.json")
    Path(os.path.realpath(snapshot / "tokenizer/vocab.txt")).unlink()  # the link now dangles


def test_damage_in_the_cache_is_found_and_named(hub_server, source, tmp_path: Path) -> None:
    snapshot = fetch_to_cache(hub_server.url, tmp_path)
    damage_the_cache(snapshot)
    code, report = as_json("verify", REPO_ID, "--cache-dir", str(tmp_path))
    assert code == 6
    assert statuses(report) == {
        "weights/model.safetensors": MISMATCH,
        "config.json": MISMATCH,
        "tokenizer/vocab.txt": MISSING,
        "README.md": OK,
        "same-as-readme.md": OK,
    }
    assert sorted(report["wrong"]) == ["config.json", "tokenizer/vocab.txt", "weights/model.safetensors"]

    code, out, err = run("verify", REPO_ID, "--cache-dir", str(tmp_path))
    assert code == 6 and "Traceback" not in err
    assert err.startswith("hfmirror: error: 3 files do not match") and len(err.strip().splitlines()) == 1
    for name in ("weights/model.safetensors", "config.json", "tokenizer/vocab.txt"):
        assert name in err
    assert "MISSING   tokenizer/vocab.txt: dangling link" in out
    assert "MISMATCH  config.json: git sha1 is" in out


def test_a_link_out_of_the_cache_is_wrong_and_a_plain_copy_is_unchecked(
    hub_server, source, tmp_path: Path
) -> None:
    snapshot = fetch_to_cache(hub_server.url, tmp_path / "cache")
    outside = tmp_path / "elsewhere.txt"
    outside.write_bytes((source / "README.md").read_bytes())  # even the right bytes
    (snapshot / "README.md").unlink()
    os.symlink(outside, snapshot / "README.md")
    copy = snapshot / "config.json"
    content = copy.read_bytes()
    copy.unlink()
    copy.write_bytes(content)  # what a file system without links gets
    code, report = as_json("verify", REPO_ID, "--cache-dir", str(tmp_path / "cache"))
    assert code == 6
    assert statuses(report)["README.md"] == MISMATCH and "outside" in report["files"][0]["detail"]
    assert statuses(report)["config.json"] == UNCHECKED and report["unchecked"] == ["config.json"]
    assert report["wrong"] == ["README.md"]


def test_damage_in_a_local_dir_is_found_and_named(hub_server, source, tmp_path: Path) -> None:
    fetch_to_local_dir(hub_server.url, tmp_path)
    flip_a_byte(tmp_path / "weights/model.safetensors")  # mtime put back: the record still vouches
    truncate(tmp_path / "README.md")
    (tmp_path / "tokenizer/vocab.txt").unlink()
    code, report = as_json("verify", "--local-dir", str(tmp_path))
    assert code == 6
    assert statuses(report) == {
        "weights/model.safetensors": MISMATCH,
        "README.md": MISMATCH,
        "tokenizer/vocab.txt": MISSING,
        "config.json": OK,
        "same-as-readme.md": OK,
    }
    code, _, err = run("verify", "--local-dir", str(tmp_path), "-q")
    assert code == 6 and "weights/model.safetensors" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------- repair


def test_repair_in_the_cache_fetches_only_what_is_wrong(fault_server, faults, source, tmp_path: Path) -> None:
    snapshot = fetch_to_cache(fault_server.url, tmp_path)
    damage_the_cache(snapshot)
    faults.reset()
    code, out, err = run(
        "verify", REPO_ID, "--cache-dir", str(tmp_path), "--repair", "--endpoint", fault_server.url
    )
    assert code == 0, err
    assert "3 repaired" in out and "all match" in out
    assert same_as_source(snapshot, source)
    fetched = sorted(
        r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in faults.requests("*/resolve/*", "GET")
    )
    assert fetched == ["config.json", "tokenizer/vocab.txt", "weights/model.safetensors"]
    # From the commit the snapshot is, not from whatever main is now.
    assert {
        r.path.split("/resolve/", 1)[1].split("/", 1)[0] for r in faults.requests("*/resolve/*", "GET")
    } == {snapshot.name}
    assert run("verify", REPO_ID, "--cache-dir", str(tmp_path))[0] == 0


def test_repair_in_a_local_dir(fault_server, faults, source, tmp_path: Path) -> None:
    fetch_to_local_dir(fault_server.url, tmp_path)
    flip_a_byte(tmp_path / "weights/model.safetensors")
    truncate(tmp_path / "README.md")
    (tmp_path / "tokenizer/vocab.txt").unlink()
    code, _, err = run("verify", "--local-dir", str(tmp_path), "--repair")
    assert code == 2 and "needs REPO_ID" in err  # the records do not name the repository
    code, report = as_json(
        "verify", REPO_ID, "--local-dir", str(tmp_path), "--repair", "--endpoint", fault_server.url
    )
    assert code == 0, report
    assert sorted(report["repaired"]) == ["README.md", "tokenizer/vocab.txt", "weights/model.safetensors"]
    assert set(statuses(report).values()) == {OK}
    assert same_as_source(tmp_path, source)


@pytest.mark.slow
def test_a_failed_repair_leaves_no_wrong_file_in_place(hub_server, source, tmp_path: Path) -> None:
    snapshot = fetch_to_cache(hub_server.url, tmp_path)
    weights = snapshot / "weights/model.safetensors"
    blob = Path(os.path.realpath(weights))
    flip_a_byte(weights)
    code, _, err = run(
        "verify", REPO_ID, "--cache-dir", str(tmp_path), "--repair", "--endpoint", dead_endpoint()
    )
    assert code == 5 and "Traceback" not in err  # no endpoint reachable
    assert not blob.exists()  # absent, not wrong
    report = verify(REPO_ID, cache_dir=tmp_path)
    assert [(f.path, f.status) for f in report.wrong] == [("weights/model.safetensors", MISSING)]


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, code, message",
    [
        ([], 2, "name a repository"),
        (["nobody/here"], 3, "not in the cache"),
        ([REPO_ID, "--revision", "v9"], 3, "no snapshot of verify/model at 'v9'"),
        (["bad//id"], 2, "malformed repo id"),
        (["--local-dir", "{tmp}/nowhere"], 3, "no folder"),
        (["--local-dir", "{tmp}"], 3, "no download records"),
        (["--local-dir", "{tmp}", "--revision", "main"], 2, "--revision is for the cache"),
    ],
)
def test_bad_input_is_one_line_and_an_exit_code(
    hub_server, source, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    fetch_to_cache(hub_server.url, tmp_path / "cache")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    got, _, err = (
        run("verify", *args, "--cache-dir", str(tmp_path / "cache"))
        if "--local-dir" not in args
        else run("verify", *args)
    )
    assert got == code, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_console_command_exits_6(hub_server, source, tmp_path: Path) -> None:
    """As users run it: a real process, the real exit status."""
    snapshot = fetch_to_cache(hub_server.url, tmp_path)
    flip_a_byte(snapshot / "config.json", offset=3)
    command = [sys.executable, "-m", "hfmirror", "verify", REPO_ID, "--cache-dir", str(tmp_path), "-q"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 6 and "config.json" in result.stderr
    assert result.stdout.startswith("MISMATCH  config.json")


def test_the_default_cache_is_verified_and_repaired_in_place(hub_server, source, isolated_home: Path) -> None:
    """No --cache-dir: HF_HUB_CACHE (here the session's temporary home, see tests/isolation.py)."""
    snapshot = download(REPO_ID, endpoints=[hub_server.url], progress=False).path
    assert snapshot.is_relative_to(isolated_home)
    truncate(snapshot / "weights/model.safetensors")
    assert run("verify", REPO_ID)[0] == 6
    code, _, err = run("verify", REPO_ID, "--repair", "--endpoint", hub_server.url, "-q")
    assert code == 0, err
    assert same_as_source(snapshot, source) and run("verify", REPO_ID, "-q") == (0, "", "")


COMMIT = "a" * 40


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        (f"{COMMIT}\n", COMMIT),
        (None, None),  # no refs/main, and "main" is not a commit id
        ("not a commit\n", None),
        (f"{COMMIT}-and-more", None),  # the mirror's reader took the first 40 characters of anything
        (f"{COMMIT}\n{'b' * 40}\n", None),
        ("link outside the repo's folder", None),  # the plain server's reader followed it anywhere in ROOT
    ],
    ids=["commit", "no-ref", "junk", "commit-with-a-tail", "two-lines", "link-out-of-the-repo"],
)
def test_every_reader_of_refs_reads_a_ref_alike(
    tmp_path: Path, ref: str | None, expected: str | None
) -> None:
    """The downloader offline, verify, the team mirror and the plain server all take a revision's
    commit from refs/ the same way (layout.cached_commit): each used to have its own reader."""
    from hfmirror.errors import NetworkError, RevisionNotFoundError
    from hfmirror.hashing import git_blob_sha1
    from hfmirror.layout import cached_commit
    from hfmirror.listing import RemoteFile, RepoListing
    from hfmirror.offline import offline_answer
    from hfmirror.server.checksums import ChecksumCache
    from hfmirror.server.repos import RepoStore
    from hfmirror.server.revisions import ListingStore, RevisionPins

    root = tmp_path / "cache"
    repo_dir = root / "models--org--x"
    (repo_dir / "snapshots" / COMMIT).mkdir(parents=True)
    (repo_dir / "snapshots" / COMMIT / "config.json").write_bytes(b"{}")
    (repo_dir / "refs").mkdir()
    if ref == "link outside the repo's folder":
        (root / "elsewhere").write_text(COMMIT)  # inside ROOT, outside the repo's folder
        (repo_dir / "refs" / "main").symlink_to(root / "elsewhere")
    elif ref is not None:
        (repo_dir / "refs" / "main").write_text(ref)
    store = ListingStore(root)
    file = RemoteFile("config.json", 2, git_blob_sha1(b"{}"))
    store.save(RepoListing("org/x", "model", COMMIT, COMMIT, (file,)))

    def offline() -> str | None:
        try:
            return offline_answer(
                "org/x",
                repo_type="model",
                revision="main",
                filenames=None,
                include=None,
                exclude=None,
                cache_dir=root,
                local_dir=None,
                reason="offline",
            ).commit
        except NetworkError:
            return None

    def verified() -> str | None:
        try:
            return verify("org/x", cache_dir=root, revision="main").commit
        except RevisionNotFoundError:
            return None

    def mirror() -> str | None:
        listing = RevisionPins(root, store, upstream=None, gate=None, ttl=1.0).cached(
            "model", "org/x", "main"
        )  # type: ignore[arg-type]
        return listing.commit if listing is not None else None

    def served() -> str | None:
        checksums = ChecksumCache(tmp_path / "state")
        try:
            repos = RepoStore(root, checksums)
            location = repos.find("model", "org/x")
            assert location is not None
            return repos.snapshot(location, "main").commit
        except RevisionNotFoundError:
            return None
        finally:
            checksums.close()

    found = {
        "layout": cached_commit(repo_dir, "main"),
        "offline": offline(),
        "verify": verified(),
        "mirror": mirror(),
        "serve": served(),
    }
    assert found == dict.fromkeys(found, expected)
    assert cached_commit(repo_dir, COMMIT) == COMMIT and cached_commit(repo_dir, "../../x") is None
