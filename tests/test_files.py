"""Downloads against a real HTTP server on 127.0.0.1 that can be told to misbehave."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dalle2_cli.config import File
from dalle2_cli.errors import Dalle2Error, InputError
from dalle2_cli.files import cache_path, resolve_file

BODY = bytes(range(256)) * 400  # 100 KiB
DIGEST = hashlib.sha256(BODY).hexdigest()


class Server:
    """Serves `routes[path] = (status, body, declared_length or None)` and counts requests."""

    def __init__(self):
        self.routes: dict[str, tuple[int, bytes, int | None]] = {}
        self.hits: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                status, body, length = server.routes.get(self.path, (404, b"not found", None))
                self.send_response(status)
                self.send_header("Content-Length", str(length if length is not None else len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    served = Server()
    yield served
    served.close()


def url_file(server, path, tmp_path, **extra) -> File:
    return File(load_type="url", path=server.url(path), cache_dir=str(tmp_path / "cache"), **extra)


def leftovers(tmp_path) -> list[str]:
    cache = tmp_path / "cache"
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_download_lands_in_cache_and_is_reused(server, tmp_path):
    server.routes["/m/decoder.pth"] = (200, BODY, None)
    file = url_file(server, "/m/decoder.pth", tmp_path, sha256=DIGEST)
    path = resolve_file(file)
    assert path == tmp_path / "cache" / "decoder.pth"
    assert path.read_bytes() == BODY
    assert resolve_file(file) == path
    assert server.hits["/m/decoder.pth"] == 1  # the second use came from the cache


def test_filename_override_names_the_cached_file(server, tmp_path):
    server.routes["/latest.pth"] = (200, BODY, None)
    path = resolve_file(url_file(server, "/latest.pth", tmp_path, filename_override="prior.pth"))
    assert path.name == "prior.pth" and path.read_bytes() == BODY


def test_wrong_sha256_caches_nothing(server, tmp_path):
    server.routes["/m.pth"] = (200, BODY, None)
    with pytest.raises(Dalle2Error, match="sha256"):
        resolve_file(url_file(server, "/m.pth", tmp_path, sha256="0" * 64))
    assert leftovers(tmp_path) == []


def test_http_error_caches_nothing(server, tmp_path):
    with pytest.raises(Dalle2Error, match="HTTP 404"):
        resolve_file(url_file(server, "/missing.pth", tmp_path))
    assert leftovers(tmp_path) == []


def test_body_shorter_than_content_length_caches_nothing(server, tmp_path):
    server.routes["/short.pth"] = (200, BODY[:1000], len(BODY))
    with pytest.raises(Dalle2Error):
        resolve_file(url_file(server, "/short.pth", tmp_path))
    assert leftovers(tmp_path) == []


def test_corrupted_cache_file_is_fetched_again_when_sha256_is_known(server, tmp_path):
    server.routes["/m.pth"] = (200, BODY, None)
    file = url_file(server, "/m.pth", tmp_path, sha256=DIGEST)
    path = resolve_file(file)
    path.write_bytes(b"garbage")
    assert resolve_file(file).read_bytes() == BODY
    assert server.hits["/m.pth"] == 2


def test_changed_remote_checksum_downloads_again(server, tmp_path):
    new_body = BODY[::-1]
    server.routes["/m.pth"] = (200, BODY, None)
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{DIGEST}\n"
    server.routes["/m.pth.pointer"] = (200, pointer.encode(), None)
    file = url_file(server, "/m.pth", tmp_path, checksum_file_path=server.url("/m.pth.pointer"))
    assert resolve_file(file).read_bytes() == BODY
    assert resolve_file(file).read_bytes() == BODY
    assert server.hits["/m.pth"] == 1
    new_digest = hashlib.sha256(new_body).hexdigest()
    server.routes["/m.pth"] = (200, new_body, None)
    server.routes["/m.pth.pointer"] = (200, f"oid sha256:{new_digest}\n".encode(), None)
    assert resolve_file(file).read_bytes() == new_body
    assert server.hits["/m.pth"] == 2


def test_unreachable_checksum_uses_the_cached_file(server, tmp_path, capsys):
    server.routes["/m.pth"] = (200, BODY, None)
    server.routes["/sum"] = (200, DIGEST.encode(), None)
    file = url_file(server, "/m.pth", tmp_path, checksum_file_path=server.url("/sum"))
    resolve_file(file)
    del server.routes["/sum"]
    assert resolve_file(file).read_bytes() == BODY
    assert "using the cached file" in capsys.readouterr().err


def test_unreachable_server_is_a_clear_error(tmp_path):
    file = File(load_type="url", path="http://127.0.0.1:9/x.pth", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(Dalle2Error, match="cannot download http://127.0.0.1:9/x.pth"):
        resolve_file(file)


def test_missing_local_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="model file not found"):
        resolve_file(File(load_type="local", path=str(tmp_path / "nope.pth")))


def test_url_without_a_file_name_needs_an_override(tmp_path):
    with pytest.raises(InputError, match="filename_override"):
        cache_path(File(load_type="url", path="https://example.org/", cache_dir=str(tmp_path)))
