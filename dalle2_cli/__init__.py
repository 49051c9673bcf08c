"""dalle2-cli: DALL·E 2 inference on DALLE2-pytorch checkpoints.

The heavy classes are imported on first use, so `import dalle2_cli` (and `dalle2 --help`)
stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ModelLoadConfig": "dalle2_cli.config",
    "File": "dalle2_cli.config",
    "load_config": "dalle2_cli.config",
    "DalleModelManager": "dalle2_cli.loading.manager",
    "InferenceScript": "dalle2_cli.sampling.script",
    "GeneratedImage": "dalle2_cli.sampling.generated",
    "SamplingSettings": "dalle2_cli.sampling.settings",
    "TextToImage": "dalle2_cli.sampling.pipelines",
    "ImageVariation": "dalle2_cli.sampling.pipelines",
    "Inpainting": "dalle2_cli.sampling.pipelines",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dalle2_cli' has no attribute {name!r}")
