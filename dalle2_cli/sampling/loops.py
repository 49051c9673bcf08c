"""The sampling loops, ours: the prior's, and each decoder unet's. They call dalle2-pytorch's
networks (`DiffusionPriorNetwork`, `Unet`) and use their noise schedules (`NoiseScheduler`
buffers and formulas), with a scheduler object choosing the steps (dalle2_cli.sampling.schedulers),
noise passed in (one generator per image, dalle2_cli.sampling.noise), guidance as an explicit
call (dalle2_cli.sampling.guidance) and progress as a callback. Nothing of dalle2-pytorch's is
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

Progress = Callable[[torch.Tensor], None]  # called once per step with the current prediction of the clean sample


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


def sample_prior(
    prior: Any,
    conditions: PriorConditions,
    scheduler: Scheduler,
    noise: NoiseSource,
    cond_scale: float = 1.0,
    batched_guidance: bool = True,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Image embeddings, one per row of `conditions`, unscaled as CLIP's are."""
    net, schedule = prior.net, prior.noise_scheduler
    rows = conditions.text_embed.shape[0]
    x = noise.draw((rows, prior.image_embed_dim), conditions.text_embed.device)
    if prior.init_image_embed_l2norm:
        x = _l2norm(x) * prior.image_embed_scale
    kwargs = conditions.as_kwargs()
    null = conditions.negative.as_kwargs() if conditions.negative is not None else None
    x0 = None
    for t in scheduler.timesteps:
        times = _times(t, x)
        self_cond = x0 if net.self_cond else None
        output = guided(net, x, times, cond_scale, {**kwargs, "self_cond": self_cond}, null, batched_guidance)
        x0 = _clean_from(schedule, x, times, output, prior.predict_x_start, prior.predict_v)
        if not prior.predict_x_start:
            x0 = x0.clamp(-1.0, 1.0)
        if prior.predict_x_start and prior.sampling_clamp_l2norm:
            x0 = _l2norm(x0) * prior.image_embed_scale
        x = scheduler.step(Prediction(x0), t, x, noise)
        if progress is not None:
            progress(x0)
    if prior.sampling_final_clamp_l2norm and prior.predict_x_start:
        x = _l2norm(x) * prior.image_embed_scale
    return x / prior.image_embed_scale


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
    """What one unet is conditioned on, one row per image."""

    image_embed: torch.Tensor
    text_encodings: torch.Tensor | None = None


@dataclass
class Inpaint:
    """RePaint: `image` (in [0, 1]) is kept where `keep` is True; each step is taken
    `resample_times` times, noising the result back in between, so that the regenerated area
    and the kept one agree."""

    image: torch.Tensor
    keep: torch.Tensor  # [batch, height, width] booleans
    resample_times: int = 5


def sample_unet(
    decoder: Any,
    index: int,
    conditions: UnetConditions,
    scheduler: Scheduler,
    noise: NoiseSource,
    cond_scale: float = 1.0,
    lowres_image: torch.Tensor | None = None,
    lowres_noise_level: float = 0.2,
    inpaint: Inpaint | None = None,
    batched_guidance: bool = True,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Unet `index` (from 0) of `decoder`: images in [0, 1]. An upsampler takes the images of
    the unet before it as `lowres_image`, noised at `lowres_noise_level` when it was trained
    with noised ones (the level its own file's config gives)."""
    from dalle2_pytorch.vqgan_vae import VQGanVAE

    unet = decoder.unets[index]
    if isinstance(decoder.vaes[index], VQGanVAE):
        raise InputError(
            f"decoder unet {index + 1} is a latent diffusion unet (it samples through a VQGAN-VAE), which "
            "dalle2-cli does not sample: use a decoder without vaes"
        )
    schedule = decoder.noise_schedulers[index]
    size = decoder.image_sizes[index]
    batch = conditions.image_embed.shape[0]
    device = conditions.image_embed.device
    extra: dict[str, Any] = {"image_embed": conditions.image_embed}
    if conditions.text_encodings is not None:
        extra["text_encodings"] = conditions.text_encodings
    if unet.lowres_cond:
        extra.update(_lowres(decoder, index, lowres_image, lowres_noise_level, size, noise))
    known = keep = None
    if inpaint is not None:
        known = decoder.normalize_img(_resize(inpaint.image, size))
        keep = _resize(inpaint.keep.unsqueeze(1).float(), size).bool()
    x = noise.draw((batch, decoder.sample_channels[index], size, size), device)
    x0 = None
    repeats = inpaint.resample_times if inpaint is not None else 1
    for t in scheduler.timesteps:
        last_step = t == scheduler.timesteps[-1]
        for r in reversed(range(repeats)):
            times = _times(t, x)
            if known is not None:  # RePaint (Lugmayr et al. 2022): the known part, noised to t
                x = x * ~keep + schedule.q_sample(known, t=times, noise=noise.like(known)) * keep
            self_cond = x0 if unet.self_cond else None
            output = guided(unet, x, times, cond_scale, {**extra, "self_cond": self_cond}, None, batched_guidance)
            prediction = _unet_prediction(decoder, index, schedule, x, times, output)
            x0 = prediction.x0
            x = scheduler.step(prediction, t, x, noise)
            if known is not None and not (last_step or r == 0):
                x = scheduler.renoise(x, scheduler.previous(t), t, noise)
        if progress is not None:
            progress(x0 if known is None else x0 * ~keep + known * keep)
    if known is not None:
        x = x * ~keep + known * keep
    return decoder.unnormalize_img(x)


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
