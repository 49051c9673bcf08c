"""What an output directory records of the runs that wrote it: each process appends a line to
its own manifest, `manifest-rank<N>.jsonl`, once an image is in place (written atomically), so
a crash loses at most the images in flight; `prepare` reads them all and decides what is left
to make. One file per process, because appends from several machines to one file on a shared
filesystem can interleave."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dalle2_cli.errors import InputError, SettingError, literal
from dalle2_cli.io.atomic import remove_leftovers
from dalle2_cli.io.output import DEFAULT_NAME
from dalle2_cli.io.prompts import Prompt
from dalle2_cli.scaleout.jobs import Job, complete_png, cut_batches, jobs_digest, plan_jobs

MANIFEST_PREFIX = "manifest-rank"
MANIFEST_FORMAT = 1


def manifest_path(directory: Path, process: int) -> Path:
    return directory / f"{MANIFEST_PREFIX}{process}.jsonl"


def manifest_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{MANIFEST_PREFIX}*.jsonl"))


def _parse_manifest(path: Path) -> tuple[dict[str, Any] | None, set[str]]:
    """(the settings in its header, or None; the files it records as finished)."""
    header = None
    finished: set[str] = set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        entry = entry_of(line)
        if header is None and isinstance(entry.get("settings"), dict):
            header = entry["settings"]
        elif header is not None and isinstance(entry.get("file"), str):
            finished.add(entry["file"])
    return header, finished


def entry_of(line: str | bytes) -> dict[str, Any]:
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
                template=literal(f"the manifests {first.name} and {path.name} in {directory} are of different runs: ")
                + "finish each run in its own {directory}"
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


# Settings that manifests record only since a later version, and what their absence means.
RECORDED_LATER = {"candidates": 1}


def check_same_settings(recorded: dict[str, Any], current: dict[str, Any], directory: Path) -> None:
    """Refuse to mix images of different settings in one directory, naming the first that differs."""
    current = json.loads(json.dumps(current))  # tuples as lists, as the manifest holds them
    finish = "resume with the first run's settings to finish it, or use another output directory"
    for key, value in current.items():
        old = recorded.get(key, RECORDED_LATER.get(key))
        if old == value:
            continue
        if key == "jobs":
            raise InputError(f"{directory} holds a run of other prompts, image counts or seeds: {finish}")
        if key == "model_sha256":
            changed = sorted(role for role in {*(old or {}), *value} if (old or {}).get(role) != value.get(role))
            files = ", ".join(changed)
            raise InputError(f"the model files ({files}) differ from those {directory} was made of: {finish}")
        made = literal(f"{directory} was made with")
        raise SettingError(key, template=made + " {setting} " + literal(f"{old}, not {value}: {finish}"))


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
            template=literal(f"{directory} holds the manifest of an earlier run ({state.files[0].name}): ")
            + "add {resume=True} to finish it, or use another {directory}"
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
                template=literal(f"{directory} already holds {clashing[0]}{more}, which no manifest there records: ")
                + "use another {directory}, or {overwrite=True} to replace them"
            )
    remove_leftovers(directory, {job.file for job in jobs} | {"grid.png"})
    todo = []
    for number, batch in enumerate(cut_batches(jobs, batch_size)):
        missing = tuple(job.number for job in batch if job.file not in finished)
        if missing:
            todo.append((number, missing))
    return Plan(seed, digest, settings, todo, len(finished), recorded)
