"""`dalle2 serve` as image generators are used today: streamed previews through the `openai`
package's own stream iterator, output formats, progress, and several workers."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from dalle2_cli.serve.batcher import Queued
from dalle2_cli.serve.progress import Step
from dalle2_cli.serve.service import ImageRequest
from tests.serving import KEY, running

STEPS = {"decoder_steps": 8}


@pytest.fixture(scope="module")
def served(tiny_config, tmp_path_factory):
    with running(tiny_config, tmp_path_factory.mktemp("served"), window_s=0.05) as server:
        yield server


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_a_streamed_generation_sends_partial_images_then_the_image_the_unstreamed_call_makes(served):
    client = served.client()
    options = {"seed": 11, **STEPS}
    stream = client.images.generate(prompt="a red circle", stream=True, partial_images=2, n=2, extra_body=options)
    events = list(stream)  # the SDK's own iterator, typed by its own models
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * 4 + ["image_generation.completed"] * 2
    assert [e.partial_image_index for e in events[:4]] == [0, 0, 1, 1]
    size = served.service.image_size()
    assert all(e.size == f"{size}x{size}" and e.output_format == "png" for e in events)
    partials = [decoded(e.b64_json) for e in events[:4]]
    completed = [decoded(e.b64_json) for e in events[4:]]
    assert all(p.size == (size, size) for p in partials)
    # Previews are the images as they form: the first far from the finished image, the later
    # one nearer (near the end the tiny decoder's prediction may round to the image itself).
    for image in range(2):
        first, later = (np.abs(pixels(partials[image + 2 * k]) - pixels(completed[image])) for k in range(2))
        assert (first != 0).mean() > 0.5
        assert later.sum() < first.sum()
    plain = client.images.generate(prompt="a red circle", n=2, response_format="b64_json", extra_body=options)
    for streamed, unstreamed in zip(completed, plain.data, strict=True):
        assert np.array_equal(pixels(streamed), pixels(decoded(unstreamed.b64_json)))


def test_a_streamed_edit_sends_image_edit_events(served, tmp_path):
    picture = Image.new("RGBA", (32, 32), (0, 0, 255, 255))
    picture.paste((0, 0, 0, 0), (8, 8, 24, 24))  # transparent: the part to edit
    path = tmp_path / "edit.png"
    picture.save(path)
    with path.open("rb") as image:
        stream = served.client().images.edit(
            image=image, prompt="a red circle", stream=True, partial_images=1, extra_body={"seed": 3, **STEPS}
        )
        events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert events[0].partial_image_index == 0


def test_partial_images_zero_streams_the_image_alone(served):
    events = list(served.client().images.generate(prompt="a blue square", stream=True, partial_images=0))
    assert [e.type for e in events] == ["image_generation.completed"]


def test_output_formats_and_compression_reach_b64_and_urls(served):
    client = served.client()
    sizes = {}
    for output_format, compression in (("webp", 90), ("jpeg", 90), ("jpeg", 5)):
        response = client.images.generate(
            prompt="a red circle",
            response_format="b64_json",
            extra_body={"seed": 2, "output_format": output_format, "output_compression": compression},
        )
        image = decoded(response.data[0].b64_json)
        assert image.format == output_format.upper()
        sizes[output_format, compression] = len(response.data[0].b64_json)
    assert sizes["jpeg", 5] < sizes["jpeg", 90]  # compression is the quality asked for
    linked = client.images.generate(prompt="a red circle", extra_body={"seed": 2, "output_format": "webp"})
    answer = httpx.get(linked.data[0].url)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(answer.content)).format == "WEBP"
    # The signature covers the name asked for: the PNG's signature does not open the WEBP.
    png_url = linked.data[0].url.replace(".webp?", ".png?")
    assert httpx.get(png_url).status_code == 401
    with pytest.raises(openai.BadRequestError, match="output_format"):
        client.images.generate(prompt="a red circle", extra_body={"output_format": "gif"})
    with pytest.raises(openai.BadRequestError, match="partial_images"):
        client.images.generate(prompt="a red circle", stream=True, partial_images=4)


def test_an_image_url_with_another_suffix_is_not_served(served):
    made = served.client().images.generate(prompt="a red circle", extra_body={"seed": 1})
    name = made.data[0].url.split("/images/")[1].split("?")[0]
    stem = name.removesuffix(".png")
    for other in (f"{stem}.txt", f"{stem}.PNG.webp", stem, f"{stem}.png.png"):
        assert httpx.get(f"{served.url}/images/{other}").status_code in (401, 404)


def test_a_stream_whose_client_hangs_up_stops_its_batch(served):
    before = served.service.batcher.jobs_done
    with httpx.stream(
        "POST",
        f"{served.url}/v1/images/generations",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"prompt": "a red circle", "stream": True, "partial_images": 3, "decoder_steps": 100, "n": 8},
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: image_generation.partial_image"):
                break  # one preview seen; hang up
    cancelled = [line for line in served.log if "was cancelled" in line]
    for _ in range(100):
        if cancelled:
            break
        threading.Event().wait(0.1)
        cancelled = [line for line in served.log if "was cancelled" in line]
    assert cancelled and served.service.batcher.jobs_done == before + 1


def test_watchers_hear_the_queue_then_each_stage_with_previews(served):
    service = served.service
    heard: list = []
    blocker = service.submit(ImageRequest("text2im", prompt="a blue square", seed=1, sampling={"decoder_steps": 60}))
    future = service.submit(
        ImageRequest(
            "inpaint",
            prompt=None,
            image=Image.new("RGB", (32, 32)),
            mask=np.eye(32, dtype=bool),
            seed=1,
            sampling=STEPS,
        )
    )
    future.watch(heard.append)
    future.result(60)
    blocker.result(60)
    assert isinstance(heard[0], Queued) and heard[0].line().startswith("queued")
    steps = [update for update in heard if isinstance(update, Step)]
    assert [stage for stage in dict.fromkeys(step.stage for step in steps)] == ["CLIP", "base", "upsampler"]
    last = steps[-1]
    assert last.decoded == 1.0 and last.step == last.steps and last.line() == f"{last.stage} {last.steps}/{last.steps}"
    assert len(last.preview()) == 1 and last.preview()[0].size == (service.image_size(),) * 2


def test_two_cpu_workers_make_the_images_one_worker_makes(tiny_config, tmp_path):
    wanted = [ImageRequest("text2im", prompt=f"a red circle {k}", n=2, seed=40 + k) for k in range(4)]
    made = {}
    for workers in (1, 2):
        with running(tiny_config, tmp_path / str(workers), window_s=0.0, max_batch=2, workers=workers) as server:
            futures = [server.service.submit(request) for request in wanted]
            made[workers] = [[pixels(Image.open(m.path)) for m in f.result(120)] for f in futures]
            assert server.service.batcher.batches == 4
    for one, two in zip(made[1], made[2], strict=True):
        for a, b in zip(one, two, strict=True):
            assert np.abs(a - b).max() <= 1


def test_served_edits_keep_their_inputs_so_info_and_from_make_them_again(served, tiny_config, tmp_path):
    from dalle2_cli.io.output import read_metadata
    from tests.helpers import invoke

    picture = Image.new("RGB", (40, 40), (0, 90, 200))
    picture.paste((250, 250, 0), (0, 0, 20, 40))
    mask = Image.new("RGBA", (40, 40), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (10, 10, 30, 30))
    picture.save(tmp_path / "upload.png")
    mask.save(tmp_path / "mask.png")
    client = served.client()
    with (tmp_path / "upload.png").open("rb") as image, (tmp_path / "mask.png").open("rb") as mask_file:
        edited = client.images.edit(image=image, mask=mask_file, prompt="a red circle", extra_body={"seed": 9})
    with (tmp_path / "upload.png").open("rb") as image:
        varied = client.images.create_variation(image=image, extra_body={"seed": 4})
    for made, command in ((edited, "inpaint"), (varied, "variation")):
        name = made.data[0].url.split("/images/")[1].split("?")[0]
        path = served.service.directory / name
        recorded = read_metadata(path)
        assert recorded["source"] == "upload.png" and recorded["source_file"].startswith("inputs/")
        assert (served.service.directory / recorded["source_file"]).is_file()
        shown = invoke("info", path, check=True).stdout
        assert f"source_file: {recorded['source_file']}" in shown
        again = invoke(command, "--from", path, "-c", tiny_config, "-n", "1", "-o", tmp_path / command, "--json")
        assert again.returncode == 0, again.stderr
        remade = Image.open(json.loads(again.stdout)["images"][0]["path"])
        assert np.abs(pixels(remade) - pixels(Image.open(path))).max() <= 1
    assert read_metadata(served.service.directory / edited.data[0].url.split("/images/")[1].split("?")[0])["mask"]
    # A kept input changed afterwards is refused by its digest, not silently used.
    kept = served.service.directory / read_metadata(path)["source_file"]
    kept.write_bytes(kept.read_bytes() + b"changed")
    refused = invoke("variation", "--from", path, "-c", tiny_config, "-o", tmp_path / "no")
    assert refused.returncode != 0 and "sha256 differs" in refused.stderr


# -- the page, through gradio's own client ---------------------------------------------------------


@pytest.fixture(scope="module")
def paged(tiny_config, tmp_path_factory):
    with running(tiny_config, tmp_path_factory.mktemp("paged"), key=None, page=True, window_s=0.05) as server:
        yield server


def page_client(server):
    from gradio_client import Client

    return Client(server.url + "/", verbose=False)


def follow(job, until=None, seconds: float = 120.0) -> list[str]:
    """The status lines a page job shows, as it runs (until `until(lines)` says stop)."""
    deadline = time.monotonic() + seconds
    while not job.done() and time.monotonic() < deadline:
        lines = [output[2] for output in job.outputs()]
        if until is not None and until(lines):
            return lines
        time.sleep(0.05)
    return [output[2] for output in job.outputs()]


def test_the_page_shows_the_queue_then_stage_and_step_with_previews(paged):
    page = page_client(paged)
    # 60 prior steps too: a 15-step prior can pass between two of the page's polls on a busy machine.
    job = page.submit("a red circle", 2, 3, "default", 60, 60, 0, 0, api_name="/text2im")
    lines = follow(job)
    gallery, files, status, session_gallery = job.result()
    stages = " ".join(lines)
    assert "prior" in stages and "base" in stages and "upsampler" in stages, lines
    assert status.startswith("Made 2 images") and len(gallery) == 2 and len(files) == 2
    galleries = [output[0] for output in job.outputs() if isinstance(output[0], list) and output[0]]  # not skipped
    previews = [gallery for gallery in galleries if "preview" in (gallery[0]["caption"] or "")]
    assert previews, "no preview reached the page"
    shown = Image.open(previews[-1][0]["image"])
    assert shown.size == (paged.service.image_size(),) * 2
    assert [item["caption"] for item in session_gallery] == [item["caption"] for item in gallery]


def test_cancel_stops_the_run_at_its_next_step_and_keeps_nothing(paged):
    page = page_client(paged)
    before = sorted(paged.service.directory.glob("*.png"))
    job = page.submit("a blue square", 8, 1, "default", 0, 100, 0, 0, api_name="/text2im")
    follow(job, until=lambda lines: any("base" in line for line in lines))
    page.predict(api_name="/cancel")
    follow(job)
    assert job.outputs()[-1][2].startswith("Cancelled")
    assert any("was cancelled" in line for line in paged.log)
    assert sorted(paged.service.directory.glob("*.png")) == before


def test_warnings_reach_the_page_and_an_error_keeps_the_last_results(paged, tmp_path):
    from gradio_client import handle_file

    page = page_client(paged)
    long_prompt = " ".join(["red"] * 100)
    gallery, _, status, _ = page.predict(long_prompt, 1, 3, "default", 0, 0, 0, 0, api_name="/text2im")
    assert "longer than CLIP's" in status and len(gallery) == 1
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(Exception, match="cannot read the image notes.png") as refused:
        page.predict(handle_file(str(text)), 1, 1, "default", 0, 0, 0, 0, api_name="/variation")
    assert "/tmp" not in str(refused.value) and "Error" not in str(refused.value).split(":")[0]


def test_png_info_reads_an_images_settings(paged):
    from gradio_client import handle_file

    page = page_client(paged)
    _, files, _, _ = page.predict("a red circle", 1, 21, "default", 0, 0, 0, 0, api_name="/text2im")
    recorded = page.predict(handle_file(files[0]), api_name="/info")
    assert recorded["prompt"] == "a red circle" and recorded["seed"] == 21


def test_api_answers_carry_the_warnings_the_page_shows(served):
    response = served.client().images.generate(prompt=" ".join(["red"] * 100), extra_body={"seed": 1})
    assert any("longer than CLIP's" in warning for warning in response.warnings)
    quiet = served.client().images.generate(prompt="a red circle", extra_body={"seed": 1})
    assert getattr(quiet, "warnings", None) is None


def test_a_replica_serves_a_link_another_signed_when_they_share_the_key_and_the_directory(tiny_config, tmp_path):
    shared = tmp_path / "shared"
    with running(tiny_config, shared) as first, running(tiny_config, shared) as second:
        url = first.client().images.generate(prompt="a red circle", extra_body={"seed": 3}).data[0].url
        path = url.split(first.url, 1)[1]
        served = httpx.get(second.url + path)
        assert served.status_code == 200 and served.content == httpx.get(url).content
        assert httpx.get(second.url + path.split("?")[0]).status_code == 401  # unsigned: refused there too
    with running(tiny_config, shared, key="another-key") as other:  # another key: its own links only
        assert httpx.get(other.url + path).status_code == 401


def test_inpaint_on_a_blank_canvas_or_a_text_file_is_one_plain_line(paged, tmp_path):
    from gradio_client import handle_file

    page = page_client(paged)
    blank, paint = tmp_path / "blank.png", tmp_path / "paint.png"
    Image.new("RGBA", (64, 64), (255, 255, 255, 255)).save(blank)
    stroke = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    stroke.paste((255, 0, 255, 255), (20, 20, 40, 40))
    stroke.save(paint)
    editor = {"background": handle_file(str(blank)), "layers": [handle_file(str(paint))], "composite": None}
    with pytest.raises(Exception, match="one flat colour"):
        page.predict(editor, "", 1, 1, "default", 0, 0, 0, 0, api_name="/inpaint")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    editor = {"background": handle_file(str(text)), "layers": [], "composite": None}
    with pytest.raises(Exception, match="cannot read the image notes.png: it is not an image file"):
        page.predict(editor, "", 1, 1, "default", 0, 0, 0, 0, api_name="/inpaint")


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (["--workers", "0"], "--workers 0: give 1 to 64"),
        (["--workers", "2", "--low-memory"], "--workers with --low-memory"),
        (["--devices", "cpu", "--workers", "2"], "leave out --workers and --device"),
        (["--devices", "cuda:0,cuda:0"], "give distinct devices"),
        (["--devices", " , "], "give distinct devices"),
    ],
)
def test_serve_refuses_worker_options_that_cannot_work_in_one_line(tiny_config, tmp_path, options, said):
    from tests.helpers import invoke

    refused = invoke("serve", "-c", tiny_config, "--port", "0", *options, cwd=tmp_path)
    assert refused.returncode != 0 and said in refused.stderr and "Traceback" not in refused.stderr
