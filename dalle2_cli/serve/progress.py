"""How a served batch advances, told to each of its requests' watchers: the stage and step,
and a preview of that request's images as they form (the decoder's current prediction of the
clean images). The page shows them; a streaming API call sends some as partial images."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from dalle2_cli.sampling.progress import Preview, StoppableProgress


@dataclass(frozen=True)
class Step:
    """A running request's update: `step` of `steps` network evaluations of `stage` done, and
    `decoded`, the part of the decoder's work done (0 to 1). `preview()` gives the request's
    images as they stand (decoder stages only)."""

    stage: str
    step: int
    steps: int
    decoded: float
    preview: Callable[[], list[Image.Image]] | None = None

    def line(self) -> str:
        return f"{self.stage} {self.step}/{self.steps}"

    def pictures(self, size: int) -> list[Image.Image]:
        """The request's images as they stand, upsampled to `size` (the final images' side)."""
        assert self.preview is not None, "only decoder stages have pictures"
        return [p if p.width == size else p.resize((size, size), Image.Resampling.BICUBIC) for p in self.preview()]


class BatchProgress(StoppableProgress):
    """The progress of one batch: stops it once `stop()` says so, and tells each job's future
    a Step at every network evaluation. `rows[k]` is which of the decoder's images are job k's."""

    def __init__(self, stop: Callable[[], bool], futures: Sequence[Any], rows: Sequence[slice]):
        super().__init__(stop)
        self.futures, self.rows = futures, rows
        self._planned: dict[str, int] = {}  # stage -> evaluations in all
        self._done: dict[str, int] = {}

    def stage(self, label: str, steps: int, loops: int = 1) -> None:
        self._planned[label] = self._planned.get(label, 0) + steps * loops
        self._done.setdefault(label, 0)

    def advance(self, label: str, steps: int = 1, preview: Preview | None = None) -> None:
        super().advance(label, steps, preview)  # raises Cancelled once the batch is to stop
        self._done[label] = self._done.get(label, 0) + steps
        decoder = [name for name in self._planned if name.startswith("decoder")]
        planned = sum(self._planned[name] for name in decoder)
        decoded = sum(self._done[name] for name in decoder) / planned if planned else 0.0
        images = functools.cache(lambda: _pictures(preview())) if preview is not None else None
        for future, rows in zip(self.futures, self.rows, strict=True):
            mine = (lambda rows=rows: images()[rows]) if images is not None else None
            future.tell(Step(self._named(label), self._done[label], self._planned.get(label, 0), decoded, mine))

    def _named(self, label: str) -> str:
        """A stage as a person reads it: prior, base, upsampler (or decoder, for one unet)."""
        if not label.startswith("decoder unet "):
            return label
        unets = sum(name.startswith("decoder unet ") for name in self._planned)
        number = int(label.rsplit(" ", 1)[1])
        if unets == 1:
            return "decoder"
        if number == 1:
            return "base"
        return "upsampler" if unets == 2 else f"upsampler {number - 1}"


def _pictures(batch: Any) -> list[Image.Image]:
    from dalle2_cli.io.images import to_pil

    return [to_pil(image) for image in batch.float().cpu()]
