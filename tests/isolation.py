"""Keep the test session away from the user's real home: caches, state, tokens, mirror settings.

:func:`isolate` runs from ``pytest_configure`` (tests/conftest.py), before any test module is
imported. It has to: huggingface_hub and transformers read ``HF_HOME``, ``HF_HUB_CACHE`` and the
home folder once, at import time, so pointing the environment elsewhere any later (in a fixture)
would leave in-process calls writing into ``~/.cache/huggingface``. Every subprocess a test starts
inherits the same environment, so it is isolated too.

What moves into a temporary home: ``HOME`` itself (so ``~/.cache/hfmirror``, hfmirror's default
state dir, and every other ``~``-derived default follow), ``XDG_CACHE_HOME`` / ``XDG_CONFIG_HOME``,
``HF_HOME`` and ``HF_HUB_CACHE``. Variables that would send tests to a real cache, a real mirror or
with a real token are removed: a test must never reach the internet because a developer exported
``HF_ENDPOINT=https://hf-mirror.com``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["REAL_HOME", "isolate", "real_hub_cache", "restore", "test_home"]

# Settings that point at real caches, real endpoints or real credentials.
_REMOVED = (
    "HF_ASSETS_CACHE",
    "HF_DATASETS_CACHE",
    "HF_ENDPOINT",
    "HF_TOKEN",
    "HF_TOKEN_PATH",
    "HF_XET_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HUGGING_FACE_HUB_TOKEN",
    "TRANSFORMERS_CACHE",
    "TORCH_HOME",
)
_SET = ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "HF_HOME", "HF_HUB_CACHE")

REAL_HOME = Path(os.path.expanduser("~"))
_saved: dict[str, str | None] = {}
_home: Path | None = None


def real_hub_cache() -> Path:
    """Where huggingface_hub would cache downloads for this user, outside the tests (computed the way
    huggingface_hub.constants does, from the environment as it was before :func:`isolate`)."""
    env = {name: value for name, value in _saved.items() if value is not None} if _saved else os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(env.get("XDG_CACHE_HOME") or REAL_HOME / ".cache") / "huggingface" / "hub"


def test_home() -> Path:
    """The temporary home of this session (only after :func:`isolate`)."""
    assert _home is not None, "tests.isolation.isolate() has not run"
    return _home


test_home.__test__ = False  # a helper, not a test, despite its name


def isolate() -> Path:
    """Point HOME and every Hugging Face / hfmirror default at a fresh temporary folder; return it."""
    global _home
    if _home is not None:
        return _home
    home = Path(tempfile.mkdtemp(prefix="hfmirror-tests-home-")).resolve()
    for name in _REMOVED + _SET:
        _saved[name] = os.environ.get(name)
    for name in _REMOVED:
        os.environ.pop(name, None)
    os.environ["HOME"] = str(home)
    os.environ["XDG_CACHE_HOME"] = str(home / ".cache")
    os.environ["XDG_CONFIG_HOME"] = str(home / ".config")
    os.environ["HF_HOME"] = str(home / ".cache" / "huggingface")
    os.environ["HF_HUB_CACHE"] = str(home / ".cache" / "huggingface" / "hub")
    _home = home
    return home


def restore() -> None:
    """Put the environment back and delete the temporary home (end of the session)."""
    global _home
    for name, value in _saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _saved.clear()
    if _home is not None:
        shutil.rmtree(_home, ignore_errors=True)
        _home = None
