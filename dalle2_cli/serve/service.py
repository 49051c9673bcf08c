"""The models behind `dalle2 serve`, kept loaded: requests in, saved images out.

    service = ImageService(lambda worker: DalleModelManager(load_config("shapes"), name="shapes"), Path("served"))
    service.start()                                  # loads the models, then starts the batcher
    made = service.make(ImageRequest("text2im", prompt="a red circle", n=2, seed=7))
    made[0].path                                     # the PNG, with the metadata the CLI writes

The web API and the web page both go through `submit`, so they share one batcher: text to
image requests with equal sampling settings run together (dalle2_cli.serve.batcher). Each
request's work is bounded (`max_steps` per stage), and a batch stops at its next step once
nobody waits for it (`JobFuture.abandon`) or the service is stopping.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dalle2_cli.errors import Cancelled, InputError, SettingError
from dalle2_cli.messages import Log, stderr
from dalle2_cli.sampling.settings import SamplingSettings, check_seed, check_whole
from dalle2_cli.serve.batcher import Batcher, Job, JobFuture
from dalle2_cli.serve.limits import MAX_PER_REQUEST, MAX_PROMPT, MAX_STEPS

KINDS = ("text2im", "variation", "inpaint")
SIZES = (16, 2048)  # the square sizes a request may ask for (the output is resized)
# What a request may set of how to sample: SamplingSettings' own fields, checked by it.
SAMPLING_FIELDS = ("sampler", "prior_steps", "decoder_steps", "prior_cond_scale", "decoder_cond_scale")


def parse_size(size: str | None) -> int | None:
    """ "256x256" -> 256; None stays None (the model's own size)."""
    if size is None or size == "auto":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(size))
    if not match:
        raise SettingError("size", f"must be WIDTHxHEIGHT such as 256x256, got {size!r}")
    width, height = int(match[1]), int(match[2])
    if width != height:
        raise SettingError("size", f"must be square (the models make square images), got {size}")
    if not SIZES[0] <= width <= SIZES[1]:
        raise SettingError("size", f"must be from {SIZES[0]}x{SIZES[0]} to {SIZES[1]}x{SIZES[1]}, got {size}")
    return width


@dataclass(frozen=True)
class ImageRequest:
    """One request: what to make, checked when made (a bad field raises a SettingError naming it)."""

    kind: str  # text2im, variation or inpaint
    prompt: str | None = None
    n: int = 1
    size: int | None = None  # None: the model's own size; else the images are resized to it
    seed: int | None = None  # None: a random one (image k gets seed + k, as the CLI's --seed)
    image: Image.Image | None = None  # variation and inpaint
    mask: Any = None  # inpaint: a boolean array of the image's size, True where to regenerate
    source: str | None = None  # the uploaded image's file name, for the metadata
    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)  # SAMPLING_FIELDS

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        check_whole("n", self.n, 1, MAX_PER_REQUEST)
        if self.seed is not None:
            check_seed(self.seed)
        if self.prompt is not None:
            if not self.prompt.strip():
                raise SettingError("prompt", "is empty: describe the image to make")
            if len(self.prompt) > MAX_PROMPT:
                raise SettingError("prompt", f"is {len(self.prompt):,} characters, more than {MAX_PROMPT:,}")
        elif self.kind == "text2im":
            raise SettingError("prompt", "is missing: describe the image to make")
        if self.kind != "text2im" and self.image is None:
            raise SettingError("image", "is missing: upload the image")
        if self.kind == "inpaint" and self.mask is None:
            raise SettingError("mask", "is missing: upload a mask, or an image with transparent pixels to edit")
        unknown = set(self.sampling) - set(SAMPLING_FIELDS)
        if unknown:
            raise ValueError(f"not sampling settings: {sorted(unknown)}")
        self.settings(1)  # checks the sampling fields

    def steps_asked(self) -> dict[str, int]:
        """The most steps this request asks of each stage it names: {field: steps}."""
        asked = {}
        for name in ("prior_steps", "decoder_steps"):
            value = self.sampling.get(name)
            if value is not None:
                asked[name] = max(value) if isinstance(value, list | tuple) else value
        return asked

    def settings(self, batch_size: int) -> SamplingSettings:
        given = {name: value for name, value in self.sampling.items() if value is not None}
        return SamplingSettings(**given, batch_size=batch_size, seed=self.seed)

    def batch_key(self) -> Any:
        """Requests with equal keys may share a batch: text to image with equal settings, and
        variations with equal settings and n. An edit runs alone (its n images are its batch)."""
        settings = tuple((name, _hashable(self.sampling.get(name))) for name in SAMPLING_FIELDS)
        if self.kind == "text2im":
            return self.kind, settings
        if self.kind == "variation":
            return self.kind, self.n, settings
        return object()


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass
class Made:
    """One image made for a request, saved as `path` (a PNG with its metadata)."""

    item: Any  # dalle2_cli.sampling.generated.GeneratedImage
    path: Path


class ImageService:
    """Loaded models, one batcher in front of them, and the directory the images go to."""

    def __init__(
        self,
        load: Callable[[], Any],
        directory: Path,
        max_batch: int = 8,
        window_s: float = 0.05,
        queue_size: int = 64,
        name: str = "model",
        log: Log = stderr,
        max_steps: int = MAX_STEPS,
        record_paths: bool = False,
        workers: int = 1,
        threads_per_worker: int | None = None,
    ):
        """`load(k)` makes the DalleModelManager of worker k (called by `start`; workers on
        one device may share one); `name` is what the API calls the model (the config's name).
        `workers` batches run at once, each on its worker's models, with `threads_per_worker`
        CPU threads (None: torch's setting). A request may ask at most `max_steps` of each
        stage. The images record the config's and model files' names and digests; with
        `record_paths`, their paths on this machine too (as the CLI's images do)."""
        check_whole("max_batch", max_batch, 1, 256)
        check_whole("queue_size", queue_size, 1)
        check_whole("max_steps", max_steps, 1)
        if window_s < 0:
            raise SettingError("batch_window_ms", f"must not be negative, got {window_s * 1000:g}")
        self._load, self.directory, self.name, self.log = load, Path(directory), name, log
        self.max_steps, self.record_paths = max_steps, record_paths
        self.batcher = Batcher(self._run, max_batch, window_s, queue_size, workers)
        self.threads_per_worker = threads_per_worker
        self.managers: list[Any] = []  # one per worker
        self.manager: Any = None  # the first worker's: what every request is checked against
        self.failure: str | None = None  # why loading failed
        self._ready = threading.Event()
        self._writer: Any = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        """Load every model (a request never waits for loading), then take requests."""
        from dalle2_cli.io.output import ImageWriter

        started = time.perf_counter()
        for worker in range(self.batcher.workers):
            manager = self._load(worker)
            for part in ("clip", "prior", "decoder"):
                if manager.has(part):
                    getattr(manager, part)
            self.managers.append(manager)
        self.manager = self.managers[0]
        self.directory.mkdir(parents=True, exist_ok=True)
        self._writer = ImageWriter(self.directory, remember=False)
        self.batcher.start()
        self._ready.set()
        workers = f" on {self.batcher.workers} workers" if self.batcher.workers > 1 else ""
        self.log(f"models loaded in {time.perf_counter() - started:.1f} s: serving {self.name}{workers}")

    def image_size(self) -> int:
        """The side of the images the models make (a request's `size` resizes them)."""
        return self.manager.decoder.image_sizes[-1]

    def stop(self, grace_s: float = 0.0, wait_s: float | None = 5.0) -> bool:
        """Take no more requests; a running batch may finish within `grace_s`, else it stops at
        its next step. Whether the worker has ended (it is given up `wait_s` after that)."""
        return self.batcher.stop(grace_s, wait_s)

    def submit(self, request: ImageRequest) -> JobFuture:
        """Queue a request; the future's result is its list of Made. Raises QueueFull, or a
        SettingError for a request over this server's limits."""
        if not self.ready:
            raise InputError("the models are still loading: try again shortly")
        for name, steps in request.steps_asked().items():
            if steps > self.max_steps:
                problem = f"asks {steps} steps; this server allows at most {self.max_steps} per stage (--max-steps)"
                raise SettingError(name, problem)
        if request.kind == "text2im" and not self.manager.has("prior"):
            raise InputError(f"{self.name} has no prior, which text to image needs")
        if request.kind == "variation" or (request.kind == "inpaint" and request.prompt is None):
            self.manager.require_image_tower()
        self._check_plan(request)
        if request.seed is None:
            request = dataclasses.replace(request, seed=random.randrange(2**31))
        return self.batcher.submit(request.batch_key(), request.n, request)

    def warnings(self, request: ImageRequest) -> list[str]:
        """What the requester should know: words CLIP will not see or the model never saw, an
        input cropped to a square, images resized to the size asked for."""
        from dalle2_cli.io.images import fit_note
        from dalle2_cli.sampling.script import prompt_warnings

        told = []
        if request.prompt is not None and self.manager.has("clip"):
            vocabulary = self.manager.config.vocabulary
            told += prompt_warnings(request.prompt, self.manager.clip.max_text_len, vocabulary)
        if request.image is not None and (note := fit_note(request.source or "the image", request.image, hint="")):
            told.append(note.removeprefix("note: "))
        made = self.image_size()
        if request.size is not None and request.size != made:
            told.append(f"{self.name} makes {made}x{made} images: these are resized to {request.size}x{request.size}")
        return told

    def _check_plan(self, request: ImageRequest) -> None:
        """Settings the models cannot take (more steps than trained, say) are refused here, before
        the request waits or streams, not when its batch runs."""
        from dalle2_cli.sampling.script import InferenceScript

        uses_prior = request.kind == "text2im" or (request.kind == "inpaint" and request.prompt is not None)
        InferenceScript(self.manager, request.settings(1)).plan(uses_prior)

    def make(self, request: ImageRequest, timeout_s: float | None = None) -> list[Made]:
        return self.submit(request).result(timeout_s)

    # -- on the batcher's thread ---------------------------------------------------------------

    def _run(self, jobs: Sequence[Job], stop: Callable[[], bool], worker: int = 0) -> list[list[Made]]:
        """Sample the batch on `worker`'s models (stopped at a step once `stop()` says so), then
        save every image: a cancelled batch saves nothing."""
        import torch

        from dalle2_cli.serve.progress import BatchProgress

        if self.threads_per_worker is not None:
            torch.set_num_threads(self.threads_per_worker)  # this thread's own setting
        requests: list[ImageRequest] = [job.payload for job in jobs]
        ends = list(itertools.accumulate(request.n for request in requests))
        rows = [slice(end - request.n, end) for request, end in zip(requests, ends, strict=True)]
        progress = BatchProgress(stop, [job.future for job in jobs], rows)
        manager, first = self.managers[worker], requests[0]
        try:
            if first.kind == "text2im":
                made = self._text_to_image(manager, requests, progress)
            elif first.kind == "variation":
                made = self._variations(manager, requests, progress)
            else:
                made = [self._inpaint(manager, first, progress)]
        except Cancelled as cancelled:
            self.log(f"a batch of {len(requests)} request(s) was cancelled: {cancelled}")
            raise
        saved = []
        for request, items in zip(requests, made, strict=True):
            inputs = self._keep_inputs(request)
            saved.append([self._save(item, request, inputs) for item in items])
        return saved

    def _text_to_image(self, manager: Any, requests: Sequence[ImageRequest], progress: Any) -> list[list[Any]]:
        from dalle2_cli.io.prompts import Prompt
        from dalle2_cli.sampling.pipelines import TextToImage

        script = TextToImage(manager, requests[0].settings(self.batcher.max_images), progress)
        prompts = [Prompt(r.prompt, num_images=r.n, seed=r.seed) for r in requests]
        images = script.run(prompts)
        split, start = [], 0
        for request in requests:
            split.append(images[start : start + request.n])
            start += request.n
        return split

    def _variations(self, manager: Any, requests: Sequence[ImageRequest], progress: Any) -> list[list[Any]]:
        from dalle2_cli.sampling.pipelines import ImageVariation

        n = requests[0].n  # equal within a batch (see batch_key)
        script = ImageVariation(manager, requests[0].settings(self.batcher.max_images), progress)
        images = script.run(
            [r.image for r in requests], n, sources=[r.source for r in requests], seeds=[r.seed for r in requests]
        )
        return [images[i * n : (i + 1) * n] for i in range(len(requests))]

    def _inpaint(self, manager: Any, request: ImageRequest, progress: Any) -> list[Any]:
        from dalle2_cli.sampling.pipelines import Inpainting

        script = Inpainting(manager, request.settings(self.batcher.max_images), progress)
        return script.run(request.image, request.mask, request.prompt, request.n, source=request.source)

    def _keep_inputs(self, request: ImageRequest) -> dict[str, Any]:
        """An edit's or variation's uploaded image (and mask) kept in the output directory's
        inputs/ folder under its digest, and what the made images record of them, so that
        `dalle2 variation --from` and `dalle2 inpaint --from` make them again."""
        if request.image is None:
            return {}
        from dalle2_cli.io.output import keep_input

        image_path, image_digest = keep_input(self.directory, request.image)
        kept = {"source_file": image_path, "source_sha256": image_digest}
        if request.mask is not None:
            mask = Image.fromarray(np.asarray(request.mask, dtype=np.uint8) * 255, "L")
            mask_path, mask_digest = keep_input(self.directory, mask)
            kept |= {"mask": mask_path, "mask_sha256": mask_digest}
        return kept

    def _save(self, item: Any, request: ImageRequest, inputs: dict[str, Any]) -> Made:
        settings = {**item.settings, **inputs}
        if request.size is not None and request.size != item.image.width:
            resized = item.image.resize((request.size, request.size), Image.Resampling.LANCZOS)
            settings |= {"resized_to": request.size, "made_at": item.image.width}
            item = dataclasses.replace(item, image=resized)
        item = dataclasses.replace(item, settings=settings)
        if not self.record_paths:  # a client learns the files' names and digests, not where they are
            item = dataclasses.replace(item, provenance=without_paths(item.provenance))
        record = self._writer.write(item)
        return Made(item, Path(record["path"]))


def without_paths(provenance: dict[str, Any]) -> dict[str, Any]:
    """A run's provenance with each path cut to its file name (digests kept)."""
    names = {role: Path(path).name for role, path in provenance.get("model_files", {}).items()}
    config = provenance.get("config")
    return {
        **provenance,
        "config": Path(config).name if config else config,
        "config_path": None,
        "model_files": names,
    }
