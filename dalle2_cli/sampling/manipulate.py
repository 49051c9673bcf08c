"""The DALL·E 2 paper's own manipulations of CLIP image embeddings, usable from Python.

    manager = DalleModelManager(load_config("shapes"))
    frames = Interpolation(manager, SamplingSettings(seed=1)).run(first, second, frames=8)
    frames = TextDiff(manager).run(image, "a red circle", "a blue circle", frames=6)
    save_animation([f.image for f in frames], Path("out.gif"))

Interpolation and text diffs (Ramesh et al. 2022, "Hierarchical Text-Conditional Image
Generation with CLIP Latents", section 3) decode every frame with the same seed: the decoder's
noise is then the same for all of them (dalle2_cli.sampling.noise), so the frames differ only where
their embeddings do. Reranking is `TextToImage.run`'s `candidates`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from dalle2_cli.errors import InputError
from dalle2_cli.io.prompts import Prompt
from dalle2_cli.sampling.generated import GeneratedImage
from dalle2_cli.sampling.pipelines import TextToImage, candidate_seed, rerank_summary
from dalle2_cli.sampling.script import InferenceScript
from dalle2_cli.sampling.settings import check_frames, check_text_diff

__all__ = [
    "Interpolation",
    "RerankedTextToImage",
    "TextDiff",
    "candidate_seed",
    "rerank_summary",
    "slerp",
]

DEFAULT_MAX_ANGLE = 0.5  # the paper: "a maximum value that is typically in [0.25, 0.50]"
_PARALLEL = 1e-7  # below this sin(angle), the great circle is numerically a straight line


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from unit vector `a` (t = 0) to unit vector `b` (t = 1), along the
    last dimension: the point at fraction `t` of the angle between them, itself of unit norm.

    The endpoints come back exactly (bit for bit), so frame 0 decodes the input embedding itself."""
    if a.shape != b.shape:
        raise ValueError(f"slerp needs two vectors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    # float64 for the weights, so that sin(angle)/sin(angle) is exactly 1 at the endpoints and
    # nearly parallel vectors keep their precision.
    x, y = a.double(), b.double()
    cos = (x * y).sum(-1, keepdim=True) / (x.norm(dim=-1, keepdim=True) * y.norm(dim=-1, keepdim=True))
    angle = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(angle)
    parallel = sin < _PARALLEL
    if bool((parallel & (cos < 0)).any()):
        raise ValueError("slerp between opposite vectors: no unique great circle joins them")
    # (Nearly) the same direction: the arc is a straight line, and the formula would divide by 0.
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    weight_a = torch.where(parallel, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * angle) / safe)
    weight_b = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * angle) / safe)
    return (weight_a * x + weight_b * y).to(a.dtype)


def _decode_frames(
    script: InferenceScript,
    embeds: list[torch.Tensor],
    text: str | None,
    source: str | None,
    extra: list[dict],
) -> list[GeneratedImage]:
    """Decode every embedding with the script's seed (the same noise for every frame); frame k
    is a record with index k and its own place on the path (`extra[k]`)."""
    text = script._text_for_decoder(text)
    seeds = [script.seed] * len(embeds)
    made: dict[int, GeneratedImage] = {}

    def finished(batch: list[tuple[int, int, Image.Image]]) -> None:
        for k, _, image in batch:
            made[k] = script._made(image, script.seed, k, text, source, extra[k])

    script._sample_decoder(
        image_embed=embeds, text=text, batch_size=script.settings.batch_size, seeds=seeds, on_batch=finished
    )
    return [made[k] for k in range(len(embeds))]


class Interpolation(InferenceScript):
    """Frames along the great circle between two images' CLIP image embeddings."""

    command = "interpolate"

    def run(
        self,
        first: Image.Image,
        second: Image.Image,
        frames: int = 8,
        text: str | None = None,
        sources: Sequence[str | None] = (None, None),
    ) -> list[GeneratedImage]:
        """`frames` images, frame 0 decoding `first`'s embedding and the last `second`'s, all with
        the script's seed. `text` conditions decoders that take text (as for variations)."""
        check_frames(frames)
        self._start(uses_prior=False, uses_image_tower=True)
        embeds = self.embeddings(first, second, frames)
        angle = float(torch.arccos(torch.dot(embeds[0].double(), embeds[-1].double()).clamp(-1, 1)))
        names = [None if s is None else str(s) for s in sources]
        extra = [
            {"interpolate": {"from": names[0], "to": names[1], "t": t, "angle": angle}} for t in _fractions(1.0, frames)
        ]
        return _decode_frames(self, embeds, text, None, extra)

    def embeddings(self, first: Image.Image, second: Image.Image, frames: int) -> list[torch.Tensor]:
        """The frames' CLIP image embeddings: `first`'s, `frames` - 2 between, `second`'s."""
        check_frames(frames)
        # One image per CLIP call: the embedding of `first` is then exactly the one a variation
        # of it decodes (a batch of two could round differently).
        start, end = (self._embed_images([image])[0] for image in (first, second))
        return [slerp(start, end, t) for t in _fractions(1.0, frames)]


def _fractions(last: float, frames: int) -> list[float]:
    """`frames` evenly spaced values from exactly 0 to exactly `last`."""
    return [float(t) for t in np.linspace(0.0, last, frames)]


class TextDiff(InferenceScript):
    """The paper's text diff: rotate an image's embedding toward the normalized difference of
    two captions' text embeddings, z_d = normalize(z_t(to) - z_t(from)).

    Frame k is slerp(z_i, z_d, θ_k) with θ rising linearly from 0 to `max_angle`: θ is the
    fraction of the angle between the image embedding and z_d (1 would decode z_d itself;
    the paper stays within 0.25-0.5)."""

    command = "textdiff"

    def run(
        self,
        image: Image.Image,
        source_text: str,
        target_text: str,
        frames: int = 6,
        max_angle: float = DEFAULT_MAX_ANGLE,
        text: str | None = None,
        source: str | None = None,
    ) -> list[GeneratedImage]:
        """`frames` images, frame 0 decoding `image`'s own embedding (θ = 0), all with the
        script's seed. `text` conditions decoders that take text (as for variations)."""
        check_text_diff(frames, max_angle, source_text, target_text)
        self._start(uses_prior=False, uses_image_tower=True)
        embeds = self.embeddings(image, source_text, target_text, frames, max_angle)
        extra = [
            {"textdiff": {"from": source_text, "to": target_text, "theta": theta}}
            for theta in _fractions(max_angle, frames)
        ]
        return _decode_frames(self, embeds, text, source, extra)

    def embeddings(
        self, image: Image.Image, source_text: str, target_text: str, frames: int, max_angle: float
    ) -> list[torch.Tensor]:
        """The frames' CLIP image embeddings, slerp(z_i, z_d, θ) for θ from 0 to `max_angle`."""
        check_text_diff(frames, max_angle, source_text, target_text)
        image_embed = self._embed_images([image])[0]
        diff = self.text_diff(source_text, target_text)
        return [slerp(image_embed, diff, theta) for theta in _fractions(max_angle, frames)]

    @torch.inference_mode()
    def text_diff(self, source_text: str, target_text: str) -> torch.Tensor:
        """normalize(text_embed(target) - text_embed(source)), CLIP's text embeddings being unit."""
        embeds, _ = self._embed_text(self._tokens([source_text, target_text]))
        difference = embeds[1] - embeds[0]
        norm = difference.norm()
        if norm < 1e-6:
            raise InputError("the two captions have the same CLIP text embedding: there is no direction to move in")
        return difference / norm


class RerankedTextToImage(TextToImage):
    """Text to image that reranks whatever the config's default: `candidates` defaults to 2.
    (`TextToImage.run(..., candidates=K)` does the same.)"""

    def run(
        self, prompts: Sequence[str | Prompt], num_images: int = 1, candidates: int | None = 2
    ) -> list[GeneratedImage]:
        return super().run(prompts, num_images, candidates)
