"""Session fixtures: a served folder of tiny repos, the mirror running on it, and a fault-injecting copy.

* ``hub_root``: a plain-tree ROOT (``tiny/bert``, ``tiny/nested``, dataset ``tiny/data``,
  ``bert-base-uncased``), built once per session. Tests must not change these repos; add new ones
  under other names if needed.
* ``hub_server``: the real app serving ``hub_root`` from a thread: ``.url``, ``.root``, ``.app``.
* ``fault_server``: the same, wrapped in :class:`~hfmirror.server.faults.FaultInjector`: also ``.plan``.
* ``faults``: the fault server's plan, reset before and after the test.
* ``serve``: start the app on any folder for one test: ``url = serve(root, page_size=2)``.
* ``isolated_home`` (autouse): the temporary home every default points at (see tests/isolation.py),
  so that no test reads or writes the user's real ``~/.cache``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hfmirror.server.app import ServerThread, create_app
from hfmirror.server.faults import FaultInjector, FaultPlan
from tests import isolation
from tests.support import make_repo, save_tiny_bert

# Larger than 1 MiB and not a multiple of any chunk size, so range and drop offsets are interesting.
BIG_FILE_SIZE = 3 * 1024 * 1024 + 4321


def pytest_configure(config: pytest.Config) -> None:
    """Before any test module is imported (huggingface_hub reads its cache paths at import time)."""
    isolation.isolate()


def pytest_unconfigure(config: pytest.Config) -> None:
    isolation.restore()


@pytest.fixture(scope="session", autouse=True)
def isolated_home() -> Path:
    """The session's temporary home. Fails at once if huggingface_hub was imported before the
    environment was redirected (an import added to this file, say), since it would then use the
    user's real cache."""
    home = isolation.test_home()
    from huggingface_hub import constants as hub_constants

    assert Path(hub_constants.HF_HUB_CACHE).is_relative_to(home), hub_constants.HF_HUB_CACHE
    return home


@dataclass
class RunningServer:
    """A server started by a fixture."""

    url: str
    root: Path
    app: Any  # the ASGI app being served (for fault servers: the FaultInjector)
    state_dir: Path
    plan: FaultPlan | None = None


@pytest.fixture(scope="session")
def hub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain-tree ROOT with a few tiny repos (see the module docstring)."""
    root = tmp_path_factory.mktemp("hub-root")
    save_tiny_bert(root / "tiny" / "bert")
    make_repo(
        root,
        "tiny/nested",
        {
            "README.md": b"# tiny/nested\n\nFolders within folders.\n",
            "a/b/c.txt": b"deep inside\n",
            "a/top.txt": b"one level down\n",
            "config.json": b'{"model_type": "none"}\n',
            "data/big.bin": BIG_FILE_SIZE,
        },
    )
    make_repo(
        root,
        "tiny/data",
        {
            "README.md": b"# a tiny dataset\n",
            "train.csv": b"text,label\nhello,1\nworld,0\n",
            "data/x.parquet": 2048,
        },
        repo_type="dataset",
    )
    save_tiny_bert(root / "bert-base-uncased", architecture="BertForMaskedLM", seed=1)
    return root


def _serve(app: Any, root: Path, state_dir: Path, plan: FaultPlan | None = None) -> Iterator[RunningServer]:
    thread = ServerThread(app).start()
    try:
        yield RunningServer(url=thread.url, root=root, app=app, state_dir=state_dir, plan=plan)
    finally:
        thread.stop()


@pytest.fixture(scope="session")
def hub_server(hub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The mirror serving ``hub_root`` on a free port of 127.0.0.1."""
    state_dir = tmp_path_factory.mktemp("hub-state")
    app = create_app(hub_root, state_dir=state_dir)
    yield from _serve(app, hub_root, state_dir)
    app.state.checksums.close()


@pytest.fixture(scope="session")
def fault_server(hub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The mirror serving ``hub_root`` through the fault injector (use the ``faults`` fixture to reset it)."""
    state_dir = tmp_path_factory.mktemp("fault-state")
    inner = create_app(hub_root, state_dir=state_dir)
    plan = FaultPlan()
    yield from _serve(FaultInjector(inner, plan), hub_root, state_dir, plan)
    inner.state.checksums.close()


@pytest.fixture
def faults(fault_server: RunningServer) -> Iterator[FaultPlan]:
    """The fault server's plan, empty (no faults, no records) at the start and the end of the test."""
    assert fault_server.plan is not None
    fault_server.plan.reset()
    yield fault_server.plan
    fault_server.plan.reset()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start the app on any folder for one test: ``url = serve(root, page_size=2)``; stopped afterwards."""
    started: list[tuple[ServerThread, Any]] = []

    def start(root: Path, **kwargs: Any) -> str:
        kwargs.setdefault("state_dir", tmp_path / "state")
        app = create_app(root, **kwargs)
        thread = ServerThread(app).start()
        started.append((thread, app))
        return thread.url

    yield start
    for thread, app in started:
        thread.stop()
        app.state.checksums.close()
