"""dalle2-laion's `InferenceScript` base class on dalle2-cli's sampling: `_sample_prior` and
`_sample_decoder` take dalle2-laion's arguments and return what it returned. Masks keep
dalle2-laion's convention: True marks the pixels to KEEP."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from dalle2_cli.io.images import fit_square, to_pil, to_tensor
from dalle2_cli.laion.config import ModelLoadConfig
from dalle2_cli.laion.manager import DalleModelManager
from dalle2_cli.loading.clip import tokenize
from dalle2_cli.sampling.script import InferenceScript as _Script

ScriptType = TypeVar("ScriptType", bound="InferenceScript")
PRIOR_ARGUMENTS = ("cond_scale", "sample_count", "batch_size", "num_samples_per_batch")
DECODER_ARGUMENTS = (
    "images",
    "image_embed",
    "text",
    "text_encoding",
    "inpaint_images",
    "inpaint_image_masks",
    "cond_scale",
    "sample_count",
    "batch_size",
)


class InferenceScript(_Script):
    def __init__(self, model_manager: DalleModelManager, verbose: bool = False):
        super().__init__(model_manager)
        self.model_manager = model_manager
        self.verbose = verbose

    @classmethod
    def create(
        cls: type[ScriptType],
        config: str | Path | ModelLoadConfig,
        *args: Any,
        verbose: bool = False,
        check_updates: bool = True,
        **kwargs: Any,
    ) -> ScriptType:
        """The script with its own manager, made from a config (or the path of one)."""
        if not isinstance(config, ModelLoadConfig):
            config = ModelLoadConfig.from_json_path(config)
        return cls(DalleModelManager(config, check_updates=check_updates), *args, verbose=verbose, **kwargs)

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.verbose:
            print(*args, **kwargs)

    def _fresh_seeds(self, count: int) -> list[int]:
        # dalle2-laion drew new noise for every sample: so does each call here.
        start = random.randrange(2**31)
        return [start + k for k in range(count)]

    def _sample_prior(
        self, text_or_tokens: Sequence[str] | str | torch.Tensor, *args: Any, **options: Any
    ) -> dict[int, list[torch.Tensor]]:
        """As dalle2-laion's, with its arguments in its order (`PRIOR_ARGUMENTS`); a lone text
        is one prompt."""
        options.update(zip(PRIOR_ARGUMENTS, args, strict=False))
        if isinstance(text_or_tokens, str):
            text_or_tokens = [text_or_tokens]
        inputs = text_or_tokens.shape[0] if isinstance(text_or_tokens, torch.Tensor) else len(text_or_tokens)
        options.setdefault("seeds", self._fresh_seeds(inputs * options.get("sample_count", 1)))
        scale = options.get("cond_scale")
        self.print(f"Sampling prior with cond_scale: {scale if scale is not None else 'the default'}")
        return super()._sample_prior(text_or_tokens, **options)

    def _sample_decoder(self, *args: Any, **options: Any) -> dict[int, list[Image.Image]]:
        """As dalle2-laion's, with its arguments in its order (`DECODER_ARGUMENTS`):
        `inpaint_image_masks` are True where the image is KEPT, and one inpaint image may
        serve every embedding."""
        options.update(zip(DECODER_ARGUMENTS, args, strict=False))
        images, inpaint_images = options.get("images"), options.get("inpaint_images")
        inpaint_image_masks = options.get("inpaint_image_masks")
        inputs = len(images) if images is not None else _count(options.get("image_embed"))
        if inpaint_images is not None:
            if inpaint_image_masks is None or len(inpaint_image_masks) != len(inpaint_images):
                raise ValueError("give one mask per inpaint image")
            regenerate = [~_as_bool_array(mask) for mask in inpaint_image_masks]
            if len(inpaint_images) == 1 and inputs > 1:
                inpaint_images, regenerate = list(inpaint_images) * inputs, regenerate * inputs
            options.update(inpaint_images=inpaint_images, inpaint_image_masks=regenerate)
        options.setdefault("seeds", self._fresh_seeds(inputs * options.get("sample_count", 1)))
        scale = options.get("cond_scale")
        self.print(f"Sampling decoder with cond_scale: {scale if scale is not None else 'the defaults'}")
        return super()._sample_decoder(**options)

    def _decode_embeddings(
        self,
        texts: list[str],
        embeddings: dict[int, list[torch.Tensor]],
        inpaint: tuple[list[Image.Image], list[Any]] | None = None,
        **options: Any,
    ) -> list[tuple[int, list[Image.Image]]]:
        """Every embedding of each text through the decoder, with its text (and its text's
        inpaint image and mask): [(text number, images)], embedding by embedding."""
        flat = [(i, embedding) for i in range(len(texts)) for embedding in embeddings[i]]
        self.print(f"Grouped {len(texts)} texts into {len(flat)} embeddings; sampling the decoder...")
        if inpaint is not None:
            options["inpaint_images"] = [inpaint[0][i] for i, _ in flat]
            options["inpaint_image_masks"] = [inpaint[1][i] for i, _ in flat]
        images = self._sample_decoder(
            text=[texts[i] for i, _ in flat], image_embed=[embedding for _, embedding in flat], **options
        )
        return [(i, images[number]) for number, (i, _) in enumerate(flat)]

    # -- dalle2-laion's helpers --------------------------------------------------------------

    def _encode_text(self, text: Sequence[str]) -> torch.Tensor:
        """CLIP's per-token text encodings."""
        return self._text_encodings(list(text))

    def _tokenize_text(self, text: Sequence[str]) -> torch.Tensor:
        return tokenize(self.models.clip, list(text))

    def _pil_to_torch(self, image: Image.Image | Sequence[Image.Image], resize_for_clip: bool = True) -> torch.Tensor:
        """[3, H, W] for one image, [N, 3, H, W] for a list; resized to CLIP's size (and made
        square) with `resize_for_clip`."""

        def one(picture: Image.Image) -> torch.Tensor:
            if resize_for_clip:
                picture = fit_square(picture.convert("RGB"), self.models.clip.image_size, self.settings.pad)
            return to_tensor(picture)

        if isinstance(image, Image.Image):
            return one(image)
        return torch.stack([one(picture) for picture in image])

    def _torch_to_pil(self, image: torch.Tensor) -> Image.Image | list[Image.Image]:
        if image.ndim == 4:
            return [to_pil(picture) for picture in image]
        return to_pil(image)

    def _repeat_tensor_and_batch(
        self, tensor: torch.Tensor | Sequence[torch.Tensor], repeat_num: int, batch_size: int
    ) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Each row repeated `repeat_num` times, cut into batches; and for each batch, the index
        of the row each of its rows came from."""
        rows = tensor if isinstance(tensor, torch.Tensor) else torch.stack(list(tensor))
        repeated = rows.repeat_interleave(repeat_num, dim=0)
        origins = torch.arange(rows.shape[0]).repeat_interleave(repeat_num)
        return list(repeated.split(batch_size)), [chunk.tolist() for chunk in origins.split(batch_size)]

    @contextlib.contextmanager
    def _clip_in_gpu(self) -> Iterator[Any]:
        with self.models.using(self.models.clip):
            yield self.models.clip

    @contextlib.contextmanager
    def _prior_in_gpu(self) -> Iterator[Any]:
        with self.models.using(self.models.prior):
            yield self.models.prior

    @contextlib.contextmanager
    def _decoder_in_gpu(self) -> Iterator[Any]:
        with self.models.using(self.models.decoder):
            yield self.models.decoder

    _clip_in_prior = _prior_in_gpu
    _clip_in_decoder = _decoder_in_gpu


class CliInferenceScript(InferenceScript):
    """dalle2-laion left this unimplemented; the `dalle2` command is dalle2-cli's CLI."""

    def __init__(self, model_manager: DalleModelManager, verbose: bool = False):
        raise NotImplementedError("CliInferenceScript was never implemented in dalle2-laion: use the `dalle2` command")


def _count(embeds: Sequence[torch.Tensor] | torch.Tensor | None) -> int:
    if embeds is None:
        return 0
    if isinstance(embeds, torch.Tensor):
        return 1 if embeds.ndim == 1 else embeds.shape[0]
    return len(embeds)


def _as_bool_array(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask, dtype=bool)
