"""A download's progress: a rich bar (size, speed, ETA) on stderr when it is a terminal, else
one line when it starts."""

from __future__ import annotations

import sys
from typing import Any

from dalle2_cli.messages import Log


class DownloadProgress:
    """A rich progress bar (size, speed, ETA) on stderr when it is a terminal; otherwise one
    line when a download starts. Notes (retries) are printed either way."""

    def __init__(self, name: str, url: str, quiet: bool, log: Log):
        self.name, self.url, self.quiet, self.log = name, url, quiet, log
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> DownloadProgress:
        if not self.quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.bar.start()
        elif not self.quiet:
            self.log(f"downloading {self.name} from {self.url}")
        return self

    def start(self, total: int | None, completed: int) -> None:
        if self.bar is None:
            return
        if self.task is None:
            self.task = self.bar.add_task(self.name, total=total, completed=completed)
        else:
            self.bar.update(self.task, total=total, completed=completed)

    def advance(self, size: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, size)

    def note(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.print(message)
        else:
            self.log(message)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
