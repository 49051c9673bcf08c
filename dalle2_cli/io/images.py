"""Reading input images and masks, and converting between PIL images and tensors.

Everything here that reads a file raises a one-line `InputError` for a file that is missing,
not an image, damaged, too large or unusable as a mask, so that the CLI can refuse bad inputs
before it imports torch or loads a model.

Non-square inputs are made square the way the decoder needs them: center-cropped (the
default), or with `pad=True` shrunk whole onto a white square. White, because transparent
areas become white too (see `flatten_to_rgb`), so a padded image looks like a transparent one.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dalle2_cli.errors import InputError, SettingError, literal

if TYPE_CHECKING:  # torch is imported where tensors are made, so that reading inputs stays fast
    import torch

# Pillow's own decompression-bomb threshold (about 89 megapixels, a 9459x9459 image): above
# it a small file can expand into gigabytes of memory. Camera photos (up to ~64 MP) pass.
MAX_PIXELS = 89_478_485

PAD_COLOR = (255, 255, 255)

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def open_image(path: str | Path) -> Image.Image:
    """An RGB image from any file Pillow reads; EXIF rotation applied, transparency on white."""
    path = Path(path)
    image = _read(path, "image")
    try:
        return flatten_to_rgb(image)
    except (ValueError, OSError) as error:  # a mode Pillow cannot convert
        raise InputError(f"cannot convert image {path} ({image.mode}) to RGB: {_one_line(error)}") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _too_large(path: str | Path, what: str, size: tuple[int, int] | None = None) -> InputError:
    dimensions = f" ({size[0]}x{size[1]}, {size[0] * size[1] / 1e6:.0f} megapixels)" if size else ""
    return InputError(
        f"{what} {path}{dimensions} is over the limit of {MAX_PIXELS / 1e6:.0f} megapixels "
        "(a guard against decompression bombs): scale it down first; the models use a few hundred pixels a side"
    )


def check_pixels(image: Image.Image, what: str = "image", name: str | Path = "(upload)") -> None:
    """A one-line InputError if an opened (not yet decoded) image is over MAX_PIXELS."""
    if image.width * image.height > MAX_PIXELS:
        raise _too_large(name, what, image.size)


def _read(path: Path, what: str) -> Image.Image:
    """The image in `path`, upright (EXIF orientation applied), or a one-line InputError."""
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory, not an image file")
    if not path.is_file():  # a pipe or a device could be read from forever
        raise InputError(f"{what} {path} is not a regular file")
    return read_image(path, what)


def read_image(source: Path | BinaryIO, what: str = "image", name: str | Path | None = None) -> Image.Image:
    """The image in a file or an open binary stream (an upload), upright, its mode as stored
    (transparency kept), or a one-line InputError naming it as `name` (default: the path)."""
    path = name if name is not None else source if isinstance(source, Path) else "(upload)"
    try:
        # Pillow warns between its limit and twice it, and raises above: its warning gives way
        # to our own check (the same limit, and a message with the size); its error stays.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                check_pixels(image, what, path)  # from the header, before a byte of pixels is decoded
                image.load()
                try:
                    return ImageOps.exif_transpose(image)
                except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels as stored are still good
                    return image.copy()
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise _too_large(path, what) from None
    except UnidentifiedImageError:
        raise InputError(
            f"{what} {path} is not an image file Pillow can read: give a PNG, JPEG, WebP, TIFF, BMP or GIF file"
        ) from None
    except Exception as error:  # noqa: BLE001 - a damaged file makes Pillow's decoders raise all kinds of errors
        hint = " (an incomplete download or copy?)" if "truncated" in str(error) else ""
        raise InputError(f"cannot read {what} {path}: {_one_line(error)}{hint}") from None


def _eight_bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit grey images as 8-bit "L" ("convert" would clip them at 255)."""
    if image.mode.startswith("I;16"):
        full_scale = 65535.0
    elif image.mode == "I":  # usually a 16-bit file, sometimes wider
        full_scale = max(65535.0, float(np.asarray(image).max()))
    elif image.mode == "F":  # floats: [0, 1], [0, 255] or anything
        top = float(np.nan_to_num(np.asarray(image), posinf=0.0).max(initial=0.0))
        full_scale = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else top
    else:
        return image
    array = np.nan_to_num(np.asarray(image, dtype=np.float32), posinf=full_scale) * (255.0 / full_scale)
    return Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8), "L")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def flatten_to_rgb(image: Image.Image) -> Image.Image:
    """RGB: grey, palette, CMYK, 16-bit ... converted; transparency composited onto white."""
    image = _eight_bit(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        # The same pixels as alpha-compositing onto white, but Pillow's paste lets other
        # threads run meanwhile (a server's event loop, while it flattens an upload).
        flat = Image.new("RGB", rgba.size, PAD_COLOR)
        flat.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def fit_square(image: Image.Image, size: int, pad: bool = False) -> Image.Image:
    """`size` pixels a side: center-cropped to a square, or with `pad` shrunk whole and
    centered on white."""
    if pad:
        return _pad_square(image, size, Image.Resampling.BICUBIC, PAD_COLOR)
    return ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)


def padded_size(image_size: tuple[int, int], size: int) -> tuple[int, int]:
    """The size an image of `image_size` takes on the square that `fit_square(pad=True)` makes
    of it: Pillow's `ImageOps.contain`, but a side never shrinks to nothing (a 20000x10 image
    at 64 px is 64x1)."""
    width, height = image_size
    if width >= height:
        return size, max(1, round(height / width * size))
    return max(1, round(width / height * size)), size


def _pad_square(image: Image.Image, size: int, method: Image.Resampling, color: Any) -> Image.Image:
    """`ImageOps.pad` to `size` a side (centred, the rest `color`), with `padded_size`'s sides."""
    shape = padded_size(image.size, size)
    square = Image.new(image.mode, (size, size), color)
    square.paste(image.resize(shape, method), (round((size - shape[0]) / 2), round((size - shape[1]) / 2)))
    return square


def _center_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The square that center-cropping keeps, as `ImageOps.fit` centres it."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def open_mask(path: str | Path, size: tuple[int, int], *, grow: int = 0, pad: bool = False) -> np.ndarray:
    """A boolean array of the image's `size`, True where the image is to be regenerated.

    White marks the area to regenerate and black the area to keep (grey at 50 %); in a mask
    with transparent pixels, transparency alone decides, as in OpenAI's image edit API.
    `grow` dilates the area to regenerate by that many pixels. A mask that leaves nothing to
    regenerate, or nothing to keep, in the part of the image that is used is refused (without
    `pad` that part is the center square).
    """
    path = Path(path)
    if grow < 0:
        raise SettingError("mask_grow", f"must be 0 or more pixels, got {grow}")
    return mask_array(_read(path, "mask"), size, path, grow=grow, pad=pad)


def mask_array(
    mask: Image.Image, size: tuple[int, int], path: str | Path = "mask", *, grow: int = 0, pad: bool = False
) -> np.ndarray:
    """`open_mask`'s array from an image already read (`path` names it in messages)."""
    if mask.size != size:
        # Sizes swapped: most likely one of the two carries an EXIF rotation the other lacks.
        rotated = " (rotated? both are used upright, as their EXIF orientation says)" if mask.size == size[::-1] else ""
        raise InputError(
            f"mask {path} is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}{rotated}: "
            "make them the same size"
        )
    regenerate = transparent_pixels(mask)
    if regenerate is None:
        regenerate = np.asarray(_eight_bit(mask).convert("L")) >= 128
    if not regenerate.any():
        raise InputError(f"mask {path} marks nothing to regenerate: paint the area to change white")
    regenerate = grow_mask(regenerate, grow)
    grown = f" once grown by {grow} pixels" if grow else ""
    if regenerate.all():
        raise InputError(
            f"mask {path} marks the whole image to regenerate{grown}: keep some of it black"
            f"{' or grow it less' if grow else ''} (or use text2im / variation)"
        )
    if not pad and size[0] != size[1]:
        left, top, right, bottom = _center_box(*size)
        used = regenerate[top:bottom, left:right]
        if not used.any():
            raise InputError(
                template=literal(f"mask {path} marks only areas outside the {size[0]}x{size[1]} image's center square")
                + ", the part that is used: pass {pad=True} to use the whole image"
            )
        if used.all():
            raise InputError(
                template=literal(f"mask {path} marks all of the {size[0]}x{size[1]} image's center square, ")
                + literal(f"the part that is used{grown}: keep some of it black, ")
                + "or pass {pad=True} to use the whole image"
            )
    return regenerate


def _alpha(image: Image.Image) -> Image.Image | None:
    """The alpha band alone (a quarter of the pixels' bytes), or None without transparency."""
    if not _has_alpha(image):
        return None
    return image.getchannel("A") if "A" in image.getbands() else image.convert("RGBA").getchannel("A")


def _any_transparent(alpha: Image.Image | None) -> bool:
    """Whether an alpha band has a pixel below half, read in Pillow's C code: no array."""
    return alpha is not None and alpha.getextrema()[0] < 128


def has_transparent_pixels(image: Image.Image) -> bool:
    """Whether any pixel is transparent (alpha below half)."""
    return _any_transparent(_alpha(image))


def transparent_pixels(image: Image.Image) -> np.ndarray | None:
    """Where `image` is transparent (alpha below half), or None if no pixel is: what a mask
    with transparency marks, as OpenAI's image edits read it."""
    alpha = _alpha(image)
    return np.asarray(alpha) < 128 if _any_transparent(alpha) else None


def grow_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Dilate the True area by `pixels` in every direction: each pixel within that distance of
    a marked one is marked (a disc, not a square, so corners stay round)."""
    if pixels < 0:
        raise SettingError("mask_grow", f"must be 0 or more pixels, got {pixels}")
    mask = np.asarray(mask, dtype=bool)
    if pixels == 0 or not mask.any() or mask.all():
        return mask.copy()
    # Only the marked area's bounding box, widened by `pixels`, can change: work on that alone.
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom = max(rows[0] - pixels, 0), min(rows[-1] + pixels + 1, mask.shape[0])
    left, right = max(columns[0] - pixels, 0), min(columns[-1] + pixels + 1, mask.shape[1])
    grown = mask.copy()
    grown[top:bottom, left:right] = _disc_dilation(mask[top:bottom, left:right], pixels)
    return grown


def _disc_dilation(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Row by row: a disc of radius `pixels` is, at each vertical offset dy, a horizontal span
    of half-width sqrt(pixels² - dy²); each span width is one sliding-window sum over prefix
    sums, so the cost is O(area x pixels) with no per-pixel Python loop."""
    height, width = mask.shape
    prefix = np.zeros((height, width + 1), dtype=np.int32)
    np.cumsum(mask, axis=1, out=prefix[:, 1:])
    columns = np.arange(width)
    offsets_by_half_width: dict[int, list[int]] = {}
    for dy in range(-min(pixels, height - 1), min(pixels, height - 1) + 1):
        offsets_by_half_width.setdefault(math.isqrt(pixels * pixels - dy * dy), []).append(dy)
    grown = np.zeros_like(mask)
    for half, offsets in offsets_by_half_width.items():
        low = np.clip(columns - half, 0, width)
        high = np.clip(columns + half + 1, 0, width)
        spans = (prefix[:, high] - prefix[:, low]) > 0  # rows dilated by `half` columns
        for dy in offsets:  # row y of the result takes row y - dy of the spans
            if dy >= 0:
                grown[dy:] |= spans[: height - dy]
            else:
                grown[:dy] |= spans[-dy:]
    return grown


def fit_mask(mask: np.ndarray, size: int, pad: bool = False) -> np.ndarray:
    """Make a boolean mask square and `size` pixels a side exactly as `fit_square` makes its
    image (padding marks "keep"). A pixel any part of which was marked is marked: the area to
    regenerate may grow by a fraction of a pixel but never shrinks, nor vanishes when small."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, "L")
    if pad:
        fitted = _pad_square(image, size, Image.Resampling.BOX, 0)
    else:
        fitted = ImageOps.fit(image, (size, size), method=Image.Resampling.BOX)
    regenerate = np.asarray(fitted) > 0
    if not regenerate.any():
        raise InputError(f"the mask, made square and {size}x{size} for the decoder, marks nothing to regenerate")
    if regenerate.all():
        raise InputError(
            f"the mask, made square and {size}x{size} for the decoder, marks all of it to regenerate: "
            "keep a larger area black"
        )
    return regenerate


def to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float in [0, 1]."""
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def fit_note(
    name: str | Path, image: Image.Image, pad: bool = False, hint: str = " (--pad keeps all of it)"
) -> str | None:
    """The one-line note for a non-square input; None for a square one."""
    if image.width == image.height:
        return None
    how = "padded to a square with white" if pad else f"center-cropped to a square{hint}"
    return f"note: {name} is {image.width}x{image.height}; {how}"


def to_pil(tensor: torch.Tensor) -> Image.Image:
    import torch

    array = (tensor.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), "RGB")
