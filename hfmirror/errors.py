"""Every error hfmirror raises on purpose, in one place.

Library code raises these; only ``hfmirror.cli`` turns them into messages and exit codes. Each class
sits on a standard-library base as well, so callers can catch broadly (``except OSError``) or
precisely (``except RepoNotFoundError``)::

    HfMirrorError
    ├── BadInputError (ValueError)            the caller asked for something malformed
    │   └── UnsafePathError                   a file name that would leave its root folder
    ├── RemoteError                           a server gave a definite answer: no
    │   ├── RepoNotFoundError
    │   ├── RevisionNotFoundError
    │   ├── EntryNotFoundError
    │   ├── AccessDeniedError                 gated or private (401/403)
    │   └── UnsafeListingError                a listing naming files outside the repo, or twice
    ├── NetworkError (OSError)                no endpoint answered, or retries ran out
    │   └── QuotaExhaustedError               an endpoint's quota stays spent longer than we wait
    ├── IntegrityError                        size or checksum never matched
    ├── StorageError (OSError)                the local disk said no
    │   ├── InsufficientSpaceError
    │   └── NotWritableError
    ├── DownloadInterrupted                   Ctrl-C; partial data is kept
    ├── MissingExtraError                     an optional extra (serve, compare) is not installed
    └── CompareError                          the comparison could not be run
        ├── UnsupportedModelError
        ├── WeightLoadError                   missing, unexpected or wrongly shaped tensor
        └── RemoteCodeError                   loading it would run the repository's own code
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "BadInputError",
    "CompareError",
    "DownloadInterrupted",
    "EntryNotFoundError",
    "HfMirrorError",
    "InsufficientSpaceError",
    "IntegrityError",
    "MissingExtraError",
    "NetworkError",
    "NotWritableError",
    "QuotaExhaustedError",
    "RemoteCodeError",
    "RemoteError",
    "RepoNotFoundError",
    "RevisionNotFoundError",
    "StorageError",
    "UnsafeListingError",
    "UnsafePathError",
    "UnsupportedModelError",
    "WeightLoadError",
]


class HfMirrorError(Exception):
    """Base of every error hfmirror raises on purpose. ``str(err)`` is a one-line message."""


class BadInputError(HfMirrorError, ValueError):
    """The caller asked for something malformed (a repo id, a glob, an option value)."""


class UnsafePathError(BadInputError):
    """A relative file name that is absolute, contains ``..``, a backslash, or otherwise leaves its root."""


class RemoteError(HfMirrorError):
    """A server answered definitely: what was asked for is not there or not allowed."""


class RepoNotFoundError(RemoteError):
    """The repository does not exist, or is private and no valid token was sent."""


class RevisionNotFoundError(RemoteError):
    """The repository exists but the branch, tag or commit does not."""


class EntryNotFoundError(RemoteError):
    """The revision exists but the requested file does not."""


class AccessDeniedError(RemoteError):
    """The repository is gated or private and the token (if any) does not grant access."""


class UnsafeListingError(RemoteError):
    """A server's file listing names a path that would be written outside the target folder, that the
    Hub forbids (``.git``, ``.cache``, over 255 bytes), or the same path twice (or as a file and a
    folder). A listing that merely lacks sizes or checksums is not a Hub answer: it fails over."""


class NetworkError(HfMirrorError, OSError):
    """No endpoint could be reached, or the retries for a request ran out."""


class QuotaExhaustedError(NetworkError):
    """An endpoint announced (``RateLimit: r=0;t=N``) that its request quota stays spent for longer than
    ``MAX_RETRY_AFTER``: it is shutting us out, not pacing us. ``seconds`` is how long it said; ``reason``
    says it without the endpoint's name (for a list of what each endpoint said)."""

    def __init__(self, endpoint: str, seconds: float, limit: float) -> None:
        self.reason = (
            f"announced its request quota is used up for {seconds:.0f} s, more than the {limit:.0f} s we wait"
        )
        super().__init__(f"{endpoint} {self.reason}; try again later")
        self.seconds = seconds


class IntegrityError(HfMirrorError):
    """A file's size or checksum did not match what the server promised, after every retry."""


class StorageError(HfMirrorError, OSError):
    """The local file system refused: no space, no permission."""


class InsufficientSpaceError(StorageError):
    """Not enough free disk space for what is left to download."""


class NotWritableError(StorageError):
    """The target folder cannot be created or written."""


class DownloadInterrupted(HfMirrorError):
    """The user pressed Ctrl-C. Partial data is kept; running the same command again resumes."""


class MissingExtraError(HfMirrorError):
    """A command needs packages of an optional extra that are not installed. The message says which
    ``pip install`` fixes it."""


class CompareError(HfMirrorError):
    """The comparison could not be run (as opposed to: it ran and found differences)."""


class UnsupportedModelError(CompareError):
    """The checkpoint's ``model_type`` or architecture has no from-scratch implementation yet."""


class WeightLoadError(CompareError):
    """A checkpoint tensor is missing, unexpected, or has the wrong shape. The message names it."""


class RemoteCodeError(CompareError):
    """Loading something (a tokenizer) would run code from the repository, which hfmirror never does."""
