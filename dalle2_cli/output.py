"""Writing generated images: PNG with the settings in its text chunks, atomically."""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dalle2_cli.atomic import atomic_path
from dalle2_cli.errors import InputError

METADATA_KEY = "dalle2-cli"


def slug(text: str, limit: int = 48, lower: bool = True) -> str:
    """A file-name-safe version of a prompt: letters, digits, '-', '_' and '.' inside."""
    words = re.sub(r"[^A-Za-z0-9_.]+|\.{2,}", "-", text.lower() if lower else text).strip("-.")
    return words[:limit].rstrip("-.") or "image"


NAME_FIELDS = ("prompt", "seed", "index", "source", "command")
DEFAULT_NAME = "{prompt}-{seed}"


def check_name_template(template: str) -> str:
    """A `--name` template: a file name (no directories) made of the fields in NAME_FIELDS."""
    if not template.strip() or "/" in template or "\\" in template or "\0" in template:
        raise InputError(f"--name {template!r} must be a file name without directories, like {DEFAULT_NAME!r}")
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:
        raise InputError(f"--name {template!r} is not a valid template: {error}") from None
    unknown = [f for f in fields if f not in NAME_FIELDS]
    if unknown:
        raise InputError(f"--name: unknown field {{{unknown[0]}}}; use {', '.join('{' + f + '}' for f in NAME_FIELDS)}")
    return template


def render_name(template: str, **fields: Any) -> str:
    """The file stem for one image: every field slugged, so that no value can make a path."""
    safe = {key: slug(str(value)) if value is not None else "none" for key, value in fields.items()}
    return slug(template.format(**safe), limit=120, lower=False)


def output_path(directory: Path, stem: str, taken: set[Path], overwrite: bool = False) -> Path:
    """`stem.png`; when that exists (and not `overwrite`) or was named earlier in this run,
    `stem-2.png`, `stem-3.png`, ..."""
    candidate = directory / f"{stem}.png"
    counter = 2
    while candidate in taken or (candidate.exists() and not overwrite):
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
    """What `save_png` recorded, or None for an image without it."""
    with Image.open(path) as image:
        text = image.text.get(METADATA_KEY) if hasattr(image, "text") else None
    return json.loads(text) if text else None


def contact_sheet(rows: Sequence[Sequence[Image.Image]], gap: int = 2) -> Image.Image:
    """One image holding `rows` of images, each cell the size of the largest image."""
    cell_w = max(image.width for row in rows for image in row)
    cell_h = max(image.height for row in rows for image in row)
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (columns * (cell_w + gap) - gap, len(rows) * (cell_h + gap) - gap), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image.convert("RGB"), (c * (cell_w + gap), r * (cell_h + gap)))
    return sheet


def grid_rows(groups: Sequence[Sequence[Image.Image]], rows: int | None = None) -> list[list[Image.Image]]:
    """One row per group (prompt or input image), or all images in `rows` even rows."""
    if rows is None:
        return [list(group) for group in groups if group]
    images = [image for group in groups for image in group]
    per_row = math.ceil(len(images) / rows)
    return [images[i : i + per_row] for i in range(0, len(images), per_row)]


def write_images(
    generated: Sequence[Any],
    directory: Path,
    common: dict[str, Any],
    template: str = DEFAULT_NAME,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Save each generated image (dalle2_cli.inference.GeneratedImage) as a PNG whose metadata
    holds its prompt, seed and settings plus `common` (command, config, model files, tool);
    return one record per image, as `--json` prints them."""
    taken: set[Path] = set()
    records = []
    for item in generated:
        source_stem = Path(item.source).stem if item.source else None
        stem = render_name(
            template,
            prompt=item.prompt or source_stem or common.get("command", "image"),
            seed=item.seed,
            index=item.index,
            source=source_stem or "none",
            command=common.get("command", "image"),
        )
        path = output_path(directory, stem, taken, overwrite)
        records.append(save_generated(item, path, common))
    return records


def save_generated(item: Any, path: Path, common: dict[str, Any]) -> dict[str, Any]:
    """Save one generated image at `path` with its own settings plus `common` in its metadata;
    return its record (one entry of `--json`'s "images")."""
    own = {"prompt": item.prompt, "seed": item.seed, "index": item.index, "source": item.source}
    save_png(item.image, path, {**own, **item.settings, **common})
    return {"path": str(path), **own, "width": item.image.width, "height": item.image.height, "settings": item.settings}


def run_metadata(command: str, config_name: str, config_path: Any, model_files: dict[str, Path]) -> dict[str, Any]:
    """What every image of a run records besides its own settings: the command, the config,
    the model files and their sha256, the tool's version."""
    from dalle2_cli import __version__
    from dalle2_cli.files import model_file_sha256

    return {
        "command": command,
        "config": config_name,
        "config_path": str(config_path),
        "model_files": {role: str(path) for role, path in model_files.items()},
        "model_sha256": {role: model_file_sha256(path) for role, path in model_files.items()},
        "tool": f"dalle2-cli {__version__}",
    }


def rows_by_input(indexed: Iterable[tuple[int, Image.Image]]) -> list[list[Image.Image]]:
    """A run's (index, image) pairs in order, grouped by input: a new group where an input's
    first image (index 0) starts; what `write_grid` lays out one row each."""
    groups: list[list[Image.Image]] = []
    for index, image in indexed:
        if index == 0 or not groups:
            groups.append([])
        groups[-1].append(image)
    return groups


def write_grid(
    groups: Sequence[Sequence[Image.Image]],
    directory: Path,
    taken_names: Sequence[str],
    rows: int | None = None,
    overwrite: bool = False,
) -> Path:
    """A contact sheet of a run's images (a row per prompt or input, or `rows` rows)."""
    path = output_path(directory, "grid", {Path(name) for name in taken_names}, overwrite)
    with atomic_path(path) as tmp:
        contact_sheet(grid_rows(groups, rows)).save(tmp, format="PNG")
    return path


def recorded_settings(path: Path, option: str = "") -> dict[str, Any]:
    """The settings dalle2 recorded in the image `path`, or a one-line InputError (whose
    message starts with `option`, the command-line option that named the file, if any)."""
    named = f"{option} {path}".strip()
    if not path.is_file():
        raise InputError(f"{named}: no such image file")
    try:
        metadata = read_metadata(path)
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{named}: cannot read it as an image ({error})") from None
    if metadata is None:
        raise InputError(f"{named} holds no dalle2 settings (it was not written by dalle2, or was re-saved)")
    return metadata


def recorded_run(path: Path) -> dict[str, Any]:
    """The settings recorded in an image made by text2im, for `text2im --from`."""
    metadata = recorded_settings(path, "--from")
    if metadata.get("command") != "text2im" or not metadata.get("prompt"):
        raise InputError(f"--from {path} was made by `dalle2 {metadata.get('command')}`; --from re-runs text2im images")
    return metadata
