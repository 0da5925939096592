"""Which repos a mirror serves: ``--allow`` and ``--deny`` patterns.

Patterns are shell globs (``fnmatch``) on the repo id as a client's URL names it, lower-cased as the
Hub treats ids: ``org/name`` for models, ``datasets/org/name`` for datasets. ``--deny`` wins over
``--allow``; with no ``--allow``, everything not denied is served. The policy applies to what is
already cached as well as to what would be fetched.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

__all__ = ["RepoFilter"]


class RepoFilter:
    """Allow and deny lists of repo-id globs."""

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self.allow = tuple(p.strip().lower() for p in allow if p.strip())
        self.deny = tuple(p.strip().lower() for p in deny if p.strip())

    @staticmethod
    def name(repo_type: str, repo_id: str) -> str:
        """The name patterns are matched against."""
        return (repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}").lower()

    def permits(self, repo_type: str, repo_id: str) -> bool:
        name = self.name(repo_type, repo_id)
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.deny):
            return False
        return not self.allow or any(fnmatch.fnmatchcase(name, pattern) for pattern in self.allow)
