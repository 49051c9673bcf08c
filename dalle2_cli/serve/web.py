"""The web page of `dalle2 serve`: dalle2-laion's three tabs (text to image, variation,
inpainting), on the same batcher as the API. Built with gradio and mounted on the API's app."""

from __future__ import annotations

import functools
import hmac
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from dalle2_cli.errors import Dalle2Error
from dalle2_cli.sampling.settings import SAMPLERS
from dalle2_cli.serve.service import MAX_PER_REQUEST, ImageRequest, ImageService

MAX_PROMPTS = 8  # prompts per text to image run, as dalle2-laion's page
AUTH_MESSAGE = "This server asks for its API key: any user name, the key as password."


def _requests(service: ImageService, wanted: Sequence[ImageRequest]) -> list:
    """Submit them all (so they batch together), then wait for each: a gallery and the files."""
    try:
        futures: list[Future] = [service.submit(request) for request in wanted]
        made = [m for future in futures for m in future.result()]
    except Dalle2Error as error:
        raise gr.Error(str(error)) from None
    gallery = [(str(m.path), _caption(m)) for m in made]
    return [gallery, [str(m.path) for m in made]]


def _caption(made: Any) -> str:
    item = made.item
    words = item.prompt or item.source or item.provenance.get("command", "")
    return f"seed {item.seed}: {words}"


def _sampling(sampler: str, prior_steps: Any, decoder_steps: Any, prior_scale: Any, decoder_scale: Any) -> dict:
    """The page's numbers, 0 (or blank) standing for the config's own value."""

    def given(value: Any, kind: type) -> Any:
        return None if value in (None, "") or float(value) == 0 else kind(value)

    return {
        "sampler": None if sampler == "default" else sampler,
        "prior_steps": given(prior_steps, int),
        "decoder_steps": given(decoder_steps, int),
        "prior_cond_scale": given(prior_scale, float),
        "decoder_cond_scale": given(decoder_scale, float),
    }


def _seed(value: Any) -> int | None:
    return None if value in (None, "") or int(value) < 0 else int(value)


def _checked(make: Any) -> Any:
    try:
        return make()
    except Dalle2Error as error:
        raise gr.Error(str(error)) from None


def build_page(service: ImageService) -> gr.Blocks:
    with gr.Blocks(title="dalle2-cli") as page:
        gr.Markdown(f"## dalle2-cli: `{service.name}`\nEach image's seed is under it; a PNG keeps its settings.")
        with gr.Accordion("Sampling", open=False):
            with gr.Row():
                sampler = gr.Dropdown(["default", *SAMPLERS], value="default", label="Sampler")
                prior_steps = gr.Number(0, precision=0, label="Prior steps (0: the config's)")
                decoder_steps = gr.Number(0, precision=0, label="Decoder steps (0: the config's)")
                prior_scale = gr.Number(0, label="Prior guidance (0: the config's)")
                decoder_scale = gr.Number(0, label="Decoder guidance (0: the config's)")
        sampling_inputs = [sampler, prior_steps, decoder_steps, prior_scale, decoder_scale]
        with gr.Row():
            count = gr.Slider(1, MAX_PER_REQUEST, value=4, step=1, label="Images per input")
            seed = gr.Number(-1, precision=0, label="Seed (-1: random; image k gets seed + k)")
        with gr.Tabs():
            with gr.Tab("Text to image"):
                prompts = gr.Textbox(lines=4, label=f"Prompts, one per line (up to {MAX_PROMPTS})")
                dream = gr.Button("Generate", variant="primary")
            with gr.Tab("Variation"):
                original = gr.Image(type="pil", label="Image", image_mode=None)
                vary = gr.Button("Make variations", variant="primary")
            with gr.Tab("Inpaint"):
                canvas = gr.ImageEditor(
                    type="pil",
                    image_mode="RGBA",
                    label="Image: paint over what to regenerate",
                    brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"),
                    layers=False,
                    transforms=(),
                )
                fill_prompt = gr.Textbox(label="What to paint there (blank: follow the image)")
                paint = gr.Button("Inpaint", variant="primary")
        gallery = gr.Gallery(label="Images", columns=4, height="auto", format="png")
        files = gr.File(label="PNG files, with their settings", file_count="multiple")

        outputs = [gallery, files]
        common = [count, seed, *sampling_inputs]
        # No limit of gradio's own: its requests meet in the batcher, which runs them together.
        for button, handler, inputs, name in (
            (dream, _text_to_image, [prompts, *common], "text2im"),
            (vary, _variation, [original, *common], "variation"),
            (paint, _inpaint, [canvas, fill_prompt, *common], "inpaint"),
        ):
            button.click(functools.partial(handler, service), inputs, outputs, api_name=name, concurrency_limit=None)
    return page


def _text_to_image(service: ImageService, text: str, n: float, seed_value: Any, *sampling: Any) -> list:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        raise gr.Error("write a prompt: one per line")
    if len(lines) > MAX_PROMPTS:
        raise gr.Error(f"{len(lines)} prompts: give at most {MAX_PROMPTS}")
    base = _seed(seed_value)
    wanted = _checked(
        lambda: [
            ImageRequest("text2im", prompt=line, n=int(n), seed=base, sampling=_sampling(*sampling)) for line in lines
        ]
    )
    return _requests(service, wanted)


def _variation(service: ImageService, image: Image.Image | None, n: float, seed_value: Any, *sampling: Any) -> list:
    from dalle2_cli.io.images import flatten_to_rgb

    if image is None:
        raise gr.Error("upload an image first")
    fields = {"image": flatten_to_rgb(image), "seed": _seed(seed_value)}
    wanted = _checked(lambda: ImageRequest("variation", n=int(n), sampling=_sampling(*sampling), **fields))
    return _requests(service, [wanted])


def _inpaint(
    service: ImageService, edited: dict | None, prompt: str, n: float, seed_value: Any, *sampling: Any
) -> list:
    """The editor's background is the image; whatever the brush painted (any layer) is the mask."""
    from dalle2_cli.io.images import flatten_to_rgb

    if not edited or edited.get("background") is None:
        raise gr.Error("upload an image, then paint over what to regenerate")
    picture = flatten_to_rgb(edited["background"])
    mask = np.zeros((picture.height, picture.width), dtype=bool)
    for layer in edited.get("layers") or []:
        mask |= np.asarray(layer.convert("RGBA").resize(picture.size))[..., 3] > 0
    if not mask.any():
        raise gr.Error("paint over the part of the image to regenerate")
    fields = {"prompt": (prompt or "").strip() or None, "image": picture, "mask": mask, "seed": _seed(seed_value)}
    wanted = _checked(lambda: ImageRequest("inpaint", n=int(n), sampling=_sampling(*sampling), **fields))
    return _requests(service, [wanted])


def mount_page(app: Any, service: ImageService, api_key: str | None) -> Any:
    """The page at `/` of `app`; with a key, the page asks for it before it opens."""

    def allowed(user: str, password: str) -> bool:
        return hmac.compare_digest(password.encode(), (api_key or "").encode())

    return gr.mount_gradio_app(
        app,
        build_page(service),
        path="/",
        auth=allowed if api_key else None,
        auth_message=AUTH_MESSAGE if api_key else None,
        allowed_paths=[str(service.directory.resolve())],
        footer_links=[],
    )
