"""Every generating run, in one process or across the processes of a launch: the one path from
a request (what to make, how to sample, where to write) to the files.

    accelerate launch --num_processes 4 -m dalle2_cli text2im --prompts-file prompts.txt -n 4 -o out/

A run loads the models, makes the images and saves each as its batch finishes, then the grid
and what else the work writes (animations), and returns the report. Text to image is cut into
the jobs a one-process run makes (dalle2_cli.scaleout.jobs): whole batches go to the processes,
round-robin, and since each image's noise comes from its own seed (dalle2_cli.sampling.noise),
a batch's pixels depend only on the batch: the files are the same whatever the number of
processes. A launched run, or one asked to `resume`, records every image in a manifest
(dalle2_cli.scaleout.manifest) and skips what earlier runs recorded; its files have the names
the plan gives them. A plain run claims free names instead (`-2`, `-3`, ... for names taken).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dalle2_cli.errors import InputError
from dalle2_cli.io.output import DEFAULT_NAME, prepare_directory
from dalle2_cli.loading.choices import Weights
from dalle2_cli.messages import Log, stderr
from dalle2_cli.sampling.settings import SamplingSettings
from dalle2_cli.scaleout.jobs import Job, cut_batches, jobs_digest, plan_jobs, share
from dalle2_cli.scaleout.manifest import ManifestWriter, Plan, check_same_settings, prepare
from dalle2_cli.scaleout.processes import (
    MainRefused,
    ProcessLog,
    all_agree,
    device_for,
    launched,
    one_for_all,
    process_group,
    world_size,
)
from dalle2_cli.scaleout.progress import combined_progress
from dalle2_cli.scaleout.works import TextToImageWork, Work

__all__ = ["MainRefused", "Request", "launched", "run", "world_size"]


@dataclass
class Request:
    """What to make (`work`), with which models, how to sample and where to write."""

    work: Work | TextToImageWork
    config: Any  # a dalle2_cli.config.ModelLoadConfig
    config_name: str
    directory: Path
    settings: SamplingSettings = dataclasses.field(default_factory=SamplingSettings)
    load: dict[str, Any] = dataclasses.field(default_factory=dict)  # DalleModelManager's keyword arguments
    template: str = DEFAULT_NAME
    overwrite: bool = False
    resume: bool = False
    grid: bool = False
    grid_rows: int | None = None

    @property
    def recorded(self) -> bool:
        """Whether the run keeps manifests: launched, or asked to resume (text to image only)."""
        return self.work.scalable and (self.resume or launched())


def run(request: Request, say: Log = stderr, warn: Log | None = None, progress: bool = False) -> dict[str, Any] | None:
    """Make the request's images into its directory. Call it once in every process of a launch
    (or alone). `say` gets what is loaded and made, `warn` warnings (default: `say`, marked);
    `progress` shows bars on stderr. Returns the report (`--json`'s object: the images written,
    and for text to image per-process figures) on the main process, None on the others."""
    if not request.work.scalable and world_size() > 1:
        raise InputError("this command runs in one process: launch only text2im with accelerate or torchrun")
    with process_group() as group:
        session = _Session(request, group, say, warn or (lambda message: say(f"warning: {message}")), progress)
        return session.run()


class _Session:
    """One process's part of a run."""

    def __init__(self, request: Request, group: Any, say: Log, warn: Log, progress: bool):
        self.request, self.group, self.progress = request, group, progress
        self.process, self.processes, self.main = group.process_index, group.num_processes, group.is_main_process
        self.log = ProcessLog(self.process, say)
        self.say, self.warn = say, warn

    def run(self) -> dict[str, Any] | None:
        request, work = self.request, self.request.work
        plan = self._plan() if request.recorded else None
        seed = plan.seed if plan else request.settings.seed
        if seed is None:
            seed = one_for_all(self.group, random.randrange(2**31) if self.main else None)
        manager = self._manager()
        settings = dataclasses.replace(request.settings, seed=seed)
        self.made: list = []  # this process's images, for the work's `after`
        self.jobs: list[Job] = []
        start = time.perf_counter()
        records = self._make_jobs(manager, settings, plan) if work.scalable else self._make_whole(manager, settings)
        seconds = time.perf_counter() - start
        figure = {"process": self.process, "device": str(manager.device), "images": len(records), "seconds": seconds}
        figures = self._gather([figure])
        every = sorted(self._gather(records), key=lambda record: record["job"])
        elapsed = time.perf_counter() - start
        if not self.main:
            return None
        return self._report(manager, every, figures, elapsed, plan)

    # -- planning and loading -----------------------------------------------------------------

    def _plan(self) -> Plan:
        """The main process reads the output directory and decides what is left; all follow."""
        request, work = self.request, self.request.work
        plan: Plan | str | None = None
        refused: InputError | None = None
        if self.main:
            try:
                prepare_directory(request.directory)  # from Python too, not only after the CLI's check
                weights = str(request.load.get("weights", Weights.ema))
                s = request.settings
                plan = prepare(
                    work.prompts,
                    work.num_images,
                    s.seed,
                    s.batch_size,
                    request.directory,
                    request.template,
                    weights,
                    request.resume,
                    request.overwrite,
                )
            except InputError as error:
                refused, plan = error, str(error)
        plan = one_for_all(self.group, plan)
        if isinstance(plan, str):
            raise refused if refused is not None else MainRefused(plan)
        return plan

    def _manager(self) -> Any:
        from dalle2_cli.loading.manager import DalleModelManager
        from dalle2_cli.sources.cache_admin import download_config
        from dalle2_cli.sources.resolve import resolve_file

        request = self.request
        load = dict(request.load)
        quiet = not (self.main and self.progress)
        if self.processes > 1:
            with self.group.main_process_first():  # rank 0 downloads; the others then find the files cached
                download_config(request.config, request.config_name, quiet=quiet, offline=load.get("offline"))
        load["device"] = device_for(load.get("device") or request.config.device, self.group.local_process_index)
        resolve = functools.partial(
            resolve_file, config_name=request.config_name, quiet=quiet, offline=load.get("offline"), log=self.log
        )
        warn = self.warn if self.process == 0 else (lambda message: self.log(f"warning: {message}"))
        return DalleModelManager(
            request.config, resolve=resolve, log=self.log, warn=warn, name=request.config_name, **load
        )

    def _script(self, manager: Any, settings: SamplingSettings, bars: Any, on_image: Any = None) -> Any:
        import importlib

        module, _, name = self.request.work.script.rpartition(".")
        script_class = getattr(importlib.import_module(f"dalle2_cli.sampling.{module}"), name)
        return script_class(manager, settings, progress=bars, on_image=on_image)

    # -- making --------------------------------------------------------------------------------

    def _make_whole(self, manager: Any, settings: SamplingSettings) -> list[dict[str, Any]]:
        """A work that one script makes whole, each image saved under a new name as it comes."""
        from dalle2_cli.io.output import ImageWriter

        request = self.request
        writer = ImageWriter(request.directory, request.template, request.overwrite)

        def save(item: Any) -> None:
            self.say(f"  {writer.write(item)['path']}")

        with _stage_bars(self.progress) as bars:
            self.made = request.work.make(self._script(manager, settings, bars, save))
        return [{"job": number, **record} for number, record in enumerate(writer.records)]

    def _make_jobs(self, manager: Any, settings: SamplingSettings, plan: Plan | None) -> list[dict[str, Any]]:
        """Text to image: this process's share of the batches, each image saved as its batch
        finishes (and recorded in the manifest, when the run keeps one)."""
        from dalle2_cli.io.output import ImageWriter, image_record

        request, work = self.request, self.request.work
        jobs = self.jobs = plan_jobs(work.prompts, work.num_images, settings.seed, request.template)
        if plan is not None and jobs_digest(jobs) != plan.digest:
            # The prompts file differs between machines (or changed while they started).
            raise InputError(
                f"process {self.process} read other prompts than process 0: give every process the same prompts"
            )
        batches = cut_batches(jobs, settings.batch_size)
        todo = plan.todo if plan is not None else [(n, tuple(j.number for j in b)) for n, b in enumerate(batches)]
        mine = share(todo, self.process, self.processes)
        bars_on = self.progress and plan is None
        with _stage_bars(bars_on) as bars:
            script = self._script(manager, settings, bars)
            current = self._check_settings(script, plan)
            self.log.loading = False
            writer = ImageWriter(request.directory, request.template, request.overwrite)
            records: list[dict[str, Any]] = []
            with self._recording(plan, current, len(jobs)) as manifest:
                self.group.wait_for_everyone()  # the clock starts when every process has its models
                for number, missing in mine:
                    batch = batches[number]
                    for job, item in zip(batch, work.make_batch(script, batch), strict=True):
                        if job.number not in missing:
                            continue  # finished by an earlier run: the batch ran whole to keep pixels exact
                        records.append({"job": job.number, **self._save(item, job, writer, manifest, image_record)})
                        self.made.append(item)
        return records

    def _save(self, item: Any, job: Job, writer: Any, manifest: ManifestWriter | None, image_record: Any) -> dict:
        if manifest is None:
            record = writer.write(item)  # a plain run: a new name, claimed
        else:
            record = image_record(item, item.save(self.request.directory / job.file))  # the plan's name
            manifest.record(job)
        self.say(f"  {record['path']}")
        return record

    def _check_settings(self, script: Any, plan: Plan | None) -> dict[str, Any] | None:
        """A resumed run's settings must be the first run's (models loaded, defaults filled in)."""
        if plan is None:
            return None
        manager = script.models
        current = {
            **script.plan(uses_prior=True),
            "dtype": str(manager.dtype).removeprefix("torch."),
            "model_sha256": manager.sha256(),
            "candidates": script.candidates(self.request.work.candidates),
        }
        error = None
        if plan.recorded is not None:
            try:
                check_same_settings(plan.recorded, current, self.request.directory)
            except InputError as refused:
                error = refused
        all_agree(self.group, error)
        return current

    @contextlib.contextmanager
    def _recording(self, plan: Plan | None, current: dict[str, Any] | None, total: int) -> Iterator[Any]:
        """The manifest this process appends to, and the main process's bar of all processes'
        images, when the run keeps manifests; None otherwise."""
        if plan is None:
            yield None
            return
        request = self.request
        settings = {**plan.settings, **(current or {})}
        with (
            ManifestWriter(request.directory, self.process, settings, request.config_name) as manifest,
            combined_progress(request.directory, total, plan.finished, self.processes, self.main and self.progress),
        ):
            yield manifest

    def _gather(self, items: list) -> list:
        if self.processes == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    # -- reporting -----------------------------------------------------------------------------

    def _report(self, manager: Any, records: list, figures: list, elapsed: float, plan: Plan | None) -> dict:
        request = self.request
        for record in records:
            del record["job"]
        total = len(records)
        report: dict[str, Any] = {"images": records, "config": request.config_name, "device": str(manager.device)}
        if manager.device.type == "cuda":
            import torch

            report["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(manager.device) / 2**30
        done_before = f" ({plan.finished} were done already)" if plan and plan.finished else ""
        self.say(f"saved {total} image(s) to {request.directory}{done_before}")
        if request.work.scalable:
            report.update(
                already_done=plan.finished if plan else 0,
                processes=figures,
                seconds=elapsed,
                images_per_second=total / elapsed if elapsed > 0 else None,
            )
            if request.recorded:
                for line in summary_lines(figures, elapsed):
                    self.say(line)
        if request.grid:
            # A recorded run's sheet shows every image of the run, the earlier runs' too.
            shown = records
            if plan is not None:
                shown = [{"index": job.index, "path": str(request.directory / job.file)} for job in self.jobs]
            replace = request.overwrite or (plan is not None and plan.recorded is not None)
            report["grid"] = str(_write_grid(shown, request.grid_rows, request.directory, replace))
            self.say(f"  {report['grid']} (grid)")
        if request.work.after is not None:
            report.update(request.work.after(self.made, request.directory, self.say))
        return report


def _stage_bars(enabled: bool) -> Any:
    """Bars per stage (CLIP, prior, each unet) on a terminal; none otherwise."""
    import sys

    from dalle2_cli.sampling.progress import NoProgress, StageProgress

    return StageProgress() if enabled and sys.stderr.isatty() else NoProgress()


def summary_lines(figures: Sequence[dict[str, Any]], elapsed: float) -> list[str]:
    """Images per process and throughput, one line each, then the whole run's."""
    lines = []
    for f in figures:
        rate = f"{f['images'] / f['seconds']:.2f} images/s" if f["seconds"] > 0 and f["images"] else "-"
        made = f"{f['images']} image(s) in {f['seconds']:.1f} s"
        lines.append(f"  process {f['process']} ({f['device']}): {made}, {rate}")
    total = sum(f["images"] for f in figures)
    rate = f"{total / elapsed:.2f} images/s" if elapsed > 0 else "-"
    plural = "es" if len(figures) != 1 else ""
    lines.append(f"  all: {total} image(s) in {elapsed:.1f} s with {len(figures)} process{plural}, {rate}")
    return lines


def _write_grid(records: Sequence[dict[str, Any]], rows: int | None, directory: Path, overwrite: bool) -> Path:
    """The contact sheet of the run's images (a row per prompt or input), read back from the
    files every process wrote."""
    from PIL import Image

    from dalle2_cli.io.output import rows_by_input, write_grid

    def read(path: str) -> Image.Image:
        with Image.open(path) as image:
            return image.copy()

    groups = rows_by_input((record["index"], read(record["path"])) for record in records)
    return write_grid(groups, directory, rows, overwrite)
