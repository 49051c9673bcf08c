"""dalle2-laion's inpainting script: images, masks (True = keep) and a text per image."""

from __future__ import annotations

import torch
from PIL import Image

from dalle2_cli.laion.scripts.InferenceScript import InferenceScript


class BasicInpainting(InferenceScript):
    def run(
        self,
        images: list[Image.Image],
        masks: list[torch.Tensor],
        text: str | list[str],
        prior_cond_scale: float | None = None,
        decoder_cond_scale: float | list[float] | tuple[float, ...] | None = None,
        sample_count: int = 1,
        prior_batch_size: int = 100,
        decoder_batch_size: int = 10,
    ) -> dict[int, list[Image.Image]]:
        """{image number: [sample_count images]}: image i filled following text i (a single
        text serves every image), where its mask is False."""
        texts = [text] if isinstance(text, str) else list(text)
        if len(texts) == 1 and len(images) > 1:
            texts = texts * len(images)
        if len(texts) != len(images) or len(masks) != len(images):
            raise ValueError(f"give one text and one mask per image: {len(images)} images, {len(texts)} texts")
        embeddings = self._sample_prior(
            texts, cond_scale=prior_cond_scale, sample_count=sample_count, batch_size=prior_batch_size
        )
        decoded = self._decode_embeddings(
            texts, embeddings, (images, masks), cond_scale=decoder_cond_scale, batch_size=decoder_batch_size
        )
        result: dict[int, list[Image.Image]] = {i: [] for i in range(len(images))}
        for i, filled in decoded:
            result[i].extend(filled)
        return result
