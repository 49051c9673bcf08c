"""The web page of `dalle2 serve`: dalle2-laion's three tabs (text to image, variation,
inpainting) and a PNG-info tab, on the same batcher as the API. Built with gradio and mounted
on the API's app.

A run shows its queue place, then its stage and step, and previews of its images as they form;
Cancel stops it at the next step. Each image can be reused (its seed and settings), sent to
Variation or Inpaint, or downloaded; the session's images stay in a gallery of their own.

The page enforces the API's limits: gradio's upload route takes files of at most MAX_UPLOAD
bytes, an uploaded image is refused from its header past MAX_PIXELS before it is decoded, and
every request goes through the service's checks (prompt length, images, steps). A user's
mistake is one line on the page and one in the log.
"""

from __future__ import annotations

import functools
import hmac
import re
import secrets
import threading
import time
from collections.abc import Sequence
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any, NoReturn

import gradio as gr
import numpy as np
from PIL import Image

from dalle2_cli.errors import Cancelled, Dalle2Error
from dalle2_cli.io.images import check_pixels
from dalle2_cli.sampling.settings import SAMPLERS
from dalle2_cli.serve.limits import MAX_PER_REQUEST, MAX_UPLOAD
from dalle2_cli.serve.progress import Step
from dalle2_cli.serve.service import ImageRequest, ImageService

MAX_PROMPTS = 8  # prompts per text to image run, as dalle2-laion's page
AUTH_MESSAGE = "This server asks for its API key: any user name, the key as password."


MAX_HISTORY = 60  # this session's images kept in its gallery
POLL_S = 0.25  # how often a running request's status line is brought up to date
PREVIEW_EVERY_S = 0.75  # previews are files gradio writes: not every step

# Ctrl+Enter (Cmd+Enter) in a prompt box clicks its button; Shift+Enter is a new line (gradio's
# multi-line box would take it as a submit, which these boxes do not have). Capture phase: before
# gradio's own handler sees the key.
KEYS = """
<script>
document.addEventListener("keydown", (event) => {
  if (event.key !== "Enter" || event.target.tagName !== "TEXTAREA") return;
  const box = event.target.closest("#prompts, #fill-prompt");
  if (!box) return;
  if (event.ctrlKey || event.metaKey) {
    event.preventDefault();
    event.stopPropagation();
    document.querySelector(box.id === "prompts" ? "#generate" : "#paint")?.click();
  } else if (event.shiftKey) {
    event.preventDefault();
    event.stopPropagation();
    const area = event.target;
    area.setRangeText("\\n", area.selectionStart, area.selectionEnd, "end");
    area.dispatchEvent(new Event("input", { bubbles: true }));
  }
}, true);
</script>
"""
# Captions whole (gradio cuts them to one line), thumbnails their own size at most.
CSS = """
#gallery .caption-label, #history .caption-label { white-space: normal; overflow: visible; text-overflow: clip; }
#status { min-height: 1.5em; }
"""


def _refuse(service: ImageService, message: str) -> NoReturn:
    """A user's mistake: one line on the page, one in the log, no traceback."""
    service.log(f"page: {message}")
    raise gr.Error(message, print_exception=False)


class _Runs:
    """What each browser session has running, so that its Cancel button stops it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, list] = {}
        self._cancelled: set[str] = set()

    def begin(self, session: str, futures: list) -> None:
        with self._lock:
            self._running[session] = futures
            self._cancelled.discard(session)

    def end(self, session: str) -> None:
        with self._lock:
            self._running.pop(session, None)
            self._cancelled.discard(session)

    def cancel(self, session: str) -> bool:
        """Stop the session's requests (a batch stops at its next step once nobody waits for
        it); whether there were any."""
        with self._lock:
            futures = self._running.get(session, [])
            if futures:
                self._cancelled.add(session)
        for future in futures:
            future.abandon()
        return bool(futures)

    def cancelled(self, session: str) -> bool:
        return session in self._cancelled


def _follow(
    service: ImageService, runs: _Runs, session: str, wanted: Sequence[ImageRequest], shown: list, history: list
):
    """Submit the requests (together, so they batch), then yield the page's outputs as they
    advance: the status line (queue place, stage and step), previews of the images as they
    form, and at the end the images. Cancel, an error or a page closed keeps nothing made."""
    try:
        futures = [service.submit(request) for request in wanted]
    except Dalle2Error as error:
        _refuse(service, str(error))
    warnings = list(dict.fromkeys(w for request in wanted for w in service.warnings(request)))
    for warning in warnings:
        gr.Warning(warning)
    notes = "".join(f"\n\n⚠ {warning}" for warning in warnings)
    # Only a wake-up: the loop reads each future's latest update (a queue of every step's
    # update would grow with fast steps, each holding its batch's tensors).
    changed = threading.Event()
    for future in futures:
        future.watch(lambda update: changed.set())
    runs.begin(session, futures)
    started, previewed = time.monotonic(), 0.0
    skip = gr.skip()
    try:
        while not all(future.done() for future in futures) and not runs.cancelled(session):
            changed.wait(POLL_S)
            changed.clear()
            time.sleep(POLL_S / 2)  # at most a few updates a second, however fast the steps
            previews = None
            if time.monotonic() - previewed >= PREVIEW_EVERY_S:
                previews = _previews(futures, service.image_size())
                previewed = time.monotonic() if previews else previewed
            yield previews or skip, skip, _status(futures, started) + notes, skip, skip, skip
        if runs.cancelled(session):
            yield _gallery(shown), skip, "Cancelled: nothing of it was kept." + notes, skip, skip, skip
            return
        try:
            made = [m for future in futures for m in future.result()]
        except (CancelledError, Cancelled):
            yield _gallery(shown), skip, "The server is stopping: the request was cancelled.", skip, skip, skip
            _refuse(service, "the server is stopping: the request was cancelled")
        except Dalle2Error as error:
            yield _gallery(shown), skip, f"⚠ {error}", skip, skip, skip
            _refuse(service, str(error))
        records = [_record(m) for m in made]
        history = (records + history)[:MAX_HISTORY]
        done = f"Made {len(made)} image{'s' * (len(made) != 1)} in {time.monotonic() - started:.1f} s." + notes
        yield _gallery(records), [r["path"] for r in records], done, _gallery(history), records, history
    finally:
        runs.end(session)
        for future in futures:
            if not future.done():  # cancelled, or the page went away: nobody waits for it
                future.abandon()


def _status(futures: Sequence[Any], started: float) -> str:
    running = next((future for future in futures if not future.done()), None)
    latest = getattr(running, "latest", None)
    return f"**{latest.line() if latest is not None else 'starting'}** · {time.monotonic() - started:.0f} s"


def _previews(futures: Sequence[Any], size: int) -> list[tuple[Image.Image, str]]:
    """Each running request's images as they stand, at the size they will have."""
    shown = []
    for future in futures:
        latest = future.latest
        if isinstance(latest, Step) and latest.preview is not None:
            shown += [(picture, f"preview: {latest.line()}") for picture in latest.pictures(size)]
    return shown


def _record(made: Any) -> dict:
    """What the page keeps of an image it showed (on the server, per session)."""
    item = made.item
    return {"path": str(made.path), "caption": _caption(made), "metadata": item.metadata()}


def _gallery(records: Sequence[dict]) -> list:
    return [(record["path"], record["caption"]) for record in records]


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


def _form_from(metadata: dict) -> list:
    """The form's fields (prompt, seed, sampler, steps, guidance) from an image's recorded
    settings: what makes that image again as the first of its run."""

    def one(value: Any) -> Any:  # a per-unet list whose values agree, as the page's one number
        values = value if isinstance(value, list) else [value]
        return values[0] if values and all(v == values[0] for v in values) and values[0] is not None else 0

    from dalle2_cli.io.output import recorded_sampler
    from dalle2_cli.sampling.generated import seed_asked

    return [
        metadata.get("prompt") or gr.skip(),
        seed_asked(metadata, metadata.get("seed", -1)),
        recorded_sampler(metadata) or "default",
        one(metadata.get("prior_steps")),
        one(metadata.get("decoder_steps")),
        one(metadata.get("prior_cond_scale")),
        one(metadata.get("decoder_cond_scale")),
    ]


def _seed(value: Any) -> int | None:
    return None if value in (None, "") or int(value) < 0 else int(value)


def _checked(service: ImageService, make: Any) -> Any:
    try:
        return make()
    except Dalle2Error as error:
        _refuse(service, str(error))


def _check_upload(service: ImageService, source: Any, name: str) -> None:
    """Refuse an upload that is not an image, or has more pixels than we take, from its header
    alone, in a line of our own (gradio's would name its class and the file's /tmp path)."""
    try:
        with Image.open(source) as header:
            check_pixels(header, "the image")
    except Dalle2Error as error:
        _refuse(service, str(error))
    except Exception:  # noqa: BLE001 - Pillow's many ways of not reading a file
        _refuse(service, f"cannot read the image {name}: it is not an image file (PNG, JPEG, WebP, ...)")


def _bounded(component: Any, service: ImageService) -> Any:
    """An image upload whose header is checked (`_check_upload`) before gradio decodes it."""
    preprocess = component.preprocess

    def checked(payload: Any) -> Any:
        if payload is not None and getattr(payload, "path", None):
            _check_upload(service, payload.path, Path(payload.orig_name or payload.path).name)
        return preprocess(payload)

    component.preprocess = checked
    return component


def _bounded_editor(editor: gr.ImageEditor, service: ImageService) -> gr.ImageEditor:
    """The editor, its images' headers checked (`_check_upload`) before gradio decodes them
    (gradio converts the editor's images before the handler sees them, and Pillow's own check
    lets twice as many pixels through). Wrapped on this instance: a subclass of a gradio
    component makes gradio write a .pyi file beside this module."""
    import io

    convert = editor.convert_and_format_image

    def checked(file: Any, flatten_on_white: bool = False) -> Any:
        if file is not None:
            path = getattr(file, "path", None)
            name = Path(getattr(file, "orig_name", None) or path or "upload").name
            _check_upload(service, path if path else io.BytesIO(file), name)
        return convert(file, flatten_on_white)

    editor.convert_and_format_image = checked
    return editor


def _recorded(service: ImageService, path: str | None) -> dict:
    """The settings a PNG made by dalle2 records (its header checked before anything is read)."""
    from dalle2_cli.io.output import read_metadata

    if not path:
        return {}
    recorded = read_metadata(Path(path))  # its header was checked on upload (`_bounded`)
    if not recorded:
        _refuse(service, "this image records no dalle2 settings (made elsewhere, or saved again since)")
    return recorded


def build_page(service: ImageService) -> gr.Blocks:
    runs = _Runs()
    with gr.Blocks(title="dalle2-cli") as page:
        gr.Markdown(
            f"## dalle2-cli: `{service.name}`\nEach image's seed is under it (image k of a run gets seed + k); "
            "a PNG keeps its settings. Ctrl+Enter generates."
        )
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
        with gr.Tabs() as tabs:
            with gr.Tab("Text to image", id="text2im"):
                prompts = gr.Textbox(
                    lines=4,
                    label=f"Prompts, one per line (up to {MAX_PROMPTS}); Shift+Enter: new line",
                    elem_id="prompts",
                )
                dream = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Tab("Variation", id="variation"):
                # A path: gradio reads only the header; the pixels are ours to decode, with our checks.
                original = _bounded(gr.Image(type="filepath", label="Image", image_mode=None), service)
                vary = gr.Button("Make variations", variant="primary")
            with gr.Tab("Inpaint", id="inpaint"):
                editor = gr.ImageEditor(
                    type="pil",
                    image_mode="RGBA",
                    label="Image: paint over what to regenerate",
                    brush=_brush(service.image_size() if service.ready else 64),
                    layers=False,
                    transforms=(),
                )
                canvas = _bounded_editor(editor, service)
                fill_prompt = gr.Textbox(label="What to paint there (blank: follow the image)", elem_id="fill-prompt")
                with gr.Row():
                    grow = gr.Slider(0, 64, value=0, step=1, label="Grow the painted area (pixels of the image)")
                    invert = gr.Checkbox(False, label="Invert: regenerate all but the painted area")
                paint = gr.Button("Inpaint", variant="primary", elem_id="paint")
            with gr.Tab("PNG info", id="info"):
                dropped = _bounded(
                    gr.Image(type="filepath", label="Drop a PNG made by dalle2", image_mode=None), service
                )
                recorded = gr.JSON(label="Its recorded settings")
                use_recorded = gr.Button("Use these settings")
        with gr.Row():
            status = gr.Markdown("", elem_id="status")
            cancel = gr.Button("Cancel", variant="stop", scale=0, min_width=100)
        gallery = gr.Gallery(
            label="Images",
            columns=4,
            height="auto",
            format="png",
            fit_columns=False,
            object_fit="contain",
            elem_id="gallery",
            buttons=["download", "fullscreen"],
        )
        with gr.Row():
            reuse = gr.Button("Reuse seed and settings", size="sm")
            to_variation = gr.Button("Send to Variation", size="sm")
            to_inpaint = gr.Button("Send to Inpaint", size="sm")
        files = gr.File(label="PNG files, with their settings", file_count="multiple")
        with gr.Accordion("This session's images", open=False):
            history_gallery = gr.Gallery(columns=8, height="auto", format="png", fit_columns=False, elem_id="history")
        shown, history, selected = gr.State([]), gr.State([]), gr.State(0)
        session = gr.State(lambda: secrets.token_hex(16))  # this page's own: what its Cancel stops

        outputs = [gallery, files, status, history_gallery, shown, history]
        common = [count, seed, *sampling_inputs]
        # No limit of gradio's own: its requests meet in the batcher, which runs them together.
        # Progress shows in the status line and the gallery's previews, not over the results.
        for button, handler, inputs, name in (
            (dream, _text_to_image, [prompts, *common], "text2im"),
            (vary, _variation, [original, *common], "variation"),
            (paint, _inpaint, [canvas, fill_prompt, *common, grow, invert], "inpaint"),
        ):
            button.click(
                functools.partial(handler, service, runs),
                [*inputs, shown, history, session],
                outputs,
                api_name=name,
                concurrency_limit=None,
                show_progress="hidden",
            )

        def cancelled(session_id: str) -> Any:
            return "Cancelling..." if runs.cancel(session_id) else gr.skip()

        cancel.click(cancelled, session, status, api_name="cancel", concurrency_limit=None, show_progress="hidden")
        gallery.select(_selected, None, selected, api_visibility="private")
        form = [prompts, seed, *sampling_inputs]
        reuse.click(_reuse, [shown, selected], [*form, tabs], api_visibility="private")
        to_variation.click(_to_variation, [shown, selected], [original, tabs], api_visibility="private")
        to_inpaint.click(_to_inpaint, [shown, selected], [canvas, tabs], api_visibility="private")
        editor.upload(_fit_brush, canvas, canvas, api_visibility="private")
        dropped.change(functools.partial(_recorded, service), dropped, recorded, api_name="info")
        use_recorded.click(_use_recorded, recorded, [*form, tabs], api_visibility="private")
    return page


def _brush(side: int) -> gr.Brush:
    """A brush a sixteenth of the image wide: fine enough on a 64 px image, visible on a large one."""
    return gr.Brush(colors=["#ff00ff"], color_mode="fixed", default_size=max(2, round(side / 16)))


def _fit_brush(edited: dict | None) -> Any:
    background = (edited or {}).get("background")
    if background is None:
        return gr.skip()
    return gr.ImageEditor(brush=_brush(min(background.size)))


def _selected(event: gr.SelectData) -> int:
    return event.index


def _chosen(shown: list, selected: int) -> dict:
    if not shown:
        raise gr.Error("make some images first, then pick one", print_exception=False)
    return shown[min(max(int(selected or 0), 0), len(shown) - 1)]


def _reuse(shown: list, selected: int) -> list:
    record = _chosen(shown, selected)
    command = record["metadata"].get("command")
    tab = command if command in ("variation", "inpaint") else "text2im"
    return [*_form_from(record["metadata"]), gr.Tabs(selected=tab)]


def _to_variation(shown: list, selected: int) -> list:
    return [_chosen(shown, selected)["path"], gr.Tabs(selected="variation")]


def _to_inpaint(shown: list, selected: int) -> list:
    path = _chosen(shown, selected)["path"]
    return [{"background": path, "layers": [], "composite": path}, gr.Tabs(selected="inpaint")]


def _use_recorded(metadata: dict | None) -> list:
    return [*_form_from(metadata or {}), gr.Tabs(selected="text2im")]


def _text_to_image(service: ImageService, runs: _Runs, text: str, n: float, seed_value: Any, *rest: Any):
    *sampling, shown, history, session = rest
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
    yield from _follow(service, runs, session, wanted, shown, history)


def _variation(service: ImageService, runs: _Runs, path: str | None, n: float, seed_value: Any, *rest: Any):
    from dalle2_cli.io.images import flatten_to_rgb, read_image

    *sampling, shown, history, session = rest
    if not path:
        _refuse(service, "upload an image first")
    name = Path(path).name  # gradio keeps the uploaded file's own name
    image = _checked(service, lambda: flatten_to_rgb(read_image(Path(path), "the image", name)))
    fields = {"image": image, "source": name, "seed": _seed(seed_value)}
    wanted = _checked(service, lambda: ImageRequest("variation", n=int(n), sampling=_sampling(*sampling), **fields))
    yield from _follow(service, runs, session, [wanted], shown, history)


def _inpaint(
    service: ImageService, runs: _Runs, edited: dict | None, prompt: str, n: float, seed_value: Any, *rest: Any
):
    """The editor's background is the image; whatever the brush painted (any layer) is the
    mask, grown by `grow` pixels, and inverted on request."""
    from dalle2_cli.io.images import flatten_to_rgb, grow_mask

    *sampling, grow, invert, shown, history, session = rest
    if not edited or edited.get("background") is None:
        _refuse(service, "upload an image, then paint over what to regenerate")
    picture = flatten_to_rgb(edited["background"])
    if all(low == high for low, high in picture.getextrema()):
        _refuse(service, "the image is one flat colour, with nothing to keep: upload the image to edit")
    mask = np.zeros((picture.height, picture.width), dtype=bool)
    for layer in edited.get("layers") or []:
        mask |= np.asarray(layer.convert("RGBA").resize(picture.size))[..., 3] > 0
    if not mask.any():
        _refuse(service, "paint over the part of the image to regenerate")
    mask = _checked(service, lambda: grow_mask(mask, int(grow or 0)))
    if invert:
        mask = ~mask
    fields = {"prompt": (prompt or "").strip() or None, "image": picture, "mask": mask, "seed": _seed(seed_value)}
    wanted = _checked(service, lambda: ImageRequest("inpaint", n=int(n), sampling=_sampling(*sampling), **fields))
    yield from _follow(service, runs, session, [wanted], shown, history)


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
        css=CSS,
        head=KEYS,
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
