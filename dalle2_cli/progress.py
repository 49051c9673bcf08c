"""Progress bars for sampling: one rich bar per stage (CLIP, prior, each decoder unet).

dalle2-pytorch wraps each sampling loop in tqdm. While `StageProgress.loops` is active, those
loops advance our bars instead, labelled in the order the loops run; the decoder's loop over
its unets (which has no description) passes through untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

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


class _Speed(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:6.1f} it/s" if task.speed else "     - it/s", style="progress.data.speed")


class NoProgress:
    """No bars: what scripts use when none are wanted (and from Python). dalle2-pytorch's own
    per-step tqdm bars stay silent too."""

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def stage(self, label: str, steps: int, loops: int = 1) -> None:
        pass

    def advance(self, label: str, steps: int = 1) -> None:
        pass

    @contextlib.contextmanager
    def loops(self, labels: list[str]) -> Iterator[None]:
        """dalle2-pytorch's next sampling loops go through `_follow`, one label each."""
        from dalle2_pytorch import dalle2_pytorch as module

        pending = list(labels)

        def tracked(iterable: Iterable, desc: str | None = None, total: int | None = None, **_ignored) -> Iterable:
            if desc is None or not pending:
                return iterable
            label = pending.pop(0)
            if total is None and hasattr(iterable, "__len__"):
                total = len(iterable)
            return self._follow(iterable, label, total)

        original = module.tqdm
        module.tqdm = tracked
        try:
            yield
        finally:
            module.tqdm = original

    def _follow(self, iterable: Iterable, label: str, total: int | None) -> Iterable:
        return iterable


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
        """A bar for `label`: `loops` sampling loops (one per batch) of about `steps` steps;
        the real count is taken from each loop as it starts."""
        if label in self._plans:
            self._plans[label][1] += loops
        else:
            self._plans[label] = [steps, loops]
            self._tasks[label] = self._bars.add_task(label, total=steps * loops)
        self._bars.update(self._tasks[label], total=self._plans[label][0] * self._plans[label][1])

    def _loop_length(self, label: str, length: int) -> None:
        # dalle2-pytorch's DDIM loops may run one step fewer than asked for (the prior's does).
        plan = self._plans[label]
        if plan[0] != length:
            plan[0] = length
            self._bars.update(self._tasks[label], total=length * plan[1])

    def advance(self, label: str, steps: int = 1) -> None:
        self._bars.advance(self._tasks[label], steps)

    def _follow(self, iterable: Iterable, label: str, total: int | None) -> Iterator:
        if total is not None:
            self._loop_length(label, total)
        for item in iterable:
            yield item
            self.advance(label)
