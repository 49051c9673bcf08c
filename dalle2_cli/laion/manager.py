"""dalle2-laion's `DalleModelManager`: dalle2-cli's manager, with the attributes dalle2-laion's
scripts read (`model_config`, `decoder_info`, `prior_info`, `devices`, ...) and its eager
loading: the models named in the config are loaded when the manager is made."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from dalle2_pytorch.version import __version__ as DALLE2_VERSION
from packaging import version

from dalle2_cli.config import ModelLoadConfig
from dalle2_cli.loading.manager import DalleModelManager as _Manager
from dalle2_cli.sources.resolve import resolve_file


@dataclass
class DataRequirements:
    """What a model needs as input; `can_generate_embedding` when a CLIP can make the
    embeddings from images or text."""

    image_embedding: bool
    text_encoding: bool
    image: bool
    text: bool
    can_generate_embedding: bool
    image_size: Any

    def has_clip(self) -> None:
        self.can_generate_embedding = True

    def is_valid(
        self,
        has_image_emb: bool = False,
        has_text_encoding: bool = False,
        has_image: bool = False,
        has_text: bool = False,
        image_size: int | None = None,
    ) -> tuple[bool, list[str]]:
        """(whether these inputs are enough, what is missing)."""
        big_enough = image_size is not None and isinstance(self.image_size, int) and image_size >= self.image_size
        missing = []
        if self.text_encoding and not (has_text_encoding or (self.can_generate_embedding and has_text)):
            missing.append("Text encoding is required, but no text encoding or text was provided")
        if self.text and not has_text:
            missing.append("Text is required, but no text was provided")
        if self.image_embedding and not (has_image_emb or (self.can_generate_embedding and has_image and big_enough)):
            missing.append("Image embedding is required, but no image embedding or large enough image was provided")
        if self.image and not (has_image and big_enough):
            missing.append("Image is required, but no large enough image was provided")
        return not missing, missing


@dataclass
class ModelInfo:
    model: Any
    model_version: version.Version | None
    requires_clip: bool
    data_requirements: DataRequirements


class DalleModelManager(_Manager):
    def __init__(self, model_load_config: ModelLoadConfig, check_updates: bool = True):
        """Download (when not cached, or changed and `check_updates`) and load the models."""
        super().__init__(
            model_load_config, resolve=functools.partial(resolve_file, check_updates=check_updates, quiet=True)
        )
        self.check_updates = check_updates
        self.model_config = model_load_config
        self.current_version = version.parse(DALLE2_VERSION)
        self.devices = [self.device]
        self.load_device = torch.device(self.map_location)
        self.strict_loading = self.strict
        has_clip = model_load_config.clip is not None
        self.decoder_info: ModelInfo | None = None
        self.prior_info: ModelInfo | None = None
        if model_load_config.decoder is not None:
            decoder = self.decoder
            needs = DataRequirements(
                image_embedding=True,
                text_encoding=bool(decoder.condition_on_text_encodings),
                image=False,
                text=False,
                can_generate_embedding=has_clip,
                image_size=decoder.image_sizes[0],
            )
            self.decoder_info = ModelInfo(decoder, self._version_of("decoder"), has_clip, needs)
        if model_load_config.prior is not None:
            needs = DataRequirements(False, True, False, False, has_clip, [-1, -1])
            self.prior_info = ModelInfo(self.prior, self._version_of("prior"), has_clip, needs)

    def _version_of(self, stage: str) -> version.Version | None:
        found = [v for role, v in self.versions.items() if role.startswith(stage) and v]
        return version.parse(found[0]) if found else None
