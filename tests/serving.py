"""A real `dalle2 serve` app on a free port of 127.0.0.1, in this process (what the serve tests share)."""

from __future__ import annotations

import functools
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai

from dalle2_cli.cli.serve import _listen
from dalle2_cli.config import load_config
from dalle2_cli.loading.manager import DalleModelManager
from dalle2_cli.serve.api import create_app
from dalle2_cli.serve.gate import allowed_hosts
from dalle2_cli.serve.server import Server
from dalle2_cli.serve.service import ImageService
from dalle2_cli.serve.web import mount_page

KEY = "sk-test-key"


class Served:
    def __init__(self, url: str, service: ImageService, log: list[str], server: Server):
        self.url, self.service, self.log, self.server = url, service, log, server
        self.port = int(url.rsplit(":", 1)[1])

    def client(self, key: str | None = KEY, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, **options)


@contextmanager
def running(
    config: Path,
    directory: Path,
    key: str | None = KEY,
    page: bool = False,
    server_options: dict | None = None,
    app_options: dict | None = None,
    **options,
):
    """The API (and the page) on a free port of 127.0.0.1, models loaded, as `dalle2 serve`
    builds them: `options` go to the ImageService, `app_options` to create_app (default: the
    loopback hosts), `server_options` to the Server."""
    log: list[str] = []
    loaded = load_config(str(config))
    manager = functools.cache(lambda: DalleModelManager(loaded, name="tiny", log=log.append))
    service = ImageService(
        lambda worker: manager(),  # workers share one manager, as `dalle2 serve --workers N` on a CPU
        directory,
        name="tiny",
        log=log.append,
        **options,
    )
    app = create_app(service, key, log=log.append, **{"hosts": allowed_hosts("127.0.0.1"), **(app_options or {})})
    if page:
        app = mount_page(app, service, key)
    listener = _listen("127.0.0.1", 0)
    server = Server(app, service, **(server_options or {}))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    service.start()
    try:
        yield Served(f"http://127.0.0.1:{listener.getsockname()[1]}", service, log, server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        server.finish()
        listener.close()


def wait_healthy(url: str, seconds: float) -> bool:
    """Whether the server at `url` answers /health with 200 within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False
