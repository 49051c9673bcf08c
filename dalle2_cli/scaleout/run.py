"""text2im at scale: thousands of prompts across processes, GPUs and machines, resumable.

    accelerate launch --num_processes 4 -m dalle2_cli text2im --prompts-file prompts.txt -n 4 -o out/

The work is the job list of a one-process run (every prompt's images in order, with their
seeds and file names), cut into batches exactly as that run cuts it; whole batches go to the
processes, round-robin. Each image's noise comes from its own seed (dalle2_cli.sampling.noise), so a
batch's pixels depend only on the batch: the files are the same whatever the number of
processes, and the same as `dalle2 text2im` makes alone.

Every process appends a line to its own manifest, `manifest-rank<N>.jsonl` in the output
directory, once an image is in place (written atomically). `--resume` reads all of them and
runs only the batches with an image missing, writing only the missing files, so a crash loses
at most the images in flight. One file per process, because appends from several machines to
one file on a shared filesystem can interleave.

Processes coordinate through accelerate's `PartialState` (rank, world size, barriers, object
broadcast and gather); no job system of our own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from dalle2_cli.errors import InputError
from dalle2_cli.io.atomic import remove_leftovers
from dalle2_cli.io.output import DEFAULT_NAME, NameCounter, render_name
from dalle2_cli.io.prompts import Prompt
from dalle2_cli.sampling.settings import check_count, check_total

MANIFEST_PREFIX = "manifest-rank"
MANIFEST_FORMAT = 1
# Barriers wait for rank 0's downloads (several GB for the LAION models) and for the slowest
# process's last batch; torch's default of 30 minutes is too short for the first.
BARRIER_TIMEOUT = timedelta(hours=6)
COMMAND = "text2im"
T = TypeVar("T")


class MainRefused(InputError):
    """The main process's refusal, raised on the other processes too so that all stop; the
    main process reports it, so the others need not print the same line again."""


# -- the launcher ----------------------------------------------------------------------------


def world_size() -> int:
    """Processes in this launch, from the launcher's environment (1 when not launched)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launched() -> bool:
    """Running under `accelerate launch` (any number of processes) or torchrun."""
    return "WORLD_SIZE" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ


# -- the job list ----------------------------------------------------------------------------


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
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    return [list(jobs[start : start + batch_size]) for start in range(0, len(jobs), batch_size)]


def share(items: Sequence[T], process: int, processes: int) -> list[T]:
    """Process `process`'s part of `items`: every `processes`-th, round-robin."""
    return list(items[process::processes])


def jobs_digest(jobs: Sequence[Job]) -> str:
    """Identifies the job list: prompts, image counts, seeds and file names."""
    text = json.dumps([[j.prompt, j.index, j.seed, j.file] for j in jobs], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


# -- the manifest ----------------------------------------------------------------------------


def manifest_path(directory: Path, process: int) -> Path:
    return directory / f"{MANIFEST_PREFIX}{process}.jsonl"


def manifest_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{MANIFEST_PREFIX}*.jsonl"))


def _parse_manifest(path: Path) -> tuple[dict[str, Any] | None, set[str]]:
    """(the settings in its header, or None; the files it records as finished)."""
    header = None
    finished: set[str] = set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        entry = _entry(line)
        if header is None and isinstance(entry.get("settings"), dict):
            header = entry["settings"]
        elif header is not None and isinstance(entry.get("file"), str):
            finished.add(entry["file"])
    return header, finished


def _entry(line: str | bytes) -> dict[str, Any]:
    """A manifest line's object; {} for a line that is none (one a crash cut short: its image
    counts as not finished)."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return entry if isinstance(entry, dict) else {}


@dataclass
class ManifestState:
    """What the manifests of an output directory say."""

    settings: dict[str, Any] | None  # the run's settings; None when there is no manifest
    finished: set[str]  # file names recorded as finished
    files: list[Path]


def read_manifests(directory: Path) -> ManifestState:
    """Read every process's manifest; they must all be of one run."""
    settings, first = None, None
    finished: set[str] = set()
    files = manifest_files(directory)
    for path in files:
        header, recorded = _parse_manifest(path)
        if header is None:
            continue  # created, but killed before its header was written: nothing recorded
        if settings is None:
            settings, first = header, path
        elif header != settings:
            raise InputError(
                f"the manifests {first.name} and {path.name} in {directory} are of different runs: "
                "finish each run in its own --output-dir"
            )
        finished |= recorded
    return ManifestState(settings, finished, files)


class ManifestWriter:
    """Appends this process's finished images to its manifest, each line on disk before the
    next image starts (so a crash loses at most the images in flight)."""

    def __init__(self, directory: Path, process: int, settings: dict[str, Any], config: str | None = None):
        self.path = manifest_path(directory, process)
        has_header = self.path.exists() and _parse_manifest(self.path)[0] is not None
        cut_short = self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        if cut_short:  # a line a crash cut short stays alone on its line, unparsed
            self._file.write("\n")
        if not has_header:
            self._write({"manifest": MANIFEST_FORMAT, "tool": "dalle2-cli", "config": config, "settings": settings})

    def record(self, job: Job) -> None:
        self._write({"file": job.file, "prompt": job.prompt, "index": job.index, "seed": job.seed, "job": job.number})

    def _write(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


# Options named in the message when --resume finds other settings than the first run's.
OPTION_NAMES = {
    "seed": "--seed",
    "batch_size": "--batch-size",
    "weights": "--weights",
    "name": "--name",
    "prior_steps": "--prior-steps",
    "prior_cond_scale": "--prior-cond-scale",
    "prior_samples_per_image": "prior samples per image",
    "decoder_steps": "--decoder-steps",
    "decoder_cond_scale": "--decoder-cond-scale",
    "dtype": "--dtype",
}


def check_same_settings(recorded: dict[str, Any], current: dict[str, Any], directory: Path) -> None:
    """Refuse to mix images of different settings in one directory, naming the first that differs."""
    current = json.loads(json.dumps(current))  # tuples as lists, as the manifest holds them
    for key, value in current.items():
        old = recorded.get(key)
        if old == value:
            continue
        finish = "repeat the first run's options to finish it, or use another --output-dir"
        if key == "jobs":
            raise InputError(f"--resume: {directory} holds a run of other prompts, -n or per-prompt seeds: {finish}")
        if key == "model_sha256":
            changed = sorted(role for role in {*(old or {}), *value} if (old or {}).get(role) != value.get(role))
            files = ", ".join(changed)
            raise InputError(f"--resume: the model files ({files}) differ from those {directory} was made of: {finish}")
        option = OPTION_NAMES.get(key, key)
        raise InputError(f"--resume: {directory} was made with {option} {old}, not {value}: {finish}")


# -- what to do ------------------------------------------------------------------------------


@dataclass
class Plan:
    """What the main process decides, and every process follows."""

    seed: int
    digest: str
    settings: dict[str, Any]  # what the manifest's header records (the model settings come later)
    todo: list[tuple[int, tuple[int, ...]]]  # (batch number, numbers of its images still missing)
    finished: int  # images done by earlier runs
    recorded: dict[str, Any] | None  # the settings in the manifests, when resuming


def prepare(
    prompts: Sequence[Prompt | str],
    num_images: int,
    seed: int | None,
    batch_size: int,
    directory: Path,
    template: str = DEFAULT_NAME,
    weights: str = "ema",
    resume: bool = False,
    overwrite: bool = False,
) -> Plan:
    """Read the output directory and decide what is left to make (on one process only, before
    any process writes there, so that all follow one view of it)."""
    state = read_manifests(directory)
    if state.files and not resume:
        raise InputError(
            f"{directory} holds the manifest of an earlier run ({state.files[0].name}): "
            "add --resume to finish it, or use another --output-dir"
        )
    recorded = state.settings if resume else None
    if seed is None:  # a resumed run keeps the seed the first run drew
        seed = recorded["seed"] if recorded and isinstance(recorded.get("seed"), int) else random.randrange(2**31)
    jobs = plan_jobs(prompts, num_images, seed, template)
    digest = jobs_digest(jobs)
    settings = {
        "seed": seed,
        "batch_size": batch_size,
        "weights": weights,
        "name": template,
        "jobs": digest,  # before "images": a changed job list is named as such
        "images": len(jobs),
    }
    if recorded is not None:
        check_same_settings(recorded, settings, directory)
    finished = {job.file for job in jobs if job.file in state.finished and complete_png(directory / job.file)}
    if recorded is None and not overwrite:
        clashing = [job.file for job in jobs if (directory / job.file).exists()]
        if clashing:
            more = f" and {len(clashing) - 1} more of this run's file names" if len(clashing) > 1 else ""
            raise InputError(
                f"{directory} already holds {clashing[0]}{more}, which no manifest there records: "
                "use another --output-dir, or --overwrite to replace them"
            )
    remove_leftovers(directory, {job.file for job in jobs} | {"grid.png"})
    todo = []
    for number, batch in enumerate(cut_batches(jobs, batch_size)):
        missing = tuple(job.number for job in batch if job.file not in finished)
        if missing:
            todo.append((number, missing))
    return Plan(seed, digest, settings, todo, len(finished), recorded)


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


# -- running ---------------------------------------------------------------------------------


class _ProcessLog:
    """Model loading says the same on every process: only the main one says it. What comes
    later (a prompt cut short in this process's batches) is said with the process number."""

    def __init__(self, process: int, say: Callable[[str], None]):
        self.process, self.say, self.loading = process, say, True

    def __call__(self, message: str) -> None:
        if self.process == 0:
            self.say(message)
        elif not self.loading:
            self.say(f"process {self.process}: {message}")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@contextmanager
def _process_group() -> Iterator[Any]:
    """accelerate's `PartialState` for this run. Under a launch, the process group is
    destroyed when the run ends: one run per launched process."""
    from accelerate import PartialState

    if world_size() == 1:
        yield PartialState(cpu=True)
        return
    # Gloo whatever the device: the processes exchange only small objects (a plan, counts,
    # records), which gloo does without taking GPU memory, and several processes may then
    # share one GPU (which NCCL refuses).
    state = PartialState(cpu=True, backend="gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield state
        state.wait_for_everyone()  # no process tears down while another still sends to it
    finally:
        # Left to the interpreter's exit, gloo's threads can abort the process after its work
        # is done ("terminate called without an active exception", pytorch issue 190489).
        state.destroy_process_group()


def _device(name: str | None, local_process: int) -> str:
    """Each process on its own GPU unless one was named (`cuda:N`): local process i on GPU i
    (modulo the count, so that several processes can share a GPU)."""
    import torch

    from dalle2_cli.loading.devices import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_process % torch.cuda.device_count())
    return str(device)


def _one_for_all(state: Any, value: Any) -> Any:
    """The main process's `value`, on every process."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value if state.is_main_process else None])[0]


def _all_agree(state: Any, error: str | None) -> None:
    """Stop every process when any one found a problem; the main process reports the first."""
    from accelerate.utils import gather_object

    errors = [(process, e) for process, e in enumerate(gather_object([error])) if e]
    if errors:
        process, message = errors[0]
        if not state.is_main_process:
            raise MainRefused(message)
        raise InputError(message if process == 0 else f"process {process}: {message}")


def model_settings(script: Any) -> dict[str, Any]:
    """The sampling settings in effect (the config's defaults filled in) and the model files'
    sha256: what else must match for --resume. Loads the models."""
    from dalle2_cli.sources.digests import model_file_sha256

    manager = script.models
    return {
        **script.plan(uses_prior=True),
        "dtype": str(manager.dtype).removeprefix("torch."),
        "model_sha256": {role: model_file_sha256(path) for role, path in manager.files.items()},
    }


def run_text2im(
    model_config: Any,
    prompts: Sequence[Prompt | str],
    directory: Path,
    num_images: int = 1,
    settings: Any = None,
    *,
    config_name: str | None = None,
    load: dict[str, Any] | None = None,
    template: str = DEFAULT_NAME,
    resume: bool = False,
    overwrite: bool = False,
    grid: bool = False,
    grid_rows: int | None = None,
    progress: bool = False,
    say: Callable[[str], None] = _stderr,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any] | None:
    """Make `num_images` images per prompt into `directory` with this process's share of the
    batches, recording each in this process's manifest; with `resume`, skip what the
    manifests record. Call it once in every process of a launch (or alone: one process does all).

    `model_config`: a dalle2_cli.config.ModelLoadConfig; `settings`: SamplingSettings (its
    seed, when None, is drawn once for all processes); `load`: DalleModelManager's keyword
    arguments; `say` gets what is loaded and made, `warn` warnings (default: `say`). Returns
    the report (`--json`'s object: the images written, per-process
    figures) on the main process, None on the others.
    """
    import functools

    from accelerate.utils import gather_object

    from dalle2_cli.io.output import image_record
    from dalle2_cli.loading.manager import DalleModelManager
    from dalle2_cli.sampling.pipelines import TextToImage
    from dalle2_cli.sampling.settings import SamplingSettings
    from dalle2_cli.sources.cache_admin import download_config
    from dalle2_cli.sources.resolve import resolve_file

    settings = settings or SamplingSettings()
    load = dict(load or {})
    name = config_name or str(model_config.source_path)
    prompts = [p if isinstance(p, Prompt) else Prompt(p) for p in prompts]
    with _process_group() as state:
        process, processes, main = state.process_index, state.num_processes, state.is_main_process

        plan: Plan | str | None = None
        if main:
            try:
                plan = prepare(
                    prompts,
                    num_images,
                    settings.seed,
                    settings.batch_size,
                    directory,
                    template,
                    "ema" if load.get("prefer_ema", True) else "raw",
                    resume,
                    overwrite,
                )
            except InputError as error:
                plan = str(error)
        plan = _one_for_all(state, plan)
        if isinstance(plan, str):
            raise InputError(plan) if main else MainRefused(plan)
        jobs = plan_jobs(prompts, num_images, plan.seed, template)
        if jobs_digest(jobs) != plan.digest:
            # The prompts file differs between machines (or changed while they started).
            raise InputError(
                f"process {process} read other prompts than process 0: give every process the same prompts"
            )
        batches = cut_batches(jobs, settings.batch_size)
        mine = share(plan.todo, process, processes)

        log = _ProcessLog(process, say)
        with state.main_process_first():  # rank 0 downloads; the others then find the files cached
            download_config(model_config, name, quiet=not (main and progress), offline=load.get("offline"))
        load["device"] = _device(load.get("device") or model_config.device, state.local_process_index)
        manager = DalleModelManager(
            model_config,
            resolve=functools.partial(resolve_file, config_name=name, quiet=not progress, offline=load.get("offline")),
            log=log,
            warn=(lambda message: log(f"warning: {message}")) if warn is None or process else warn,
            name=name,
            **load,
        )
        script = TextToImage(manager, dataclasses.replace(settings, seed=plan.seed))
        current = model_settings(script)
        error = None
        if plan.recorded is not None:
            try:
                check_same_settings(plan.recorded, current, directory)
            except InputError as refused:
                error = str(refused)
        _all_agree(state, error)
        log.loading = False

        records: list[dict[str, Any]] = []
        with (
            ManifestWriter(directory, process, {**plan.settings, **current}, name) as manifest,
            _combined_progress(directory, len(jobs), plan.finished, processes, main and progress),
        ):
            state.wait_for_everyone()  # the clock starts when every process has its models
            start = time.perf_counter()
            for number, missing in mine:
                batch = batches[number]
                made = script.run([Prompt(job.prompt, 1, job.seed) for job in batch], 1)
                for job, item in zip(batch, made, strict=True):
                    if job.number not in missing:
                        continue  # finished by an earlier run: the batch ran whole only to keep pixels exact
                    item = dataclasses.replace(item, index=job.index)  # run alone, each image was index 0
                    records.append({"job": job.number, **image_record(item, item.save(directory / job.file))})
                    manifest.record(job)
            seconds = time.perf_counter() - start

            figures = gather_object(
                [{"process": process, "device": str(manager.device), "images": len(records), "seconds": seconds}]
            )
            every_record = gather_object(records)
            elapsed = time.perf_counter() - start
        if not main:
            return None
        every_record.sort(key=lambda record: record["job"])
        for record in every_record:
            del record["job"]
        total = sum(f["images"] for f in figures)
        report: dict[str, Any] = {
            "images": every_record,
            "config": name,
            "device": str(manager.device),
            "already_done": plan.finished,
            "processes": figures,
            "seconds": elapsed,
            "images_per_second": total / elapsed if elapsed > 0 else None,
        }
        done_before = f" ({plan.finished} were done already)" if plan.finished else ""
        say(f"saved {total} image(s) to {directory}{done_before}")
        for line in summary_lines(figures, elapsed):
            say(line)
        if grid:
            report["grid"] = str(_write_grid(directory, jobs, grid_rows, overwrite or plan.recorded is not None))
            say(f"  {report['grid']} (grid)")
        return report


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


def _write_grid(directory: Path, jobs: Sequence[Job], rows: int | None, overwrite: bool) -> Path:
    """The contact sheet of the whole run (a row per prompt), from the files on disk, which
    every process wrote."""
    from PIL import Image

    from dalle2_cli.io.output import rows_by_input, write_grid

    def read(job: Job) -> Image.Image:
        with Image.open(directory / job.file) as image:
            return image.copy()

    groups = rows_by_input((job.index, read(job)) for job in jobs)
    return write_grid(groups, directory, [str(directory / job.file) for job in jobs], rows, overwrite)


# -- the combined progress view --------------------------------------------------------------


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
                file = _entry(line).get("file")
                if isinstance(file, str):
                    self.files.add(file)
        return len(self.files)


@contextmanager
def _combined_progress(directory: Path, total: int, finished: int, processes: int, enabled: bool) -> Iterator[None]:
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
