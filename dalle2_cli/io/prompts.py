"""Prompts from a file: one per line, a JSON list, or JSON lines with per-prompt settings.

    a red circle                        # .txt (or anything else): one prompt per line
    ["a red circle", "a blue square"]   # a JSON list of prompts (or of objects as below)
    {"prompt": "a red circle", "n": 4, "seed": 7}   # JSON lines: one object per line

`-` reads standard input, whose format is told by its first character.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dalle2_cli.errors import InputError, SettingError
from dalle2_cli.sampling.settings import check_count, check_seed

FIELDS = {"prompt", "n", "seed"}


@dataclass(frozen=True)
class Prompt:
    """A prompt with its own image count and seed (as a prompts file may give them)."""

    text: str
    num_images: int | None = None  # None: the run's -n
    seed: int | None = None  # None: the run's --seed


# Far more text than the most images a run may make could use: a bigger input is a mistake.
PROMPTS_LIMIT = 64 * 2**20


def read_prompts(source: str) -> list[Prompt]:
    """The prompts in file `source` (`-` for standard input), checked. A pipe is read (as
    `--prompts-file <(command)` gives one), up to PROMPTS_LIMIT bytes."""
    if source == "-":
        data, name = sys.stdin.buffer.read(PROMPTS_LIMIT + 1), "standard input"
    else:
        path = Path(source)
        if not path.exists():
            raise InputError(f"prompts file not found: {path}")
        if path.is_dir():
            raise InputError(f"prompts file {path} is a directory")
        try:
            with open(path, "rb") as handle:
                data = handle.read(PROMPTS_LIMIT + 1)
        except OSError as error:
            raise InputError(f"cannot read prompts file {path}: {error.strerror or error}") from None
        name = str(path)
    if len(data) > PROMPTS_LIMIT:
        raise InputError(f"{name} holds more than {PROMPTS_LIMIT // 2**20} MB of prompts: split it into several runs")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(f"{name} is not UTF-8 text (byte {error.start} is {data[error.start]:#04x})") from None
    prompts = parse_prompts(text, name)
    if not prompts:
        raise InputError(f"{name} holds no prompts: write one per line")
    return prompts


def parse_prompts(text: str, name: str = "prompts") -> list[Prompt]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as error:
            raise InputError(f"{name} is not valid JSON: {error}") from None
        if not isinstance(items, list):
            raise InputError(f"{name} must hold a JSON list of prompts")
        return [_prompt(item, f"{name} item {number}") for number, item in enumerate(items, 1)]
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)]
    lines = [(number, line) for number, line in lines if line]
    if stripped.startswith("{"):
        prompts = []
        for number, line in lines:
            try:
                item = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as error:
                raise InputError(f"{name} line {number} is not a JSON object: {error}") from None
            prompts.append(_prompt(item, f"{name} line {number}"))
        return prompts
    return [_prompt(line, f"{name} line {number}") for number, line in lines]


def _prompt(item: Any, where: str) -> Prompt:
    if isinstance(item, str):
        item = {"prompt": item}
    if not isinstance(item, dict):
        raise InputError(f'{where}: expected a prompt or an object with a "prompt", got {item!r}')
    unknown = set(item) - FIELDS
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: prompt, n, seed")
    text = item.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: the prompt is missing or empty")
    count, seed = item.get("n"), item.get("seed")
    try:
        if count is not None:
            check_count(count, '"n"')
        if seed is not None:
            check_seed(seed, '"seed"')
    except SettingError as error:
        raise InputError(f"{where}: {error}") from None
    return Prompt(text.strip(), count, seed)


def shortened(text: str, words: int = 12) -> str:
    """The first `words` words of `text` (at most 100 characters), for a one-line message."""
    split = text.split()
    short = " ".join(split[:words])[:100]
    return short if len(split) <= words and len(text) <= 100 else f"{short} ... ({len(split)} words)"


def ends(text: str, words: int = 5) -> str:
    """`text`, or its first and last words when it is long: "a b c ... x y (40 words)"."""
    split = text.split()
    if len(split) <= 2 * words and len(text) <= 100:
        return text
    return f"{' '.join(split[:words])[:60]} ... {' '.join(split[-words:])[-60:]} ({len(split)} words)"


def unknown_words(text: str, words: list[str], summary: str | None = None) -> str | None:
    """A warning naming the words of `text` a model's vocabulary lacks, or None."""
    known = {word.lower() for word in words}
    unknown = [w for w in dict.fromkeys(re.findall(r"[^\W\d_]+", text.lower())) if w not in known]
    if not unknown:
        return None
    named = ", ".join(repr(w) for w in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
    knows = f"; it knows {summary}" if summary else ""
    return f"{shortened(text)!r}: the model was not trained on the word(s) {named}{knows}"
