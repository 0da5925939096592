"""The server's listings: confined to ROOT through every symlink, and kept between requests.

Cost is counted, not timed: a spy on ``os.scandir`` / ``os.stat`` / ``os.lstat`` counts the calls the
server makes on a repo's paths, which is what grows with the number of files when a listing is
recomputed per request.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from hfmirror.hashing import git_blob_sha1
from hfmirror.server.app import ServerThread, create_app
from tests.support import make_repo
from tests.test_server import raw_get

SECRET = b"TOP SECRET"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def make_cache_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT_A) -> Path:
    """A Hugging Face cache folder for ``repo_id`` as huggingface_hub writes it: blobs, links, a ref."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    for name, content in files.items():
        lfs = name.endswith(".safetensors")
        blob = folder / "blobs" / (hashlib.sha256(content).hexdigest() if lfs else git_blob_sha1(content))
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return folder


def outside_folder(tmp_path: Path) -> Path:
    """A folder next to ROOT holding secrets under the names a repo would use."""
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True, exist_ok=True)
    for name in ("leak.txt", "sub/leak.txt", "main", "m/config.json"):
        (outside / name).parent.mkdir(parents=True, exist_ok=True)
        (outside / name).write_bytes(SECRET)
    (outside / "main").write_text(COMMIT_A)  # a ref that names a real commit inside ROOT
    (outside / COMMIT_B).write_text(COMMIT_A)
    return outside


def assert_not_served(url: str, paths: list[str]) -> None:
    for path in paths:
        status, _, body = raw_get(url, path)
        assert 400 <= status < 500, (path, status, body[:200])
        assert SECRET not in body, (path, body[:200])
        if path.startswith("/api/"):  # a listing must not even name what is outside
            assert b"leak" not in body, (path, body[:200])


# ------------------------------------------------------------------------------- confinement


def test_a_cached_commit_whose_snapshot_folder_links_outside_root_is_not_served(
    tmp_path: Path, serve: Callable[..., str]
) -> None:
    root = tmp_path / "root"
    folder = make_cache_repo(root, "org/x", {"ok.txt": b"fine\n"})
    (folder / "snapshots" / COMMIT_B).symlink_to(outside_folder(tmp_path), target_is_directory=True)
    (folder / "refs" / "evil").write_text(COMMIT_B)
    url = serve(root)
    assert_not_served(
        url,
        [
            f"/api/models/org/x/revision/{COMMIT_B}?blobs=true",
            "/api/models/org/x/revision/evil",
            f"/api/models/org/x/tree/{COMMIT_B}?recursive=true",
            f"/org/x/resolve/{COMMIT_B}/leak.txt",
            "/org/x/resolve/evil/sub/leak.txt",
        ],
    )
    assert requests.get(f"{url}/org/x/resolve/main/ok.txt", timeout=10).content == b"fine\n"


def test_refs_that_link_outside_root_are_not_read(tmp_path: Path, serve: Callable[..., str]) -> None:
    root = tmp_path / "root"
    outside = outside_folder(tmp_path)
    linked_dir = make_cache_repo(root, "org/x", {"ok.txt": b"fine\n"})
    (linked_dir / "refs" / "main").unlink()
    (linked_dir / "refs").rmdir()
    (linked_dir / "refs").symlink_to(outside, target_is_directory=True)  # refs/main -> outside/main
    linked_file = make_cache_repo(root, "org/y", {"ok.txt": b"fine\n"})
    (linked_file / "refs" / "main").unlink()
    (linked_file / "refs" / "main").symlink_to(outside / "main")
    url = serve(root)
    for repo in ("org/x", "org/y"):
        status, headers, _ = raw_get(url, f"/api/models/{repo}/revision/main")
        assert (status, headers.get("x-error-code")) == (404, "RevisionNotFound")
        # The commit itself is inside ROOT and stays reachable by its id.
        assert requests.get(f"{url}/{repo}/resolve/{COMMIT_A}/ok.txt", timeout=10).content == b"fine\n"


@pytest.mark.parametrize(
    "link",
    ["blobs folder", "file link", "folder link in a snapshot", "repo folder", "org folder", "plain repo"],
)
def test_every_other_link_out_of_root_is_refused(
    tmp_path: Path, serve: Callable[..., str], link: str
) -> None:
    root = tmp_path / "root"
    outside = outside_folder(tmp_path)
    folder = make_cache_repo(root, "org/x", {"ok.txt": b"fine\n"})
    snapshot = folder / "snapshots" / COMMIT_A
    requested = ["/api/models/org/x/revision/main?blobs=true", "/api/models/org/x/tree/main?recursive=true"]
    if link == "blobs folder":
        (folder / "blobs").rename(tmp_path / "outside-blobs")
        (folder / "blobs").symlink_to(tmp_path / "outside-blobs", target_is_directory=True)
        (tmp_path / "outside-blobs" / git_blob_sha1(b"fine\n")).write_bytes(SECRET)
        requested.append("/org/x/resolve/main/ok.txt")
    elif link == "file link":
        (snapshot / "leak.txt").symlink_to(outside / "leak.txt")
        requested.append("/org/x/resolve/main/leak.txt")
    elif link == "folder link in a snapshot":
        (snapshot / "leaky").symlink_to(outside / "sub", target_is_directory=True)
        requested.append("/org/x/resolve/main/leaky/leak.txt")
    elif link == "repo folder":
        other = make_cache_repo(tmp_path / "other-cache", "org/y", {"leak.txt": SECRET})
        (root / "models--org--y").symlink_to(other, target_is_directory=True)
        requested += ["/api/models/org/y", "/org/y/resolve/main/leak.txt"]
    elif link == "org folder":
        (root / "evil").symlink_to(outside, target_is_directory=True)  # outside/m/config.json
        requested += ["/api/models/evil/m", "/evil/m/resolve/main/config.json"]
    else:
        (root / "org").mkdir()
        (root / "org" / "m").symlink_to(outside, target_is_directory=True)
        requested += ["/api/models/org/m", "/org/m/resolve/main/leak.txt"]
    url = serve(root)
    assert_not_served(url, requested[2:])
    for path in requested[:2]:
        status, _, body = raw_get(url, path)
        assert status == 200 and SECRET not in body and b"leak" not in body, (path, body[:300])


def test_a_file_swapped_for_a_link_out_of_root_after_listing_is_not_served(
    tmp_path: Path, serve: Callable[..., str]
) -> None:
    outside = outside_folder(tmp_path)
    repo = make_repo(tmp_path / "root", "org/m", {"ok.txt": b"fine\n", "sub/a.txt": b"a\n"})
    url = serve(tmp_path / "root")
    assert requests.get(f"{url}/org/m/resolve/main/ok.txt", timeout=10).content == b"fine\n"
    folder_mtime = repo.stat().st_mtime_ns
    (repo / "ok.txt").unlink()
    (repo / "ok.txt").symlink_to(outside / "leak.txt")
    os.utime(repo, ns=(folder_mtime, folder_mtime))  # the folder looks unchanged: only the file tells
    (repo / "sub").rename(tmp_path / "moved")
    (repo / "sub").symlink_to(outside / "sub", target_is_directory=True)
    assert_not_served(url, ["/org/m/resolve/main/ok.txt", "/org/m/resolve/main/sub/leak.txt"])


# ----------------------------------------------------------------------------------- cost


class PathSpy:
    """Counts ``os.scandir``, ``os.stat`` and ``os.lstat`` calls on paths under one folder."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, under: Path) -> None:
        self.under = str(under)
        self.counts = {"scandir": 0, "stat": 0}
        self._lock = threading.Lock()
        for name, kind in (("scandir", "scandir"), ("stat", "stat"), ("lstat", "stat")):
            monkeypatch.setattr(os, name, self._counting(getattr(os, name), kind))

    def _counting(self, real: Callable[..., Any], kind: str) -> Callable[..., Any]:
        def spy(path: Any = ".", *args: Any, **kwargs: Any) -> Any:
            if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(self.under):
                with self._lock:
                    self.counts[kind] += 1
            return real(path, *args, **kwargs)

        return spy

    def take(self) -> dict[str, int]:
        """The counts since the last call."""
        with self._lock:
            counts, self.counts = self.counts, {"scandir": 0, "stat": 0}
        return counts


def age(folder: Path, seconds: float = 3600) -> None:
    """Set every folder's mtime an hour back, as for a repo written long before the server started
    (a folder changed within the last two seconds is re-read on every request, by design)."""
    for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        old = path.stat().st_mtime - seconds
        os.utime(path, (old, old))


@pytest.fixture
def big_repo(tmp_path: Path) -> Iterator[tuple[str, Path, Any]]:
    """A plain repo of 600 files in 3 folders, served; yields (url, repo folder, app)."""
    files: dict[str, bytes | int] = {f"part_{i:03d}.txt": f"{i}\n".encode() for i in range(200)}
    files.update({f"a/part_{i:03d}.txt": f"a{i}\n".encode() for i in range(200)})
    files.update({f"a/b/part_{i:03d}.txt": f"b{i}\n".encode() for i in range(199)})
    files["a/b/w.safetensors"] = 5000
    repo = make_repo(tmp_path / "root", "org/big", files)
    age(repo)
    app = create_app(tmp_path / "root", state_dir=tmp_path / "state")
    with ServerThread(app) as server:
        yield server.url, repo, app
    app.state.checksums.close()


def test_a_get_costs_a_stat_per_folder_not_per_file(big_repo: tuple[str, Path, Any], monkeypatch) -> None:
    url, repo, app = big_repo
    spy = PathSpy(monkeypatch, repo)
    session = requests.Session()
    assert session.get(f"{url}/api/models/org/big/revision/main", timeout=10).status_code == 200
    first = spy.take()
    assert first["scandir"] == 3  # the first request reads each folder once
    hashed = app.state.checksums.computed
    assert hashed == 600
    for i in range(10):
        for path in (
            f"/org/big/resolve/main/a/part_{i:03d}.txt",
            "/api/models/org/big/revision/main?blobs=true",
            "/api/models/org/big/tree/main/a?recursive=true",
        ):
            assert session.get(url + path, timeout=10).status_code == 200
            counts = spy.take()
            assert counts["scandir"] == 0, (path, counts)
            assert counts["stat"] <= 15, (path, counts)  # 3 folders and the path to one file, not 600
    assert app.state.checksums.computed == hashed


def test_changes_are_noticed_and_only_what_changed_is_read_again(
    big_repo: tuple[str, Path, Any], monkeypatch
) -> None:
    url, repo, app = big_repo
    info_url = f"{url}/api/models/org/big/revision/main?blobs=true"
    before = requests.get(info_url, timeout=10).json()
    hashed = app.state.checksums.computed
    spy = PathSpy(monkeypatch, repo)

    # A new file in a sub-folder: listed at once; that one folder is read again, one file hashed.
    (repo / "a" / "b" / "new.txt").write_bytes(b"new\n")
    added = requests.get(info_url, timeout=10).json()
    assert "a/b/new.txt" in {s["rfilename"] for s in added["siblings"]}
    assert added["sha"] != before["sha"]
    assert spy.take()["scandir"] == 1
    assert app.state.checksums.computed == hashed + 1

    # A file rewritten in place, its folder's mtime unchanged: the resolve of it sees the new bytes and
    # gives their checksum, and the listing follows.
    target = repo / "a" / "part_007.txt"
    folder_mtime = target.parent.stat().st_mtime_ns
    target.write_bytes(b"rewritten in place\n")
    os.utime(target.parent, ns=(folder_mtime, folder_mtime))
    r = requests.get(f"{url}/org/big/resolve/main/a/part_007.txt", timeout=10)
    assert r.content == b"rewritten in place\n"
    assert r.headers["ETag"] == f'"{git_blob_sha1(b"rewritten in place" + bytes([10]))}"'
    rewritten = requests.get(info_url, timeout=10).json()
    assert rewritten["sha"] not in (before["sha"], added["sha"])
    assert r.headers["X-Repo-Commit"] == rewritten["sha"]

    # A file deleted, a folder renamed.
    (repo / "part_000.txt").unlink()
    (repo / "a" / "b").rename(repo / "a" / "c")
    names = {s["rfilename"] for s in requests.get(info_url, timeout=10).json()["siblings"]}
    assert "part_000.txt" not in names and "a/b/new.txt" not in names and "a/c/new.txt" in names
    gone = requests.get(f"{url}/org/big/resolve/main/part_000.txt", timeout=10)
    assert gone.status_code == 404 and gone.headers["X-Error-Code"] == "EntryNotFound"


def test_a_file_added_in_the_same_mtime_tick_as_the_last_read_is_still_noticed(
    tmp_path: Path, serve: Callable[..., str]
) -> None:
    repo = make_repo(tmp_path / "root", "org/m", {"a.txt": b"a\n"})
    url = serve(tmp_path / "root")
    assert requests.get(f"{url}/api/models/org/m", timeout=10).status_code == 200
    # A coarse file-system clock: the folder changes but its mtime reads the same as when it was read.
    mtime = repo.stat().st_mtime_ns
    (repo / "b.txt").write_bytes(b"b\n")
    os.utime(repo, ns=(mtime, mtime))
    names = {s["rfilename"] for s in requests.get(f"{url}/api/models/org/m", timeout=10).json()["siblings"]}
    assert names == {"a.txt", "b.txt"}


def test_a_cached_snapshot_is_read_once_and_notices_new_files(
    tmp_path: Path, serve: Callable[..., str], monkeypatch
) -> None:
    root = tmp_path / "root"
    folder = make_cache_repo(root, "org/x", {f"f{i}.txt": f"{i}\n".encode() for i in range(50)})
    age(folder)
    url = serve(root)
    assert requests.get(f"{url}/api/models/org/x", timeout=10).status_code == 200
    spy = PathSpy(monkeypatch, folder)
    for i in range(5):
        assert requests.get(f"{url}/org/x/resolve/main/f{i}.txt", timeout=10).content == f"{i}\n".encode()
        counts = spy.take()
        assert counts["scandir"] == 0 and counts["stat"] <= 30, counts  # links to blobs: a few more
    # huggingface_hub adds a file of the same commit later: the snapshot folder changes, and it shows.
    make_cache_repo(root, "org/x", {"late.txt": b"late\n"})
    assert requests.get(f"{url}/org/x/resolve/main/late.txt", timeout=10).content == b"late\n"


# ------------------------------------------------------------------------------ HTTP caching


def test_commit_addressed_answers_are_immutable_and_branch_ones_revalidate(
    tmp_path: Path, serve: Callable[..., str]
) -> None:
    make_repo(tmp_path / "root", "org/m", {"a.txt": b"hello\n", "w.safetensors": 1000})
    url = serve(tmp_path / "root")
    commit = requests.get(f"{url}/api/models/org/m", timeout=10).json()["sha"]
    immutable = "public, max-age=31536000, immutable"
    for path in (f"/org/m/resolve/{commit}/a.txt", f"/api/models/org/m/revision/{commit}"):
        assert requests.get(url + path, timeout=10).headers["Cache-Control"] == immutable, path
    for path in ("/org/m/resolve/main/a.txt", "/api/models/org/m", "/api/models/org/m/tree/main"):
        assert requests.get(url + path, timeout=10).headers["Cache-Control"] == "no-cache", path
    # A cache revalidating what it holds gets a 304 without the body.
    first = requests.get(f"{url}/org/m/resolve/main/w.safetensors", timeout=10)
    again = requests.get(
        f"{url}/org/m/resolve/main/w.safetensors",
        headers={"If-None-Match": first.headers["ETag"]},
        timeout=10,
    )
    assert (
        again.status_code == 304 and again.content == b"" and again.headers["ETag"] == first.headers["ETag"]
    )
    other = requests.get(f"{url}/org/m/resolve/main/a.txt", headers={"If-None-Match": '"0000"'}, timeout=10)
    assert other.status_code == 200 and other.content == b"hello\n"
