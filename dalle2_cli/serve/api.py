"""OpenAI's Images API over an ImageService, so that OpenAI's SDKs work unchanged:

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.images.generate(prompt="a red circle", n=2, extra_body={"seed": 7})

Requests are read and checked here (the gate, dalle2_cli.serve.gate, has checked their
head and capped their body), the work is the service's, and every failure under /v1 and
/images is answered in OpenAI's error shape with OpenAI's status codes, which the SDKs turn
into their own exception types. A response never carries a traceback. Parsing bodies, decoding
images and encoding answers run on worker threads: the event loop only moves bytes, so
/health and the page answer while a large upload is read.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import io
import json
import sys
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.routing import Match

from dalle2_cli.config import MAX_NAME_BYTES
from dalle2_cli.errors import Cancelled, Dalle2Error
from dalle2_cli.serve.batcher import QueueFull, Stopping
from dalle2_cli.serve.gate import Gate
from dalle2_cli.serve.limits import MAX_BODY, MAX_PER_REQUEST, MAX_PROMPT, MAX_UPLOAD
from dalle2_cli.serve.progress import Step
from dalle2_cli.serve.service import (
    SAMPLING_FIELDS,
    ImageRequest,
    ImageService,
    parse_size,
)

# The methods HTTP defines; any other is refused under /v1 and /images before routing.
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")
MODEL_ALIASES = ("dall-e-2",)  # what clients written for OpenAI send; served by the loaded model
PARAMS = {"num_images": "n"}  # the library's field names that the API spells otherwise


class APIError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, **headers: str):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @classmethod
    def of(cls, error: Dalle2Error, status: int = 400) -> APIError:
        """The library's error, its setting named as the API spells it (the `param`)."""
        field = getattr(error, "field", None)
        param = PARAMS.get(field, field) if field else None
        return cls(status, error.naming(lambda name: PARAMS.get(name, name)), param)

    def body(self) -> dict:
        kind = {401: "invalid_request_error", 429: "rate_limit_error"}.get(self.status, "invalid_request_error")
        if self.status >= 500:
            kind = "server_error"
        return {"message": self.message, "type": kind, "param": self.param, "code": self.code}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status, headers=self.headers or None)


def _parse_json(body: bytes) -> dict:
    """A JSON object of parameters (on a worker thread: a body may be megabytes)."""
    try:
        values = json.loads(body or b"null")
    except RecursionError:
        raise APIError(400, "the JSON body is nested too deeply: send a flat object of parameters") from None
    except ValueError:
        raise APIError(400, "the body is not JSON: send the parameters as a JSON object") from None
    if not isinstance(values, dict):
        raise APIError(400, "the body must be a JSON object of parameters")
    return values


Steps = int | list[int]
Scales = float | list[float]


FORMATS = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


class _Common(BaseModel):
    """The fields every images endpoint takes: OpenAI's and our sampling extensions."""

    model_config = ConfigDict(extra="forbid")

    n: Annotated[int, Field(ge=1, le=MAX_PER_REQUEST)] = 1
    size: str | None = None
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png", "webp", "jpeg"] = "png"
    output_compression: Annotated[int, Field(ge=0, le=100)] | None = None  # webp and jpeg: their quality
    background: Literal["auto", "opaque"] = "auto"  # the models make opaque images only
    model: str | None = None
    user: str | None = None
    seed: int | None = None
    sampler: str | None = None
    decoder_steps: Steps | None = None
    decoder_cond_scale: Scales | None = None


class _Streamed(_Common):
    """Generations and edits may stream: server-sent events, `partial_images` previews first."""

    stream: bool = False
    partial_images: Annotated[int, Field(ge=0, le=3)] = 0
    prior_steps: int | None = None
    prior_cond_scale: float | None = None


class GenerationBody(_Streamed):
    prompt: Annotated[str, Field(max_length=MAX_PROMPT)]
    quality: str | None = None  # accepted for OpenAI's clients; one quality here
    style: str | None = None


class VariationBody(_Common):
    pass


class EditBody(_Streamed):
    prompt: Annotated[str | None, Field(max_length=MAX_PROMPT)] = None


def _checked(model: type[BaseModel], values: dict[str, Any]) -> Any:
    try:
        return model.model_validate(values)
    except RecursionError:
        raise APIError(400, "a parameter is nested too deeply: send plain values") from None
    except ValidationError as error:
        first = error.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "extra_forbidden":
            message = f"unknown parameter '{param}'"
        elif first["type"] == "missing":
            message = f"missing required parameter '{param}'"
        else:
            message = f"invalid '{param}': {first['msg']}"
        raise APIError(400, message, param, "invalid_value" if first["type"] != "missing" else "missing") from None


def create_app(
    service: ImageService,
    api_key: str | None = None,
    log: Any = None,
    *,
    hosts: Sequence[str] | None = None,
    cors_origins: Sequence[str] = (),
    debug: bool = False,
) -> FastAPI:
    """The API on `service`; with `api_key`, every /v1 call must carry it as a bearer token.
    Every route of the app (a page mounted on it too) is behind the gate: only `hosts` (None:
    any) as Host, no other site's browser requests unless in `cors_origins`, bodies of at most
    MAX_BODY bytes. A failure of the server's own is one line in the log (`debug`: its
    traceback too)."""
    say = log or (lambda line: print(line, file=sys.stderr))
    app = FastAPI(title="dalle2-cli", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        param = str(first.get("loc", ["", None])[-1]) if first.get("loc") else None
        return APIError(400, f"invalid '{param}': {first.get('msg', 'not understood')}", param).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        say(f"error: {request.method} {request.url.path}: {type(error).__name__}: {error}")
        if debug:
            say("".join(traceback.format_exception(error)).rstrip())
        return APIError(500, "the server failed to make the images; its log says why").response()

    app.add_middleware(_ApiEdge, say=say)
    app.add_middleware(Gate, hosts=hosts, cors_origins=cors_origins, max_body=MAX_BODY)
    api = _Images(service, api_key, say)
    _image_routes(app, api)
    _other_routes(app, api)
    return app


class _Images:
    """What the routes share: the service, the key, and the answer to a checked request."""

    def __init__(self, service: ImageService, api_key: str | None, say: Any):
        self.service, self.api_key, self.say = service, api_key, say

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given.removeprefix("Bearer ").strip() if given.startswith("Bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            message = "missing API key: send it as 'Authorization: Bearer KEY'" if not token else "incorrect API key"
            raise APIError(401, message, code="invalid_api_key")

    def signature(self, name: str) -> str:
        """Image links carry a signature made with the key: a browser can open one, nobody can guess one."""
        if not self.api_key:
            return ""
        return hmac.new(self.api_key.encode(), name.encode(), hashlib.sha256).hexdigest()[:32]

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.service.name and name not in MODEL_ALIASES:
            message = f"the model '{name}' is not served here: {self.service.name} is"
            raise APIError(404, message, "model", "model_not_found")

    async def answer(self, request: Request, fields: Any, kind: str, **inputs: Any) -> Response:
        self.check_model(fields.model)
        try:
            wanted = ImageRequest(
                kind,
                n=fields.n,
                size=parse_size(fields.size),
                seed=fields.seed,
                sampling={name: getattr(fields, name, None) for name in SAMPLING_FIELDS},
                **inputs,
            )
            future = self.service.submit(wanted)
        except QueueFull as error:
            retry = {"Retry-After": f"{error.retry_after_s:.0f}"}
            raise APIError(429, str(error), code="queue_full", **retry) from None
        except Stopping as error:
            raise APIError(503, str(error), code="stopping") from None
        except Dalle2Error as error:
            raise APIError.of(error, 503 if not self.service.ready else 400) from None
        told = self.service.warnings(wanted)
        if getattr(fields, "stream", False):
            events = "image_edit" if kind == "inpaint" else "image_generation"
            stream = _events(future, fields, events, wanted.size or self.service.image_size(), told, self.say)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-store"})
        made = await _wait(request, future)
        if made is None:  # the client hung up: nobody to answer
            return Response(status_code=499)
        data = await run_in_threadpool(lambda: [self.entry(m, fields, request) for m in made])
        # `warnings` is ours (OpenAI's SDKs keep a field they do not know, as response.warnings).
        return JSONResponse({"created": int(time.time()), "data": data} | ({"warnings": told} if told else {}))

    def entry(self, made: Any, fields: Any, request: Request) -> dict:
        if fields.response_format == "b64_json":
            return {"b64_json": _encoded(made.path, fields.output_format, fields.output_compression)}
        name = made.path.name
        if fields.output_format != "png":  # the PNG is kept; the link converts it
            name = f"{made.path.stem}.{fields.output_format}"
        link = f"{str(request.base_url).rstrip('/')}/images/{name}"
        query = [f"sig={self.signature(name)}"] if self.api_key else []
        if fields.output_compression is not None and fields.output_format != "png":
            query.append(f"compression={fields.output_compression}")
        return {"url": f"{link}?{'&'.join(query)}" if query else link}


def _encoded(path: Path, output_format: str, compression: int | None) -> str:
    """A saved PNG as base64, in the format asked for."""
    return base64.b64encode(_file_in(path, output_format, compression)).decode()


def _file_in(path: Path, output_format: str, compression: int | None) -> bytes:
    """A saved PNG's bytes, or the image converted (webp and jpeg at `compression` quality)."""
    if output_format == "png":
        return path.read_bytes()
    with Image.open(path) as image:
        return _converted(image, output_format, compression)


def _converted(image: Image.Image, output_format: str, compression: int | None) -> bytes:
    out = io.BytesIO()
    quality = 100 if compression is None else compression  # OpenAI's default: 100
    image.convert("RGB").save(out, format=output_format.upper(), quality=quality)
    return out.getvalue()


async def _events(future: Any, fields: Any, events: str, size: int, warnings: list[str], say: Any) -> Any:
    """Server-sent events as OpenAI streams them: `partial_images` previews of each image as
    it forms (at even steps through the decoder, as many as it reaches), then each image.
    Between them, at most once a second, a comment line with the queue place or the stage
    and step (": base 12/25"), which OpenAI's SDKs skip and which keeps the
    connection busy. Warnings come first, as comments too (": warning: ...")."""
    loop, updates = asyncio.get_running_loop(), asyncio.Queue()
    wanted, sent, told = fields.partial_images, [0], [0.0]

    def watcher(update: Any) -> None:  # on a sampling thread: hand over what is needed, no more
        due = isinstance(update, Step) and update.preview is not None and sent[0] < wanted
        if due and update.decoded >= (sent[0] + 1) / (wanted + 1):
            index, sent[0] = sent[0], sent[0] + 1
            loop.call_soon_threadsafe(updates.put_nowait, (index, update))
        elif time.monotonic() - told[0] >= 1.0:
            told[0] = time.monotonic()
            loop.call_soon_threadsafe(updates.put_nowait, update.line())

    shape = {"background": "opaque", "quality": "auto", "output_format": fields.output_format, "size": f"{size}x{size}"}
    future.watch(watcher)
    done = asyncio.wrap_future(future)
    try:
        for warning in warnings:
            yield f": warning: {' '.join(warning.splitlines())}\n\n".encode()
        while True:
            taking = asyncio.ensure_future(updates.get())
            await asyncio.wait({taking, done}, return_when=asyncio.FIRST_COMPLETED)
            if not taking.done():
                taking.cancel()
                break
            taken = taking.result()
            if isinstance(taken, str):
                yield f": {' '.join(taken.splitlines())}\n\n".encode()
                continue
            index, step = taken
            encode = functools.partial(_partials, step, size, fields)
            for b64 in await run_in_threadpool(encode):
                body = {"type": f"{events}.partial_image", "b64_json": b64, "partial_image_index": index}
                yield _event(body["type"], {**body, **shape, "created_at": int(time.time())})
        try:
            made = done.result()
        except (CancelledError, asyncio.CancelledError, Cancelled):
            error = APIError(503, "the server is stopping: the request was cancelled", code="stopping")
            yield _event("error", {"type": "error", "error": error.body()})
            return
        except Dalle2Error as failure:
            yield _event("error", {"type": "error", "error": APIError.of(failure).body()})
            return
        except Exception as failure:  # noqa: BLE001 - one line in the log, no trace to the client
            say(f"error: a streamed request failed: {type(failure).__name__}: {failure}")
            error = APIError(500, "the server failed to make the images; its log says why")
            yield _event("error", {"type": "error", "error": error.body()})
            return
        for made_one in made:
            b64 = await run_in_threadpool(_encoded, made_one.path, fields.output_format, fields.output_compression)
            body = {"type": f"{events}.completed", "b64_json": b64, **shape, "created_at": int(time.time())}
            yield _event(body["type"], body)
    finally:
        if not future.done():  # the client went away mid-stream
            future.abandon()
            done.cancel()


def _partials(step: Step, size: int, fields: Any) -> list[str]:
    """A step's previews of the request's images, encoded as the request asked."""
    encoded = (_converted(p, fields.output_format, fields.output_compression) for p in step.pictures(size))
    return [base64.b64encode(data).decode() for data in encoded]


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def _image_routes(app: FastAPI, api: _Images) -> None:
    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        api.authorize(request)
        _content_type(request, "application/json", "send the parameters as JSON (Content-Type: application/json)")
        body = await request.body()
        fields = await run_in_threadpool(lambda: _checked(GenerationBody, _parse_json(body)))
        return await api.answer(request, fields, "text2im", prompt=fields.prompt)

    async def upload(request: Request, body: type[BaseModel]) -> tuple[Any, dict]:
        """A multipart request's checked fields and its files."""
        api.authorize(request)
        values, files = await _form(request)
        return await run_in_threadpool(_checked, body, values), files

    @app.post("/v1/images/variations")
    async def variations(request: Request) -> Response:
        fields, files = await upload(request, VariationBody)

        def inputs() -> dict:
            picture, source = _image(files, "image")
            return {"image": _rgb(picture), "source": source}

        return await api.answer(request, fields, "variation", **await run_in_threadpool(inputs))

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        fields, files = await upload(request, EditBody)

        def inputs() -> dict:
            picture, source = _image(files, "image")
            return {"mask": _edit_mask(picture, files), "image": _rgb(picture), "source": source}

        prompt = fields.prompt if fields.prompt and fields.prompt.strip() else None
        return await api.answer(request, fields, "inpaint", prompt=prompt, **await run_in_threadpool(inputs))


def _other_routes(app: FastAPI, api: _Images) -> None:
    service = api.service

    @app.get("/health")
    async def health() -> JSONResponse:
        if service.failure:
            return JSONResponse({"status": "failed", "error": service.failure}, status_code=503)
        if not service.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready", "model": service.name, "queued": service.batcher.waiting})

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        api.authorize(request)
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{name}")
    async def model(name: str, request: Request) -> dict:
        api.authorize(request)
        api.check_model(name)
        return _model_card(service)

    @app.api_route("/images/{name:path}", methods=["GET", "HEAD"])  # never answered by the page
    async def image_file(name: str, request: Request, sig: str = "", compression: int | None = None) -> Response:
        """A PNG made here; NAME.webp or NAME.jpeg is that PNG converted (output_format)."""
        stem, _, output_format = name.rpartition(".")
        known = output_format in FORMATS and stem
        path = await run_in_threadpool(_served_file, service.directory, f"{stem}.png") if known else None
        if path is None:
            raise APIError(404, f"no image '{name[:100]}' here", code="not_found")
        if api.api_key and not hmac.compare_digest(sig, api.signature(name)):
            raise APIError(401, "this image link is not signed by this server", code="invalid_signature")
        if output_format == "png":
            return FileResponse(path, media_type="image/png")
        if compression is not None and not 0 <= compression <= 100:
            raise APIError(400, "compression must be from 0 to 100", "compression")
        converted = await run_in_threadpool(_file_in, path, output_format, compression)
        return Response(converted, media_type=FORMATS[output_format])

    # Last: a path under /v1 or /images that no route above takes, or not with this method.
    @app.api_route("/v1/{rest:path}", methods=list(METHODS))
    @app.api_route("/images/{rest:path}", methods=list(METHODS))
    async def unknown(rest: str, request: Request) -> Response:
        allowed = _methods_for(app, request.scope)
        if allowed:
            listed = ", ".join(sorted(allowed))
            message = f"{request.method} is not allowed on {request.url.path[:100]}: use {listed}"
            raise APIError(405, message, code="method_not_allowed", Allow=listed)
        raise APIError(404, f"no such endpoint: {request.url.path[:100]}", code="unknown_url")


def _methods_for(app: FastAPI, scope: dict) -> set[str]:
    """The methods the routes before the catch-all take at this path (none: no such path)."""
    methods: set[str] = set()
    for route in app.router.routes:
        if getattr(route, "name", None) == "unknown":
            break
        if route.matches(scope)[0] is Match.PARTIAL and getattr(route, "methods", None):
            methods |= set(route.methods)
    return methods


def _served_file(directory: Path, name: str) -> Path | None:
    """The image `name` of the output directory, or None: only a regular .png file whose
    resolved path lies in the resolved directory itself (a link placed there that points
    elsewhere is not followed, nor a sub-folder, nor a name no file system takes)."""
    if not name.endswith(".png") or Path(name).name != name or len(name.encode()) > MAX_NAME_BYTES or "\0" in name:
        return None
    try:
        folder = directory.resolve(strict=True)
        path = (folder / name).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a loop of links, a name too long
        return None
    return path if path.parent == folder and path.is_file() else None


def _content_type(request: Request, wanted: str, how: str) -> None:
    given = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if given != wanted:
        raise APIError(415, f"the body is {given or 'untyped'}: {how}", code="unsupported_media_type")


def _rgb(picture: Image.Image) -> Image.Image:
    from dalle2_cli.io.images import flatten_to_rgb

    return flatten_to_rgb(picture)


class _ApiEdge:
    """For /v1 and /images: one log line per request (method, path, status, seconds), and a 405
    in OpenAI's shape for a method HTTP does not define (no route could take it). Plain ASGI,
    not a BaseHTTPMiddleware, which would hide a client's hang-up from the endpoint."""

    def __init__(self, app: Any, say: Any):
        self.app, self.say = app, say

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(("/v1/", "/images/")):  # not /health: polled
            await self.app(scope, receive, send)
            return
        if scope["method"] not in METHODS:
            answer = APIError(405, f"{scope['method'][:20]} is not an HTTP method this server takes", code="bad_method")
            await answer.response()(scope, receive, send)
            self.say(f"{scope['method'][:20]} {scope['path'][:200]} 405")
            return
        started, status = time.perf_counter(), [500]  # 500 unless a response starts

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.say(f"{scope['method']} {scope['path'][:200]} {status[0]} {time.perf_counter() - started:.2f}s")


async def _wait(request: Request, future: Any) -> Any:
    """The future's result, or None once the client has gone (its job is dropped if not
    started, and its batch stopped at the next step if nobody else waits for it)."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=0.25)
        if done:
            try:
                return waiting.result()
            except (CancelledError, asyncio.CancelledError, Cancelled):
                raise APIError(503, "the server is stopping: the request was cancelled", code="stopping") from None
            except Dalle2Error as error:
                raise APIError.of(error) from None
        if await request.is_disconnected():
            future.abandon()
            waiting.cancel()  # nobody will read its outcome: asyncio must not report it unread
            return None


async def _form(request: Request) -> tuple[dict[str, str], dict[str, tuple[bytes, str]]]:
    """A multipart form's text fields, and its files as (bytes, file name)."""
    how = "send the image as multipart/form-data (as OpenAI's SDKs do)"
    _content_type(request, "multipart/form-data", how)
    await request.body()  # whole, as the gate capped it, before the parser sees it
    try:
        form = await request.form(max_files=4, max_fields=64)
    except Exception as error:  # noqa: BLE001 - python-multipart's parse errors have no common base
        raise APIError(400, f"cannot read the multipart form: {error}") from None
    values: dict[str, str] = {}
    files: dict[str, tuple[bytes, str]] = {}
    for key, value in form.multi_items():
        key = key.removesuffix("[]")
        if isinstance(value, str):
            values[key] = value
        elif key in files:
            raise APIError(400, f"give one '{key}' file", key)
        else:
            data = await value.read()
            if len(data) > MAX_UPLOAD:
                raise APIError(
                    413, f"'{key}' is {len(data):,} bytes, over the {MAX_UPLOAD:,} allowed", key, "too_large"
                )
            files[key] = (data, value.filename or key)
    unknown = set(files) - {"image", "mask"}
    if unknown:
        raise APIError(400, f"unknown file parameter '{sorted(unknown)[0]}'", sorted(unknown)[0])
    return values, files


def _image(files: dict[str, tuple[bytes, str]], param: str) -> tuple[Image.Image, str]:
    """An uploaded image, upright, with its transparency kept (an edit's mask may be in it)."""
    from dalle2_cli.io.images import read_image

    if param not in files:
        raise APIError(400, f"missing required parameter '{param}': upload a PNG", param, "missing")
    data, name = files[param]
    try:
        return read_image(io.BytesIO(data), param, name), Path(name).name
    except Dalle2Error as error:
        raise APIError(400, str(error), param, "invalid_image") from None


def _edit_mask(picture: Image.Image, files: dict[str, tuple[bytes, str]]) -> np.ndarray:
    """OpenAI's convention: transparent pixels of the mask (or, without a mask, of the image)
    are the ones to edit; a mask without transparency marks them white."""
    from dalle2_cli.io.images import has_transparent_pixels, mask_array

    param = "mask" if "mask" in files else "image"
    try:
        source = _image(files, "mask")[0] if "mask" in files else picture
        if "mask" not in files and not has_transparent_pixels(picture):
            raise APIError(400, "give a mask, or an image whose transparent pixels mark what to edit", "mask")
        return mask_array(source, picture.size, param)
    except Dalle2Error as error:
        raise APIError(400, str(error), param, "invalid_mask") from None


def _model_card(service: ImageService) -> dict:
    return {"id": service.name, "object": "model", "created": 0, "owned_by": "dalle2-cli"}
