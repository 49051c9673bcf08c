"""`InferenceScript`: what every generating script shares. It plans each stage (sampler, steps,
guidance: what was asked, else the config's defaults, else the network's own), encodes text
and images with CLIP, and samples the prior and the decoder in batches, each image from its own
seed, handing every image to `on_image` as soon as its batch is decoded.

`_sample_prior` and `_sample_decoder` take dalle2-laion's arguments, so scripts written for it
port over (dalle2_cli.laion keeps its mask convention too); subclasses add a `run` method.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from dalle2_cli.errors import SettingError
from dalle2_cli.io.images import fit_square, to_pil, to_tensor
from dalle2_cli.io.prompts import ends, shortened, unknown_words
from dalle2_cli.loading.clip import cut_off_words, tokenize
from dalle2_cli.loading.manager import DalleModelManager
from dalle2_cli.sampling.batches import Batch, DecoderBatches, stack_rows
from dalle2_cli.sampling.generated import GeneratedImage
from dalle2_cli.sampling.loops import Inpaint, PriorConditions, UnetConditions, best_of, sample_prior, sample_unet
from dalle2_cli.sampling.noise import ImageNoise
from dalle2_cli.sampling.progress import NoProgress
from dalle2_cli.sampling.schedulers import PRIOR, make_scheduler, unet_scheduler
from dalle2_cli.sampling.settings import (
    SamplingSettings,
    StageDefaults,
    StagePlan,
    Trained,
    check_finite,
    plan_stage,
)


def _per_unet(values: Sequence | None, count: int, what: str) -> list:
    if values is None:
        return [None] * count
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
        self.progress = progress or NoProgress()  # dalle2_cli.sampling.progress.StageProgress shows bars
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
        """Half-precision arithmetic runs under autocast, which casts each op's inputs."""
        if self.models.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.models.compute_dtype)

    def _start(self, uses_prior: bool, uses_image_tower: bool = False) -> None:
        """Load what will run, plan every stage before any sampling (a bad setting stops the
        run here), then seed every random generator (same seed, same settings, same device:
        same pixels). A missing part stops the run before any weights are read."""
        if uses_image_tower:
            self.models.require_image_tower()
        self._record = {"batch_size": self.settings.batch_size, "dtype": str(self.models.dtype).removeprefix("torch.")}
        self._record.update(self.plan(uses_prior))
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)

    # -- plans --------------------------------------------------------------------------------

    def plan(self, uses_prior: bool = True) -> dict[str, Any]:
        """The sampling settings in effect, as the images' metadata records them. Loads the
        models it plans for (their trained steps and guidance are the limits)."""
        planned: dict[str, Any] = {}
        if uses_prior:
            prior = self.prior_plan()
            planned.update(
                prior_sampler=prior.sampler,
                prior_steps=prior.steps,
                prior_cond_scale=prior.cond_scale,
                prior_samples_per_image=self.settings.num_samples_per_batch,
            )
            if self.settings.negative_prompt is not None:
                planned["negative_prompt"] = self.settings.negative_prompt
                if prior.cond_scale == 1 and "negative scale" not in self._warned:
                    self._warned.add("negative scale")
                    self.models.warn(
                        "a negative prompt acts through the prior's guidance, which is off at scale 1: "
                        "raise the prior's guidance scale (to 2, say) for it to count"
                    )
        elif (
            self.settings.negative_prompt is not None
            and getattr(self.models.decoder, "null_text", None) is None
            and "negative unused" not in self._warned
        ):
            self._warned.add("negative unused")
            self.models.warn("the negative prompt is ignored: it steers the prior, which this run does not use")
        unets = self.decoder_plans()
        if self.settings.ddim_eta is not None:
            used = {planned.get("prior_sampler"), *(p.sampler for p in unets)} - {None}
            if "ddim" in used:
                planned["ddim_eta"] = self.settings.ddim_eta
            elif "ddim eta" not in self._warned:
                self._warned.add("ddim eta")
                self.models.warn(f"the DDIM eta is ignored: no stage samples with ddim (they use {', '.join(used)})")
        planned.update(
            decoder_sampler=[p.sampler for p in unets],
            decoder_steps=[p.steps for p in unets],
            decoder_cond_scale=[p.cond_scale for p in unets],
        )
        return planned

    def prior_plan(self) -> StagePlan:
        prior = self.models.prior  # loads it: its trained steps bound the steps asked for
        trained = Trained(prior.noise_scheduler.num_timesteps, prior.can_classifier_guidance, prior.sample_timesteps)
        s = self.settings
        defaults = self.models.prior_defaults()
        return plan_stage("prior", trained, s.prior_steps, s.prior_cond_scale, s.sampler, defaults, ddim_eta=s.ddim_eta)

    def decoder_plans(self) -> list[StagePlan]:
        decoder = self.models.decoder  # loads it
        count = decoder.num_unets
        s = self.settings
        steps = _per_unet(s.decoder_steps, count, "decoder_steps")
        scales = _per_unet(s.decoder_cond_scale, count, "decoder_cond_scale")
        plans = []
        for number, defaults in enumerate(self.models.decoder_defaults()):
            if hasattr(decoder, "trained"):  # another family's decoder says it itself
                trained = decoder.trained(number)
            else:
                schedule = decoder.noise_schedulers[number]
                trained = Trained(
                    schedule.num_timesteps, decoder.can_classifier_guidance, decoder.sample_timesteps[number]
                )
            where = f"for unet {number + 1} " if count > 1 else ""
            sampler = s.sampler
            if getattr(decoder, "keeps_schedule", (False,) * count)[number]:
                # One value (`--decoder-steps 8`) is for the others; this unet keeps its own steps.
                given = s.decoder_steps if s.decoder_steps is not None and len(s.decoder_steps) > 1 else None
                steps[number] = given[number] if given else None
                sampler = self._kept_schedule(number, steps[number], defaults)
            plans.append(
                plan_stage("decoder", trained, steps[number], scales[number], sampler, defaults, where, s.ddim_eta)
            )
        return plans

    def _kept_schedule(self, number: int, steps: int | None, defaults: StageDefaults) -> str | None:
        """The sampler of a unet that keeps its own whatever the others take (Karlo's
        super-resolution: `super_res_last` was trained for the last of exactly 7 DDPM steps).
        Other steps are allowed, with a warning."""
        if steps is not None and steps != defaults.steps and "kept steps" not in self._warned:
            self._warned.add("kept steps")
            self.models.warn(
                f"decoder unet {number + 1} (Karlo's super-resolution) was trained to end with the last of "
                f"{defaults.steps} steps (super_res_last): {steps} steps may give worse images"
            )
        return defaults.sampler

    # -- CLIP ------------------------------------------------------------------------------

    def _tokens(self, texts: Sequence[str]) -> torch.Tensor:
        clip = self.models.clip
        for text in dict.fromkeys(texts):
            if text not in self._warned:
                self._warned.add(text)  # once per prompt, though the prior and decoder both read it
                self._check_prompt(text, clip.max_text_len)
        return tokenize(clip, list(texts)).to(self.device)

    def _check_prompt(self, text: str, context_length: int) -> None:
        for warning in prompt_warnings(text, context_length, self.models.config.vocabulary):
            self.models.warn(warning)

    def _embed_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP's text embeddings and per-token encodings, in float32."""
        with self._precision(), self.models.using(self.models.clip):
            embeds, encodings = self.models.clip.embed_text(tokens.to(self.device))
        return embeds.float(), encodings.float()

    def _text_encodings(self, text_or_tokens: Sequence[str] | torch.Tensor) -> torch.Tensor:
        tokens = text_or_tokens if isinstance(text_or_tokens, torch.Tensor) else self._tokens(text_or_tokens)
        return self._embed_text(tokens)[1]

    def _text_conditions(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP's text embeddings and per-token encodings of `texts`."""
        return self._embed_text(self._tokens(texts))

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
            self.models.warn(f"this decoder is not conditioned on text: the text {shortened(text)!r} is ignored")
            return None
        return text

    # -- the two sampling stages, with dalle2-laion's arguments ---------------------------------

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
        """CLIP image embeddings for each text: {text index: [sample_count embeddings]}, each the
        best of `num_samples_per_batch` candidates by CLIP similarity.

        `seeds` has one seed per embedding, text by text; by default embedding k of each text
        has the script's seed + k."""
        plan = self.prior_plan()
        steps = timesteps or plan.steps
        cond_scale = plan.cond_scale if cond_scale is None else check_finite("prior_cond_scale", cond_scale)
        tokens = text_or_tokens if isinstance(text_or_tokens, torch.Tensor) else self._tokens(text_or_tokens)
        negative = self._negative_conditions()
        jobs = [index for index in range(tokens.shape[0]) for _ in range(sample_count)]
        seeds = self._job_seeds(seeds, len(jobs), sample_count)
        prior = self.models.prior
        results: dict[int, list[torch.Tensor]] = {index: [] for index in range(tokens.shape[0])}
        evaluations = len(make_scheduler(plan.sampler, prior.noise_scheduler, steps, PRIOR).timesteps)
        self.progress.stage("prior", evaluations, loops=-(-len(jobs) // batch_size))
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            rows = tokens[chunk].repeat_interleave(num_samples_per_batch, dim=0)
            text_embed, encodings = self._embed_text(rows)
            conditions = PriorConditions(text_embed, encodings if prior.condition_on_text_encodings else None)
            if negative is not None:
                conditions.negative = negative.repeated(len(rows))
            scheduler = make_scheduler(plan.sampler, prior.noise_scheduler, steps, PRIOR, plan.ddim_eta)
            noise = ImageNoise(seeds[start : start + batch_size], "prior")
            advance = lambda clean: self.progress.advance("prior")  # noqa: E731
            with self._precision(), self.models.using(prior):
                embeds = sample_prior(
                    prior, conditions, scheduler, noise, cond_scale, self.settings.batched_guidance, advance
                )
            best = best_of(embeds.float(), text_embed, num_samples_per_batch)
            for index, embed in zip(chunk, best, strict=True):
                results[index].append(embed)
        return results

    def _negative_conditions(self, model: Any = None) -> PriorConditions | None:
        """The text of guidance's null branch, one row (to be `repeated` for a batch): a negative
        prompt's; else the empty prompt's for a family whose null branch reads one (Karlo's),
        or None (dalle2-pytorch's networks drop their text there). `model`: the prior, or the
        decoder."""
        model = self.models.prior if model is None else model
        text = self.settings.negative_prompt
        if text is None:
            text = getattr(model, "null_text", None)
        if text is None:
            return None
        text_embed, encodings = self._embed_text(self._tokens([text]))
        return PriorConditions(text_embed, encodings if model.condition_on_text_encodings else None)

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
        embeds = self._embed_images(images) if images is not None else stack_rows(image_embed)
        decoder = self.models.decoder
        plans = self.decoder_plans()
        steps = timesteps or [p.steps for p in plans]
        scales = [p.cond_scale for p in plans]
        if cond_scale is not None:
            given = [cond_scale] if isinstance(cond_scale, int | float) else list(cond_scale)
            scales = [check_finite("decoder_cond_scale", s) for s in _per_unet(given, len(plans), "decoder_cond_scale")]
        seeds = self._job_seeds(seeds, embeds.shape[0] * sample_count, sample_count)
        encode_text = self._text_conditions if self._takes_text() else None
        batches = DecoderBatches(embeds, seeds, text, text_encoding, sample_count, batch_size, encode_text)
        batches.inpaint(inpaint_images, inpaint_image_masks, decoder.image_sizes[-1], self.settings.pad)
        # The text of the decoder guidance's null branch, for a family whose null branch reads one.
        null = self._negative_conditions(decoder) if getattr(decoder, "null_text", None) is not None else None
        bars = [f"decoder unet {number + 1}" for number in range(decoder.num_unets)]
        for number, (bar, plan, unet_steps) in enumerate(zip(bars, plans, steps, strict=True)):
            evaluations = len(unet_scheduler(decoder, number, plan, unet_steps).timesteps)
            self.progress.stage(bar, evaluations, loops=len(batches))
        results: dict[int, list[Image.Image]] = {index: [] for index in range(embeds.shape[0])}
        for batch in batches:
            out = self._decode(batch, plans, steps, scales, bars, null)
            finished = []
            for index, tensor in zip(batch.inputs, out, strict=True):
                results[index].append(to_pil(tensor))
                finished.append((index, len(results[index]) - 1, results[index][-1]))
            if on_batch is not None:
                on_batch(finished)
        return results

    def _decode(
        self,
        batch: Batch,
        plans: list[StagePlan],
        steps: list[int],
        scales: list[float],
        bars: list[str],
        null: PriorConditions | None = None,
    ) -> torch.Tensor:
        """Every unet on one batch, each upsampler taking the images of the one before, noised
        at the level its own file says."""
        decoder = self.models.decoder
        noise = ImageNoise(batch.seeds, "decoder")
        conditions = UnetConditions(
            batch.image_embed.to(self.device),
            _to(batch.text_encodings, self.device),
            _to(batch.text_embed, self.device),
            null,
        )
        inpaint = None
        if batch.keep_images is not None:
            keep_images, keep_masks = batch.keep_images.to(self.device), batch.keep_masks.to(self.device)
            inpaint = Inpaint(keep_images, keep_masks, self.settings.inpaint_resample_times)
        image = None
        with self._precision(), self.models.using(decoder):
            for number, plan in enumerate(plans):
                scheduler = unet_scheduler(decoder, number, plan, steps[number])
                advance = functools.partial(self._advance_decoder, bars[number])
                image = sample_unet(
                    decoder,
                    number,
                    conditions,
                    scheduler,
                    noise,
                    scales[number],
                    lowres_image=image,
                    lowres_noise_level=self.models.lowres_noise_levels[number],
                    inpaint=inpaint,
                    batched_guidance=self.settings.batched_guidance,
                    progress=advance,
                )
        if inpaint is not None:  # exact pixels outside the mask, whatever the rounding
            keep = inpaint.keep.unsqueeze(1)
            image = torch.where(keep, inpaint.image, image.float().clamp(0, 1))
        return image

    def _advance_decoder(self, bar: str, clean: torch.Tensor) -> None:
        """One decoder step done; a progress that shows previews may ask for the images as they
        stand (the current prediction of the clean images, in [0, 1])."""
        decoder = self.models.decoder
        self.progress.advance(bar, preview=lambda: decoder.unnormalize_img(clean.float()).clamp(0, 1))

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
            from dalle2_cli.io.output import run_metadata

            manager = self.models
            self._provenance = run_metadata(
                self.command, manager.name, manager.config.source_path, manager.files, manager.sha256()
            )
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


def prompt_warnings(text: str, context_length: int, vocabulary: Any = None) -> list[str]:
    """What to tell about a prompt: the words CLIP will not see (past its context), and those
    the model never saw (where its config lists its `vocabulary`)."""
    warnings = []
    if cut := cut_off_words(text, context_length):
        warnings.append(f"the prompt is longer than CLIP's {context_length} tokens; left out: {ends(cut)}")
    if vocabulary is not None and (warning := unknown_words(text, vocabulary.words, vocabulary.summary)):
        warnings.append(warning)
    return warnings


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)
