"""Fixtures of the team-mirror tests: one upstream for the session, mirrors per test.

* ``upstream``: `hfmirror serve` over ``upstream_root`` wrapped by the fault injector, in this
  process, its plan reset before and after each test (``.url``, ``.root``, ``.plan``, ``.sent()``).
* ``mirror``: start `hfmirror serve --upstream` in this process: ``m = mirror(upstream.url, **options)``.
* ``unused_port``: a loopback port nobody listens on (a dead upstream).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hfmirror.server.app import ServerThread, create_app
from hfmirror.server.faults import FaultInjector, FaultPlan
from hfmirror.server.mirror import create_mirror_app
from tests.mirror.support import MIB, free_port
from tests.support import make_repo, save_tiny_bert

BIG = 24 * MIB + 12345  # large enough for several upstream connections, not a multiple of any block


@dataclass
class Upstream:
    url: str
    root: Path
    plan: FaultPlan

    def sent(self, path_glob: str = "*") -> int:
        """Body bytes the upstream sent for paths matching the glob."""
        return self.plan.bytes_sent(path_glob)


@dataclass
class Mirror:
    url: str
    app: Any
    root: Path
    server: ServerThread

    def counter(self, name: str) -> int:
        return self.app.state.metrics.value(name)


@pytest.fixture(scope="session")
def upstream_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("upstream-root")
    save_tiny_bert(root / "tiny" / "bert")
    make_repo(root, "big/one", {"weights.bin": BIG, "config.json": b'{"big": true}\n'})
    make_repo(root, "gated/model", {"model.safetensors": 2 * MIB + 7, "config.json": b'{"gated": true}\n'})
    make_repo(root, "evict/three", {"a.bin": MIB, "b.bin": MIB, "c.bin": MIB})
    make_repo(root, "tiny/data", {"README.md": b"# data\n", "train.csv": b"a,b\n1,2\n"}, repo_type="dataset")
    return root


@pytest.fixture(scope="session")
def upstream_server(upstream_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    inner = create_app(upstream_root, state_dir=tmp_path_factory.mktemp("upstream-state"))
    plan = FaultPlan()
    with ServerThread(FaultInjector(inner, plan)) as server:
        yield Upstream(server.url, upstream_root, plan)
    inner.state.checksums.close()


@pytest.fixture
def upstream(upstream_server: Upstream) -> Iterator[Upstream]:
    """The upstream with no faults and no records, before and after the test."""
    upstream_server.plan.reset()
    yield upstream_server
    upstream_server.plan.reset()


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Callable[..., Mirror]]:
    """Start a mirror in this process: ``m = mirror(upstream.url, max_size=...)`` (stopped afterwards)."""
    started: list[Mirror] = []

    def start(*upstreams: str, root: Path | None = None, **options: Any) -> Mirror:
        root = root if root is not None else tmp_path / "mirror-cache"
        options.setdefault("state_dir", tmp_path / "mirror-state")
        app = create_mirror_app(root, list(upstreams), **options)
        server = ServerThread(app).start()
        started.append(Mirror(server.url, app, root, server))
        return started[-1]

    yield start
    for m in started:
        m.app.state.api.close()
        m.server.stop()
        m.app.state.store.checksums.close()


def hub(**kwargs: Any) -> dict[str, Any]:
    """huggingface_hub keyword arguments: anonymous unless a token is given."""
    kwargs.setdefault("token", False)
    return kwargs


@pytest.fixture
def unused_port() -> int:
    """A loopback port with nobody listening (a dead upstream)."""
    return free_port()
