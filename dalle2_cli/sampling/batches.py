"""The decoder's work cut into batches: which input each image comes from, its seed, its text
encodings and, for inpainting, what to keep."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from dalle2_cli.io.images import fit_mask, fit_square, to_tensor


@dataclass
class Batch:
    """One decoder batch: which input each image comes from, its seed and conditioning."""

    inputs: list[int]
    seeds: list[int]
    image_embed: torch.Tensor
    text_encodings: torch.Tensor | None = None
    text_embed: torch.Tensor | None = None
    keep_images: torch.Tensor | None = None
    keep_masks: torch.Tensor | None = None


class DecoderBatches:
    """The decoder's images cut into batches of `batch_size`, input by input, `sample_count`
    images of each; text encoded batch by batch, all before the decoder runs (no model swap
    per batch): a batch's pixels then depend on that batch alone, whatever else the run holds
    (GPU kernels may round by batch shape), which scale-out relies on."""

    def __init__(
        self,
        embeds: torch.Tensor,
        seeds: Sequence[int],
        text: Sequence[str] | str | None,
        text_encoding: Sequence[torch.Tensor] | torch.Tensor | None,
        sample_count: int,
        batch_size: int,
        encode_text: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None,
    ):
        """`seeds`: one per image, input by input. `encode_text`: CLIP's text embeddings and
        per-token encodings of texts, or None for a decoder not conditioned on text (then no
        text is encoded). Encodings given as `text_encoding` come without embeddings."""
        count = embeds.shape[0]
        self.embeds = embeds
        self.jobs = [index for index in range(count) for _ in range(sample_count)]
        self.seeds = list(seeds)
        self.batch_size = batch_size
        self.encodings: list[torch.Tensor | None] = [None] * len(self)
        self.text_embeds: list[torch.Tensor | None] = [None] * len(self)
        if encode_text is not None:
            if text_encoding is not None:
                given = stack_rows(text_encoding)
                given = given.expand(count, *given.shape[1:]) if given.shape[0] == 1 and count > 1 else given
                self.encodings = [given[chunk] for chunk in self._chunks()]
            else:
                texts = [text] * count if text is None or isinstance(text, str) else list(text)
                encoded = [encode_text([texts[i] or "" for i in chunk]) for chunk in self._chunks()]
                self.text_embeds = [embeds for embeds, _ in encoded]
                self.encodings = [encodings for _, encodings in encoded]
        self.keep_images = self.keep_masks = None

    def inpaint(self, images: Sequence[Image.Image] | None, masks: Sequence[Any] | None, size: int, pad: bool) -> None:
        """Keep these images (one per input) where the masks (True = regenerate) are False."""
        if images is None:
            return
        if masks is None or len(masks) != len(images):
            raise ValueError("give one mask per inpaint image")
        self.keep_images = torch.stack([to_tensor(fit_square(img, size, pad)) for img in images])
        regenerate = [fit_mask(as_mask_array(m), size, pad) for m in masks]
        self.keep_masks = torch.from_numpy(~np.stack(regenerate))  # dalle2-pytorch's convention: True = keep

    def _chunks(self) -> list[list[int]]:
        return [self.jobs[start : start + self.batch_size] for start in range(0, len(self.jobs), self.batch_size)]

    def __len__(self) -> int:
        return -(-len(self.jobs) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for number, chunk in enumerate(self._chunks()):
            start = number * self.batch_size
            seeds = self.seeds[start : start + len(chunk)]
            batch = Batch(chunk, seeds, self.embeds[chunk], self.encodings[number], self.text_embeds[number])
            if self.keep_images is not None:
                batch.keep_images, batch.keep_masks = self.keep_images[chunk], self.keep_masks[chunk]
            yield batch


def as_mask_array(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask, dtype=bool)


def stack_rows(tensors: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    if isinstance(tensors, torch.Tensor):
        return tensors if tensors.ndim >= 2 else tensors.unsqueeze(0)
    return torch.stack(list(tensors))
