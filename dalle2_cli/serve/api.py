"""OpenAI's Images API over an ImageService, so that OpenAI's SDKs work unchanged:

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.images.generate(prompt="a red circle", n=2, extra_body={"seed": 7})

Requests are read and checked here (the body's size first, then its fields), the work is the
service's, and every failure is answered in OpenAI's error shape with OpenAI's status codes,
which the SDKs turn into their own exception types. A response never carries a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from dalle2_cli.errors import Dalle2Error
from dalle2_cli.serve.batcher import QueueFull
from dalle2_cli.serve.service import (
    MAX_PER_REQUEST,
    MAX_PROMPT,
    SAMPLING_FIELDS,
    ImageRequest,
    ImageService,
    parse_size,
)

MAX_UPLOAD = 4 * 2**20  # bytes per image, as OpenAI's Images API
# A multipart body holds up to two images and a few short fields.
MAX_BODY = 2 * MAX_UPLOAD + 64 * 2**10
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

    def response(self) -> JSONResponse:
        kind = {401: "invalid_request_error", 429: "rate_limit_error"}.get(self.status, "invalid_request_error")
        if self.status >= 500:
            kind = "server_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers or None)


Steps = int | list[int]
Scales = float | list[float]


class _Common(BaseModel):
    """The fields every images endpoint takes: OpenAI's and our sampling extensions."""

    model_config = ConfigDict(extra="forbid")

    n: Annotated[int, Field(ge=1, le=MAX_PER_REQUEST)] = 1
    size: str | None = None
    response_format: Literal["url", "b64_json"] = "url"
    model: str | None = None
    user: str | None = None
    seed: int | None = None
    sampler: str | None = None
    decoder_steps: Steps | None = None
    decoder_cond_scale: Scales | None = None


class GenerationBody(_Common):
    prompt: Annotated[str, Field(max_length=MAX_PROMPT)]
    quality: str | None = None  # accepted for OpenAI's clients; one quality here
    style: str | None = None
    prior_steps: int | None = None
    prior_cond_scale: float | None = None


class VariationBody(_Common):
    pass


class EditBody(_Common):
    prompt: Annotated[str | None, Field(max_length=MAX_PROMPT)] = None
    prior_steps: int | None = None
    prior_cond_scale: float | None = None


def _checked(model: type[BaseModel], values: dict[str, Any]) -> Any:
    try:
        return model.model_validate(values)
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


def create_app(service: ImageService, api_key: str | None = None, log: Any = None) -> FastAPI:
    """The API on `service`; with `api_key`, every /v1 call must carry it as a bearer token."""
    say = log or (lambda line: print(line, file=sys.stderr))
    app = FastAPI(title="dalle2-cli", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        say(f"error: {request.method} {request.url.path}: {type(error).__name__}: {error}")
        return APIError(500, "the server failed to make the images; its log says why").response()

    app.add_middleware(_RequestLog, say=say)
    api = _Images(service, api_key)
    _image_routes(app, api)
    _other_routes(app, api)
    return app


class _Images:
    """What the routes share: the service, the key, and the answer to a checked request."""

    def __init__(self, service: ImageService, api_key: str | None):
        self.service, self.api_key = service, api_key

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
        except Dalle2Error as error:
            raise APIError.of(error, 503 if not self.service.ready else 400) from None
        made = await _wait(request, future)
        if made is None:  # the client hung up: nobody to answer
            return Response(status_code=499)
        data = [self.entry(m, fields.response_format, request) for m in made]
        return JSONResponse({"created": int(time.time()), "data": data})

    def entry(self, made: Any, response_format: str, request: Request) -> dict:
        if response_format == "b64_json":
            return {"b64_json": base64.b64encode(made.path.read_bytes()).decode()}
        name = made.path.name
        link = f"{str(request.base_url).rstrip('/')}/images/{name}"
        return {"url": f"{link}?sig={self.signature(name)}" if self.api_key else link}


def _image_routes(app: FastAPI, api: _Images) -> None:
    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        api.authorize(request)
        body = await _read_body(request)
        try:
            values = json.loads(body or b"null")
        except ValueError:
            raise APIError(400, "the body is not JSON: send the parameters as a JSON object") from None
        if not isinstance(values, dict):
            raise APIError(400, "the body must be a JSON object of parameters")
        fields = _checked(GenerationBody, values)
        return await api.answer(request, fields, "text2im", prompt=fields.prompt)

    async def upload(request: Request, body: type[BaseModel]) -> tuple[Any, dict, Image.Image, str]:
        """A multipart request's checked fields, its files, and its image (with its file name)."""
        api.authorize(request)
        values, files = await _form(request)
        fields = _checked(body, values)
        picture, source = _image(files, "image")
        return fields, files, picture, source

    @app.post("/v1/images/variations")
    async def variations(request: Request) -> Response:
        fields, _, picture, source = await upload(request, VariationBody)
        return await api.answer(request, fields, "variation", image=_rgb(picture), source=source)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        fields, files, picture, source = await upload(request, EditBody)
        mask = _edit_mask(picture, files)
        prompt = fields.prompt if fields.prompt and fields.prompt.strip() else None
        return await api.answer(
            request, fields, "inpaint", prompt=prompt, image=_rgb(picture), mask=mask, source=source
        )


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

    @app.get("/images/{name:path}")  # any path under /images is answered here, never by the page
    async def image_file(name: str, request: Request, sig: str = "") -> Response:
        path = service.directory / name
        # Only a plain file of the output directory itself: no sub-folders, no way out of it.
        if Path(name).name != name or not name.endswith(".png") or not path.is_file():
            raise APIError(404, f"no image '{name}' here", code="not_found")
        if api.api_key and not hmac.compare_digest(sig, api.signature(name)):
            raise APIError(401, "this image link is not signed by this server", code="invalid_signature")
        return FileResponse(path, media_type="image/png")

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def unknown(rest: str) -> Response:
        raise APIError(404, f"no such endpoint: /v1/{rest}", code="unknown_url")


def _rgb(picture: Image.Image) -> Image.Image:
    from dalle2_cli.io.images import flatten_to_rgb

    return flatten_to_rgb(picture)


class _RequestLog:
    """One line per API request: method, path, status, seconds. Plain ASGI, not a
    BaseHTTPMiddleware, which would hide a client's hang-up from the endpoint."""

    def __init__(self, app: Any, say: Any):
        self.app, self.say = app, say

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(("/v1", "/images")):  # not /health: polled
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]  # 500 unless a response starts

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.say(f"{scope['method']} {scope['path']} {status[0]} {time.perf_counter() - started:.2f}s")


async def _wait(request: Request, future: Any) -> Any:
    """The future's result, or None once the client has gone (its job is dropped if not started)."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=0.25)
        if done:
            try:
                return waiting.result()
            except Dalle2Error as error:
                raise APIError.of(error) from None
        if await request.is_disconnected():
            future.cancel()
            return None


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 once it passes MAX_BODY (whatever Content-Length claims)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY:
        raise APIError(413, f"the request is {int(declared):,} bytes, over the {MAX_BODY:,} allowed", code="too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise APIError(413, f"the request is over the {MAX_BODY:,} bytes allowed", code="too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette's own cache of the body: `form()` parses it from there
    return body


async def _form(request: Request) -> tuple[dict[str, str], dict[str, tuple[bytes, str]]]:
    """A multipart form's text fields, and its files as (bytes, file name)."""
    await _read_body(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "send the image as multipart/form-data (as OpenAI's SDKs do)")
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
    from dalle2_cli.io.images import mask_array, transparent_pixels

    param = "mask" if "mask" in files else "image"
    try:
        source = _image(files, "mask")[0] if "mask" in files else picture
        if "mask" not in files and transparent_pixels(picture) is None:
            raise APIError(400, "give a mask, or an image whose transparent pixels mark what to edit", "mask")
        return mask_array(source, picture.size, param)
    except Dalle2Error as error:
        raise APIError(400, str(error), param, "invalid_mask") from None


def _model_card(service: ImageService) -> dict:
    return {"id": service.name, "object": "model", "created": 0, "owned_by": "dalle2-cli"}
