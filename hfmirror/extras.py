"""The optional extras (``pyproject.toml``) and the check a command makes before it needs one.

``importlib.util.find_spec`` only looks for a package, it imports nothing: checking costs nothing
and keeps ``hfmirror --help`` and the download path free of torch.
"""

from __future__ import annotations

import importlib.util

from .errors import MissingExtraError

__all__ = ["EXTRAS", "require_extras"]

# Each extra, and the modules a command that needs it cannot run without.
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("starlette", "uvicorn"),
    "compare": ("torch", "transformers", "safetensors"),
    "report": ("matplotlib", "PIL"),  # `compare --html`: matplotlib draws, Pillow writes the PNGs
}


def require_extras(*extras: str) -> None:
    """Check that the modules of ``extras`` are installed.

    Raises:
        MissingExtraError: one is not; the message says which ``pip install`` fixes it.
    """
    for extra in extras:
        missing = [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]
        if missing:
            raise MissingExtraError(
                f"this command needs {', '.join(missing)} (the '{extra}' extra), which is not "
                f"installed: pip install 'hfmirror[{extra}]' (from a source checkout: "
                f"pip install -e '.[{extra}]')"
            )
