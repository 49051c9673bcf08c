"""dalle2-laion's helpers for its example scripts: finding images, prompts from file names,
masks from mask images (True where the red channel is over 128), center crops."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def is_image_file(file: Path) -> bool:
    return Path(file).suffix in IMAGE_SUFFIXES


def is_text_file(file: Path) -> bool:
    return Path(file).suffix == ".txt"


def is_json_file(file: Path) -> bool:
    return Path(file).suffix == ".json"


def get_images_in_dir(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory")
    return [path for path in directory.iterdir() if is_image_file(path)]


def get_images_from_paths(paths: list[Path]) -> list[Image.Image]:
    return [Image.open(path) for path in paths]


def get_prompt_from_filestem(filestem: str) -> str:
    """`a_red_circle` or `aRedCircle` -> `A red circle` / `A Red Circle`: words split at
    underscores and before capitals, the first letter capitalised."""
    words = re.sub(r"(?<!^)(?<! )([A-Z])", r" \1", filestem.replace("_", " "))
    return words[:1].upper() + words[1:]


def get_mask_from_image(image: Image.Image) -> torch.Tensor:
    """[height, width] booleans, True where the image's red channel is over 128 (dalle2-laion's
    callers pass this to its inpainting as the pixels to keep)."""
    red = np.asarray(image.convert("RGB"))[..., 0]
    return torch.from_numpy(red > 128)


def center_crop_to_square(image: Image.Image) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))
