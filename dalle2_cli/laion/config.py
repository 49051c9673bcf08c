"""dalle2-laion's config classes: dalle2-cli's, which read its JSON files unchanged."""

from dalle2_cli.config import (
    ClipConfig,
    DecoderLoadConfig,
    File,
    ModelLoadConfig,
    PriorLoadConfig,
    SingleDecoderLoadConfig,
)

__all__ = [
    "ClipConfig",
    "DecoderLoadConfig",
    "File",
    "ModelLoadConfig",
    "PriorLoadConfig",
    "SingleDecoderLoadConfig",
]
