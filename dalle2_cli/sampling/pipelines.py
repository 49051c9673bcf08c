"""The generating scripts: text to image, image variation and inpainting, usable from Python.

manager = DalleModelManager(load_config("my-config"))
images = TextToImage(manager).run(["a red circle"], num_images=2)
images[0].save("circle.png")   # with its prompt, seed and settings in the PNG
best = TextToImage(manager).run(["a red circle"], candidates=4)   # each the best of 4 by CLIP
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from dalle2_cli.errors import InputError
from dalle2_cli.io.images import padded_size
from dalle2_cli.io.prompts import Prompt
from dalle2_cli.sampling.generated import GeneratedImage
from dalle2_cli.sampling.script import InferenceScript
from dalle2_cli.sampling.settings import check_candidates, check_count, check_total


class TextToImage(InferenceScript):
    """Prompts -> prior -> decoder; with reranking, each image the best of several by CLIP."""

    command = "text2im"

    def run(
        self, prompts: Sequence[str | Prompt], num_images: int = 1, candidates: int | None = None
    ) -> list[GeneratedImage]:
        """`num_images` per prompt, image k with the seed + k; a `Prompt` may set its own.

        `candidates` > 1 reranks, as DALL·E 2 does: each image is the best of that many by
        CLIP image-text similarity, the first candidate being the image a plain run makes
        with the same seed. The kept image's `seed` is its own (a plain run with it makes it
        again); its settings record `rerank`: every candidate's seed and score, which was
        kept, and its score. None takes the config's `default_rerank` (1 when it has none)."""
        wanted = self.candidates(candidates)
        return self._draw(prompts, num_images) if wanted == 1 else self._reranked(prompts, num_images, wanted)

    def candidates(self, asked: int | None = None) -> int:
        """Images drawn for each one kept: `asked`, else the config's default (1: no reranking)."""
        return self.models.rerank_default() if asked is None else check_candidates(asked)

    def _draw(self, prompts: Sequence[str | Prompt], num_images: int) -> list[GeneratedImage]:
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

    def _reranked(self, prompts: Sequence[str | Prompt], num_images: int, candidates: int) -> list[GeneratedImage]:
        self.models.require_image_tower()  # before drawing any candidate
        # Candidate 0 is exactly the plain run (whatever seed each image gets there) ...
        with self._held():
            firsts = self._draw(prompts, num_images)
        # ... and the others are lone images with seeds derived from it, so each is reproducible
        # alone and a batch of them equals them one by one (dalle2_cli.sampling.noise).
        requests = [
            Prompt(first.prompt or "", num_images=1, seed=candidate_seed(first.seed, j))
            for first in firsts
            for j in range(1, candidates)
        ]
        with self._held():
            others = self._draw(requests, 1)
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


def candidate_seed(seed: int, candidate: int) -> int:
    """The seed of candidate `candidate` of an image whose seed is `seed`: the image's own seed
    for candidate 0 (the image a plain run makes), otherwise a 31-bit hash of
    both (as short as a drawn seed, for file names), unlikely to be near seed + k of the
    neighbouring images."""
    if candidate == 0:
        return seed
    # SeedSequence takes non-negative entropy only; a negative seed maps to its 64-bit pattern.
    return int(np.random.SeedSequence([seed % 2**64, candidate]).generate_state(1, np.uint32)[0]) >> 1


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


class ImageVariation(InferenceScript):
    """Images -> CLIP image embeddings -> decoder: new images with the same content."""

    command = "variation"

    def run(
        self,
        images: Sequence[Image.Image],
        num_images: int = 1,
        text: str | None = None,
        sources: Sequence[str | None] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[GeneratedImage]:
        """`num_images` of each image, image k with the seed + k; `seeds` gives each input
        image a seed of its own instead (a server batches requests so)."""
        check_count(num_images)
        if not images:
            raise InputError("give at least one image to make variations of")
        check_total(num_images * len(images))
        bases = [self.seed] * len(images) if seeds is None else list(seeds)
        if len(bases) != len(images):
            raise ValueError(f"give one seed per image: {len(images)}, not {len(bases)}")
        self._start(uses_prior=False, uses_image_tower=True)
        text = self._text_for_decoder(text)
        names = list(sources or [None] * len(images))
        made: dict[tuple[int, int], GeneratedImage] = {}

        def finished(batch: list[tuple[int, int, Image.Image]]) -> None:
            for i, k, image in batch:
                made[i, k] = self._made(image, bases[i] + k, k, text, names[i], {"pad": self.settings.pad})

        self._sample_decoder(
            images=list(images),
            text=text,
            sample_count=num_images,
            batch_size=self.settings.batch_size,
            seeds=[base + k for base in bases for k in range(num_images)],
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
        self._start(uses_prior=prompt is not None, uses_image_tower=prompt is None)
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
        record = {"mask": mask_source, "mask_grow": mask_grow, "pad": s.pad, "resample": s.inpaint_resample_times}
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
    width, height = padded_size(image_size, size)
    left, top = round((size - width) / 2), round((size - height) / 2)
    return left, top, left + width, top + height
