"""What a generating script hands back: an image, with the seed, prompt and settings that
made it (which its PNG records)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image


def seed_asked(settings: dict[str, Any], own_seed: int) -> int:
    """The seed asked for an image whose settings (or PNG metadata) are `settings`: for a
    reranked image, the seed its candidates were drawn from; else its own."""
    return settings.get("rerank", {}).get("image_seed", own_seed)


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int  # this image's own: a run with this seed and one image makes it again
    index: int  # which of the images made from the same input
    prompt: str | None = None
    source: str | None = None  # the input image, for variations and inpainting
    settings: dict[str, Any] = field(default_factory=dict)
    # What made it: the command, the config, the model files and their sha256, the tool.
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def asked_seed(self) -> int:
        """The seed asked for this image: its own, or for a reranked image the seed its
        candidates were drawn from (given again, it makes this image again)."""
        return seed_asked(self.settings, self.seed)

    def metadata(self) -> dict[str, Any]:
        """Everything a PNG of this image records (see `dalle2 info`)."""
        own = {"prompt": self.prompt, "seed": self.seed, "index": self.index, "source": self.source}
        return {**own, **self.settings, **self.provenance}

    def save(self, path: str | Path) -> Path:
        """Write the image as a PNG with `metadata()` in it, whole or not at all."""
        from dalle2_cli.io.output import save_png

        path = Path(path)
        save_png(self.image, path, self.metadata())
        return path
