"""A real HTTP server on 127.0.0.1 for download tests, which can be told to misbehave.

It answers GET and HEAD, honours Range and If-Range as real servers do, and can play the
Hugging Face hub's `resolve` endpoint (the headers huggingface_hub reads: X-Repo-Commit,
ETag; X-Error-Code on a missing file), so that `HF_ENDPOINT` can point at it.
"""

from __future__ import annotations

import hashlib
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Route:
    body: bytes
    status: int = 200
    declared_length: int | None = None  # a Content-Length that lies (a body cut short every time)
    delay_s: float = 0.0  # before the body: keeps a download in flight
    hub: bool = False  # answer as the hub's resolve endpoint
    lfs: bool = True  # hub ETag: the sha256 (LFS file) or the git object id (small file)
    ranges: bool = True  # whether Range requests are honoured
    validators: bool = True  # whether ETag and Last-Modified are sent
    faults: list[str] = field(default_factory=list)  # one per request: 500, cut, reset
    headers: dict[str, str] = field(default_factory=dict)  # sent with every answer (a Location, say)

    @property
    def etag(self) -> str:
        if self.hub and not self.lfs:
            return hashlib.sha1(b"blob %d\0" % len(self.body) + self.body).hexdigest()
        return hashlib.sha256(self.body).hexdigest()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class FakeServer:
    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.modified = formatdate(time.time() - 3600, usegmt=True)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                server._answer(self, head=False)

            def do_HEAD(self):  # noqa: N802
                server._answer(self, head=True)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.endpoint + path

    def serve(self, path: str, body: bytes, **options) -> Route:
        route = Route(body, **options)
        self.routes[path] = route
        return route

    def gets(self, path: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.method == "GET" and s.path == path]

    def requests(self, path: str | None = None) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if path is None or s.path == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- answering ------------------------------------------------------------------------

    def _answer(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        with self.lock:
            self.seen.append(Seen(handler.command, handler.path, dict(handler.headers)))
            route = self.routes.get(handler.path)
            fault = route.faults.pop(0) if route is not None and route.faults and not head else None
        if route is None:
            return self._missing(handler)
        if fault == "500":
            return self._plain(handler, 500, b"internal error")
        if route.status != 200:
            return self._plain(handler, route.status, route.body, route.headers)
        body, status, extra = route.body, 200, {}
        start = self._range_start(handler, route)
        if start is not None:
            if start >= len(body):
                return self._plain(handler, 416, b"", {"Content-Range": f"bytes */{len(body)}"})
            status = 206
            extra["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
            body = body[start:]
        handler.send_response(status)
        length = route.declared_length if route.declared_length is not None else len(body)
        handler.send_header("Content-Length", str(length))
        if route.validators:
            handler.send_header("ETag", f'"{route.etag}"')
            handler.send_header("Last-Modified", self.modified)
        handler.send_header("Accept-Ranges", "bytes" if route.ranges else "none")
        if route.hub:
            handler.send_header("X-Repo-Commit", COMMIT)
        for key, value in {**route.headers, **extra}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if head:
            return
        if route.delay_s:
            time.sleep(route.delay_s)
        if fault in ("cut", "reset"):
            handler.wfile.write(body[: len(body) // 2])
            handler.wfile.flush()
            if fault == "reset":  # an abortive close: the client reads ECONNRESET
                handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.close_connection = True
            return
        handler.wfile.write(body)

    def _range_start(self, handler: BaseHTTPRequestHandler, route: Route) -> int | None:
        match = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range", ""))
        if match is None or not route.ranges:
            return None
        if_range = handler.headers.get("If-Range")
        if if_range is not None and if_range not in (f'"{route.etag}"', self.modified):
            return None  # the client's partial file is of another version: send it all
        return int(match.group(1))

    def _missing(self, handler: BaseHTTPRequestHandler) -> None:
        headers = {}
        if "/resolve/" in handler.path:  # as the hub says it, so huggingface_hub knows what is missing
            headers = {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": COMMIT}
        self._plain(handler, 404, b"not found", headers)

    @staticmethod
    def _plain(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict | None = None) -> None:
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)
