"""dalle2-laion's text-to-image script: text in, images out."""

from __future__ import annotations

from PIL import Image

from dalle2_cli.laion.scripts.InferenceScript import InferenceScript


class BasicInference(InferenceScript):
    def run(
        self,
        text: str | list[str],
        prior_cond_scale: float | None = None,
        decoder_cond_scale: float | list[float] | tuple[float, ...] | None = None,
        prior_sample_count: int = 1,
        decoder_sample_count: int = 1,
        prior_batch_size: int = 100,
        decoder_batch_size: int = 10,
        prior_num_samples_per_batch: int = 2,
    ) -> dict[str, dict[int, list[Image.Image]]]:
        """{prompt: {embedding number: [images]}}: `prior_sample_count` embeddings per prompt,
        numbered across all prompts, and `decoder_sample_count` images of each."""
        texts = [text] if isinstance(text, str) else list(text)
        self.print(f"Generating images for texts: {texts}")
        embeddings = self._sample_prior(
            texts,
            cond_scale=prior_cond_scale,
            sample_count=prior_sample_count,
            batch_size=prior_batch_size,
            num_samples_per_batch=prior_num_samples_per_batch,
        )
        decoded = self._decode_embeddings(
            texts,
            embeddings,
            cond_scale=decoder_cond_scale,
            sample_count=decoder_sample_count,
            batch_size=decoder_batch_size,
        )
        result: dict[str, dict[int, list[Image.Image]]] = {}
        for number, (i, images) in enumerate(decoded):
            result.setdefault(texts[i], {})[number] = images
        return result
