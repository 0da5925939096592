"""Blocking calls to the upstream, made from the mirror's async request handlers.

Each call runs on a thread pool of its own, and a handler waits for it at most ``timeout`` seconds
(then it answers from the cache, or 504); the call itself goes on, so that what it fetches is kept
for whoever asks next. Calls are made **once per key**: a request asking what another one is
already asking (the same revision of the same repo) waits for that call instead of starting its own.
So a flood of requests for one repo whose upstream hangs holds one thread, not the whole pool, and
requests for other repos are still answered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

__all__ = ["Call", "UpstreamCalls"]


@dataclass(frozen=True)
class Call:
    """A call in flight. ``joined``: it was started by another request (with that request's token)."""

    future: concurrent.futures.Future[Any]
    joined: bool


class UpstreamCalls:
    """A thread pool on which at most one call per key is in flight; bounded waits for their answers."""

    def __init__(self, threads: int, *, timeout: float, name: str = "hfmirror-up") -> None:
        self.timeout = timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._running: dict[Hashable, concurrent.futures.Future[Any]] = {}
        self._lock = threading.Lock()

    def start(self, key: Hashable, function: Callable[..., Any], *args: Any) -> Call:
        """The call in flight for ``key``, or ``function(*args)`` started now as that call."""
        with self._lock:
            running = self._running.get(key)
            if running is not None:
                return Call(running, joined=True)
            future = self._running[key] = self._pool.submit(function, *args)
        # Outside the lock: a call that is already over runs the callback at once, in this thread.
        future.add_done_callback(lambda done: self._forget(key, done))
        return Call(future, joined=False)

    async def wait(self, call: Call) -> Any:
        """The call's result (or its exception), waited for at most ``timeout`` seconds.

        Raises:
            TimeoutError: if it did not finish in time (it goes on; other waiters are not affected).
        """
        loop = asyncio.get_running_loop()
        finished = loop.create_future()  # this waiter's own: giving up on it leaves the call alone

        def wake(_: concurrent.futures.Future[Any]) -> None:
            try:
                loop.call_soon_threadsafe(_settle, finished)
            except RuntimeError:  # the loop has closed: nobody waits any more
                pass

        call.future.add_done_callback(wake)
        await asyncio.wait_for(finished, self.timeout)
        return call.future.result()

    async def run(self, key: Hashable, function: Callable[..., Any], *args: Any) -> Any:
        """:meth:`start` then :meth:`wait`."""
        return await self.wait(self.start(key, function, *args))

    def close(self) -> None:
        """Drop the calls that have not started; those running finish on their own threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _forget(self, key: Hashable, done: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            if self._running.get(key) is done:
                del self._running[key]


def _settle(finished: asyncio.Future[None]) -> None:
    if not finished.done():
        finished.set_result(None)
