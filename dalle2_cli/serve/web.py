"""The web page of `dalle2 serve`: dalle2-laion's three tabs (text to image, variation,
inpainting), on the same batcher as the API. Built with gradio and mounted on the API's app.

The page enforces the API's limits: gradio's upload route takes files of at most MAX_UPLOAD
bytes, an uploaded image is refused from its header past MAX_PIXELS before it is decoded, and
every request goes through the service's checks (prompt length, images, steps). A user's
mistake is one line on the page and one in the log.
"""

from __future__ import annotations

import functools
import hmac
import re
from collections.abc import Sequence
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any, NoReturn

import gradio as gr
import numpy as np
from PIL import Image

from dalle2_cli.errors import Dalle2Error
from dalle2_cli.io.images import check_pixels
from dalle2_cli.sampling.settings import SAMPLERS
from dalle2_cli.serve.limits import MAX_PER_REQUEST, MAX_UPLOAD
from dalle2_cli.serve.service import ImageRequest, ImageService

MAX_PROMPTS = 8  # prompts per text to image run, as dalle2-laion's page
AUTH_MESSAGE = "This server asks for its API key: any user name, the key as password."


def _refuse(service: ImageService, message: str) -> NoReturn:
    """A user's mistake: one line on the page, one in the log, no traceback."""
    service.log(f"page: {message}")
    raise gr.Error(message, print_exception=False)


def _requests(service: ImageService, wanted: Sequence[ImageRequest]) -> list:
    """Submit them all (so they batch together), then wait for each: a gallery and the files."""
    try:
        futures = [service.submit(request) for request in wanted]
        made = [m for future in futures for m in future.result()]
    except CancelledError:
        _refuse(service, "the server is stopping: the request was cancelled")
    except Dalle2Error as error:
        _refuse(service, str(error))
    gallery = [(str(m.path), _caption(m)) for m in made]
    return [gallery, [str(m.path) for m in made]]


def _caption(made: Any) -> str:
    """The seed asked for (typed back in, it makes this image again) and what made it."""
    item = made.item
    words = item.prompt or item.source or item.provenance.get("command", "")
    return f"seed {item.asked_seed}: {words}"


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


def _checked(service: ImageService, make: Any) -> Any:
    try:
        return make()
    except Dalle2Error as error:
        _refuse(service, str(error))


def _bounded_editor(editor: gr.ImageEditor, service: ImageService) -> gr.ImageEditor:
    """The editor, refusing from its header an image over our pixel limit before gradio decodes
    it (gradio converts the editor's images before the handler sees them, and Pillow's own
    check lets twice as many pixels through). Wrapped on this instance: a subclass of a gradio
    component makes gradio write a .pyi file beside this module."""
    convert = editor.convert_and_format_image

    def checked(file: Any, flatten_on_white: bool = False) -> Any:
        import io

        if file is not None:
            source = file.path if hasattr(file, "path") else io.BytesIO(file)
            try:
                with Image.open(source) as header:
                    check_pixels(header, "the image")
            except Dalle2Error as error:
                _refuse(service, str(error))
            except Exception:  # noqa: BLE001 - not an image: gradio's own reading says so
                pass
        return convert(file, flatten_on_white)

    editor.convert_and_format_image = checked
    return editor


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
                # A path: gradio reads only the header; the pixels are ours to decode, with our checks.
                original = gr.Image(type="filepath", label="Image", image_mode=None)
                vary = gr.Button("Make variations", variant="primary")
            with gr.Tab("Inpaint"):
                editor = gr.ImageEditor(
                    type="pil",
                    image_mode="RGBA",
                    label="Image: paint over what to regenerate",
                    brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"),
                    layers=False,
                    transforms=(),
                )
                canvas = _bounded_editor(editor, service)
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
        _refuse(service, "write a prompt: one per line")
    if len(lines) > MAX_PROMPTS:
        _refuse(service, f"{len(lines)} prompts: give at most {MAX_PROMPTS}")
    base = _seed(seed_value)
    wanted = _checked(
        service,
        lambda: [
            ImageRequest("text2im", prompt=line, n=int(n), seed=base, sampling=_sampling(*sampling)) for line in lines
        ],
    )
    return _requests(service, wanted)


def _variation(service: ImageService, path: str | None, n: float, seed_value: Any, *sampling: Any) -> list:
    from dalle2_cli.io.images import flatten_to_rgb, read_image

    if not path:
        _refuse(service, "upload an image first")
    name = Path(path).name  # gradio keeps the uploaded file's own name
    image = _checked(service, lambda: flatten_to_rgb(read_image(Path(path), "the image", name)))
    fields = {"image": image, "source": name, "seed": _seed(seed_value)}
    wanted = _checked(service, lambda: ImageRequest("variation", n=int(n), sampling=_sampling(*sampling), **fields))
    return _requests(service, [wanted])


def _inpaint(
    service: ImageService, edited: dict | None, prompt: str, n: float, seed_value: Any, *sampling: Any
) -> list:
    """The editor's background is the image; whatever the brush painted (any layer) is the mask."""
    from dalle2_cli.io.images import flatten_to_rgb

    if not edited or edited.get("background") is None:
        _refuse(service, "upload an image, then paint over what to regenerate")
    picture = flatten_to_rgb(edited["background"])
    mask = np.zeros((picture.height, picture.width), dtype=bool)
    for layer in edited.get("layers") or []:
        mask |= np.asarray(layer.convert("RGBA").resize(picture.size))[..., 3] > 0
    if not mask.any():
        _refuse(service, "paint over the part of the image to regenerate")
    fields = {"prompt": (prompt or "").strip() or None, "image": picture, "mask": mask, "seed": _seed(seed_value)}
    wanted = _checked(service, lambda: ImageRequest("inpaint", n=int(n), sampling=_sampling(*sampling), **fields))
    return _requests(service, [wanted])


def mount_page(app: Any, service: ImageService, api_key: str | None) -> Any:
    """The page at `/` of `app`; with a key, the page asks for it before it opens."""

    def allowed(user: str, password: str) -> bool:
        return hmac.compare_digest(password.encode(), (api_key or "").encode())

    page = build_page(service)
    mounted = gr.mount_gradio_app(
        app,
        page,
        path="/",
        auth=allowed if api_key else None,
        auth_message=AUTH_MESSAGE if api_key else None,
        allowed_paths=[str(service.directory.resolve())],
        footer_links=[],
        max_file_size=MAX_UPLOAD,
    )
    if api_key:
        mounted.add_middleware(_LoginPageWithoutApi)
    # A stopping server ends the page's heartbeat streams (dalle2_cli.serve.server).
    gradio_app = next(route.app for route in mounted.routes if hasattr(getattr(route, "app", None), "stop_event"))
    mounted.state.on_stop = [*getattr(mounted.state, "on_stop", []), gradio_app.stop_event.set]
    return mounted


class _LoginPageWithoutApi:
    """gradio renders its description of the page's API (every endpoint, input and label) into
    the login page too, for visitors without the key: here that page carries an empty one.
    The login page is the one whose embedded config says `auth_required`."""

    LOGIN = re.compile(rb'window\.gradio_config = \{"auth_required":\s*true')
    API_INFO = re.compile(rb"(window\.gradio_api_info = ).*?(;</script>)", re.DOTALL)
    NO_API = b'{"named_endpoints": {}, "unnamed_endpoints": {}}'  # gradio's own shape, empty

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD") or scope["path"] not in ("/", ""):
            await self.app(scope, receive, send)
            return
        start: dict = {}
        body = bytearray()

        async def held(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if not message.get("more_body"):
                    page = bytes(body)
                    if self.LOGIN.search(page):
                        page = self.API_INFO.sub(rb"\1" + self.NO_API + rb"\2", page)
                    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                    length = str(len(page)).encode() if scope["method"] == "GET" else None
                    headers += [(b"content-length", length)] if length else []
                    await send({**start, "headers": headers})
                    await send({"type": "http.response.body", "body": page})
            else:
                await send(message)

        await self.app(scope, receive, held)
