"""The test session never touches the user's real home: every default location is a temporary one.

huggingface_hub writes ``refs/main`` into its default cache even for a ``local_dir`` download, and
hfmirror's server keeps checksums in ``~/.cache/hfmirror`` by default; before tests/isolation.py, a
test run left both behind in the real ``~/.cache``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hub_constants

from hfmirror import constants
from hfmirror.download import download
from hfmirror.layout import repo_folder_name
from hfmirror.server.checksums import DEFAULT_STATE_DIR, ChecksumCache
from tests import isolation
from tests.support import make_repo


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and mtime (empty if the folder does not exist)."""
    if not folder.exists():
        return {}
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in [folder, *folder.rglob("*")]}


def test_every_default_location_is_inside_the_test_home(isolated_home: Path) -> None:
    assert not isolated_home.is_relative_to(isolation.REAL_HOME)
    defaults = {
        "home": Path.home(),
        "hfmirror cache": constants.default_cache_dir(),
        "hfmirror server state": Path(DEFAULT_STATE_DIR).expanduser(),
        "huggingface_hub cache": Path(hub_constants.HF_HUB_CACHE),
        "huggingface_hub home": Path(hub_constants.HF_HOME),
        "huggingface_hub token": Path(hub_constants.HF_TOKEN_PATH),
    }
    outside = {name: path for name, path in defaults.items() if not path.is_relative_to(isolated_home)}
    assert not outside, outside
    assert "HF_ENDPOINT" not in os.environ and "HF_TOKEN" not in os.environ


def test_downloads_with_default_locations_leave_the_real_cache_alone(
    hub_server, isolated_home: Path, tmp_path: Path
) -> None:
    # A repo of its own, so that what this test would leak cannot be confused with anyone else's files.
    repo_id = f"isolation/probe-{uuid.uuid4().hex[:12]}"
    make_repo(hub_server.root, repo_id, {"config.json": b"{}\n", "notes/a.txt": b"a\n"})
    folder = repo_folder_name(repo_id, "model")
    real_state = isolation.REAL_HOME / ".cache" / "hfmirror"
    state_before = tree(real_state)

    # What used to leak: huggingface_hub records refs/main in its default cache for a local_dir download.
    huggingface_hub.snapshot_download(repo_id, endpoint=hub_server.url, local_dir=tmp_path / "local")
    # hfmirror with its default cache, in this process and as a user runs it.
    download(repo_id, endpoints=[hub_server.url], progress=False)
    command = [sys.executable, "-m", "hfmirror", "download", repo_id, "--endpoint", hub_server.url, "-q"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    # hfmirror serve's default state dir.
    ChecksumCache().close()

    test_hub = isolated_home / ".cache" / "huggingface" / "hub"
    # The defaults were used, and they are in the test home.
    assert (test_hub / folder / "refs" / "main").is_file()
    assert Path(run.stdout.strip()).is_relative_to(test_hub)
    assert (isolated_home / ".cache" / "hfmirror" / "checksums.sqlite3").is_file()
    for real_hub in {isolation.real_hub_cache(), isolation.REAL_HOME / ".cache" / "huggingface" / "hub"}:
        assert not (real_hub / folder).exists(), f"written into the real cache: {real_hub / folder}"
        assert not (real_hub / ".locks" / folder).exists()
    assert tree(real_state) == state_before, f"{real_state} changed"
