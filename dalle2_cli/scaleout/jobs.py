"""The job list of a text-to-image run: every prompt's images in order, each with its seed and
the file name a one-process run gives it, cut into the batches that run samples; whole batches
go to the processes of a launch, round-robin."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from dalle2_cli.errors import InputError
from dalle2_cli.io.output import DEFAULT_NAME, NameCounter, render_name
from dalle2_cli.io.prompts import Prompt
from dalle2_cli.sampling.settings import check_count, check_total, check_whole

COMMAND = "text2im"
T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    """One image of the run."""

    number: int  # its position in a one-process run
    prompt_number: int
    prompt: str
    index: int  # image k of its prompt
    seed: int
    file: str  # its file name in the output directory


def plan_jobs(prompts: Sequence[Prompt | str], num_images: int, seed: int, template: str = DEFAULT_NAME) -> list[Job]:
    """Every image a one-process `text2im` run makes, in its order, with the seed and the file
    name that run gives it in an empty directory (a repeated name gets -2, -3, ...)."""
    requests = [p if isinstance(p, Prompt) else Prompt(p) for p in prompts]
    counts = [check_count(num_images if r.num_images is None else r.num_images) for r in requests]
    check_total(sum(counts))
    jobs: list[Job] = []
    # Only names given earlier in the plan count, never files on disk, so that every process
    # (and every later --resume) names the files alike.
    names = NameCounter()
    for prompt_number, (request, count) in enumerate(zip(requests, counts, strict=True)):
        if not request.text.strip():
            raise InputError(f"prompt {prompt_number + 1} is empty: describe the image to make")
        base = seed if request.seed is None else request.seed
        for index in range(count):
            stem = render_name(
                template, prompt=request.text, seed=base + index, index=index, source="none", command=COMMAND
            )
            jobs.append(Job(len(jobs), prompt_number, request.text, index, base + index, names.name(stem)))
    return jobs


def cut_batches(jobs: Sequence[Job], batch_size: int) -> list[list[Job]]:
    """The batches a one-process run samples: `batch_size` consecutive images at a time, across
    prompt boundaries (TextToImage.run samples its flat list of images so)."""
    check_whole("batch_size", batch_size)
    return [list(jobs[start : start + batch_size]) for start in range(0, len(jobs), batch_size)]


def share(items: Sequence[T], process: int, processes: int) -> list[T]:
    """Process `process`'s part of `items`: every `processes`-th, round-robin."""
    return list(items[process::processes])


def jobs_digest(jobs: Sequence[Job]) -> str:
    """Identifies the job list: prompts, image counts, seeds and file names."""
    text = json.dumps([[j.prompt, j.index, j.seed, j.file] for j in jobs], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def complete_png(path: Path) -> bool:
    """Whether `path` is a whole, readable PNG (a recorded image that was since emptied or cut
    short is made again)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # decodes every row: a file cut short fails here
        return True
    except Exception:  # noqa: BLE001 - Pillow raises many kinds of error for a damaged file
        return False
