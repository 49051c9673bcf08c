"""The main process's view of a launched run: one bar for every process's images, read from the
manifests (the output directory is shared)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dalle2_cli.scaleout.manifest import entry_of, manifest_files


class _ManifestTail:
    """New records in every process's manifest since it was created: the main process's view
    of the whole run's progress (the output directory is shared)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.offsets = {path: path.stat().st_size for path in manifest_files(directory)}
        self.files: set[str] = set()

    def poll(self) -> int:
        for path in manifest_files(self.directory):
            offset = self.offsets.get(path, 0)
            try:
                with open(path, "rb") as file:
                    file.seek(offset)
                    data = file.read()
            except OSError:
                continue
            whole = data[: data.rfind(b"\n") + 1]  # a line still being written waits
            self.offsets[path] = offset + len(whole)
            for line in whole.splitlines():
                file = entry_of(line).get("file")
                if isinstance(file, str):
                    self.files.add(file)
        return len(self.files)


@contextmanager
def combined_progress(directory: Path, total: int, finished: int, processes: int, enabled: bool) -> Iterator[None]:
    """On the main process: one bar for every process's images, read from the manifests."""
    if not enabled:
        yield
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    tail = _ManifestTail(directory)  # before any process writes: counts this run's images only
    stop = threading.Event()
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    plural = "es" if processes != 1 else ""
    task = bars.add_task(f"images ({processes} process{plural})", total=total, completed=finished)

    def follow() -> None:
        while not stop.wait(0.5):
            bars.update(task, completed=finished + tail.poll())

    watcher = threading.Thread(target=follow, daemon=True)
    with bars:
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()
            bars.update(task, completed=finished + tail.poll())
