"""uvicorn's HTTP/1.1 protocol with deadlines for reading a request and a bound on the
connections that are still sending one.

Why here and not a uvicorn option: uvicorn (0.55) times out only idle keep-alive connections;
a client that sends its headers or body a byte at a time keeps its connection, and its memory,
forever, and `limit_concurrency` answers 503 to everyone once such clients fill it, so 500
slow clients stop a normal one either way. hypercorn has the same gap for bodies and is not a
dependency. So each connection gets:
  - `header_timeout` seconds from its first byte (or the end of its previous response) to a
    complete request line and headers, and `body_timeout` seconds more to the end of the
    body; past either it is closed (the app sees a disconnect);
  - at most `max_connections` connections may be reading a request at once: a new connection
    past that closes the oldest one still reading (slow clients make room for new ones instead
    of locking them out). Connections that are waiting for their response are not counted:
    the engine's queue bounds those (429).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
MAX_READING_CONNECTIONS = 256


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with read deadlines and eviction of the oldest slow reader (see module)."""

    header_timeout = HEADER_TIMEOUT_S
    body_timeout = BODY_TIMEOUT_S
    max_connections = MAX_READING_CONNECTIONS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = ""
        self._reading_since = time.monotonic()
        self._arm("headers", self.header_timeout)
        self._evict_oldest_readers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY and self._phase == "headers":
            self._arm("body", self.body_timeout)
        elif state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # a keep-alive connection reads its next request
            self._reading_since = time.monotonic()
            self._arm("headers", self.header_timeout)

    # ------------------------------------------------------------------ deadlines
    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, ""

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def _evict_oldest_readers(self) -> None:
        readers: list[Any] = [c for c in self.connections if getattr(c, "_phase", "")]
        excess = len(readers) - self.max_connections
        if excess > 0:
            for c in sorted(readers, key=lambda c: c._reading_since)[:excess]:
                c._disarm()
                c.transport.close()


def guarded_protocol(
    header_timeout: float = HEADER_TIMEOUT_S,
    body_timeout: float = BODY_TIMEOUT_S,
    max_connections: int = MAX_READING_CONNECTIONS,
) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol subclass with these limits (uvicorn takes a class)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout": header_timeout,
            "body_timeout": body_timeout,
            "max_connections": max_connections,
        },
    )
