"""The gate in front of every route of `dalle2 serve` (the API, the page and gradio's own
routes): checks made on a request's head before any route sees it, and a cap on its body.

- Host: a server bound to loopback answers only to loopback names (a DNS-rebinding page
  reaches it under a name of its own); `--allowed-host` adds names, `*` allows any.
- Origin: a browser says where a request comes from; one from another site is refused (a page
  the user visits must not make a key-less local server work, nor use the page's login
  cookie), unless `--cors-origin` allows that site, which then gets CORS headers.
- Body: at most `max_body` bytes, whatever Content-Length claims, on every route.

Refusals are answered in OpenAI's error shape, as the API's own errors are.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from starlette.middleware.cors import CORSMiddleware

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
DRAIN_FACTOR = 4  # a refused body is read (and dropped) up to this many times the cap before the 413


def is_loopback(host: str) -> bool:
    """Whether a bind address (or a Host name) is this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, extra: Sequence[str] = ()) -> tuple[str, ...] | None:
    """The Host names a server bound to `bind_host` answers to; None: any. Bound to loopback,
    or given names: the loopback names and those; bound to a network and given none: any."""
    if "*" in extra:
        return None
    if not is_loopback(bind_host) and not extra:
        return None
    return tuple(dict.fromkeys([*LOOPBACK_NAMES, *(name.lower().strip("[]") for name in extra)]))


def host_name(host_header: str) -> str:
    """`example.com:8000` -> `example.com`; `[::1]:8000` -> `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def error_body(status: int, message: str, code: str) -> bytes:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


async def send_error(send: Any, status: int, message: str, code: str, headers: Sequence[tuple[bytes, bytes]] = ()):
    body = error_body(status, message, code)
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """Pure ASGI (a client's hang-up still reaches the routes). Wraps the whole app."""

    def __init__(
        self,
        app: Any,
        hosts: Sequence[str] | None = None,
        cors_origins: Sequence[str] = (),
        max_body: int | None = None,
    ):
        self.hosts = None if hosts is None else frozenset(hosts)
        self.cors_origins = frozenset(origin.rstrip("/").lower() for origin in cors_origins)
        self.max_body = max_body
        self.app = app
        if self.cors_origins:
            allow = ["*"] if "*" in self.cors_origins else sorted(self.cors_origins)
            self.app = CORSMiddleware(app, allow_origins=allow, allow_methods=["*"], allow_headers=["*"])

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        refusal = self._refusal(headers)
        if refusal is not None:
            await send_error(send, *refusal)
            return
        declared = headers.get("content-length", "")
        if self.max_body is not None and declared.isdigit() and int(declared) > self.max_body:
            await _drain(receive, DRAIN_FACTOR * self.max_body)
            await send_error(send, 413, self._too_large(int(declared)), "too_large", [(b"connection", b"close")])
            return
        if self.max_body is None:
            await self.app(scope, receive, send)
        else:
            await _CappedBody(self.max_body, self._too_large).run(self.app, scope, receive, send)

    def _refusal(self, headers: dict[str, str]) -> tuple[int, str, str] | None:
        host = headers.get("host")
        if self.hosts is not None and host is not None and host_name(host) not in self.hosts:
            return (
                421,
                f"this server does not answer to the host name '{host_name(host)[:100]}': "
                "its operator can allow it with --allowed-host",
                "host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is None or self._same_origin(origin, host) or self._cors_allows(origin):
            return None
        return (
            403,
            "requests from other web sites are refused: the server's operator can allow a site with --cors-origin",
            "cross_origin",
        )

    @staticmethod
    def _same_origin(origin: str, host: str | None) -> bool:
        parts = urlsplit(origin)
        return host is not None and parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()

    def _cors_allows(self, origin: str) -> bool:
        return "*" in self.cors_origins or origin.rstrip("/").lower() in self.cors_origins

    def _too_large(self, size: int | None = None) -> str:
        told = f"{size:,} bytes, " if size is not None else ""
        return f"the request is {told}over the {self.max_body:,} bytes this server takes"


class _CappedBody:
    """Passes a request through, counting its body: past the cap the route is told the client
    has gone, whatever it answers is dropped, and the client gets 413."""

    def __init__(self, cap: int, message: Any):
        self.cap, self.message = cap, message
        self.received = 0
        self.over = False
        self.started = False

    async def run(self, app: Any, scope: dict, receive: Any, send: Any) -> None:
        async def counted() -> dict:
            if self.over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
                if self.received > self.cap:
                    self.over = True
                    return {"type": "http.disconnect"}
            return message

        async def sending(message: dict) -> None:
            if self.over and not self.started:
                return  # the route's answer to a body it never got whole
            self.started = True
            await send(message)

        try:
            await app(scope, counted, sending)
        except Exception:
            if not self.over:
                raise
        if self.over and not self.started:
            await _drain(receive, DRAIN_FACTOR * self.cap)
            await send_error(send, 413, self.message(), "too_large", [(b"connection", b"close")])


async def _drain(receive: Any, most: int) -> None:
    """Read and drop what is left of a refused body, up to `most` bytes (the connection's read
    deadline bounds the time): a client still sending when the server closes would lose the
    answer to a reset, and see a broken connection instead of the 413."""
    dropped = 0
    while dropped <= most:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body"):
            return
