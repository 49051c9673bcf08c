"""Requests that arrive close together and sample alike run as one batch, on one worker thread.

A job waits at most `window_s` for others with the same key (the same command and sampling
settings) to join it, then runs with them, up to `max_images` images in all. Each image has its
own seed, so what a job gets does not depend on who shared its batch. One worker means the
models never run two batches at once: batching, not threads, is what makes the server fast.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from dalle2_cli.errors import Dalle2Error


class QueueFull(Dalle2Error):
    """More jobs wait than the queue holds: try again after `retry_after_s`."""

    def __init__(self, waiting: int, retry_after_s: float):
        super().__init__(f"the server is busy ({waiting} requests waiting): try again in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class Job:
    key: Hashable  # jobs with equal keys may share a batch
    images: int  # how many images the job asks for
    payload: Any  # what the runner needs to make them
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


Runner = Callable[[Sequence[Job]], Sequence[Any]]  # one result per job, in order


class Batcher:
    """Collects jobs into batches and runs them with `run` on its own thread."""

    def __init__(self, run: Runner, max_images: int = 8, window_s: float = 0.05, queue_size: int = 64):
        if max_images < 1 or queue_size < 1 or window_s < 0:
            raise ValueError("max_images and queue_size must be at least 1, window_s not negative")
        self.run, self.max_images, self.window_s, self.queue_size = run, max_images, window_s, queue_size
        self._waiting: list[Job] = []
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches run so far (the tests and the log read it)
        self.jobs_done = 0
        self._last_batch_s = 1.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="dalle2-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()

    def submit(self, key: Hashable, images: int, payload: Any) -> Future:
        """Queue a job; its future gets the runner's result (or its error). Raises QueueFull."""
        job = Job(key, images, payload)
        with self._changed:
            if len(self._waiting) >= self.queue_size:
                # Roughly when a place frees: the batches ahead, at the last batch's pace.
                ahead = max(1, len(self._waiting) // max(1, self.max_images))
                raise QueueFull(len(self._waiting), max(1.0, ahead * self._last_batch_s))
            self._waiting.append(job)
            self._changed.notify_all()
        return job.future

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._waiting)

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            # A job whose client hung up before it started is dropped here.
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if batch:
                started = time.monotonic()
                self._run(batch)
                self._last_batch_s = time.monotonic() - started
                self.batches += 1
                self.jobs_done += len(batch)

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and the later ones with its key, once its window has passed or the
        batch is full."""
        with self._changed:
            while not self._waiting and not self._stopping:
                self._changed.wait()
            if self._stopping:
                for job in self._waiting:
                    job.future.cancel()
                return None
            first = self._waiting[0]
            while not self._stopping:
                left = first.arrived + self.window_s - time.monotonic()
                if left <= 0 or self._images_like(first) >= self.max_images:
                    break
                self._changed.wait(left)
            batch, images = [], 0
            for job in self._waiting:
                if job.key == first.key and (not batch or images + job.images <= self.max_images):
                    batch.append(job)
                    images += job.images
            self._waiting = [job for job in self._waiting if job not in batch]
            return batch

    def _images_like(self, first: Job) -> int:
        return sum(job.images for job in self._waiting if job.key == first.key)

    def _run(self, batch: list[Job]) -> None:
        try:
            results = self.run(batch)
        except Exception as error:  # noqa: BLE001 - handed to the job's caller, who reports it
            if len(batch) == 1:
                batch[0].future.set_exception(error)
                return
            # One bad job must not fail the others: each runs again alone.
            for job in batch:
                self._run_alone(job)
            return
        for job, result in zip(batch, results, strict=True):
            job.future.set_result(result)

    def _run_alone(self, job: Job) -> None:
        try:
            job.future.set_result(self.run([job])[0])
        except Exception as error:  # noqa: BLE001 - as above
            job.future.set_exception(error)
