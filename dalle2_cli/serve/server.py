"""Running `dalle2 serve`'s app with uvicorn, its connections bounded and its stop bounded too.

    server = Server(app, service, shutdown_timeout_s=5)
    server.run(sockets=[listener])   # until SIGTERM or Ctrl-C
    server.finish()                  # the service's worker, stopped

A stop (SIGTERM or Ctrl-C) stops accepting connections and requests, closes the page's
long-lived streams, gives the running batch `shutdown_timeout_s` to finish and then cancels it
at its next step (nothing of it is saved: images are written whole, after their batch). A
second signal leaves at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import uvicorn

from dalle2_cli.serve.connections import bounded_protocol
from dalle2_cli.serve.limits import KEEP_ALIVE_S, MAX_CONNECTIONS, READ_TIMEOUT_S, SHUTDOWN_TIMEOUT_S

ANSWER_S = 1.0  # after a cancelled batch, for its clients to be answered before the connections go


class Server(uvicorn.Server):
    def __init__(
        self,
        app: Any,
        service: Any,
        *,
        read_timeout_s: float = READ_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S,
    ):
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            http=bounded_protocol(read_timeout_s, max_connections),
            timeout_keep_alive=min(KEEP_ALIVE_S, read_timeout_s),
            # A second more than the batch's grace: the batch is cancelled first, so that its
            # clients are answered (503) before uvicorn cancels their handlers.
            timeout_graceful_shutdown=shutdown_timeout_s + ANSWER_S,
        )
        super().__init__(config)
        self.service, self.shutdown_timeout_s = service, shutdown_timeout_s

    def handle_exit(self, sig: int, frame: Any) -> None:
        # uvicorn leaves at once on a second Ctrl-C only; here a second SIGTERM does too, and
        # the running batch stops at its next step. Only flags are set: this is a signal handler.
        if self.should_exit:
            self.force_exit = True
            self.service.batcher.hurry()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: Any = None) -> None:
        self.service.batcher.begin_stop(self.shutdown_timeout_s)
        for end_streams in _on_stop(self.config.app):
            end_streams()
        await super().shutdown(sockets)

    def finish(self, wait_s: float = 5.0) -> bool:
        """After `run`: the service's worker stopped (its batch cancelled once the grace
        period has passed), given up `wait_s` after that. Whether it ended."""
        return self.service.stop(0.0 if self.force_exit else self.shutdown_timeout_s, wait_s)


def _on_stop(app: Any) -> list[Callable[[], None]]:
    """What the app asks to be called when the server stops (dalle2_cli.serve.web: ending the
    page's heartbeat streams, which would otherwise hold the stop for the whole grace period)."""
    state = getattr(app, "state", None)
    return list(getattr(state, "on_stop", []))
