"""What a run makes: one `Work` per generating command, each naming its inference script and
how to run it. Text to image is cut into jobs (one image each) that the processes of a launch
share; the others run whole, in one process."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dalle2_cli.io.prompts import Prompt
from dalle2_cli.messages import Log
from dalle2_cli.scaleout.jobs import Job

AfterRun = Callable[[list, Path, Log], dict[str, Any]]  # (images made, directory, log) -> report entries


@dataclass
class Work:
    """A run that one script makes whole (variation, inpaint, frames): `make(script)` returns
    its images, handing each to the script's `on_image` as its batch finishes."""

    script: str  # a class of dalle2_cli.sampling: "pipelines.ImageVariation", "manipulate.TextDiff"
    make: Callable[[Any], list]
    after: AfterRun | None = None
    scalable = False


@dataclass
class TextToImageWork:
    """Text to image: every prompt's images in order, image k with seed + k, cut into jobs the
    processes share; each image the best of `candidates` by CLIP (None: the config's
    default_rerank, see TextToImage.run)."""

    prompts: list[Prompt]
    num_images: int = 1
    candidates: int | None = None
    after: AfterRun | None = None
    scalable = True
    script = "pipelines.TextToImage"

    def make_batch(self, script: Any, batch: Sequence[Job]) -> list:
        """The images of one batch of jobs, in job order, as one process run makes them: each
        job a prompt of one image with its own seed (so the batch's pixels are the same whatever
        process makes it)."""
        requests = [Prompt(job.prompt, 1, job.seed) for job in batch]
        made = script.run(requests, 1, self.candidates)
        return [dataclasses.replace(item, index=job.index) for job, item in zip(batch, made, strict=True)]
