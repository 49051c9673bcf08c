"""Inference scripts: text to image, image variation and inpainting, usable from Python.

    manager = DalleModelManager(load_config("my-config"))
    images = TextToImage(manager).run(["a red circle"], num_images=2)

`InferenceScript._sample_prior` and `_sample_decoder` follow dalle2-laion's argument
conventions, so scripts written for it port over; subclasses add a `run` method.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from dalle2_cli.clip import cut_off_words, tokenize
from dalle2_cli.errors import InputError
from dalle2_cli.guidance import batched_guidance
from dalle2_cli.images import fit_mask, fit_square, to_pil, to_tensor
from dalle2_cli.manager import DalleModelManager
from dalle2_cli.noise import per_image_noise
from dalle2_cli.progress import NoProgress
from dalle2_cli.prompts import Prompt


@dataclass
class SamplingSettings:
    """What the user may override; None means the config's default (or the trained value)."""

    prior_steps: int | None = None
    prior_cond_scale: float | None = None
    decoder_steps: list[int | None] | None = None  # one per unet, or one for all
    decoder_cond_scale: list[float] | None = None
    batch_size: int = 4
    num_samples_per_batch: int = 2  # prior embeddings drawn per image; CLIP keeps the best
    seed: int | None = None  # image k of each input gets seed + k
    pad: bool = False  # non-square input images: padded with white to a square, not center-cropped
    # Guidance's conditional and null passes as one forward over a doubled batch (same images
    # within float rounding, fewer kernel launches); False keeps two passes, half the activations.
    batched_guidance: bool = True


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int  # this image's own: a run with this seed and one image makes it again
    index: int  # which of the images made from the same input
    prompt: str | None = None
    source: str | None = None  # the input image, for variations and inpainting
    settings: dict[str, Any] = field(default_factory=dict)


def _per_unet(values: Sequence | None, count: int, what: str) -> list | None:
    if values is None:
        return None
    values = list(values)
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise InputError(f"{what} has {len(values)} values but the decoder has {count} unets: give 1 or {count}")
    return values


class InferenceScript:
    def __init__(
        self,
        model_manager: DalleModelManager,
        settings: SamplingSettings | None = None,
        progress: NoProgress | None = None,
    ):
        self.models = model_manager
        self.settings = settings or SamplingSettings()
        self.progress = progress or NoProgress()  # dalle2_cli.progress.StageProgress shows bars
        if self.settings.batch_size < 1:
            raise InputError("batch size must be at least 1")
        if self.settings.num_samples_per_batch < 1:
            raise InputError("the prior needs at least 1 sample per image to rank")
        self.seed = self.settings.seed if self.settings.seed is not None else random.randrange(2**31)
        self._record: dict[str, Any] = {}  # the settings in effect, filled by _start
        self._warned: set[str] = set()  # prompts already found too long

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
            raise InputError(f"prior steps must be between 1 and {trained} (what it was trained with), got {steps}")
        if scale != 1.0 and not prior.can_classifier_guidance:
            raise InputError("this prior was trained without conditioning dropout: its cond scale must be 1")
        return steps, scale

    def decoder_settings(self) -> tuple[list[int], list[float]]:
        decoder = self.models.decoder
        count = decoder.num_unets
        default_steps, default_scales = self.models.decoder_defaults()
        wanted_steps = _per_unet(self.settings.decoder_steps, count, "--decoder-steps") or [None] * count
        scales = _per_unet(self.settings.decoder_cond_scale, count, "--decoder-cond-scale") or default_scales
        steps = []
        for number in range(count):
            trained = decoder.noise_schedulers[number].num_timesteps
            chosen = wanted_steps[number] or default_steps[number] or decoder.sample_timesteps[number] or trained
            if not 1 <= chosen <= trained:
                raise InputError(f"decoder steps for unet {number + 1} must be between 1 and {trained}, got {chosen}")
            steps.append(chosen)
        if any(s != 1.0 for s in scales) and not decoder.can_classifier_guidance:
            raise InputError("this decoder was trained without conditioning dropout: its cond scale must be 1")
        return steps, scales

    # -- CLIP ------------------------------------------------------------------------------

    def _tokens(self, texts: Sequence[str]) -> torch.Tensor:
        clip = self.models.clip
        for text in dict.fromkeys(texts):
            if text in self._warned:
                continue
            self._warned.add(text)  # once per prompt, though the prior and decoder both read it
            cut = cut_off_words(text, clip.max_text_len)
            if cut:
                self.models.log(
                    f"warning: the prompt is longer than CLIP's {clip.max_text_len} tokens; left out: {cut!r}"
                )
        return tokenize(clip, list(texts)).to(self.device)

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
        cond_scale: list[float] | float | None = None,
        sample_count: int = 1,
        batch_size: int = 10,
        timesteps: list[int] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> dict[int, list[Image.Image]]:
        """Images for each input: {input index: [sample_count images]}.

        `seeds` has one seed per image, input by input; by default image k of each input has
        the script's seed + k.

        Give exactly one of `images` (variations of them) and `image_embed`. `inpaint_image_masks`
        are True where the image is to be regenerated; the rest of each output equals the
        (square, resized) inpaint image exactly.
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
            scales = _per_unet(
                cond_scale if isinstance(cond_scale, list) else [cond_scale], decoder.num_unets, "cond_scale"
            )

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
            regenerate = [fit_mask(np.asarray(m, dtype=bool), size, pad) for m in inpaint_image_masks]
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
                    out = decoder.sample(image_embed=embeds[chunk].to(self.device), cond_scale=tuple(scales), **extra)
                if keep_images is not None:  # exact pixels outside the mask, whatever the rounding
                    keep = keep_masks[chunk].unsqueeze(1).to(out.device)
                    out = torch.where(keep, keep_images[chunk].to(out.device), out.float().clamp(0, 1))
                for index, tensor in zip(chunk, out, strict=True):
                    results[index].append(to_pil(tensor))
        finally:
            decoder.sample_timesteps = saved_steps
        return results

    def _job_seeds(self, seeds: Sequence[int] | None, count: int, per_input: int) -> list[int]:
        if seeds is None:
            return [self.seed + position % per_input for position in range(count)]
        if len(seeds) != count:
            raise ValueError(f"give one seed per image: {count}, not {len(seeds)}")
        return list(seeds)

    def _records(
        self,
        results: dict[int, list[Image.Image]],
        prompts: Sequence[str | None],
        sources: Sequence[str | None],
        seeds: dict[int, list[int]] | None = None,
    ) -> list[GeneratedImage]:
        """`seeds`: each image's seed, as `results` holds the images; by default seed + k."""
        settings = dict(self._record)
        return [
            GeneratedImage(
                image,
                seeds[index][position] if seeds else self.seed + position,
                position,
                prompts[index],
                sources[index],
                settings,
            )
            for index, images in results.items()
            for position, image in enumerate(images)
        ]


def _stack(tensors: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    if isinstance(tensors, torch.Tensor):
        return tensors if tensors.ndim >= 2 else tensors.unsqueeze(0)
    return torch.stack(list(tensors))


def _check_count(num_images: int) -> None:
    if num_images < 1:
        raise InputError(f"the number of images must be at least 1, got {num_images}")


class TextToImage(InferenceScript):
    """Prompts -> prior -> decoder."""

    def run(self, prompts: Sequence[str | Prompt], num_images: int = 1) -> list[GeneratedImage]:
        """`num_images` per prompt, image k with the seed + k; a `Prompt` may set its own."""
        _check_count(num_images)
        requests = [p if isinstance(p, Prompt) else Prompt(p) for p in prompts]
        if not requests or any(not r.text.strip() for r in requests):
            raise InputError("a prompt is empty: describe the image to make")
        counts = [num_images if r.num_images is None else r.num_images for r in requests]
        for count in counts:
            _check_count(count)
        self._start(uses_prior=True)
        s = self.settings
        texts: list[str] = []
        seeds: dict[int, list[int]] = {}
        for i, (request, count) in enumerate(zip(requests, counts, strict=True)):
            base = self.seed if request.seed is None else request.seed
            seeds[i] = [base + k for k in range(count)]
            texts += [request.text] * count
        flat_seeds = [seed for i in range(len(requests)) for seed in seeds[i]]
        # One prior input per image, so that each prompt may ask for its own count.
        embeds = self._sample_prior(
            texts, batch_size=s.batch_size, num_samples_per_batch=s.num_samples_per_batch, seeds=flat_seeds
        )
        flat = [embeds[j][0] for j in range(len(texts))]
        images = self._sample_decoder(image_embed=flat, text=texts, batch_size=s.batch_size, seeds=flat_seeds)
        by_prompt, start = {}, 0
        for i, count in enumerate(counts):  # one decoder input per image: regroup by prompt
            by_prompt[i] = [images[start + k][0] for k in range(count)]
            start += count
        return self._records(by_prompt, [r.text for r in requests], [None] * len(requests), seeds)


class ImageVariation(InferenceScript):
    """Images -> CLIP image embeddings -> decoder: new images with the same content."""

    def run(
        self,
        images: Sequence[Image.Image],
        num_images: int = 1,
        text: str | None = None,
        sources: Sequence[str] | None = None,
    ) -> list[GeneratedImage]:
        _check_count(num_images)
        if not images:
            raise InputError("give at least one image to make variations of")
        self._start(uses_prior=False)
        results = self._sample_decoder(
            images=list(images), text=text, sample_count=num_images, batch_size=self.settings.batch_size
        )
        return self._records(results, [text] * len(images), list(sources or [None] * len(images)))


class Inpainting(InferenceScript):
    """Regenerate the masked area of an image, following a prompt or the image itself."""

    def run(
        self,
        image: Image.Image,
        mask: np.ndarray,
        prompt: str | None = None,
        num_images: int = 1,
        source: str | None = None,
    ) -> list[GeneratedImage]:
        """`mask` is True where the image is to be regenerated."""
        _check_count(num_images)
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
        results = self._sample_decoder(
            image_embed=embeds,
            text=[prompt or ""] * num_images,
            batch_size=s.batch_size,
            inpaint_images=[image] * num_images,
            inpaint_image_masks=[mask] * num_images,
        )
        grouped = {0: [results[k][0] for k in range(num_images)]}
        return self._records(grouped, [prompt], [source])


def as_record(generated: GeneratedImage) -> dict[str, Any]:
    record = asdict(generated)
    record.pop("image")
    return record
