"""Requests that arrive close together and sample alike run as one batch, on one worker thread.

A job waits at most `window_s` for others with the same key (the same command and sampling
settings) to join it, then runs with them, up to `max_images` images in all. Each image has its
own seed, so what a job gets does not depend on who shared its batch. With one worker (the
default) the models never run two batches at once: batching, not threads, is what makes a
server fast on one device. With several (one per device, or CPU workers splitting the cores),
each batch runs on the first free one.

Whoever waits for a job may watch it (`JobFuture.watch`): the batcher tells it its place in
the queue, the runner how its batch advances (dalle2_cli.serve.progress).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from dalle2_cli.errors import Cancelled, Dalle2Error


class Stopping(Dalle2Error):
    """The batcher takes no more jobs: the server is stopping."""


class QueueFull(Dalle2Error):
    """More jobs wait than the queue holds: try again after `retry_after_s`."""

    def __init__(self, waiting: int, retry_after_s: float):
        super().__init__(f"the server is busy ({waiting} requests waiting): try again in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class JobFuture(Future):
    """A job's result to come; `abandon()` when nobody waits for it any more."""

    abandoned = False

    def __init__(self) -> None:
        super().__init__()
        self._watchers: list[Callable[[Any], None]] = []
        self.latest: Any = None  # the last update told

    def watch(self, watcher: Callable[[Any], None]) -> None:
        """Call `watcher(update)` with each update of this job from now on (on the batcher's
        threads: it must return quickly, as putting it on a queue does)."""
        self._watchers.append(watcher)
        if self.latest is not None:
            watcher(self.latest)

    def tell(self, update: Any) -> None:
        self.latest = update
        for watcher in list(self._watchers):
            watcher(update)

    def abandon(self) -> None:
        """Drop the job if it has not started; if it runs, let its batch stop early."""
        if not self.cancel():
            self.abandoned = True


@dataclass(frozen=True)
class Queued:
    """The update a waiting job is told: how many jobs wait before it."""

    ahead: int

    def line(self) -> str:
        return "queued: next" if not self.ahead else f"queued: {self.ahead} request{'s' * (self.ahead > 1)} ahead"


@dataclass(eq=False)
class Job:
    key: Hashable  # jobs with equal keys may share a batch
    images: int  # how many images the job asks for
    payload: Any  # what the runner needs to make them
    future: JobFuture = field(default_factory=JobFuture)
    arrived: float = field(default_factory=time.monotonic)


# One result per job, in order; the runner calls `stop()` as it goes and, when it says so,
# raises Cancelled (it is passed in, so that a runner decides where it can stop cleanly). The
# last argument is which worker runs the batch (0 to workers - 1).
Runner = Callable[[Sequence[Job], Callable[[], bool], int], Sequence[Any]]


class Batcher:
    """Collects jobs into batches and runs them with `run` on its own thread."""

    def __init__(
        self, run: Runner, max_images: int = 8, window_s: float = 0.05, queue_size: int = 64, workers: int = 1
    ):
        if max_images < 1 or queue_size < 1 or window_s < 0 or workers < 1:
            raise ValueError("max_images, queue_size and workers must be at least 1, window_s not negative")
        self.run, self.max_images, self.window_s, self.queue_size = run, max_images, window_s, queue_size
        self.workers = workers
        self._waiting: list[Job] = []
        self._changed = threading.Condition()
        self._stopping = False
        self._deadline = float("inf")  # once stopping: when a running batch is cancelled
        self._threads: list[threading.Thread] = []
        self.batches = 0  # batches run so far (the tests and the log read it)
        self.jobs_done = 0
        self._last_batch_s = 1.0

    def start(self) -> None:
        for worker in range(self.workers):
            thread = threading.Thread(target=self._work, args=(worker,), name=f"dalle2-worker-{worker}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def begin_stop(self, grace_s: float = 0.0) -> None:
        """Take no more jobs, cancel the waiting ones, and cancel a running batch at its next
        step once `grace_s` has passed. Returns at once (see `stop`)."""
        with self._changed:
            self._deadline = min(self._deadline, time.monotonic() + grace_s)
            self._stopping = True
            self._changed.notify_all()

    def stop(self, grace_s: float = 0.0, wait_s: float | None = None) -> bool:
        """`begin_stop(grace_s)`, then wait for the worker (at most `wait_s` after the grace
        period). Whether it has ended."""
        self.begin_stop(grace_s)
        until = None if wait_s is None else max(self._deadline, time.monotonic()) + wait_s
        for thread in self._threads:
            thread.join(None if until is None else max(0.0, until - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def hurry(self) -> None:
        """Cancel a running batch at its next step, now. Safe from a signal handler: it only
        assigns a number."""
        self._deadline = float("-inf")

    def submit(self, key: Hashable, images: int, payload: Any) -> JobFuture:
        """Queue a job; its future gets the runner's result (or its error). Raises QueueFull,
        or Stopping once the batcher stops."""
        job = Job(key, images, payload)
        with self._changed:
            if self._stopping:
                raise Stopping("the server is stopping: it takes no new requests")
            if len(self._waiting) >= self.queue_size:
                # Roughly when a place frees: the batches ahead, at the last batch's pace.
                ahead = max(1, len(self._waiting) // max(1, self.max_images))
                raise QueueFull(len(self._waiting), max(1.0, ahead * self._last_batch_s))
            self._waiting.append(job)
            job.future.tell(Queued(len(self._waiting) - 1))
            self._changed.notify_all()
        return job.future

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._waiting)

    def _work(self, worker: int) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            # A job whose client hung up before it started is dropped here.
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if batch:
                started = time.monotonic()
                self._run(batch, worker)
                with self._changed:
                    self._last_batch_s = time.monotonic() - started
                    self.batches += 1
                    self.jobs_done += len(batch)

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and the later ones with its key, once its window has passed or the
        batch is full."""
        with self._changed:
            while True:
                while not self._waiting and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    for job in self._waiting:
                        job.future.cancel()
                    return None
                first = self._waiting[0]
                left = first.arrived + self.window_s - time.monotonic()
                if left <= 0 or self._images_like(first) >= self.max_images:
                    break
                self._changed.wait(left)  # then look again: another worker may have taken it
            batch, images = [], 0
            for job in self._waiting:
                if job.key == first.key and (not batch or images + job.images <= self.max_images):
                    batch.append(job)
                    images += job.images
            self._waiting = [job for job in self._waiting if job not in batch]
            for ahead, job in enumerate(self._waiting):
                job.future.tell(Queued(ahead))
            self._changed.notify_all()  # another free worker may take the next batch now
            return batch

    def _images_like(self, first: Job) -> int:
        return sum(job.images for job in self._waiting if job.key == first.key)

    def _stop_check(self, batch: list[Job]) -> Callable[[], bool]:
        def stop() -> bool:
            if all(job.future.abandoned for job in batch):
                return True
            return self._stopping and time.monotonic() >= self._deadline

        return stop

    def _run(self, batch: list[Job], worker: int) -> None:
        try:
            results = self.run(batch, self._stop_check(batch), worker)
        except Cancelled as error:
            for job in batch:
                job.future.set_exception(error)
            return
        except Exception as error:  # noqa: BLE001 - handed to the job's caller, who reports it
            if len(batch) == 1:
                batch[0].future.set_exception(error)
                return
            # One bad job must not fail the others: each runs again alone.
            for job in batch:
                self._run_alone(job, worker)
            return
        for job, result in zip(batch, results, strict=True):
            job.future.set_result(result)

    def _run_alone(self, job: Job, worker: int) -> None:
        try:
            job.future.set_result(self.run([job], self._stop_check([job]), worker)[0])
        except Exception as error:  # noqa: BLE001 - as above
            job.future.set_exception(error)
