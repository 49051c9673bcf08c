"""Karlo's diffusion stages for the one sampling loop (dalle2_cli.sampling.stages): the prior,
the 64 px decoder and the 64 -> 256 super-resolution, computing what diffusers' `UnCLIPPipeline`
computes (same operations in the same order, so the same noise gives the same images).

Guidance is Karlo's: the null branch is the empty prompt (or a negative prompt) through the
same CLIP, and for the decoder also a learned null image embedding; the prior blends its whole
output, the decoder its noise only (the learned variance comes from the conditional branch);
the super-resolution is not guided. A guided prediction runs both branches in one doubled
batch, null first, as diffusers does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dalle2_cli.karlo.schedule import KarloSchedule
from dalle2_cli.loading.precision import compute_dtype
from dalle2_cli.sampling.schedulers import NoiseSource, Prediction
from dalle2_cli.sampling.stages import RePaint


@dataclass
class Text:
    """CLIP's reading of texts, one row each: the (unnormalised) text embedding and the per-token
    encodings, zero after the end-of-text token (those rows are masked out)."""

    embed: torch.Tensor
    encodings: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return self.encodings.ne(0).any(dim=-1)

    @classmethod
    def of(cls, conditions) -> Text | None:
        """The text of a PriorConditions (or None)."""
        return None if conditions is None else cls(conditions.text_embed, conditions.text_encodings)

    def rows(self, count: int) -> Text:
        """These (one row) for `count` rows."""
        return Text(self.embed.expand(count, -1), self.encodings.expand(count, -1, -1))

    def after(self, null: Text) -> Text:
        """`null`'s rows, then these: a guided batch."""
        return Text(torch.cat((null.embed, self.embed)), torch.cat((null.encodings, self.encodings)))


def _time(t: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(t, dtype=torch.long, device=device)


def _blend(null: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, in diffusers' operand order."""
    return null + scale * (cond - null)


class _KarloStage:
    """What Karlo's stages share: the forward process of their schedule (RePaint's known part)."""

    schedule: KarloSchedule

    def noised(self, clean: torch.Tensor, t: int, noise: NoiseSource) -> torch.Tensor:
        return self.schedule.q_sample(clean, torch.full((clean.shape[0],), t), noise.like(clean))


class KarloPriorStage(_KarloStage):
    """`PriorTransformer`: image embeddings (de-normalised by clip_mean / clip_std) from text."""

    repaint = None

    def __init__(self, prior, text: Text, null: Text | None, cond_scale: float, batched: bool = True):
        self.prior, self.net, self.schedule = prior, prior.net, prior.noise_scheduler
        self.rows, self.device = text.embed.shape[0], text.embed.device
        self.cond_scale, self.batched = cond_scale, batched
        self.text, self.null = text, null.rows(self.rows) if null is not None else None
        if cond_scale != 1 and self.null is None:
            raise ValueError("a guided Karlo prior needs the null branch's text (the empty prompt)")
        self.both = text.after(self.null) if cond_scale != 1 else text

    def _run(self, x: torch.Tensor, t: int, text: Text) -> torch.Tensor:
        return self.net(
            x,
            timestep=_time(t, x.device),
            proj_embedding=text.embed.to(x.dtype),
            encoder_hidden_states=text.encodings.to(x.dtype),
            attention_mask=text.mask,
        ).predicted_image_embedding

    def start(self, noise: NoiseSource) -> torch.Tensor:
        return noise.draw((self.rows, self.prior.image_embed_dim), self.device)

    def predict(self, x: torch.Tensor, t: int, previous: Prediction | None) -> Prediction:
        if self.cond_scale == 1:
            output = self._run(x, t, self.text)
        elif self.batched:
            output = _blend(*self._run(torch.cat([x] * 2), t, self.both).chunk(2), self.cond_scale)
        else:
            null, cond = self._run(x, t, self.null), self._run(x, t, self.text)
            output = _blend(null, cond, self.cond_scale)
        return Prediction(self.schedule.clean(x, t, output))

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.post_process_latents(x)


def _split(output: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(noise, learned variance or None) of a unet's output."""
    if output.shape[1] == 2 * channels:
        noise, variance = output.split(channels, dim=1)
        return noise, variance
    return output, None


def _repaint(inpaint, size: int) -> RePaint | None:
    """RePaint in Karlo's sample space ([-1, 1])."""
    return inpaint.at(size, lambda image: image * 2 - 1) if inpaint is not None else None


class KarloDecoderStage(_KarloStage):
    """The 64 px `UNet2DConditionModel`, conditioned through the text projection."""

    def __init__(
        self,
        decoder,
        image_embed: torch.Tensor,
        text: Text,
        null: Text | None,
        cond_scale: float,
        inpaint=None,
        batched: bool = True,
    ):
        self.unet, self.schedule = decoder.decoder, decoder.noise_schedulers[0]
        self.size, self.channels = decoder.image_sizes[0], decoder.decoder.config.in_channels
        self.rows, self.device = image_embed.shape[0], image_embed.device
        self.cond_scale, self.batched = cond_scale, batched
        self.repaint = _repaint(inpaint, self.size)
        guided = cond_scale != 1
        if guided and null is None:
            raise ValueError("a guided Karlo decoder needs the null branch's text (the empty prompt)")
        if guided:
            text = text.after(null.rows(self.rows))
            image_embed = torch.cat((decoder.text_proj.null_image_embeds(self.rows).to(image_embed.dtype), image_embed))
        dtype = compute_dtype(decoder.text_proj)
        context, self.time_added = decoder.text_proj(
            image_embed.to(dtype), text.embed.to(dtype), text.encodings.to(dtype)
        )
        self.context = context
        self.mask = F.pad(text.mask, (decoder.text_proj.extra_tokens, 0), value=True)

    def _run(self, x: torch.Tensor, t: int, rows: slice) -> torch.Tensor:
        return self.unet(
            sample=x,
            timestep=_time(t, x.device),
            encoder_hidden_states=self.context[rows].to(x.dtype),
            class_labels=self.time_added[rows].to(x.dtype),
            attention_mask=self.mask[rows],
        ).sample

    def start(self, noise: NoiseSource) -> torch.Tensor:
        return noise.draw((self.rows, self.channels, self.size, self.size), self.device)

    def predict(self, x: torch.Tensor, t: int, previous: Prediction | None) -> Prediction:
        every = slice(None)
        if self.cond_scale == 1:
            noise, variance = _split(self._run(x, t, every), self.channels)
        else:
            if self.batched:
                null, cond = self._run(torch.cat([x] * 2), t, every).chunk(2)
            else:
                null = self._run(x, t, slice(0, self.rows))
                cond = self._run(x, t, slice(self.rows, None))
            null_noise, _ = _split(null, self.channels)
            cond_noise, variance = _split(cond, self.channels)
            noise = _blend(null_noise, cond_noise, self.cond_scale)
        return Prediction(self.schedule.clean(x, t, noise), variance)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The 64 px images in [-1, 1], as the super-resolution takes them (a round trip
        through [0, 1] would round them, and its first steps magnify any difference)."""
        return x.clamp(-1, 1)


class KarloSuperResStage(_KarloStage):
    """64 -> 256 px: the decoder's images (in [-1, 1]) upscaled (bicubic, antialiased) and concatenated to
    the sample; `super_res_first` at every step but the last, `super_res_last` at the last."""

    def __init__(self, decoder, lowres_image: torch.Tensor, final_timestep: int, inpaint=None):
        self.first, self.last = decoder.super_res_first, decoder.super_res_last
        self.schedule, self.size = decoder.noise_schedulers[1], decoder.image_sizes[1]
        self.channels = self.first.config.in_channels // 2
        self.final_timestep = final_timestep
        self.repaint = _repaint(inpaint, self.size)
        self.upscaled = F.interpolate(
            lowres_image, size=[self.size] * 2, mode="bicubic", align_corners=False, antialias=True
        )

    def start(self, noise: NoiseSource) -> torch.Tensor:
        return noise.draw((self.upscaled.shape[0], self.channels, self.size, self.size), self.upscaled.device)

    def predict(self, x: torch.Tensor, t: int, previous: Prediction | None) -> Prediction:
        unet = self.last if t == self.final_timestep else self.first
        output = unet(sample=torch.cat([x, self.upscaled.to(x.dtype)], dim=1), timestep=_time(t, x.device)).sample
        noise, variance = _split(output, self.channels)
        learned = variance if self.schedule.variance_type == "learned_range" else None
        return Prediction(self.schedule.clean(x, t, noise), learned)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 0.5 + 0.5).clamp(0, 1)
