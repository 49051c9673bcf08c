"""dalle2-pytorch's diffusion stages, the prior and each decoder unet, for the one sampling loop
(dalle2_cli.sampling.stages). They call dalle2-pytorch's networks (`DiffusionPriorNetwork`,
`Unet`) and use their noise schedules (`NoiseScheduler` buffers and formulas), with a
scheduler object choosing the steps (dalle2_cli.sampling.schedulers), noise passed in (one
generator per image, dalle2_cli.sampling.noise), guidance as an explicit call
(dalle2_cli.sampling.guidance) and progress as a callback. Nothing of dalle2-pytorch's is
swapped while they run (but the one guidance hook, see there), so batches may sample in
several threads at once.

With the `ddpm` and `ddim` schedulers they compute what dalle2-pytorch's `p_sample_loop_ddpm`
and `p_sample_loop_ddim` compute, draw for draw: its clamping (static or dynamic thresholds
for the decoder; clamps and l2-norm clamps for the prior), self-conditioning, learned
variance, low-resolution conditioning noised at sampling time, and RePaint inpainting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dalle2_cli.errors import InputError
from dalle2_cli.sampling.guidance import guided
from dalle2_cli.sampling.schedulers import NoiseSource, Prediction, Scheduler
from dalle2_cli.sampling.stages import Progress, RePaint, sample


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def _times(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def _clean_from(schedule: Any, x: torch.Tensor, times: torch.Tensor, output: torch.Tensor, x_start: bool, v: bool):
    """The clean sample the network's output predicts (it predicts v, x0 or the noise)."""
    if v:
        return schedule.predict_start_from_v(x, t=times, v=output)
    if x_start:
        return output
    return schedule.predict_start_from_noise(x, t=times, noise=output)


# -- the prior ------------------------------------------------------------------------------


@dataclass
class PriorConditions:
    """What the prior is conditioned on, one row per sample: CLIP's text embedding and, for
    priors trained on them, its per-token text encodings; `negative` the same of a negative
    prompt, for the guidance's null branch."""

    text_embed: torch.Tensor
    text_encodings: torch.Tensor | None = None
    negative: PriorConditions | None = None

    def repeated(self, rows: int) -> PriorConditions:
        """These conditions (of one row) for `rows` rows."""
        encodings = None if self.text_encodings is None else self.text_encodings.expand(rows, -1, -1)
        return PriorConditions(self.text_embed.expand(rows, -1), encodings)

    def as_kwargs(self) -> dict[str, Any]:
        kwargs = {"text_embed": self.text_embed}
        if self.text_encodings is not None:
            kwargs["text_encodings"] = self.text_encodings
        return kwargs


class PriorStage:
    """dalle2-pytorch's `DiffusionPrior` as a stage: CLIP image embeddings from `conditions`,
    guided on the whole output (the null branch drops the text, or takes a negative prompt's)."""

    repaint = None

    def __init__(self, prior: Any, conditions: PriorConditions, cond_scale: float = 1.0, batched_guidance: bool = True):
        self.prior, self.cond_scale, self.batched_guidance = prior, cond_scale, batched_guidance
        self.rows, self.device = conditions.text_embed.shape[0], conditions.text_embed.device
        self.conditions = conditions.as_kwargs()
        self.null = conditions.negative.as_kwargs() if conditions.negative is not None else None

    def start(self, noise: NoiseSource) -> torch.Tensor:
        x = noise.draw((self.rows, self.prior.image_embed_dim), self.device)
        return _l2norm(x) * self.prior.image_embed_scale if self.prior.init_image_embed_l2norm else x

    def predict(self, x: torch.Tensor, t: int, previous: Prediction | None) -> Prediction:
        prior, times = self.prior, _times(t, x)
        self_cond = previous.x0 if prior.net.self_cond and previous is not None else None
        kwargs = {**self.conditions, "self_cond": self_cond}
        output = guided(prior.net, x, times, self.cond_scale, kwargs, self.null, self.batched_guidance)
        x0 = _clean_from(prior.noise_scheduler, x, times, output, prior.predict_x_start, prior.predict_v)
        if not prior.predict_x_start:
            x0 = x0.clamp(-1.0, 1.0)
        if prior.predict_x_start and prior.sampling_clamp_l2norm:
            x0 = _l2norm(x0) * prior.image_embed_scale
        return Prediction(x0)

    def noised(self, clean: torch.Tensor, t: int, noise: NoiseSource) -> torch.Tensor:
        return self.prior.noise_scheduler.q_sample(clean, t=_times(t, clean), noise=noise.like(clean))

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Unscaled, as CLIP's embeddings are."""
        if self.prior.sampling_final_clamp_l2norm and self.prior.predict_x_start:
            x = _l2norm(x) * self.prior.image_embed_scale
        return x / self.prior.image_embed_scale


def sample_prior(
    prior: Any,
    conditions: PriorConditions,
    scheduler: Scheduler,
    noise: NoiseSource,
    cond_scale: float = 1.0,
    batched_guidance: bool = True,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Image embeddings, one per row of `conditions`, unscaled as CLIP's are. A prior of another
    family (Karlo's) makes its own stage."""
    if hasattr(prior, "stage"):
        stage = prior.stage(conditions, cond_scale, batched_guidance)
    else:
        stage = PriorStage(prior, conditions, cond_scale, batched_guidance)
    return sample(stage, scheduler, noise, progress)


def best_of(image_embeds: torch.Tensor, text_embeds: torch.Tensor, candidates: int) -> torch.Tensor:
    """Of each image's `candidates` embeddings (rows image by image), the one CLIP finds closest
    to its text, as the DALL·E 2 paper reranks (and dalle2-pytorch's prior does)."""
    dim = image_embeds.shape[-1]
    images = image_embeds.reshape(-1, candidates, dim)
    texts = text_embeds.reshape(-1, candidates, dim)
    similarity = torch.einsum("b r d, b r d -> b r", _l2norm(texts), _l2norm(images))
    best = similarity.topk(k=1).indices
    return images.gather(1, best.unsqueeze(-1).expand(-1, 1, dim)).squeeze(1)


# -- a decoder unet ---------------------------------------------------------------------------


@dataclass
class UnetConditions:
    """What one unet is conditioned on, one row per image. Karlo's decoder also reads CLIP's
    text embedding, and its guidance's `null` text (one row: the empty or a negative prompt)."""

    image_embed: torch.Tensor
    text_encodings: torch.Tensor | None = None
    text_embed: torch.Tensor | None = None
    null: PriorConditions | None = None


@dataclass
class Inpaint:
    """RePaint (dalle2_cli.sampling.stages.RePaint) in image terms: `image` (in [0, 1]) is kept
    where `keep` is True, at every unet's size."""

    image: torch.Tensor
    keep: torch.Tensor  # [batch, height, width] booleans
    resample_times: int = 5

    def at(self, size: int, normalize: Callable[[torch.Tensor], torch.Tensor]) -> RePaint:
        """RePaint for a stage making `size` px samples, `normalize` mapping [0, 1] images to its
        sample space (both resized by nearest neighbour, only where the size differs)."""
        known = normalize(_resize(self.image, size))
        keep = _resize(self.keep.unsqueeze(1).float(), size).bool()
        return RePaint(known, keep, self.resample_times)


class UnetStage:
    """Unet `index` (from 0) of dalle2-pytorch's `Decoder` as a stage: images in [0, 1],
    guided on every output channel. An upsampler takes the images of the unet before it as
    `lowres_image`, noised at `lowres_noise_level` when it was trained with noised ones."""

    def __init__(
        self,
        decoder: Any,
        index: int,
        conditions: UnetConditions,
        noise: NoiseSource,
        cond_scale: float = 1.0,
        lowres_image: torch.Tensor | None = None,
        lowres_noise_level: float = 0.2,
        inpaint: Inpaint | None = None,
        batched_guidance: bool = True,
    ):
        """What is computed once per batch; `noise` draws the upsampler's conditioning noise."""
        from dalle2_pytorch.vqgan_vae import VQGanVAE

        self.decoder, self.index, self.unet = decoder, index, decoder.unets[index]
        if isinstance(decoder.vaes[index], VQGanVAE):
            raise InputError(
                f"decoder unet {index + 1} is a latent diffusion unet (it samples through a VQGAN-VAE), which "
                "dalle2-cli does not sample: use a decoder without vaes"
            )
        self.schedule, self.size = decoder.noise_schedulers[index], decoder.image_sizes[index]
        self.cond_scale, self.batched_guidance = cond_scale, batched_guidance
        self.batch, self.device = conditions.image_embed.shape[0], conditions.image_embed.device
        self.conditions: dict[str, Any] = {"image_embed": conditions.image_embed}
        if conditions.text_encodings is not None:
            self.conditions["text_encodings"] = conditions.text_encodings
        if self.unet.lowres_cond:
            self.conditions.update(_lowres(decoder, index, lowres_image, lowres_noise_level, self.size, noise))
        self.repaint = inpaint.at(self.size, decoder.normalize_img) if inpaint is not None else None

    def start(self, noise: NoiseSource) -> torch.Tensor:
        return noise.draw((self.batch, self.decoder.sample_channels[self.index], self.size, self.size), self.device)

    def predict(self, x: torch.Tensor, t: int, previous: Prediction | None) -> Prediction:
        times = _times(t, x)
        self_cond = previous.x0 if self.unet.self_cond and previous is not None else None
        kwargs = {**self.conditions, "self_cond": self_cond}
        output = guided(self.unet, x, times, self.cond_scale, kwargs, None, self.batched_guidance)
        return _unet_prediction(self.decoder, self.index, self.schedule, x, times, output)

    def noised(self, clean: torch.Tensor, t: int, noise: NoiseSource) -> torch.Tensor:
        return self.schedule.q_sample(clean, t=_times(t, clean), noise=noise.like(clean))

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder.unnormalize_img(x)


def sample_unet(
    decoder: Any,
    index: int,
    conditions: UnetConditions,
    scheduler: Scheduler,
    noise: NoiseSource,
    cond_scale: float = 1.0,
    progress: Progress | None = None,
    **stage_options: Any,
) -> torch.Tensor:
    """Unet `index` (from 0) of `decoder`: images in [0, 1]. `stage_options` are UnetStage's
    (lowres_image, lowres_noise_level, inpaint, batched_guidance). A decoder of another family
    (Karlo's) makes its own stages."""
    if hasattr(decoder, "stage"):
        final = scheduler.timesteps[-1]
        stage = decoder.stage(index, conditions, noise, cond_scale, final_timestep=final, **stage_options)
    else:
        stage = UnetStage(decoder, index, conditions, noise, cond_scale, **stage_options)
    return sample(stage, scheduler, noise, progress)


def _unet_prediction(
    decoder: Any, index: int, schedule: Any, x: torch.Tensor, times: torch.Tensor, output: torch.Tensor
) -> Prediction:
    variance = None
    if decoder.learned_variance[index]:
        output, variance = output.chunk(2, dim=1)
    x0 = _clean_from(schedule, x, times, output, decoder.predict_x_start[index], decoder.predict_v[index])
    # Clamped to the image range as the decoder samples (statically, or by dynamic thresholds).
    return Prediction(decoder.dynamic_threshold(x0), variance)


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    return image if image.shape[-1] == size else F.interpolate(image, size, mode="nearest")


def _lowres(decoder: Any, index: int, image: torch.Tensor | None, level: float, size: int, noise: NoiseSource) -> dict:
    """The previous unet's images, resized for this one and, if it was trained so, noised."""
    if image is None:
        raise ValueError(f"unet {index + 1} is an upsampler: give it the images of the unet before it")
    if image.shape[-1] != size:  # resized (and clamped, as dalle2-pytorch does) only when it must be
        image = _resize(image, size).clamp(*decoder.input_image_range)
    conditioner = decoder.lowres_conds[index]
    levels = None
    if conditioner is not None and conditioner.use_noise:
        levels = torch.full((image.shape[0],), int(level * 1000), dtype=torch.long, device=image.device)
        normalized = conditioner.normalize_img(image)
        noised = conditioner.noise_scheduler.q_sample(normalized, t=levels, noise=noise.like(normalized))
        image = conditioner.unnormalize_img(noised)
    return {"lowres_cond_img": decoder.normalize_img(image), "lowres_noise_level": levels}
