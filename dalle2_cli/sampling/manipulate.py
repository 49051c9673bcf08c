"""The DALL·E 2 paper's own manipulations of CLIP image embeddings, usable from Python.

    manager = DalleModelManager(load_config("shapes"))
    frames = Interpolation(manager, SamplingSettings(seed=1)).run(first, second, frames=8)
    frames = TextDiff(manager).run(image, "a red circle", "a blue circle", frames=6)
    images = RerankedTextToImage(manager).run(["a red circle"], num_images=2, candidates=4)
    save_animation([f.image for f in frames], Path("out.gif"))

Interpolation and text diffs (Ramesh et al. 2022, "Hierarchical Text-Conditional Image
Generation with CLIP Latents", section 3) decode every frame with the same seed: the decoder's
noise is then the same for all of them (dalle2_cli.sampling.noise), so the frames differ only where
their embeddings do. Reranking draws several candidates per image and keeps the one whose
CLIP image embedding is closest to the prompt's text embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from dalle2_cli.errors import InputError, SettingError
from dalle2_cli.io.prompts import Prompt
from dalle2_cli.sampling.generated import GeneratedImage
from dalle2_cli.sampling.pipelines import TextToImage
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
        self._start(uses_prior=False)
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
        self._start(uses_prior=False)
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


MAX_CANDIDATES = 64


def candidate_seed(seed: int, candidate: int) -> int:
    """The seed of candidate `candidate` of an image whose seed is `seed`: the image's own seed
    for candidate 0 (so reranking 1 candidate changes nothing), otherwise a 31-bit hash of
    both (as short as a drawn seed, for file names), unlikely to be near seed + k of the
    neighbouring images."""
    if candidate == 0:
        return seed
    # SeedSequence takes non-negative entropy only; a negative seed maps to its 64-bit pattern.
    return int(np.random.SeedSequence([seed % 2**64, candidate]).generate_state(1, np.uint32)[0]) >> 1


class RerankedTextToImage(TextToImage):
    """Text to image, keeping the best of `candidates` images by CLIP image-text similarity."""

    command = "text2im"

    def run(self, prompts: Sequence[str | Prompt], num_images: int = 1, candidates: int = 2) -> list[GeneratedImage]:
        """As `TextToImage.run`; each image is the best-scoring of `candidates`, the first of
        which is the image plain text-to-image makes with the same seed. The kept image's
        `seed` is its own (a plain run with it and one image makes it again); its settings
        record `rerank`: every candidate's seed and score, which was kept, and its score."""
        if not isinstance(candidates, int) or not 1 <= candidates <= MAX_CANDIDATES:
            raise SettingError("candidates", f"must be from 1 to {MAX_CANDIDATES} per image, got {candidates!r}")
        # Candidate 0 is exactly the plain run (whatever seed each image gets there) ...
        with self._held():
            firsts = super().run(prompts, num_images)
        # ... and the others are lone images with seeds derived from it, so each is reproducible
        # alone and a batch of them equals them one by one (dalle2_cli.sampling.noise).
        others: list[GeneratedImage] = []
        if candidates > 1:
            requests = [
                Prompt(first.prompt or "", num_images=1, seed=candidate_seed(first.seed, j))
                for first in firsts
                for j in range(1, candidates)
            ]
            with self._held():
                others = super().run(requests)
        text_embeds = self._text_embeds([first.prompt or "" for first in firsts])
        kept = []
        for i, first in enumerate(firsts):
            group = [first, *others[i * (candidates - 1) : (i + 1) * (candidates - 1)]]
            scores = self._scores([g.image for g in group], text_embeds[first.prompt or ""])
            best = max(range(candidates), key=lambda j: scores[j])  # the first of equal ones
            rerank = {
                "candidates": candidates,
                "image_seed": first.seed,
                "kept": best,
                "score": scores[best],
                "scores": scores,
                "seeds": [g.seed for g in group],
            }
            chosen = group[best]
            kept.append(
                self._made(
                    chosen.image, chosen.seed, first.index, chosen.prompt, None, {**first.settings, "rerank": rerank}
                )
            )
        return kept

    @torch.inference_mode()
    def _text_embeds(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each distinct text's unit CLIP text embedding, from one CLIP call."""
        distinct = list(dict.fromkeys(texts))
        embeds, _ = self._embed_text(self._tokens(distinct))
        embeds = torch.nn.functional.normalize(embeds, dim=-1)
        return dict(zip(distinct, embeds, strict=True))

    @torch.inference_mode()
    def _scores(self, images: Sequence[Image.Image], text_embed: torch.Tensor) -> list[float]:
        # One image per CLIP call: a score does not depend on which images were scored with it.
        image_embeds = torch.cat([self._embed_images([image]) for image in images])
        image_embeds = torch.nn.functional.normalize(image_embeds, dim=-1)
        return [float(score) for score in image_embeds @ text_embed]


def rerank_summary(item: GeneratedImage) -> str | None:
    """One line about an image's candidates, or None if it was not reranked."""
    rerank = item.settings.get("rerank")
    if not rerank:
        return None
    scores = ", ".join(f"{score:.4f}" for score in rerank["scores"])
    return (
        f"rerank {item.prompt!r} image {item.index}: kept candidate {rerank['kept']} "
        f"(score {rerank['score']:.4f}, seed {item.seed}) of {rerank['candidates']}: {scores}"
    )
