"""Inference scripts: text to image, image variation and inpainting, usable from Python.

    manager = DalleModelManager(load_config("my-config"))
    images = TextToImage(manager).run(["a red circle"], num_images=2)
    images[0].save("circle.png")   # with its prompt, seed and settings in the PNG

`InferenceScript._sample_prior` and `_sample_decoder` follow dalle2-laion's argument
conventions, so scripts written for it port over; subclasses add a `run` method. A script
hands each image to `on_image` as soon as its batch is decoded, so that a caller can save it
before the rest of the run is done.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from dalle2_cli.clip import cut_off_words, tokenize
from dalle2_cli.errors import InputError, SettingError
from dalle2_cli.guidance import batched_guidance
from dalle2_cli.images import fit_mask, fit_square, to_pil, to_tensor
from dalle2_cli.manager import DalleModelManager
from dalle2_cli.noise import per_image_noise
from dalle2_cli.progress import NoProgress
from dalle2_cli.prompts import Prompt
from dalle2_cli.settings import SamplingSettings, check_count, check_finite, check_total


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int  # this image's own: a run with this seed and one image makes it again
    index: int  # which of the images made from the same input
    prompt: str | None = None
    source: str | None = None  # the input image, for variations and inpainting
    settings: dict[str, Any] = field(default_factory=dict)
    # What made it: the command, the config, the model files and their sha256, the tool.
    provenance: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        """Everything a PNG of this image records (see `dalle2 info`)."""
        own = {"prompt": self.prompt, "seed": self.seed, "index": self.index, "source": self.source}
        return {**own, **self.settings, **self.provenance}

    def save(self, path: str | Path) -> Path:
        """Write the image as a PNG with `metadata()` in it, whole or not at all."""
        from dalle2_cli.output import save_png

        path = Path(path)
        save_png(self.image, path, self.metadata())
        return path


def _per_unet(values: Sequence | None, count: int, what: str) -> list | None:
    if values is None:
        return None
    values = list(values)
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise SettingError(what, f"has {len(values)} values but the decoder has {count} unets: give 1 or {count}")
    return values


class InferenceScript:
    command = "script"  # what the images' metadata names as the command that made them

    def __init__(
        self,
        model_manager: DalleModelManager,
        settings: SamplingSettings | None = None,
        progress: NoProgress | None = None,
        on_image: Callable[[GeneratedImage], None] | None = None,
    ):
        self.models = model_manager
        self.settings = settings or SamplingSettings()
        self.progress = progress or NoProgress()  # dalle2_cli.progress.StageProgress shows bars
        self.on_image = on_image
        self.seed = self.settings.seed if self.settings.seed is not None else random.randrange(2**31)
        self._record: dict[str, Any] = {}  # the settings in effect, filled by _start
        self._warned: set[str] = set()  # prompts already checked (too long, unknown words)
        self._provenance: dict[str, Any] | None = None
        self._holding = 0  # while > 0, finished images are not handed to on_image

    @property
    def device(self) -> torch.device:
        return self.models.device

    def _precision(self):
        """Half-precision weights sample under autocast, which casts each op's inputs."""
        if self.models.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.models.dtype)

    def _start(self, uses_prior: bool) -> None:
        """Check every setting before any sampling, then seed every random generator
        (same seed, same settings, same device: same pixels)."""
        self._record = {"batch_size": self.settings.batch_size, "dtype": str(self.models.dtype).removeprefix("torch.")}
        if uses_prior:
            steps, scale = self.prior_settings()
            self._record.update(
                prior_steps=steps, prior_cond_scale=scale, prior_samples_per_image=self.settings.num_samples_per_batch
            )
        steps, scales = self.decoder_settings()
        self._record.update(decoder_steps=steps, decoder_cond_scale=scales)
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)

    # -- settings ---------------------------------------------------------------------------

    def prior_settings(self) -> tuple[int, float]:
        default_steps, default_scale = self.models.prior_defaults()
        prior = self.models.prior
        trained = prior.noise_scheduler.num_timesteps
        steps = self.settings.prior_steps or default_steps or prior.sample_timesteps or trained
        scale = self.settings.prior_cond_scale if self.settings.prior_cond_scale is not None else default_scale
        if not 1 <= steps <= trained:
            raise SettingError(
                "prior_steps", f"must be between 1 and {trained} (what the prior was trained with), got {steps}"
            )
        if scale != 1.0 and not prior.can_classifier_guidance:
            raise SettingError("prior_cond_scale", "must be 1: this prior was trained without conditioning dropout")
        return steps, scale

    def decoder_settings(self) -> tuple[list[int], list[float]]:
        decoder = self.models.decoder
        count = decoder.num_unets
        default_steps, default_scales = self.models.decoder_defaults()
        wanted_steps = _per_unet(self.settings.decoder_steps, count, "decoder_steps") or [None] * count
        scales = _per_unet(self.settings.decoder_cond_scale, count, "decoder_cond_scale") or default_scales
        steps = []
        for number in range(count):
            trained = decoder.noise_schedulers[number].num_timesteps
            chosen = wanted_steps[number] or default_steps[number] or decoder.sample_timesteps[number] or trained
            if not 1 <= chosen <= trained:
                raise SettingError(
                    "decoder_steps", f"for unet {number + 1} must be between 1 and {trained}, got {chosen}"
                )
            steps.append(chosen)
        if any(s != 1.0 for s in scales) and not decoder.can_classifier_guidance:
            raise SettingError("decoder_cond_scale", "must be 1: this decoder was trained without conditioning dropout")
        return steps, scales

    # -- CLIP ------------------------------------------------------------------------------

    def _tokens(self, texts: Sequence[str]) -> torch.Tensor:
        clip = self.models.clip
        for text in dict.fromkeys(texts):
            if text not in self._warned:
                self._warned.add(text)  # once per prompt, though the prior and decoder both read it
                self._check_prompt(text, clip.max_text_len)
        return tokenize(clip, list(texts)).to(self.device)

    def _check_prompt(self, text: str, context_length: int) -> None:
        """Warn about words CLIP will not see (past its context) or the model never saw."""
        cut = cut_off_words(text, context_length)
        if cut:
            self.models.warn(f"the prompt is longer than CLIP's {context_length} tokens; left out: {_ends(cut)}")
        vocabulary = self.models.config.vocabulary
        if vocabulary is not None and text:
            known = {word.lower() for word in vocabulary.words}
            unknown = [w for w in dict.fromkeys(re.findall(r"[^\W\d_]+", text.lower())) if w not in known]
            if unknown:
                words = ", ".join(repr(w) for w in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
                knows = f"; it knows {vocabulary.summary}" if vocabulary.summary else ""
                self.models.warn(f"{_shortened(text)!r}: the model was not trained on the word(s) {words}{knows}")

    def _text_encodings(self, text_or_tokens: Sequence[str] | torch.Tensor) -> torch.Tensor:
        tokens = text_or_tokens if isinstance(text_or_tokens, torch.Tensor) else self._tokens(text_or_tokens)
        with self._precision(), self.models.using(self.models.clip):
            _, encodings = self.models.clip.embed_text(tokens.to(self.device))
        return encodings.float()

    @torch.inference_mode()
    def _embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        clip = self.models.clip
        batch = torch.stack([to_tensor(fit_square(img, clip.image_size, self.settings.pad)) for img in images])
        self.progress.stage("CLIP", 1)
        with self._precision(), self.models.using(clip):
            embeds, _ = clip.embed_image(batch.to(self.device))
        self.progress.advance("CLIP")
        return embeds.float()

    def _takes_text(self) -> bool:
        return bool(self.models.decoder.condition_on_text_encodings)

    def _text_for_decoder(self, text: str | None) -> str | None:
        """`text`, or None with a warning when the decoder takes no text (it would be ignored)."""
        if text is not None and not self._takes_text():
            self.models.warn(f"this decoder is not conditioned on text: the text {_shortened(text)!r} is ignored")
            return None
        return text

    # -- the two sampling loops, with dalle2-laion's arguments -------------------------------

    @torch.inference_mode()
    def _sample_prior(
        self,
        text_or_tokens: Sequence[str] | torch.Tensor,
        cond_scale: float | None = None,
        sample_count: int = 1,
        batch_size: int = 100,
        num_samples_per_batch: int = 2,
        timesteps: int | None = None,
        seeds: Sequence[int] | None = None,
    ) -> dict[int, list[torch.Tensor]]:
        """CLIP image embeddings for each text: {text index: [sample_count embeddings]}.

        `seeds` has one seed per embedding, text by text; by default embedding k of each text
        has the script's seed + k."""
        steps, default_scale = self.prior_settings()
        timesteps = timesteps or steps
        cond_scale = default_scale if cond_scale is None else cond_scale
        check_finite("prior_cond_scale", cond_scale)
        tokens = text_or_tokens if isinstance(text_or_tokens, torch.Tensor) else self._tokens(text_or_tokens)
        jobs = [index for index in range(tokens.shape[0]) for _ in range(sample_count)]
        seeds = self._job_seeds(seeds, len(jobs), sample_count)
        results: dict[int, list[torch.Tensor]] = {index: [] for index in range(tokens.shape[0])}
        self.progress.stage("prior", timesteps, loops=-(-len(jobs) // batch_size))
        prior = self.models.prior
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            noise = per_image_noise(seeds[start : start + batch_size], "prior")
            guidance = batched_guidance(self.settings.batched_guidance)
            with self._precision(), noise, guidance, self.progress.loops(["prior"]), self.models.using(prior):
                embeds = prior.sample(
                    tokens[chunk].to(self.device),
                    num_samples_per_batch=num_samples_per_batch,
                    cond_scale=cond_scale,
                    timesteps=timesteps,
                ).float()
            for index, embed in zip(chunk, embeds, strict=True):
                results[index].append(embed)
        return results

    @torch.inference_mode()
    def _sample_decoder(
        self,
        images: Sequence[Image.Image] | None = None,
        image_embed: Sequence[torch.Tensor] | torch.Tensor | None = None,
        text: Sequence[str] | str | None = None,
        text_encoding: Sequence[torch.Tensor] | torch.Tensor | None = None,
        inpaint_images: Sequence[Image.Image] | None = None,
        inpaint_image_masks: Sequence[np.ndarray | torch.Tensor] | None = None,
        cond_scale: Sequence[float] | float | None = None,
        sample_count: int = 1,
        batch_size: int = 10,
        timesteps: list[int] | None = None,
        seeds: Sequence[int] | None = None,
        on_batch: Callable[[list[tuple[int, int, Image.Image]]], None] | None = None,
    ) -> dict[int, list[Image.Image]]:
        """Images for each input: {input index: [sample_count images]}.

        `seeds` has one seed per image, input by input; by default image k of each input has
        the script's seed + k. `on_batch` gets each batch's images as soon as they are
        decoded, as (input index, position among that input's images, image).

        Give exactly one of `images` (variations of them) and `image_embed`. `inpaint_image_masks`
        are True where the image is to be regenerated; the rest of each output equals the
        (square, resized) inpaint image exactly. `cond_scale` is one number or one per unet.
        """
        if (images is None) == (image_embed is None):
            raise ValueError("give exactly one of images and image_embed")
        embeds = self._embed_images(images) if images is not None else _stack(image_embed)
        count = embeds.shape[0]
        decoder = self.models.decoder
        steps, default_scales = self.decoder_settings()
        timesteps = timesteps or steps
        if cond_scale is None:
            scales = default_scales
        else:
            given = [cond_scale] if isinstance(cond_scale, int | float) else list(cond_scale)
            scales = _per_unet(given, decoder.num_unets, "decoder_cond_scale")
        for scale in scales:
            check_finite("decoder_cond_scale", scale)

        encodings = texts = None
        if decoder.condition_on_text_encodings:
            if text_encoding is not None:
                encodings = _stack(text_encoding)
                if encodings.shape[0] == 1 and count > 1:
                    encodings = encodings.expand(count, *encodings.shape[1:])
            else:
                texts = [text] * count if text is None or isinstance(text, str) else list(text)

        size = decoder.image_sizes[-1]
        keep_images = keep_masks = None
        if inpaint_images is not None:
            if inpaint_image_masks is None or len(inpaint_image_masks) != len(inpaint_images):
                raise ValueError("give one mask per inpaint image")
            pad = self.settings.pad
            keep_images = torch.stack([to_tensor(fit_square(img, size, pad)) for img in inpaint_images])
            regenerate = [fit_mask(_as_array(m), size, pad) for m in inpaint_image_masks]
            keep_masks = torch.from_numpy(~np.stack(regenerate))  # dalle2-pytorch: True = keep

        jobs = [index for index in range(count) for _ in range(sample_count)]
        seeds = self._job_seeds(seeds, len(jobs), sample_count)
        if texts is not None:
            # Encoded in the decoder's batches, all before the decoder runs (no model swap per
            # batch): a batch's pixels then depend on that batch alone, whatever else the run
            # holds (GPU kernels may round by batch shape), which scale-out relies on.
            batch_encodings = [
                self._text_encodings([texts[i] or "" for i in jobs[start : start + batch_size]])
                for start in range(0, len(jobs), batch_size)
            ]
        results: dict[int, list[Image.Image]] = {index: [] for index in range(count)}
        saved_steps = decoder.sample_timesteps
        decoder.sample_timesteps = tuple(timesteps)
        bars = [f"decoder unet {number + 1}" for number in range(decoder.num_unets)]
        for bar, steps_of_unet in zip(bars, timesteps, strict=True):
            self.progress.stage(bar, steps_of_unet, loops=-(-len(jobs) // batch_size))
        try:
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start : start + batch_size]
                extra = {}
                if encodings is not None:
                    extra["text_encodings"] = encodings[chunk].to(self.device)
                elif texts is not None:
                    extra["text_encodings"] = batch_encodings[start // batch_size].to(self.device)
                if keep_images is not None:
                    extra["inpaint_image"] = keep_images[chunk].to(self.device)
                    extra["inpaint_mask"] = keep_masks[chunk].to(self.device)
                noise = per_image_noise(seeds[start : start + batch_size], "decoder")
                guidance = batched_guidance(self.settings.batched_guidance)
                with self._precision(), noise, guidance, self.progress.loops(bars), self.models.using(decoder):
                    out = self._decode(decoder, embeds[chunk].to(self.device), tuple(scales), extra)
                if keep_images is not None:  # exact pixels outside the mask, whatever the rounding
                    keep = keep_masks[chunk].unsqueeze(1).to(out.device)
                    out = torch.where(keep, keep_images[chunk].to(out.device), out.float().clamp(0, 1))
                finished = []
                for index, tensor in zip(chunk, out, strict=True):
                    results[index].append(to_pil(tensor))
                    finished.append((index, len(results[index]) - 1, results[index][-1]))
                if on_batch is not None:
                    on_batch(finished)
        finally:
            decoder.sample_timesteps = saved_steps
        return results

    def _decode(self, decoder: Any, image_embed: torch.Tensor, scales: tuple[float, ...], extra: dict) -> torch.Tensor:
        """All unets on one batch. Each upsampler's low-resolution conditioning is noised at the
        level its own file was trained with; dalle2-pytorch's decoder holds one level for all,
        so a cascade whose files differ runs unet by unet with each one's level."""
        levels = self.models.lowres_noise_levels
        if len(set(levels)) <= 1 and (not levels or levels[0] == decoder.lowres_noise_sample_level):
            return decoder.sample(image_embed=image_embed, cond_scale=scales, **extra)
        image, saved = None, decoder.lowres_noise_sample_level
        try:
            for number, level in enumerate(levels, 1):
                decoder.lowres_noise_sample_level = level
                image = decoder.sample(
                    image=image,
                    image_embed=image_embed,
                    cond_scale=scales,
                    start_at_unet_number=number,
                    stop_at_unet_number=number,
                    **extra,
                )
        finally:
            decoder.lowres_noise_sample_level = saved
        return image

    def _job_seeds(self, seeds: Sequence[int] | None, count: int, per_input: int) -> list[int]:
        if seeds is None:
            return [self.seed + position % per_input for position in range(count)]
        if len(seeds) != count:
            raise ValueError(f"give one seed per image: {count}, not {len(seeds)}")
        return list(seeds)

    # -- the images made --------------------------------------------------------------------

    def provenance(self) -> dict[str, Any]:
        """What every image of this script records besides its own settings (once the models
        it uses are loaded): the command, the config, the model files and their sha256."""
        if self._provenance is None:
            from dalle2_cli.output import run_metadata

            manager = self.models
            self._provenance = run_metadata(self.command, manager.name, manager.config.source_path, manager.files)
        return self._provenance

    def _made(
        self,
        image: Image.Image,
        seed: int,
        index: int,
        prompt: str | None,
        source: str | None,
        extra: dict[str, Any] | None = None,
    ) -> GeneratedImage:
        """One finished image, handed to `on_image` at once (unless held back)."""
        settings = {**self._record, **(extra or {})}
        item = GeneratedImage(image, seed, index, prompt, source, settings, self.provenance())
        if self.on_image is not None and not self._holding:
            self.on_image(item)
        return item

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        """Images made in this block are not handed to `on_image` (candidates, say)."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1


def _shortened(text: str, words: int = 12) -> str:
    """The first `words` words of `text` (at most 100 characters), for a one-line message."""
    split = text.split()
    short = " ".join(split[:words])[:100]
    return short if len(split) <= words and len(text) <= 100 else f"{short} ... ({len(split)} words)"


def _ends(text: str, words: int = 5) -> str:
    """`text`, or its first and last words when it is long: "a b c ... x y (40 words)"."""
    split = text.split()
    if len(split) <= 2 * words and len(text) <= 100:
        return text
    return f"{' '.join(split[:words])[:60]} ... {' '.join(split[-words:])[-60:]} ({len(split)} words)"


def _as_array(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask, dtype=bool)


def _stack(tensors: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    if isinstance(tensors, torch.Tensor):
        return tensors if tensors.ndim >= 2 else tensors.unsqueeze(0)
    return torch.stack([t if t.ndim == 1 else t.reshape(-1) for t in tensors])


class TextToImage(InferenceScript):
    """Prompts -> prior -> decoder."""

    command = "text2im"

    def run(self, prompts: Sequence[str | Prompt], num_images: int = 1) -> list[GeneratedImage]:
        """`num_images` per prompt, image k with the seed + k; a `Prompt` may set its own."""
        check_count(num_images)
        requests = [p if isinstance(p, Prompt) else Prompt(p) for p in prompts]
        if not requests or any(not r.text.strip() for r in requests):
            raise InputError("a prompt is empty: describe the image to make")
        counts = [num_images if r.num_images is None else r.num_images for r in requests]
        for count in counts:
            check_count(count)
        check_total(sum(counts))
        self._start(uses_prior=True)
        s = self.settings
        texts: list[str] = []
        flat_seeds: list[int] = []
        place: list[tuple[int, int]] = []  # flat image -> (prompt number, image k of it)
        for i, (request, count) in enumerate(zip(requests, counts, strict=True)):
            base = self.seed if request.seed is None else request.seed
            flat_seeds += [base + k for k in range(count)]
            texts += [request.text] * count
            place += [(i, k) for k in range(count)]
        # One prior input per image, so that each prompt may ask for its own count.
        embeds = self._sample_prior(
            texts, batch_size=s.batch_size, num_samples_per_batch=s.num_samples_per_batch, seeds=flat_seeds
        )
        flat = [embeds[j][0] for j in range(len(texts))]
        made: dict[int, GeneratedImage] = {}

        def finished(batch: list[tuple[int, int, Image.Image]]) -> None:
            for j, _, image in batch:
                made[j] = self._made(image, flat_seeds[j], place[j][1], texts[j], None)

        self._sample_decoder(image_embed=flat, text=texts, batch_size=s.batch_size, seeds=flat_seeds, on_batch=finished)
        return [made[j] for j in range(len(texts))]


class ImageVariation(InferenceScript):
    """Images -> CLIP image embeddings -> decoder: new images with the same content."""

    command = "variation"

    def run(
        self,
        images: Sequence[Image.Image],
        num_images: int = 1,
        text: str | None = None,
        sources: Sequence[str] | None = None,
    ) -> list[GeneratedImage]:
        check_count(num_images)
        if not images:
            raise InputError("give at least one image to make variations of")
        check_total(num_images * len(images))
        self._start(uses_prior=False)
        text = self._text_for_decoder(text)
        names = list(sources or [None] * len(images))
        made: dict[tuple[int, int], GeneratedImage] = {}

        def finished(batch: list[tuple[int, int, Image.Image]]) -> None:
            for i, k, image in batch:
                made[i, k] = self._made(image, self.seed + k, k, text, names[i], {"pad": self.settings.pad})

        self._sample_decoder(
            images=list(images),
            text=text,
            sample_count=num_images,
            batch_size=self.settings.batch_size,
            on_batch=finished,
        )
        return [made[i, k] for i in range(len(images)) for k in range(num_images)]


class Inpainting(InferenceScript):
    """Regenerate the masked area of an image, following a prompt or the image itself."""

    command = "inpaint"

    def run(
        self,
        image: Image.Image,
        mask: np.ndarray,
        prompt: str | None = None,
        num_images: int = 1,
        source: str | None = None,
        mask_source: str | None = None,
        mask_grow: int = 0,
    ) -> list[GeneratedImage]:
        """`mask` is True where the image is to be regenerated. With `pad` (a non-square image
        fitted whole onto a square), each output is cropped back to the image's own shape.
        `mask_source` and `mask_grow` are recorded (how the mask was made)."""
        check_count(num_images)
        if prompt is not None and not prompt.strip():
            raise InputError("the prompt is empty: leave it out to fill from the image itself")
        self._start(uses_prior=prompt is not None)
        s = self.settings
        if prompt is not None:
            embeds = self._sample_prior(
                [prompt],
                sample_count=num_images,
                batch_size=s.batch_size,
                num_samples_per_batch=s.num_samples_per_batch,
            )[0]
        else:
            embeds = list(self._embed_images([image]).expand(num_images, -1))
        size = self.models.decoder.image_sizes[-1]
        box = padded_box(image.size, size) if s.pad else None
        record = {"mask": mask_source, "mask_grow": mask_grow, "pad": s.pad}
        made: dict[int, GeneratedImage] = {}

        def finished(batch: list[tuple[int, int, Image.Image]]) -> None:
            for k, _, picture in batch:
                picture = picture.crop(box) if box is not None else picture
                made[k] = self._made(picture, self.seed + k, k, prompt, source, record)

        self._sample_decoder(
            image_embed=embeds,
            text=[prompt or ""] * num_images,
            batch_size=s.batch_size,
            inpaint_images=[image] * num_images,
            inpaint_image_masks=[mask] * num_images,
            on_batch=finished,
        )
        return [made[k] for k in range(num_images)]


def padded_box(image_size: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """Where an image of `image_size` lies on the `size` square that `fit_square(pad=True)`
    makes of it, as a crop box: Pillow's own fitting of a blank image of that size, measured."""
    width, height = ImageOps.contain(Image.new("1", image_size), (size, size)).size
    left, top = round((size - width) / 2), round((size - height) / 2)
    return left, top, left + width, top + height
