"""HTTP sessions for many threads at once, over one shared pool of connections.

A ``requests.Session`` is not thread-safe, so each thread gets its own; but a session's connections
live in its adapter, and one adapter per thread would mean one set of sockets per thread: a socket
opened by one file's thread could never carry the next file's request on another thread, and the
sockets open to an endpoint would grow with the threads instead of staying within its connection
budget. So every session of a :class:`SessionFactory` mounts the same adapter, whose urllib3 pool is
thread-safe: an idle keep-alive connection is reused by whichever thread asks next.

The downloader (``hfmirror download``) and the team mirror's upstream side both use it.
"""

from __future__ import annotations

import threading

import requests
import requests.adapters

from . import constants

__all__ = ["SessionFactory"]


class SessionFactory:
    """One ``requests.Session`` per thread, all over one adapter keeping at most ``pool_size``
    connections per host (give it the endpoint's connection budget)."""

    def __init__(self, pool_size: int) -> None:
        self._local = threading.local()
        self._adapter = requests.adapters.HTTPAdapter(
            pool_connections=8,  # hosts kept: the endpoints, and the CDNs they redirect to
            pool_maxsize=pool_size,
            max_retries=0,  # retries are the request policy's (hfmirror.policy), not urllib3's
        )

    def get(self) -> requests.Session:
        """This thread's session (made on first use)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.mount("http://", self._adapter)
            session.mount("https://", self._adapter)
            # identity: a compressed body would break byte ranges and lengths.
            session.headers.update({"User-Agent": constants.USER_AGENT, "Accept-Encoding": "identity"})
            self._local.session = session
        return session
