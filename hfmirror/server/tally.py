"""What a response sent: its status and how many body bytes, counted on the way out.

The access log (:class:`~.logs.AccessLog`) and the counters (:class:`~.metrics.CountingMiddleware`)
both need to know this about every request, and both learn it the same way: by wrapping the ASGI
``send`` of the request.
"""

from __future__ import annotations

from starlette.types import Message, Send

__all__ = ["ResponseTally"]


class ResponseTally:
    """Wraps one request's ASGI ``send``: pass :meth:`send` to the app, then read the tally.

    ``status`` stays None if the app never started a response (it raised, or the client left first).
    """

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status: int | None = None
        self.body_bytes = 0

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.body_bytes += len(message.get("body", b""))
        await self._send(message)
