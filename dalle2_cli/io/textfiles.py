"""Reading the small text files a user points us at (configs, checksum files, JSON training
configs) without trusting them: a pipe or a device is refused rather than read forever, a
huge file is refused rather than read into memory, and bad bytes or JSON give one line."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from dalle2_cli.errors import InputError

# Far above any real config or checksum file (LAION's decoder_config.json is 2 KB).
TEXT_LIMIT = 16 * 2**20


def regular_file(path: Path, what: str) -> os.stat_result:
    """`path`'s stat, or a one-line InputError unless it is a regular file we may read."""
    try:
        status = path.stat()
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except OSError as error:
        raise InputError(f"cannot read {what} {path}: {error.strerror or error}") from None
    if stat.S_ISDIR(status.st_mode):
        raise InputError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(status.st_mode):  # a pipe or a device could be read from forever
        raise InputError(f"{what} {path} is not a regular file (a pipe or a device?): give a file")
    return status


def read_text(path: Path, what: str, limit: int = TEXT_LIMIT) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes."""
    path = Path(path)
    size = regular_file(path, what).st_size
    if size > limit:
        raise InputError(
            f"{what} {path} is {size:,} bytes, too large for a {what} (at most {limit:,}): is it the right file?"
        )
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as error:
        raise InputError(f"cannot read {what} {path}: {error.strerror or error}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {error.start} is {data[error.start]:#04x})") from None


def parse_json(text: str, where: str) -> Any:
    """JSON, with errors as one line naming the position."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(
            f"{where} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
        ) from None
    except RecursionError:
        raise InputError(f"{where} is nested too deeply to be a config") from None


def read_json(path: Path, what: str) -> Any:
    return parse_json(read_text(path, what), f"{what} {path}")
