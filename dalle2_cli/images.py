"""Reading input images and masks, and converting between PIL images and tensors."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dalle2_cli.errors import InputError

if TYPE_CHECKING:  # torch is imported where tensors are made, so that reading inputs stays fast
    import torch


def open_image(path: str | Path) -> Image.Image:
    """An RGB image from any file Pillow reads; EXIF rotation applied, transparency on white."""
    return flatten_to_rgb(_read(Path(path), "image"))


def _read(path: Path, what: str) -> Image.Image:
    """The image in `path`, upright (EXIF orientation applied), or a one-line InputError."""
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not an image")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise InputError(f"cannot read {what} {path} as an image: {error}") from None


def flatten_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((array * 255.0 / max(array.max(), 1)).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def center_square(image: Image.Image, size: int) -> Image.Image:
    """Center-crop to a square and resize to `size` pixels a side."""
    return ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)


def open_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """A boolean array, True where the image is to be regenerated.

    White marks the area to regenerate and black the area to keep (grey at 50 %); in a mask
    with transparent pixels, transparency alone decides, as in OpenAI's image edit API.
    """
    path = Path(path)
    mask = _read(path, "mask")
    if mask.size != size:
        raise InputError(
            f"mask {path} is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}: "
            "they must be the same size"
        )
    has_alpha = mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info)
    alpha = np.asarray(mask.convert("RGBA"))[..., 3] if has_alpha else None
    if alpha is not None and (alpha < 128).any():
        regenerate = alpha < 128
    else:
        regenerate = np.asarray(mask.convert("L")) >= 128
    if not regenerate.any():
        raise InputError(f"mask {path} marks nothing to regenerate: paint the area to change white")
    if regenerate.all():
        raise InputError(
            f"mask {path} marks the whole image to regenerate: keep some of it black (or use text2im / variation)"
        )
    return regenerate


def to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float in [0, 1]."""
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_pil(tensor: torch.Tensor) -> Image.Image:
    import torch

    array = (tensor.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), "RGB")


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Square crop and resize a boolean mask the same way `center_square` treats its image."""
    image = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    fitted = ImageOps.fit(image, (size, size), method=Image.Resampling.NEAREST)
    return np.asarray(fitted) >= 128
