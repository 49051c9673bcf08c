"""The web page of `dalle2 serve`: dalle2-laion's three tabs (text to image, variation,
inpainting), on the same batcher as the API. Built with gradio and mounted on the API's app."""

from __future__ import annotations

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
    def whole(value: Any) -> int | None:
        return None if value in (None, "", 0) else int(value)

    return {
        "sampler": None if sampler == "default" else sampler,
        "prior_steps": whole(prior_steps),
        "decoder_steps": whole(decoder_steps),
        "prior_cond_scale": None if prior_scale in (None, "") else float(prior_scale),
        "decoder_cond_scale": None if decoder_scale in (None, "") else float(decoder_scale),
    }


def _seed(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


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
                prior_steps = gr.Number(None, precision=0, label="Prior steps (blank: the config's)")
                decoder_steps = gr.Number(None, precision=0, label="Decoder steps (blank: the config's)")
                prior_scale = gr.Number(None, label="Prior guidance (blank: the config's)")
                decoder_scale = gr.Number(None, label="Decoder guidance (blank: the config's)")
        sampling_inputs = [sampler, prior_steps, decoder_steps, prior_scale, decoder_scale]
        with gr.Row():
            count = gr.Slider(1, MAX_PER_REQUEST, value=4, step=1, label="Images per input")
            seed = gr.Number(None, precision=0, label="Seed (blank: random)")
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

        def text_to_image(text: str, n: float, seed_value: Any, *sampling: Any) -> list:
            lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
            if not lines:
                raise gr.Error("write a prompt: one per line")
            if len(lines) > MAX_PROMPTS:
                raise gr.Error(f"{len(lines)} prompts: give at most {MAX_PROMPTS}")
            base = _seed(seed_value)
            wanted = _checked(
                lambda: [
                    ImageRequest("text2im", prompt=line, n=int(n), seed=base, sampling=_sampling(*sampling))
                    for line in lines
                ]
            )
            return _requests(service, wanted)

        def variation(image: Image.Image | None, n: float, seed_value: Any, *sampling: Any) -> list:
            from dalle2_cli.io.images import flatten_to_rgb

            if image is None:
                raise gr.Error("upload an image first")
            wanted = _checked(
                lambda: ImageRequest(
                    "variation",
                    image=flatten_to_rgb(image),
                    n=int(n),
                    seed=_seed(seed_value),
                    sampling=_sampling(*sampling),
                )
            )
            return _requests(service, [wanted])

        def inpaint(edited: dict | None, prompt: str, n: float, seed_value: Any, *sampling: Any) -> list:
            from dalle2_cli.io.images import flatten_to_rgb

            if not edited or edited.get("background") is None:
                raise gr.Error("upload an image, then paint over what to regenerate")
            picture = flatten_to_rgb(edited["background"])
            mask = np.zeros((picture.height, picture.width), dtype=bool)
            for layer in edited.get("layers") or []:
                mask |= np.asarray(layer.convert("RGBA").resize(picture.size))[..., 3] > 0
            if not mask.any():
                raise gr.Error("paint over the part of the image to regenerate")
            wanted = _checked(
                lambda: ImageRequest(
                    "inpaint",
                    prompt=prompt.strip() or None,
                    image=picture,
                    mask=mask,
                    n=int(n),
                    seed=_seed(seed_value),
                    sampling=_sampling(*sampling),
                )
            )
            return _requests(service, [wanted])

        outputs = [gallery, files]
        common = [count, seed, *sampling_inputs]
        # No limit of gradio's own: its requests meet in the batcher, which runs them together.
        dream.click(text_to_image, [prompts, *common], outputs, api_name="text2im", concurrency_limit=None)
        vary.click(variation, [original, *common], outputs, api_name="variation", concurrency_limit=None)
        paint.click(inpaint, [canvas, fill_prompt, *common], outputs, api_name="inpaint", concurrency_limit=None)
    return page


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
