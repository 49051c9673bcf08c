"""Writing generated images: PNG with the settings in its text chunks, atomically."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dalle2_cli.atomic import atomic_path

METADATA_KEY = "dalle2-cli"


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe version of a prompt."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:limit].rstrip("-") or "image"


def unique_path(directory: Path, stem: str, taken: set[Path]) -> Path:
    """`stem.png`, or `stem-2.png`, ... : never an existing file (or one named this run)."""
    candidate = directory / f"{stem}.png"
    counter = 2
    while candidate.exists() or candidate in taken:
        candidate = directory / f"{stem}-{counter}.png"
        counter += 1
    taken.add(candidate)
    return candidate


def save_png(image: Image.Image, path: Path, metadata: dict[str, Any]) -> None:
    """Written whole or not at all (see dalle2_cli.atomic)."""
    info = PngInfo()
    info.add_text(METADATA_KEY, json.dumps(metadata, sort_keys=True))
    if metadata.get("prompt"):
        info.add_text("prompt", str(metadata["prompt"]))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_metadata(path: Path) -> dict[str, Any] | None:
    with Image.open(path) as image:
        text = image.text.get(METADATA_KEY) if hasattr(image, "text") else None
    return json.loads(text) if text else None
