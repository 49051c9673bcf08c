"""Writing generated images: PNG with the settings in its text chunks, atomically."""

from __future__ import annotations

import json
import math
import os
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dalle2_cli.errors import InputError, SettingError, literal
from dalle2_cli.io.atomic import atomic_path, numbered, write_new

METADATA_KEY = "dalle2-cli"


MAX_STEM_BYTES = 200  # a file name's stem, in UTF-8; with "-NNN.png" it stays under 255 bytes


def slug(text: str, limit: int = 48, lower: bool = True) -> str:
    """A file-name-safe version of a prompt: letters (of any script; accents dropped, so
    "über ñandú" is "uber-nandu"), digits, '-', '_' and '.' inside."""
    text = "".join(_plain_letter(c) for c in unicodedata.normalize("NFC", text))
    words = re.sub(r"[^\w.]+|\.{2,}", "-", text.lower() if lower else text).strip("-.")
    return _cut(words[:limit]).rstrip("-.") or "image"


def _plain_letter(char: str) -> str:
    """A Latin letter without its accent (ü -> u, ﬁ -> fi); any other character as it is (a
    kana's voicing mark is part of the letter, not an accent)."""
    parts = unicodedata.normalize("NFKD", char)
    if parts[0].isascii():
        return "".join(part for part in parts if not unicodedata.combining(part))
    return char


def _cut(text: str, most: int = MAX_STEM_BYTES) -> str:
    """`text` shortened to at most `most` bytes of UTF-8, on a character boundary."""
    return text.encode()[:most].decode(errors="ignore")


NAME_FIELDS = ("prompt", "seed", "index", "source", "command")
DEFAULT_NAME = "{prompt}-{seed}"


def check_name_template(template: str) -> str:
    """A file name template (`--name`): a file name (no directories) made of the fields in NAME_FIELDS."""
    if not template.strip() or "/" in template or "\\" in template or "\0" in template:
        raise SettingError("template", f"{template!r} must be a file name without directories, like {DEFAULT_NAME!r}")
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:
        raise SettingError("template", f"{template!r} is not a valid template: {error}") from None
    unknown = [f for f in fields if f not in NAME_FIELDS]
    if unknown:
        fields = ", ".join("{" + f + "}" for f in NAME_FIELDS)
        raise SettingError("template", f"has an unknown field {{{unknown[0]}}}; use {fields}")
    return template


def render_name(template: str, **fields: Any) -> str:
    """The file stem for one image: every field slugged, so that no value can make a path."""
    safe = {key: slug(str(value)) if value is not None else "none" for key, value in fields.items()}
    return slug(template.format(**safe), limit=MAX_STEM_BYTES, lower=False)


class NameCounter:
    """The names a run gives its files: `stem`, then `stem-2`, `stem-3`, ... for a stem given
    again, never one given before (a later "a-2" prompt does not take the second "a"'s name).
    Each stem remembers where it got to, so that thousands of equal prompts stay cheap."""

    def __init__(self) -> None:
        self.taken: set[str] = set()
        self.next: dict[str, int] = {}

    def name(self, stem: str, suffix: str = ".png") -> str:
        number = self.next.get(stem, 1)
        while (name := numbered(Path(), stem, suffix, number).name) in self.taken:
            number += 1
        self.next[stem] = number + 1
        self.taken.add(name)
        return name


def prepare_directory(path: Path) -> Path:
    """The output directory, made if missing; a one-line SettingError (naming the setting
    `directory`) if it is a file, cannot be made or is not writable."""
    fix = "pass another {setting}"
    if path.exists() and not path.is_dir():
        raise SettingError("directory", template=f"output directory {literal(path)} is a file: {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = literal(error.strerror or error)
        problem = f"cannot create output directory {literal(path)}: {reason}; {fix}"
        raise SettingError("directory", template=problem) from None
    if not os.access(path, os.W_OK | os.X_OK):
        problem = f"output directory {literal(path)} is not writable: {fix}, or fix its permissions"
        raise SettingError("directory", template=problem)
    return path


def save_png(image: Image.Image, path: Path, metadata: dict[str, Any]) -> None:
    """Written whole or not at all (see dalle2_cli.io.atomic)."""
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


class ImageWriter:
    """Saves a run's images into a directory as they are made, each a PNG with its metadata,
    under its own new name (a run beside it writing the same names never replaces one; with
    `overwrite`, files of the same name are replaced)."""

    def __init__(self, directory: Path, template: str = DEFAULT_NAME, overwrite: bool = False, remember: bool = True):
        """`remember`: keep each record and image for the run's grid and report (a server,
        which writes for ever, does not)."""
        self.directory, self.template, self.overwrite, self.remember = directory, template, overwrite, remember
        self.records: list[dict[str, Any]] = []
        self.images: list[Any] = []  # the GeneratedImage of each record
        self._next: dict[str, int] = {}  # where each stem's numbering got to

    def stem(self, item: Any) -> str:
        command = item.provenance.get("command", "image")
        source_stem = Path(item.source).stem if item.source else None
        # A reranked image is named by the seed asked for, as a launched run plans its names
        # before any candidate is drawn; it records the kept candidate's own seed.
        return render_name(
            self.template,
            prompt=item.prompt or source_stem or command,
            seed=item.asked_seed,
            index=item.index,
            source=source_stem or "none",
            command=command,
        )

    def write(self, item: Any) -> dict[str, Any]:
        """Save one dalle2_cli.inference.GeneratedImage; its record, as `--json` prints it."""
        stem = self.stem(item)
        first = 1 if self.overwrite else self._next.get(stem, 1)
        path, number = write_new(self.directory, stem, ".png", item.save, self.overwrite, first)
        self._next[stem] = number + 1
        record = image_record(item, path)
        if self.remember:
            self.records.append(record)
            self.images.append(item)
        return record


def image_record(item: Any, path: Path) -> dict[str, Any]:
    """One entry of `--json`'s "images"."""
    own = {"prompt": item.prompt, "seed": item.seed, "index": item.index, "source": item.source}
    return {"path": str(path), **own, "width": item.image.width, "height": item.image.height, "settings": item.settings}


def run_metadata(
    command: str, config_name: str, config_path: Any, model_files: dict[str, Path], digests: dict[str, str]
) -> dict[str, Any]:
    """What every image of a run records besides its own settings: the command, the config,
    the model files and their sha256 (`digests`, by role), the tool's version."""
    from dalle2_cli import __version__

    return {
        "command": command,
        "config": config_name,
        "config_path": str(config_path),
        "model_files": {role: str(path) for role, path in model_files.items()},
        "model_sha256": {role: digests[role] for role in model_files},
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
    groups: Sequence[Sequence[Image.Image]], directory: Path, rows: int | None = None, overwrite: bool = False
) -> Path:
    """A contact sheet of a run's images (a row per prompt or input, or `rows` rows)."""
    sheet = contact_sheet(grid_rows(groups, rows))
    path, _ = write_new(directory, "grid", ".png", lambda tmp: sheet.save(tmp, format="PNG"), overwrite)
    return path


INPUTS = "inputs"  # the folder of an output directory where a server keeps the images it was sent


def keep_input(directory: Path, image: Image.Image) -> tuple[str, str]:
    """`image` as a PNG in `directory`/inputs/, named by its digest (the same image is kept
    once): its path relative to `directory`, and the file's sha256."""
    import hashlib
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    folder = directory / INPUTS
    folder.mkdir(exist_ok=True)
    target = folder / f"{digest[:32]}.png"
    if not target.is_file():
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
    return f"{INPUTS}/{target.name}", digest


def recorded_sampler(recorded: dict[str, Any]) -> str | None:
    """The sampler every stage of a recorded image used, or None (none recorded, or several)."""
    samplers = set(recorded.get("decoder_sampler") or []) | {recorded.get("prior_sampler")} - {None}
    return samplers.pop() if len(samplers) == 1 else None


def recorded_input(image_path: Path, recorded: dict[str, Any], role: str) -> Path:
    """The file an image records as its `role` input ("source" or "mask"): a server's kept
    copy (relative to the image's folder, its digest checked), or the path the CLI was given."""
    from dalle2_cli.sources.digests import sha256_of

    kept = recorded.get("source_file") if role == "source" else recorded.get("mask")
    if not kept:
        raise InputError(f"{image_path} records no {role} image: it was not made from one")
    path = Path(kept)
    if not path.is_absolute() and not path.exists():
        path = image_path.parent / path
    if not path.is_file():
        raise InputError(f"{image_path} was made from {role} {kept}, which is not there: give the {role} image")
    digest = recorded.get(f"{role}_sha256")
    if digest and sha256_of(path) != digest:
        raise InputError(f"{path} is not the {role} {image_path} was made from (its sha256 differs)")
    return path


def recorded_settings(path: Path, named_by: str = "") -> dict[str, Any]:
    """The settings dalle2 recorded in the image `path`, or a one-line InputError (whose
    message starts with `named_by`, what named the file, if anything)."""
    named = f"{named_by} {path}".strip()
    if not path.is_file():
        raise InputError(f"{named}: no such image file")
    try:
        metadata = read_metadata(path)
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{named}: cannot read it as an image ({error})") from None
    if metadata is None:
        raise InputError(f"{named} holds no dalle2 settings (it was not written by dalle2, or was re-saved)")
    return metadata
