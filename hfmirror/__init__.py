"""hfmirror: a mirror-aware, resumable Hugging Face downloader, a Hub-compatible mirror server,
and a from-scratch transformer checked stage by stage against ``transformers``.

The downloader's Python API is :func:`hfmirror.download`; it needs neither torch nor transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "download"]

if TYPE_CHECKING:
    from .download import download


def __getattr__(name: str) -> Any:
    # Lazy, so that `import hfmirror` (and `hfmirror --help`) stays fast.
    if name == "download":
        from .download import download

        return download
    raise AttributeError(f"module 'hfmirror' has no attribute {name!r}")
