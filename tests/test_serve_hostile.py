"""`dalle2 serve` attacked, and used carelessly: a real server on 127.0.0.1 driven by httpx,
the `openai` package, gradio_client, raw sockets and the real CLI, one class of hole each."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from PIL import Image

from dalle2_cli.io.output import METADATA_KEY
from dalle2_cli.serve.gate import allowed_hosts, host_name
from tests.serving import KEY, running, wait_healthy

AUTH = {"Authorization": f"Bearer {KEY}"}


def png(width: int, height: int, colour=(200, 30, 30), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def keyed(tiny_config, tmp_path_factory):
    """With a key, the page, and deadlines short enough to test."""
    options = {"read_timeout_s": 1.5, "max_connections": 12}
    with running(tiny_config, tmp_path_factory.mktemp("keyed"), page=True, server_options=options) as server:
        yield server


@pytest.fixture(scope="module")
def open_server(tiny_config, tmp_path_factory):
    """Without a key, as `dalle2 serve` runs on a laptop by default."""
    with running(tiny_config, tmp_path_factory.mktemp("open"), key=None, page=True, max_steps=20) as server:
        yield server


def no_traceback(log: list[str]) -> None:
    assert not any("Traceback" in line for line in log), log[-5:]


# -- 1. files from outside the output directory ------------------------------------------------


def test_a_link_in_the_output_directory_to_another_file_is_not_served(keyed, open_server, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(8, 8))
    for server in (keyed, open_server):
        made = server.client().images.generate(prompt="a red circle", extra_body={"seed": 1}).data[0].url
        name = made.split("/images/")[1].split("?")[0]
        (server.service.directory / "leak.png").symlink_to(secret)
        (server.service.directory / "loop.png").symlink_to(server.service.directory / "loop.png")
        for link in ("leak.png", "loop.png"):
            signed = f"?sig={_signature(server, link)}" if server is keyed else ""
            answer = httpx.get(f"{server.url}/images/{link}{signed}")
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
        # A link that stays inside the directory is a file of it, and is served.
        (server.service.directory / "again.png").symlink_to(server.service.directory / name)
        signed = f"?sig={_signature(server, 'again.png')}" if server is keyed else ""
        assert httpx.get(f"{server.url}/images/again.png{signed}").status_code == 200


def _signature(server, name: str) -> str:
    import hashlib
    import hmac

    return hmac.new(KEY.encode(), name.encode(), hashlib.sha256).hexdigest()[:32]


# -- 2. a client's mistake is never a 500 ------------------------------------------------------


def test_odd_requests_get_openai_errors_with_the_right_status_never_a_500(keyed):
    url = keyed.url
    json_headers = {**AUTH, "Content-Type": "application/json"}
    cases = [
        (httpx.get(f"{url}/images/{'a' * 300}.png"), 404),
        (httpx.get(f"{url}/images/{'é' * 200}.png"), 404),
        (httpx.post(f"{url}/v1/images/generations", content=b"[" * 200_000, headers=json_headers), 400),
        (
            httpx.post(
                f"{url}/v1/images/generations",
                content=b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                headers=json_headers,
            ),
            400,
        ),
        (httpx.options(f"{url}/v1/images/generations"), 405),
        (httpx.get(f"{url}/v1/images/generations", headers=AUTH), 405),
        (httpx.delete(f"{url}/v1/models", headers=AUTH), 405),
        (httpx.post(f"{url}/images/x.png"), 405),
        (httpx.put(f"{url}/images/x.png"), 405),
        (httpx.delete(f"{url}/images/x.png"), 405),
        (httpx.request("PROPFIND", f"{url}/v1/models", headers=AUTH), 405),
        (httpx.options(f"{url}/v1/nothing/here"), 404),
        (httpx.get(f"{url}/images/x.png?sig=a&sig=b"), 404),
    ]
    for answer, status in cases:
        assert answer.status_code == status, (answer.request.method, answer.request.url, answer.text[:200])
        error = answer.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
    allowed = httpx.options(f"{url}/v1/images/generations")
    assert allowed.headers["allow"] == "POST"
    assert not any(" 500 " in line for line in keyed.log)
    no_traceback(keyed.log)


def test_user_errors_on_the_page_are_one_line_in_the_log(open_server, capfd):
    from gradio_client import Client

    page = Client(open_server.url + "/", verbose=False)
    capfd.readouterr()
    with pytest.raises(Exception, match="write a prompt"):
        page.predict("   ", 1, 1, "default", None, None, None, None, api_name="/text2im")
    with pytest.raises(Exception, match="upload an image"):
        page.predict(None, 1, 1, "default", None, None, None, None, api_name="/variation")
    printed = capfd.readouterr()
    assert "Traceback" not in printed.err + printed.out
    assert [line for line in open_server.log if line.startswith("page: ")][-2:] == [
        "page: write a prompt: one per line",
        "page: upload an image first",
    ]


# -- 3. the same limits on every way in --------------------------------------------------------


def test_the_page_takes_no_upload_over_the_api_limit(open_server):
    upload = f"{open_server.url}/gradio_api/upload"
    big = httpx.post(upload, files={"files": ("big.png", os.urandom(5 * 2**20), "image/png")})
    assert big.status_code == 413, big.text[:200]  # under the body cap: gradio's own file limit, set to ours
    assert httpx.post(upload, files={"files": ("small.png", png(8, 8), "image/png")}).status_code == 200


def test_the_page_refuses_images_over_the_pixel_limit_without_decoding_them(open_server, tmp_path):
    from gradio_client import Client, handle_file

    bomb = tmp_path / "bomb.png"
    Image.new("L", (12000, 12000)).save(bomb)  # 144 megapixels in a small file
    assert bomb.stat().st_size < 2**20
    page = Client(open_server.url + "/", verbose=False)
    grown = psutil.Process().memory_info().rss
    with pytest.raises(Exception, match="megapixels"):
        page.predict(handle_file(str(bomb)), 1, 1, "default", None, None, None, None, api_name="/variation")
    editor = {"background": handle_file(str(bomb)), "layers": [], "composite": None}
    with pytest.raises(Exception, match="megapixels"):
        page.predict(editor, "", 1, 1, "default", None, None, None, None, api_name="/inpaint")
    grown = psutil.Process().memory_info().rss - grown
    assert grown < 200 * 2**20, f"the server grew by {grown / 2**20:.0f} MB"  # decoded, it is 144 MB a copy


def test_the_page_and_the_api_both_refuse_work_over_the_step_limit(open_server):
    from gradio_client import Client

    with pytest.raises(openai.BadRequestError) as refused:
        open_server.client().images.generate(prompt="a red circle", extra_body={"decoder_steps": [10, 21]})
    assert refused.value.body["param"] == "decoder_steps" and "--max-steps" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        open_server.client().images.generate(prompt="a red circle", extra_body={"prior_steps": 50})
    assert refused.value.body["param"] == "prior_steps"
    page = Client(open_server.url + "/", verbose=False)
    with pytest.raises(Exception, match="at most 20"):
        page.predict("a red circle", 1, 1, "default", 0, 50, 0, 0, api_name="/text2im")
    with pytest.raises(Exception, match="1,000"):
        page.predict("x" * 1001, 1, 1, "default", 0, 0, 0, 0, api_name="/text2im")
    with pytest.raises(Exception, match="maximum value 10"):  # gradio's own check of the slider
        page.predict("a red circle", 11, 1, "default", 0, 0, 0, 0, api_name="/text2im")


def test_every_route_refuses_a_body_over_the_cap(keyed):
    big = b"x" * (9 * 2**20)
    for path in ("/v1/images/generations", "/gradio_api/queue/join", "/gradio_api/upload"):
        answer = httpx.post(f"{keyed.url}{path}", content=big, headers={**AUTH, "Content-Type": "application/json"})
        assert answer.status_code == 413 and answer.json()["error"]["code"] == "too_large", path

    def chunks():  # no Content-Length: the cap counts what arrives
        for _ in range(20):
            yield b"x" * 2**20

    json_type = {**AUTH, "Content-Type": "application/json"}
    streamed = httpx.post(f"{keyed.url}/v1/images/generations", content=chunks(), headers=json_type)
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "too_large"


# -- 4. one client never stalls the others ----------------------------------------------------


def test_health_answers_while_a_huge_upload_is_decoded(keyed):
    half = Image.new("RGBA", (9000, 9000), (20, 200, 20, 255))
    half.paste((0, 0, 0, 0), (0, 0, 9000, 4500))  # 81 megapixels, half transparent: the part to edit
    buffer = io.BytesIO()
    half.save(buffer, format="PNG")
    picture = buffer.getvalue()
    assert len(picture) < 2**20
    slowest = []

    def poll() -> None:
        while not done.is_set():
            started = time.perf_counter()
            httpx.get(f"{keyed.url}/health", timeout=30)
            slowest.append(time.perf_counter() - started)
            time.sleep(0.02)

    done = threading.Event()
    poller = threading.Thread(target=poll)
    poller.start()
    started = time.perf_counter()
    try:
        keyed.client().images.edit(image=("big.png", picture, "image/png"), prompt="a red circle", n=1)
    finally:
        done.set()
        poller.join()
    took = time.perf_counter() - started
    # The edit decodes 81 megapixels (seconds); /health is answered all the while.
    assert len(slowest) > 5 and max(slowest) < took / 3, (max(slowest), took)


def raw(server, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    if data:
        sock.sendall(data)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes the connection within `seconds` (anything it sends is read)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if sock.recv(65536) == b"":
                return True
    except (TimeoutError, ConnectionResetError):
        return False
    finally:
        sock.close()
    return False


def test_silent_slow_and_stalled_clients_are_cut_off(keyed):
    silent = raw(keyed)
    slow_head = raw(keyed, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    body = b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    stalled_body = raw(keyed, body + b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{")
    for sock in (silent, slow_head, stalled_body):
        assert closed_within(sock, 6)  # its deadline is 1.5 s
    # A connection that keeps sending a header line now and then is cut off all the same.
    trickle = raw(keyed, b"GET /health HTTP/1.1\r\n")
    started = time.monotonic()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(20):
            time.sleep(0.5)
            trickle.sendall(b"X-Slow: 1\r\n")
    assert time.monotonic() - started < 8
    trickle.close()
    assert httpx.get(f"{keyed.url}/health").status_code == 200


def test_connections_past_the_limit_are_answered_503_and_closed(keyed):
    held = [raw(keyed) for _ in range(12)]
    try:
        time.sleep(0.2)
        extra = raw(keyed)
        extra.settimeout(5)
        answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer
        extra.close()
    finally:
        for sock in held:
            sock.close()
    assert wait_healthy(keyed.url, 5)


# -- 5. bounded work, cancelled when nobody waits -----------------------------------------------


def test_a_batch_whose_client_hung_up_stops_at_its_next_step(tiny_config, tmp_path):
    with running(tiny_config, tmp_path / "out", window_s=0.0) as server:
        body = {"prompt": "a red circle", "n": 10, "prior_steps": 100, "decoder_steps": 100, "seed": 1}
        started = time.perf_counter()
        with pytest.raises(httpx.TimeoutException):  # about 20 s of work on two cores
            httpx.post(f"{server.url}/v1/images/generations", json=body, headers=AUTH, timeout=1.0)
        answer = server.client().images.generate(prompt="a blue square", extra_body={"seed": 2})
        assert answer.data[0].url and time.perf_counter() - started < 10
        cancelled = [line for line in server.log if "was cancelled" in line]
        assert cancelled and "network evaluations, in the " in cancelled[0], server.log[-5:]
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a-blue-square-2.png"]  # nothing half-made


# -- 6. stopping -------------------------------------------------------------------------------


def serve(config: Path, cwd: Path, *options: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "dalle2_cli", "serve", "-c", str(config), "--port", "0", "-o", "out", *options],
        cwd=cwd,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = process.stderr.readline().split()[2]
    assert wait_healthy(url, 120)
    return process, url


def start_long_batch(url: str) -> threading.Thread:
    body = {"prompt": "a red circle", "n": 10, "prior_steps": 100, "decoder_steps": 100, "seed": 1}

    def ask() -> None:
        try:
            httpx.post(f"{url}/v1/images/generations", json=body, timeout=60)
        except httpx.HTTPError:
            pass

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    return thread


def test_sigterm_stops_within_the_grace_period_with_the_page_open_and_a_batch_running(tiny_config, tmp_path):
    process, url = serve(tiny_config, tmp_path, "--shutdown-timeout", "1")
    try:
        # The page's heartbeat stream (it needs no credentials), held open.
        with httpx.stream("GET", f"{url}/gradio_api/heartbeat/abc123", timeout=30) as heartbeat:
            assert heartbeat.status_code == 200
            asker = start_long_batch(url)
            time.sleep(2)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)
            took = time.monotonic() - started
    finally:
        process.kill()
    asker.join(timeout=5)
    output = process.stderr.read()
    assert process.returncode == 0, output
    assert took < 8, took  # 1 s of grace, the batch cancelled at its next step
    assert "was cancelled" in output and "Traceback" not in output
    assert not list((tmp_path / "out").iterdir())  # no image, whole or half


def test_a_second_sigterm_leaves_at_once(tiny_config, tmp_path):
    process, url = serve(tiny_config, tmp_path, "--no-page", "--shutdown-timeout", "60")
    try:
        start_long_batch(url)
        time.sleep(2)
        process.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert process.poll() is None  # waiting for the batch, within its 60 s of grace
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
        assert time.monotonic() - started < 8
    finally:
        process.kill()
    assert process.returncode in (0, 143)
    assert not [p for p in (tmp_path / "out").iterdir() if p.suffix != ".png"]  # no temporary file left


# -- 7. browsers as a way in --------------------------------------------------------------------


def test_a_web_page_cannot_make_a_local_server_work(open_server):
    url = f"{open_server.url}/v1/images/generations"
    body = json.dumps({"prompt": "a red circle"})
    # A form or fetch "simple request": text/plain, so that no preflight is asked.
    plain = httpx.post(url, content=body, headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
    form = httpx.post(url, data={"prompt": "a red circle"})
    assert form.status_code == 415
    # Another site's page, with the right type.
    evil = {"Origin": "https://evil.example", "Content-Type": "application/json"}
    cross = httpx.post(url, content=body, headers=evil)
    assert cross.status_code == 403 and cross.json()["error"]["code"] == "cross_origin"
    preflight = httpx.options(url, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
    for path in ("/gradio_api/queue/join", "/gradio_api/upload", "/"):
        assert httpx.post(f"{open_server.url}{path}", headers=evil, content=b"{}").status_code == 403
    # A DNS-rebinding page reaches the server under its own name.
    rebound = httpx.post(url, content=body, headers={"Host": "evil.example", "Content-Type": "application/json"})
    assert rebound.status_code == 421 and rebound.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(f"{open_server.url}/", headers={"Host": "evil.example:80"}).status_code == 421
    # The page's own requests (same origin) and plain clients go through.
    same = {"Origin": open_server.url, "Content-Type": "application/json"}
    assert httpx.post(url, content=body, headers=same).status_code == 200
    assert httpx.post(url, content=body, headers={"Host": "localhost", "Content-Type": "application/json"}).is_success


def test_an_allowed_origin_gets_cors_headers_and_others_none(tiny_config, tmp_path):
    app_options = {"cors_origins": ["https://app.example"], "hosts": allowed_hosts("127.0.0.1", ["gen.example"])}
    with running(tiny_config, tmp_path, key=None, app_options=app_options) as server:
        url = f"{server.url}/v1/images/generations"
        headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        preflight = httpx.options(url, headers={**headers, "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        asked = httpx.post(url, json={"prompt": "a red circle"}, headers={"Origin": "https://app.example"})
        assert asked.status_code == 200 and asked.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.post(url, json={"prompt": "a red circle"}, headers={"Origin": "https://other.example"})
        assert other.status_code == 403
        named = httpx.post(url, json={"prompt": "a red circle"}, headers={"Host": "gen.example:8000"})
        assert named.status_code == 200


def test_host_names_allowed_by_binding():
    assert allowed_hosts("127.0.0.1") == ("localhost", "127.0.0.1", "::1")
    assert allowed_hosts("::1", ["Gen.Example"]) == ("localhost", "127.0.0.1", "::1", "gen.example")
    assert allowed_hosts("0.0.0.0") is None and allowed_hosts("127.0.0.1", ["*"]) is None
    assert allowed_hosts("0.0.0.0", ["gen.example"]) == ("localhost", "127.0.0.1", "::1", "gen.example")
    assert [host_name(h) for h in ("[::1]:8000", "LOCALHOST:1", "a.b", "[::1]")] == ["::1", "localhost", "a.b", "::1"]


# -- 8. what a client learns --------------------------------------------------------------------


def test_served_images_record_names_and_digests_not_server_paths(keyed, tiny_config, tmp_path):
    answer = keyed.client().images.generate(prompt="a red circle", response_format="b64_json")
    metadata = json.loads(Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).text[METADATA_KEY])
    text = json.dumps(metadata)
    assert str(tiny_config.parent) not in text and "/" not in "".join(metadata["model_files"].values())
    assert metadata["model_files"]["prior"] == "prior.pth" and metadata["model_sha256"]["prior"]
    assert metadata["config_path"] is None
    with running(tiny_config, tmp_path, record_paths=True) as operator:
        answer = operator.client().images.generate(prompt="a red circle", response_format="b64_json")
    recorded = json.loads(Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).text[METADATA_KEY])
    assert recorded["model_files"]["prior"] == str(tiny_config.parent / "prior.pth")


def test_the_login_page_tells_a_visitor_without_the_key_nothing_of_the_page(keyed):
    for query in ("", "?all_endpoints=true"):
        login = httpx.get(f"{keyed.url}/{query}")
        assert login.status_code == 200 and '"named_endpoints": {}' in login.text
        for word in ("text2im", "inpaint", "Prior steps", "Seed"):
            assert word not in login.text


@pytest.mark.parametrize(
    ("option", "says"),
    [
        (["--read-timeout", "0"], "--read-timeout 0: give a number of seconds above 0"),
        (["--max-connections", "0"], "--max-connections 0: give 1 or more"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout -1: give a number of seconds, 0 or more"),
    ],
)
def test_the_server_limits_are_checked_before_anything_loads(tmp_path, option, says):
    from tests.helpers import invoke

    result = invoke("serve", "--port", "0", *option, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == f"error: {says}"
