"""Scale-out: Debian's nginx (installed by .ci/run) in front of two mirror replicas on one cache.

nginx runs the configuration documented in deploy/nginx.conf, with only its ports and paths
replaced; huggingface_hub downloads through it.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
import requests

from tests.mirror.conftest import Upstream, hub
from tests.mirror.support import REPO_ROOT, files_under, free_port, start_mirror_process, wait_until

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_config(workdir: Path, listen: int, replicas: list[int]) -> Path:
    """deploy/nginx.conf with this test's ports and folders (and what nginx needs to run unprivileged)."""
    text = (REPO_ROOT / "deploy" / "nginx.conf").read_text()
    for documented, port in zip(("127.0.0.1:8001", "127.0.0.1:8002"), replicas, strict=True):
        assert documented in text
        text = text.replace(documented, f"127.0.0.1:{port}")
    text = text.replace("listen 8000;", f"listen 127.0.0.1:{listen};")
    text = text.replace("/var/cache/nginx/hfmirror", str(workdir / "nginx-cache"))
    top = [f"pid {workdir}/nginx.pid;", f"error_log {workdir}/nginx-error.log;", "daemon off;"]
    if os.geteuid() == 0:
        top.append("user root;")  # workers must write the test's folders
    temp = "".join(
        f"    {kind}_temp_path {workdir}/nginx-{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {\n", f"http {{\n{temp}    access_log {workdir}/nginx-access.log;\n", 1)
    path = workdir / "nginx.conf"
    path.write_text("\n".join(top) + "\n" + text)
    return path


@pytest.fixture
def nginx_in_front(upstream: Upstream, tmp_path: Path) -> Iterator[tuple[str, list]]:
    """Two replicas on one cache and nginx before them; yields (nginx URL, replicas)."""
    assert Path(NGINX).exists(), "nginx is needed: apt-get install -y nginx (.ci/run does)"
    cache = tmp_path / "cache"
    replicas = [start_mirror_process(cache, upstream.url, tmp_path) for _ in range(2)]
    listen = free_port()
    config = nginx_config(tmp_path, listen, [r.port for r in replicas])
    check = subprocess.run([NGINX, "-t", "-c", str(config)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    with open(tmp_path / "nginx-stderr.log", "wb") as stderr:
        process = subprocess.Popen([NGINX, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_until(lambda: _listening(listen) or process.poll() is not None, timeout=30)
        assert process.poll() is None, (tmp_path / "nginx-stderr.log").read_text()
        yield f"http://127.0.0.1:{listen}", replicas
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(20)
        for replica in replicas:
            replica.stop()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_huggingface_hub_through_nginx_and_two_replicas(
    upstream: Upstream, nginx_in_front: tuple[str, list], tmp_path: Path
) -> None:
    url, replicas = nginx_in_front
    expected = files_under(upstream.root / "tiny" / "bert")
    for i in range(3):  # the first fills everything; the others come from nginx's cache or a replica's
        path = huggingface_hub.snapshot_download(
            "tiny/bert", **hub(endpoint=url, cache_dir=tmp_path / f"c{i}")
        )
        assert files_under(Path(path)) == expected
    weights = (upstream.root / "big/one/weights.bin").read_bytes()

    def fetch_weights(i: int) -> bytes:
        cache = tmp_path / f"w{i}"
        return Path(
            huggingface_hub.hf_hub_download("big/one", "weights.bin", **hub(endpoint=url, cache_dir=cache))
        ).read_bytes()

    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # at once: nginx passes some on to both replicas
        assert all(body == weights for body in pool.map(fetch_weights, range(3)))
    # Each file crossed the upstream once, whichever replica asked.
    for name, content in expected.items():
        assert upstream.sent(f"/tiny/bert/resolve/*/{name}") == len(content), name
    assert upstream.sent("*/weights.bin") <= len(weights) + 4 * 1024 * 1024
    # nginx kept the commit-addressed answers, and passes branch listings on every time.
    commit = requests.get(f"{url}/api/models/tiny/bert", timeout=30).json()["sha"]
    statuses = [
        requests.get(f"{url}/tiny/bert/resolve/{commit}/config.json", timeout=30).headers["X-Cache-Status"]
        for _ in range(2)
    ]
    assert statuses[-1] == "HIT"
    listing = [
        requests.get(f"{url}/api/models/tiny/bert", timeout=30).headers["X-Cache-Status"] for _ in range(2)
    ]
    assert "HIT" not in listing
    # Both replicas took requests (their log lines are written as each answer ends).
    wait_until(lambda: all('"GET /' in r.log() or '"HEAD /' in r.log() for r in replicas), timeout=10)


@pytest.mark.slow
def test_nginx_never_gives_an_answer_kept_for_one_host_to_another(
    upstream: Upstream, nginx_in_front: tuple[str, list]
) -> None:
    # Answers carry URLs built from the Host header (a tree page's Link): a forged Host must not
    # plant them in what nginx gives everyone else.
    url, _ = nginx_in_front
    commit = requests.get(f"{url}/api/models/tiny/bert", timeout=30).json()["sha"]
    page = f"{url}/api/models/tiny/bert/tree/{commit}"  # commit-addressed: immutable, kept by nginx
    forged = [
        requests.get(page, headers={"Host": "evil.example"}, timeout=30).headers["X-Cache-Status"]
        for _ in range(2)
    ]
    assert forged == ["MISS", "HIT"]  # kept, for that Host
    assert requests.get(page, timeout=30).headers["X-Cache-Status"] == "MISS"
    assert requests.get(page, timeout=30).headers["X-Cache-Status"] == "HIT"
