"""dalle2-laion's variation script: CLIP image embeddings of images, decoded again."""

from __future__ import annotations

from PIL import Image

from dalle2_cli.laion.scripts.InferenceScript import InferenceScript


class ImageVariation(InferenceScript):
    def run(
        self,
        images: list[Image.Image],
        text: list[str] | None,
        cond_scale: float | list[float] | tuple[float, ...] | None = None,
        sample_count: int = 1,
        batch_size: int = 10,
    ) -> dict[int, list[Image.Image]]:
        """{image number: [sample_count variations]}; `text` (one per image) conditions
        decoders trained on text."""
        self.print("Running decoder...")
        return self._sample_decoder(
            images=images, text=text, cond_scale=cond_scale, sample_count=sample_count, batch_size=batch_size
        )
