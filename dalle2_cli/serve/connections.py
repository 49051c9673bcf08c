"""Connections to `dalle2 serve`, bounded: uvicorn's h11 protocol with the two limits it lacks.

uvicorn times out an idle connection only after a first response, and never a request that
arrives slowly: a client could hold a connection for ever by sending nothing, or one header
line a minute. Here a request must arrive whole (head and body) within `read_timeout_s` of
the connection opening or of the previous response, and at most `max_connections` are open
at once (one more is answered 503 and closed). A request that has arrived whole may take as
long as its work takes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from dalle2_cli.serve.gate import error_body

BUSY = error_body(503, "the server has too many open connections: try again shortly", "too_many_connections")


def bounded_protocol(read_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with these limits (uvicorn.Config(http=...) takes it)."""

    class BoundedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._deadline: asyncio.TimerHandle | None = None
            if len(self.connections) > max_connections:
                head = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                head += f"content-length: {len(BUSY)}\r\nconnection: close\r\n\r\n"
                transport.write(head.encode() + BUSY)
                transport.close()
                return
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if getattr(self, "_deadline", None) is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(read_timeout_s, self._late, self.cycle)

        def _late(self, cycle_when_armed: Any) -> None:
            """Close the connection if the next request has not arrived whole by now."""
            if self.transport.is_closing():
                return
            cycle = self.cycle
            no_new_request = cycle is cycle_when_armed and (cycle is None or cycle.response_complete)
            body_unfinished = cycle is not None and cycle.more_body and not cycle.response_complete
            if no_new_request or body_unfinished:
                self.transport.close()

    return BoundedH11Protocol
