"""The generating commands: text2im, variation, inpaint. Each parses, checks what is cheap to
check (before torch is imported), then hands the work to `generate`, which saves every image
the moment its batch is decoded."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from dalle2_cli.cli.app import app
from dalle2_cli.cli.options import (
    CONFIG_ENV,
    MODEL,
    OUTPUT,
    ModelChoice,
    OutputChoice,
    Report,
    Sampling,
    command,
    report,
    sampling,
)
from dalle2_cli.errors import InputError, SettingError
from dalle2_cli.sampling.settings import SamplingSettings


def output_directory(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise InputError(f"output directory {path} is a file: pass another --output-dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or error
        raise InputError(f"cannot create output directory {path}: {reason}; pass another --output-dir") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"output directory {path} is not writable: pass another --output-dir, or fix its permissions")
    return path


def generate(
    script: str,
    model: ModelChoice,
    output: OutputChoice,
    report: Report,
    settings: SamplingSettings,
    run: Callable[[Any], list],
    default_name: str | None = None,
    after: Callable[[list, Path], dict[str, Any]] | None = None,
) -> None:
    """Build the inference `script` (a class of dalle2_cli.sampling.pipelines, or "manipulate.Name"),
    `run` it, saving each image as it is made; then the grid, what `after(images, directory)`
    writes, and the report."""
    from dalle2_cli.config import load_config
    from dalle2_cli.scaleout import run as scaleout

    if scaleout.world_size() > 1:
        raise InputError("this command runs in one process: launch only text2im with accelerate or torchrun")
    # What is cheap to check comes before the (slow) torch import.
    model_config = load_config(model.config)
    directory = output_directory(output.directory)

    import importlib

    from dalle2_cli.io.output import DEFAULT_NAME, ImageWriter, rows_by_input, write_grid
    from dalle2_cli.sampling.progress import NoProgress, StageProgress

    manager = open_manager(model_config, model, report)
    module_name, _, class_name = script.rpartition(".")
    script_class = getattr(importlib.import_module(f"dalle2_cli.sampling.{module_name or 'pipelines'}"), class_name)
    writer = ImageWriter(directory, output.name or default_name or DEFAULT_NAME, output.overwrite)

    def save(item: Any) -> None:
        report.info(f"  {writer.write(item)['path']}")

    with StageProgress() if not report.quiet and sys.stderr.isatty() else NoProgress() as bars:
        run(script_class(manager, settings, progress=bars, on_image=save))

    result: dict[str, Any] = {"images": writer.records, "config": model.config, "device": str(manager.device)}
    report.info(f"saved {len(writer.records)} image(s) to {directory}")
    if output.grid:
        groups = rows_by_input((item.index, item.image) for item in writer.images)
        result["grid"] = str(write_grid(groups, directory, output.grid_rows, output.overwrite))
        report.info(f"  {result['grid']} (grid)")
    if after is not None:
        result.update(after(writer.images, directory))
    if report.json:
        report.print_json(result)


def open_manager(model_config: Any, model: ModelChoice, report: Report) -> Any:
    """The DalleModelManager for a command's model options (models load when first used)."""
    import functools

    from dalle2_cli.loading.manager import DalleModelManager
    from dalle2_cli.sources.resolve import resolve_file

    apply_threads(model)
    options = model.manager_options()
    resolve = functools.partial(
        resolve_file, config_name=model.config, quiet=report.quiet, offline=options["offline"], log=report.info
    )
    return DalleModelManager(
        model_config, resolve=resolve, log=report.info, warn=report.warning, name=model.config, **options
    )


def apply_threads(model: ModelChoice) -> None:
    """--threads, and quiet compiling on machines without a GPU runtime."""
    import torch

    if model.threads is not None:
        torch.set_num_threads(model.threads)
    if model.compile:
        import logging

        # torch's C++ extension loader warns about CUDA_HOME where there is no CUDA runtime.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def note_fits(paths: Sequence[Path], pictures: Sequence[Any], pad: bool, report: Report) -> None:
    """Say which inputs are not square, and so get center-cropped (or padded, with --pad)."""
    from dalle2_cli.io.images import fit_note

    for path, picture in zip(paths, pictures, strict=True):
        if note := fit_note(path, picture, pad):
            report.info(note)


def _joined(values: list | None) -> str | None:
    return ",".join(str(v) for v in values) if values else None


PROMPTS_FILE_HELP = (
    'Prompts, one per line; or a JSON list; or JSON lines {"prompt": ..., "n": ..., "seed": ...}. - reads stdin.'
)


@command(app, sampling(prior=True), MODEL, OUTPUT, report("the images", quiet=True))
def text2im(
    prompts: Annotated[list[str] | None, typer.Argument(help="One or more prompts.", show_default=False)] = None,
    prompts_file: Annotated[str | None, typer.Option("--prompts-file", help=PROMPTS_FILE_HELP)] = None,
    from_image: Annotated[
        Path | None,
        typer.Option("--from", help="Re-run an image made by text2im: its prompt, seed, steps, scales and config."),
    ] = None,
    rerank: Annotated[
        int | None,
        typer.Option(
            "--rerank",
            metavar="K",
            help="Make K candidates per image and keep the one CLIP finds closest to the prompt (scores printed).",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            metavar="",
            help="Record finished images in a manifest in the output directory (always done under accelerate "
            "launch) and skip those it records: the same command with --resume finishes an interrupted run.",
        ),
    ] = False,
    *,
    sampling: Sampling,
    model: ModelChoice,
    output: OutputChoice,
    report: Report,
) -> None:
    """Make images from text prompts (spread over the processes of `accelerate launch`)."""
    from dalle2_cli.io.prompts import Prompt, read_prompts
    from dalle2_cli.scaleout import run as scaleout

    if any(not p.strip() for p in prompts or []):
        raise InputError("a prompt is empty: describe the image to make")
    requests = [Prompt(p) for p in prompts or []]
    if prompts_file == "-" and scaleout.world_size() > 1:
        raise InputError("--prompts-file -: processes of a launch cannot share standard input; give a file")
    if prompts_file is not None:
        requests += read_prompts(prompts_file)
    settings = sampling.settings
    if from_image is not None:
        requests, settings, model = _rerun(from_image, requests, settings, model)
    if not requests:
        raise InputError("give a prompt, --prompts-file FILE, or --from IMAGE")
    if rerank is not None:
        from dalle2_cli.sampling.manipulate import MAX_CANDIDATES

        if not 1 <= rerank <= MAX_CANDIDATES:
            raise SettingError("candidates", f"must be from 1 to {MAX_CANDIDATES} per image, got {rerank}")
    if resume or scaleout.launched():
        if rerank is not None:
            raise InputError("--rerank runs in one process, without --resume: leave one of them out")
        _scale_out(model, output, report, settings, requests, sampling.num_images, resume)
        return
    if rerank is None:
        generate("TextToImage", model, output, report, settings, lambda s: s.run(requests, sampling.num_images))
    else:
        generate(
            "manipulate.RerankedTextToImage",
            model,
            output,
            report,
            settings,
            _reranked(requests, sampling.num_images, rerank, report),
        )


def _rerun(
    path: Path, requests: list, settings: SamplingSettings, model: ModelChoice
) -> tuple[list, SamplingSettings, ModelChoice]:
    """text2im --from: what the command line leaves unset comes from the image's metadata."""
    from dalle2_cli.io.output import recorded_run
    from dalle2_cli.io.prompts import Prompt

    recorded = recorded_run(path)
    requests = requests or [Prompt(recorded["prompt"])]
    settings = dataclasses.replace(
        settings,
        seed=recorded.get("seed") if settings.seed is None else settings.seed,
        prior_steps=settings.prior_steps or recorded.get("prior_steps"),
        prior_cond_scale=recorded.get("prior_cond_scale")
        if settings.prior_cond_scale is None
        else settings.prior_cond_scale,
        decoder_steps=settings.decoder_steps or recorded.get("decoder_steps"),
        decoder_cond_scale=settings.decoder_cond_scale or recorded.get("decoder_cond_scale"),
    )
    if not model.named and not os.environ.get(CONFIG_ENV):
        recorded_path = Path(recorded.get("config_path") or "")
        config = str(recorded_path) if recorded_path.is_file() else recorded.get("config")
        model = dataclasses.replace(model, config=config or model.config)
    return requests, settings, model


def _reranked(requests: list, num_images: int, candidates: int, report: Report) -> Callable[[Any], list]:
    """text2im --rerank K: run RerankedTextToImage, print each image's scores."""

    def run(script: Any) -> list:
        from dalle2_cli.sampling.manipulate import rerank_summary

        made = script.run(requests, num_images, candidates=candidates)
        for item in made:
            report.info(rerank_summary(item))
        return made

    return run


def _scale_out(
    model: ModelChoice,
    output: OutputChoice,
    report: Report,
    settings: SamplingSettings,
    requests: list,
    num_images: int,
    resume: bool,
) -> None:
    """text2im's work shared by the processes of a launch, resumable (dalle2_cli.scaleout.run)."""
    from dalle2_cli.config import load_config
    from dalle2_cli.io.output import DEFAULT_NAME
    from dalle2_cli.scaleout import run as scaleout

    model_config = load_config(model.config)
    directory = output_directory(output.directory)
    apply_threads(model)
    try:
        result = scaleout.run_text2im(
            model_config,
            requests,
            directory,
            num_images,
            settings,
            config_name=model.config,
            load=model.manager_options(),
            template=output.name or DEFAULT_NAME,
            resume=resume,
            overwrite=output.overwrite,
            grid=output.grid,
            grid_rows=output.grid_rows,
            progress=not report.quiet and sys.stderr.isatty(),
            say=report.info,
            warn=report.warning,
        )
    except scaleout.MainRefused as refused:  # the main process prints it: one line, not one per process
        raise typer.Exit(refused.exit_code) from None
    if result is not None and report.json:
        report.print_json(result)


@command(app, sampling(pad=True), MODEL, OUTPUT, report("the images", quiet=True))
def variation(
    images: Annotated[list[Path], typer.Argument(help="One or more images to make variations of.")],
    text: Annotated[str | None, typer.Option("--text", help="Text for text-conditioned decoders.")] = None,
    *,
    sampling: Sampling,
    model: ModelChoice,
    output: OutputChoice,
    report: Report,
) -> None:
    """Make new images with the content and style of existing ones."""
    from dalle2_cli.io.images import open_image

    if text is not None and not text.strip():
        raise InputError("--text is empty: leave it out, or describe the image")
    pictures = [open_image(path) for path in images]
    note_fits(images, pictures, sampling.settings.pad, report)
    sources = [str(p) for p in images]
    generate(
        "ImageVariation",
        model,
        output,
        report,
        sampling.settings,
        lambda script: script.run(pictures, sampling.num_images, text=text, sources=sources),
    )


@command(app, sampling(prior=True, pad=True), MODEL, OUTPUT, report("the images", quiet=True))
def inpaint(
    image: Annotated[Path, typer.Argument(help="The image to edit.")],
    mask: Annotated[Path, typer.Argument(help="Same size as the image: white (or transparent) = regenerate.")],
    prompt: Annotated[str | None, typer.Argument(help="What to paint; without it, fill from the image.")] = None,
    mask_grow: Annotated[
        int, typer.Option("--mask-grow", metavar="PIXELS", help="Grow the area to regenerate by PIXELS all round.")
    ] = 0,
    *,
    sampling: Sampling,
    model: ModelChoice,
    output: OutputChoice,
    report: Report,
) -> None:
    """Regenerate the masked area of an image."""
    from dalle2_cli.io.images import open_image, open_mask

    if prompt is not None and not prompt.strip():
        raise InputError("the prompt is empty: leave it out to fill from the image itself")
    pad = sampling.settings.pad
    picture = open_image(image)
    regenerate = open_mask(mask, picture.size, grow=mask_grow, pad=pad)
    note_fits([image], [picture], pad, report)
    generate(
        "Inpainting",
        model,
        output,
        report,
        sampling.settings,
        lambda script: script.run(
            picture,
            regenerate,
            prompt,
            sampling.num_images,
            source=str(image),
            mask_source=str(mask),
            mask_grow=mask_grow,
        ),
    )
