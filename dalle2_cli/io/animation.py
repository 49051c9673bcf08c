"""Animations of frames: GIF or lossless WebP, written whole or not at all."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path

from PIL import Image

from dalle2_cli.errors import InputError, SettingError
from dalle2_cli.io.atomic import atomic_path, write_new


class AnimationFormat(StrEnum):
    gif = "gif"
    webp = "webp"


def check_animation_format(fmt: AnimationFormat | str) -> AnimationFormat:
    """Refuse, before any sampling, a format this Pillow cannot write."""
    from PIL import features

    fmt = AnimationFormat(fmt)
    if fmt == AnimationFormat.webp and not features.check("webp"):
        raise InputError(template="this Pillow was built without WebP support: use {animation format} gif")
    return fmt


def write_animation(
    images: Sequence[Image.Image],
    directory: Path,
    stem: str,
    fmt: AnimationFormat | str,
    duration_ms: int = 250,
    overwrite: bool = False,
) -> Path:
    """`save_animation` under a new name: `stem.gif`, else `stem-2.gif`, ... (claimed
    atomically; with `overwrite`, `stem.gif` is replaced)."""
    fmt = check_animation_format(fmt)
    path, _ = write_new(
        directory, stem, f".{fmt.value}", lambda tmp: _write_frames(images, tmp, fmt, duration_ms), overwrite
    )
    return path


def save_animation(
    images: Sequence[Image.Image], path: Path, fmt: AnimationFormat | str | None = None, duration_ms: int = 250
) -> Path:
    """An endlessly looping animation of `images`, one frame each, written whole or not at all.

    `fmt` defaults to the file's suffix. GIF holds 256 colours a frame, so its frames are
    quantized; WebP is written lossless. Both store a frame identical to the one before as
    more time on that one (Pillow's GIF writer and libwebp do it), so the timing stays right;
    frames all alike make a one-frame file (for WebP, a still image without timing)."""
    fmt = check_animation_format(fmt or path.suffix.lstrip(".").lower())
    with atomic_path(path) as tmp:
        _write_frames(images, tmp, fmt, duration_ms)
    return path


def _write_frames(images: Sequence[Image.Image], path: Path, fmt: AnimationFormat, duration_ms: int) -> None:
    if len(images) < 2:
        raise ValueError("an animation needs at least 2 frames")
    check_duration(duration_ms)
    frames = [image.convert("RGB") for image in images]
    options: dict = {"save_all": True, "append_images": frames[1:], "duration": duration_ms, "loop": 0}
    if fmt == AnimationFormat.webp:
        options.update(lossless=True, quality=100, method=4)
    frames[0].save(path, format=fmt.value.upper(), **options)


def check_duration(duration_ms: int) -> int:
    if not isinstance(duration_ms, int) or isinstance(duration_ms, bool) or duration_ms < 1:
        raise SettingError("duration_ms", f"must be at least 1 millisecond, got {duration_ms!r}")
    return duration_ms
