"""Progress bars for sampling: one rich bar per stage (CLIP, prior, each decoder unet), advanced
by the sampling loops' callback once per network evaluation. The same callback is where a run
can be stopped from outside (`StoppableProgress`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from dalle2_cli.errors import Cancelled

if TYPE_CHECKING:
    import torch

Preview = Callable[[], "torch.Tensor"]  # a batch's images as they stand, [batch, 3, height, width] in [0, 1]


class _Speed(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:6.1f} it/s" if task.speed else "     - it/s", style="progress.data.speed")


class NoProgress:
    """No bars: what scripts use when none are wanted (and from Python)."""

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def stage(self, label: str, steps: int, loops: int = 1) -> None:
        pass

    def advance(self, label: str, steps: int = 1, preview: Preview | None = None) -> None:
        """`steps` network evaluations of `label` done; `preview()`, where given, is the
        batch's images as they stand (a tensor in [0, 1]), for a progress that shows them."""


class StoppableProgress(NoProgress):
    """No bars; counts the network evaluations done, and raises Cancelled at the next one once
    `stop()` says so (a server's batch whose clients have all gone, say)."""

    def __init__(self, stop: Callable[[], bool]):
        self.stop = stop
        self.done = 0

    def advance(self, label: str, steps: int = 1, preview: Preview | None = None) -> None:
        self.done += steps
        if self.stop():
            raise Cancelled(f"stopped after {self.done} network evaluations, in the {label} stage")


class StageProgress(NoProgress):
    """Bars on stderr; use as a context manager around the whole run."""

    def __init__(self, console: Console | None = None):
        self._bars = Progress(
            TextColumn("{task.description:<16}"),
            BarColumn(),
            MofNCompleteColumn(),
            _Speed(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
        )
        self._tasks: dict[str, int] = {}
        self._plans: dict[str, list[int]] = {}  # label -> [steps per loop, loops]

    def __enter__(self) -> StageProgress:
        self._bars.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._bars.stop()

    def stage(self, label: str, steps: int, loops: int = 1) -> None:
        """A bar for `label`: `loops` sampling loops (one per batch) of `steps` network
        evaluations each (a later call for the same label adds its loops)."""
        if label in self._plans:
            self._plans[label][1] += loops
        else:
            self._plans[label] = [steps, loops]
            self._tasks[label] = self._bars.add_task(label, total=steps * loops)
        self._bars.update(self._tasks[label], total=self._plans[label][0] * self._plans[label][1])

    def advance(self, label: str, steps: int = 1, preview: Preview | None = None) -> None:
        self._bars.advance(self._tasks[label], steps)
