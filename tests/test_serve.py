"""`dalle2 serve`: a real server on 127.0.0.1, driven by OpenAI's own Python SDK, httpx,
gradio's client and the real CLI."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from dalle2_cli.io.output import METADATA_KEY, read_metadata
from dalle2_cli.sampling.pipelines import ImageVariation, TextToImage
from dalle2_cli.sampling.settings import SamplingSettings
from dalle2_cli.serve.api import MAX_UPLOAD
from dalle2_cli.serve.service import ImageService
from tests.helpers import invoke
from tests.serving import KEY, running, wait_healthy


@pytest.fixture(scope="module")
def served(tiny_config, tmp_path_factory):
    # A long window, so that requests sent together surely meet (and a hung-up one is noticed).
    with running(tiny_config, tmp_path_factory.mktemp("served"), page=True, window_s=0.3) as server:
        yield server


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_same_image(a: Image.Image, b: Image.Image) -> None:
    """Equal within float rounding: batches of other sizes may round a last bit otherwise."""
    difference = np.abs(pixels(a) - pixels(b))
    assert difference.max() <= 1 and (difference == 0).mean() > 0.99


def metadata_of(image: Image.Image) -> dict:
    return json.loads(image.text[METADATA_KEY])


def decoded(entry) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(entry.b64_json)))


def lone_text2im(service: ImageService, prompt: str, seed: int, n: int) -> list[Image.Image]:
    """What `dalle2 text2im PROMPT --seed SEED -n N` makes, from the same loaded models."""
    return [g.image for g in TextToImage(service.manager, SamplingSettings(seed=seed)).run([prompt], n)]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_generations_through_the_openai_sdk_equal_a_lone_run_and_carry_the_metadata(served):
    response = served.client().images.generate(
        prompt="a red circle", n=2, response_format="b64_json", extra_body={"seed": 5}
    )
    assert len(response.data) == 2 and response.created > 0
    images = [decoded(entry) for entry in response.data]
    for made, lone in zip(images, lone_text2im(served.service, "a red circle", 5, 2), strict=True):
        assert_same_image(made, lone)
    metadata = [metadata_of(image) for image in images]
    assert [(m["prompt"], m["seed"], m["command"]) for m in metadata] == [
        ("a red circle", 5, "text2im"),
        ("a red circle", 6, "text2im"),
    ]
    assert metadata[0]["model_sha256"]  # the same provenance the CLI writes


def test_urls_serve_the_saved_png_only_with_the_signature(served):
    response = served.client().images.generate(prompt="a blue square", size="64x64", extra_body={"seed": 3})
    url = response.data[0].url
    assert url.startswith(served.url + "/images/") and "?sig=" in url
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(fetched.content))
    assert image.size == (64, 64)  # asked for 64x64; the model makes 32x32
    metadata = metadata_of(image)
    assert (metadata["resized_to"], metadata["made_at"], metadata["seed"]) == (64, 32, 3)
    unsigned = httpx.get(url.split("?")[0])
    assert unsigned.status_code == 401 and unsigned.json()["error"]["code"] == "invalid_signature"
    outside = httpx.get(f"{served.url}/images/..%2Fsecret.png")
    assert outside.status_code == 404 and "error" in outside.json()


def test_variations_and_edits_through_the_sdk(served, tmp_path):
    client = served.client()
    source = Image.new("RGB", (40, 32), (200, 30, 30))
    response = client.images.create_variation(
        image=("red.png", png_bytes(source), "image/png"), n=2, response_format="b64_json", extra_body={"seed": 9}
    )
    made = [decoded(entry) for entry in response.data]
    lone = ImageVariation(served.service.manager, SamplingSettings(seed=9)).run([source], 2)
    for mine, theirs in zip(made, lone, strict=True):
        assert_same_image(mine, theirs.image)
    assert metadata_of(made[0])["source"] == "red.png"

    # An edit without a mask: the image's transparent pixels are the ones to paint.
    picture = Image.new("RGBA", (32, 32), (20, 200, 20, 255))
    picture.paste((0, 0, 0, 0), (0, 0, 32, 16))
    edited = client.images.edit(
        image=("half.png", png_bytes(picture), "image/png"),
        prompt="a red circle",
        n=1,
        response_format="b64_json",
        extra_body={"seed": 2},
    )
    out = pixels(decoded(edited.data[0]))
    assert (out[16:] == (20, 200, 20)).all()  # the kept half, exact
    # With a mask (white: edit), an opaque image, and no prompt: the fill follows the image.
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 32, 16))
    with_mask = client.images.edit(
        image=("green.png", png_bytes(picture.convert("RGB")), "image/png"),
        mask=("mask.png", png_bytes(mask), "image/png"),
        prompt="",
        response_format="b64_json",
    )
    assert metadata_of(decoded(with_mask.data[0]))["prompt"] is None
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(image=("opaque.png", png_bytes(source), "image/png"), prompt="a red circle")
    assert refused.value.body["param"] == "mask"


@pytest.mark.parametrize(
    ("call", "error", "param"),
    [
        ({"n": 11}, openai.BadRequestError, "n"),
        ({"size": "64x32"}, openai.BadRequestError, "size"),
        ({"prompt": "x" * 1001}, openai.BadRequestError, "prompt"),
        ({"extra_body": {"sampler": "euler"}}, openai.BadRequestError, "sampler"),
        ({"extra_body": {"decoder_steps": 0}}, openai.BadRequestError, "decoder_steps"),
        ({"extra_body": {"colour": "red"}}, openai.BadRequestError, "colour"),
        ({"model": "gpt-image-1"}, openai.NotFoundError, "model"),
    ],
)
def test_bad_requests_get_openai_errors_naming_the_parameter(served, call, error, param):
    arguments = {"prompt": "a red circle", **call}
    with pytest.raises(error) as raised:
        served.client().images.generate(**arguments)
    body = raised.value.body
    assert body["param"] == param and body["message"] and "Traceback" not in body["message"]


def test_keys_errors_limits_and_the_health_and_models_endpoints(served):
    with pytest.raises(openai.AuthenticationError):
        served.client(key="sk-wrong").images.generate(prompt="a red circle")
    no_key = httpx.post(f"{served.url}/v1/images/generations", json={"prompt": "a red circle"})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    assert served.client().images.generate(prompt="a red circle", model="dall-e-2").data  # OpenAI's name is served
    assert [m.id for m in served.client().models.list()] == ["tiny"]
    health = httpx.get(f"{served.url}/health").json()
    assert health["status"] == "ready" and health["model"] == "tiny"
    headers = {"Authorization": f"Bearer {KEY}"}
    unknown = httpx.get(f"{served.url}/v1/files", headers=headers)
    assert unknown.status_code == 404 and unknown.json()["error"]["message"]
    as_json = {**headers, "Content-Type": "application/json"}
    not_json = httpx.post(f"{served.url}/v1/images/generations", content=b"{oops", headers=as_json)
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]
    big = os.urandom(MAX_UPLOAD + 1)
    too_big = httpx.post(
        f"{served.url}/v1/images/variations", files={"image": ("big.png", big, "image/png")}, headers=headers
    )
    assert too_big.status_code == 413 and too_big.json()["error"]["param"] == "image"
    not_image = httpx.post(
        f"{served.url}/v1/images/variations", files={"image": ("a.png", b"not a png", "image/png")}, headers=headers
    )
    assert not_image.status_code == 400 and not_image.json()["error"]["param"] == "image"


def test_sixteen_requests_at_once_share_batches_and_each_equals_its_lone_run(served):
    client = served.client()
    before = served.service.batcher.batches

    def ask(seed: int) -> Image.Image:
        response = client.images.generate(prompt="a red circle", response_format="b64_json", extra_body={"seed": seed})
        return decoded(response.data[0])

    with ThreadPoolExecutor(16) as pool:
        made = list(pool.map(ask, range(100, 116)))
    batches = served.service.batcher.batches - before
    assert batches < 16  # requests that arrived together ran together
    for seed in (100, 107, 115):
        assert_same_image(made[seed - 100], lone_text2im(served.service, "a red circle", seed, 1)[0])


def test_variations_sent_together_share_a_batch_and_each_equals_its_lone_run(served):
    client = served.client()
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    before = served.service.batcher.batches

    def ask(number: int) -> list[Image.Image]:
        image = png_bytes(Image.new("RGB", (32, 32), colours[number]))
        response = client.images.create_variation(
            image=(f"{number}.png", image, "image/png"),
            n=2,
            response_format="b64_json",
            extra_body={"seed": 50 + number},
        )
        return [decoded(entry) for entry in response.data]

    with ThreadPoolExecutor(4) as pool:
        made = list(pool.map(ask, range(4)))
    assert served.service.batcher.batches - before < 4
    for number in (0, 3):
        lone = ImageVariation(served.service.manager, SamplingSettings(seed=50 + number))
        for mine, theirs in zip(made[number], lone.run([Image.new("RGB", (32, 32), colours[number])], 2), strict=True):
            assert_same_image(mine, theirs.image)
        assert [metadata_of(image)["seed"] for image in made[number]] == [50 + number, 51 + number]


def test_generations_are_reranked_as_the_config_asks(reranking_config, tmp_path):
    """A config's default_rerank holds for the API too: each image the best of 3 by CLIP, the
    one `TextToImage.run` keeps from the same seeds."""
    with running(reranking_config, tmp_path) as server:
        response = server.client().images.generate(
            prompt="a red circle", n=2, response_format="b64_json", extra_body={"seed": 5}
        )
        images = [decoded(entry) for entry in response.data]
        lone = TextToImage(server.service.manager, SamplingSettings(seed=5)).run(["a red circle"], 2)
    for image, expected in zip(images, lone, strict=True):
        metadata = metadata_of(image)
        assert metadata["rerank"] == expected.settings["rerank"] and metadata["rerank"]["candidates"] == 3
        assert metadata["seed"] == expected.seed
        assert_same_image(image, expected.image)


def test_a_full_queue_answers_429_with_retry_after(tiny_config, tmp_path):
    with running(tiny_config, tmp_path, queue_size=1, max_batch=1, window_s=0.2) as server:
        client = server.client()

        def ask(seed: int):
            try:
                return client.images.generate(prompt="a red circle", extra_body={"seed": seed})
            except openai.RateLimitError as error:
                return error

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
    refused = [a for a in answers if isinstance(a, openai.RateLimitError)]
    assert refused and len(refused) < 6
    assert int(refused[0].response.headers["retry-after"]) >= 1
    assert refused[0].body["code"] == "queue_full"


def test_a_client_that_hangs_up_loses_only_its_own_result(served):
    headers = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            f"{served.url}/v1/images/generations",
            json={"prompt": "a red circle", "n": 4},
            headers=headers,
            timeout=0.05,
        )
    answer = served.client().images.generate(prompt="a blue square", extra_body={"seed": 1})
    assert answer.data[0].url
    deadline = time.monotonic() + 10
    while not any(" 499 " in line for line in served.log) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any("/v1/images/generations 499 " in line for line in served.log), served.log[-6:]


def test_the_page_goes_through_the_same_batcher(served):
    from gradio_client import Client

    page = Client(served.url + "/", auth=("anyone", KEY), verbose=False)
    gallery, files, *_ = page.predict(
        "a red circle\na blue square", 2, 7, "default", None, None, None, None, api_name="/text2im"
    )
    assert len(gallery) == 4 and len(files) == 4
    seeds = sorted((m["prompt"], m["seed"]) for m in (read_metadata(Path(f)) for f in files))
    assert seeds == [("a blue square", 7), ("a blue square", 8), ("a red circle", 7), ("a red circle", 8)]
    assert all("seed" in (item.get("caption") or "") for item in gallery)


def test_the_cli_serves_until_interrupted_and_refuses_a_taken_port(tiny_config, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "dalle2_cli", "serve", "-c", str(tiny_config), "--port", "0", "--no-page", "-o", "out"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DALLE2_API_KEY": "k"},
    )
    try:
        first = process.stderr.readline()
        url = first.split()[2]
        assert url.startswith("http://127.0.0.1:")
        assert wait_healthy(url, 120)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        assert client.images.generate(prompt="a red circle", extra_body={"seed": 4}).data[0].url
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["a-red-circle-4.png"]
        port = int(url.rsplit(":", 1)[1])
        taken = invoke("serve", "-c", str(tiny_config), "--port", str(port), cwd=tmp_path)
        assert taken.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in taken.stderr
        assert "Traceback" not in taken.stderr
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    assert process.returncode == 0, process.stderr.read()


def test_a_config_that_does_not_load_ends_in_one_line(tmp_path):
    broken = tmp_path / "broken.json"
    source = {"unet_numbers": [1], "load_model_from": {"load_type": "local", "path": "missing.pth"}}
    broken.write_text(json.dumps({"decoder": {"unet_sources": [source]}}))
    result = invoke("serve", "-c", str(broken), "--port", "0", "--no-page", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.splitlines()[-1]
        == f"error: the models did not load: model file not found: {tmp_path}/missing.pth"
    )
    uncached = invoke("serve", "-c", "nobody/nothing", "--offline", "--port", "0", "--no-page", cwd=tmp_path)
    assert uncached.returncode == 2 and "Traceback" not in uncached.stderr
    assert "`dalle2 models download -c nobody/nothing`" in uncached.stderr.splitlines()[-1]  # the config's own name
    bad_config = invoke("serve", "-c", str(tmp_path / "none.json"), "--port", "0", cwd=tmp_path)
    assert bad_config.returncode == 2 and "dalle2 serve: http" not in bad_config.stderr  # refused before listening


def test_the_page_shows_the_seed_asked_for_and_that_seed_makes_the_image_again(reranking_config, tmp_path):
    """With reranking, an image's own seed is its kept candidate's: the caption shows the seed
    asked for (seed + k), which typed back in makes the same image."""
    from gradio_client import Client

    with running(reranking_config, tmp_path, key=None, page=True) as server:
        page = Client(server.url + "/", verbose=False)
        gallery, files, *_ = page.predict("a red circle", 2, 7, "default", 0, 0, 0, 0, api_name="/text2im")
        assert [item["caption"] for item in gallery] == ["seed 7: a red circle", "seed 8: a red circle"]
        # What makes this a test: some image kept a candidate other than the first (whose own
        # seed is the one asked for), so its own seed is not the caption's.
        kept = [read_metadata(Path(path))["rerank"] for path in files]
        assert any(rerank["kept"] != 0 for rerank in kept)
        again, *_ = page.predict("a red circle", 1, 8, "default", 0, 0, 0, 0, api_name="/text2im")
        assert again[0]["caption"] == "seed 8: a red circle"
        assert_same_image(Image.open(gallery[1]["image"]), Image.open(again[0]["image"]))
