"""The generating commands: text2im, variation, inpaint. Each parses, checks what is cheap to
check (before torch is imported), and hands one request to the runner (dalle2_cli.run),
which saves every image the moment its batch is decoded."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from dalle2_cli.cli.app import app
from dalle2_cli.cli.groups import command
from dalle2_cli.cli.options import CONFIG_ENV, Generation, ModelChoice, generation
from dalle2_cli.errors import InputError
from dalle2_cli.sampling.settings import SamplingSettings, check_candidates


def generate(work: Any, options: Generation, settings: SamplingSettings | None = None, **extra: Any) -> None:
    """Run `work` (a dalle2_cli.scaleout.works Work) with these options (`settings`, when given,
    replacing the sampling options'), and report."""
    from dalle2_cli import run as runner
    from dalle2_cli.config import load_config
    from dalle2_cli.io.output import DEFAULT_NAME, prepare_directory

    model, output, report = options.model, options.output, options.report
    settings = settings or options.sampling.settings

    # What is cheap to check comes before the (slow) torch import.
    model_config = load_config(model.config)
    directory = prepare_directory(output.directory)
    apply_threads(model)
    request = runner.Request(
        work,
        model_config,
        model.config,
        directory,
        settings,
        load=model.manager_options(),
        template=output.name or extra.pop("default_name", None) or DEFAULT_NAME,
        overwrite=output.overwrite,
        grid=output.grid,
        grid_rows=output.grid_rows,
        **extra,
    )
    try:
        result = runner.run(request, say=report.info, warn=report.warning, progress=not report.quiet)
    except runner.MainRefused as refused:  # the main process prints it: one line, not one per process
        raise typer.Exit(refused.exit_code) from None
    if result is not None and report.json:
        report.print_json(result)


def apply_threads(model: ModelChoice) -> None:
    """--threads, and quiet compiling on machines without a GPU runtime."""
    import torch

    if model.threads is not None:
        torch.set_num_threads(model.threads)
    if model.compile:
        import logging

        # torch's C++ extension loader warns about CUDA_HOME where there is no CUDA runtime.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def note_fits(paths: Sequence[Path], pictures: Sequence[Any], options: Generation) -> None:
    """Say which inputs are not square, and so get center-cropped (or padded, with --pad)."""
    from dalle2_cli.io.images import fit_note

    for path, picture in zip(paths, pictures, strict=True):
        if note := fit_note(path, picture, options.sampling.settings.pad):
            options.report.info(note)


PROMPTS_FILE_HELP = (
    'Prompts, one per line; or a JSON list; or JSON lines {"prompt": ..., "n": ..., "seed": ...}. - reads stdin.'
)


@command(app, generation(prior=True))
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
            help="Make K candidates per image and keep the one CLIP finds closest to the prompt (scores printed). "
            "Default: the config's default_rerank, else 1 (each image drawn once).",
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
    generation: Generation,
) -> None:
    """Make images from text prompts (spread over the processes of `accelerate launch`)."""
    from dalle2_cli.io.prompts import Prompt, read_prompts
    from dalle2_cli.scaleout.processes import world_size
    from dalle2_cli.scaleout.works import TextToImageWork

    if any(not p.strip() for p in prompts or []):
        raise InputError("a prompt is empty: describe the image to make")
    requests = [Prompt(p) for p in prompts or []]
    if prompts_file == "-" and world_size() > 1:
        raise InputError("--prompts-file -: processes of a launch cannot share standard input; give a file")
    if prompts_file is not None:
        requests += read_prompts(prompts_file)
    settings, model = generation.sampling.settings, generation.model
    if rerank is not None:
        check_candidates(rerank)
    if from_image is not None:
        requests, settings, model = _rerun(from_image, requests, settings, model)
        # The image's seed is its own even if it was kept from candidates: drawn once, it comes back.
        rerank = 1 if rerank is None else rerank
    if not requests:
        raise InputError("give a prompt, --prompts-file FILE, or --from IMAGE")
    after = _rerank_summaries if rerank is not None else _rerank_note
    work = TextToImageWork(requests, generation.sampling.num_images, rerank, after=after)
    generate(work, dataclasses.replace(generation, model=model), settings, resume=resume)


def _rerank_summaries(made: list, directory: Path, say: Any) -> dict[str, Any]:
    """--rerank K: a line per image, its candidates' scores."""
    from dalle2_cli.sampling.pipelines import rerank_summary

    for item in made:
        if line := rerank_summary(item):
            say(line)
    return {}


def _rerank_note(made: list, directory: Path, say: Any) -> dict[str, Any]:
    """The config's reranking, which the user did not ask for: one line saying so."""
    counts = {item.settings["rerank"]["candidates"] for item in made if "rerank" in item.settings}
    if counts:
        say(
            f"each image is the best of {max(counts)} by CLIP (the config's default_rerank; "
            "--rerank 1 draws each once, --rerank K prints the scores)"
        )
    return {}


def _rerun(
    path: Path, requests: list, settings: SamplingSettings, model: ModelChoice
) -> tuple[list, SamplingSettings, ModelChoice]:
    """text2im --from: what the command line leaves unset comes from the image's metadata."""
    from dalle2_cli.io.prompts import Prompt

    recorded, settings, model = _recorded_run(path, "text2im", settings, model)
    if not recorded.get("prompt"):
        raise InputError(f"--from {path} records no prompt")
    return requests or [Prompt(recorded["prompt"])], settings, model


def _recorded_run(
    path: Path, command: str, settings: SamplingSettings, model: ModelChoice
) -> tuple[dict[str, Any], SamplingSettings, ModelChoice]:
    """--from IMAGE: its recorded settings, and the sampling settings and model to make it
    again (what the command line sets wins)."""
    from dalle2_cli.io.output import recorded_sampler, recorded_settings

    recorded = recorded_settings(path, "--from")
    if recorded.get("command") != command:
        raise InputError(
            f"--from {path} was made by `dalle2 {recorded.get('command')}`: "
            f"use `dalle2 {recorded.get('command')} --from {path}`"
        )
    settings = dataclasses.replace(
        settings,
        seed=recorded.get("seed") if settings.seed is None else settings.seed,
        prior_steps=settings.prior_steps or recorded.get("prior_steps"),
        prior_cond_scale=recorded.get("prior_cond_scale")
        if settings.prior_cond_scale is None
        else settings.prior_cond_scale,
        decoder_steps=settings.decoder_steps or recorded.get("decoder_steps"),
        decoder_cond_scale=settings.decoder_cond_scale or recorded.get("decoder_cond_scale"),
        sampler=settings.sampler or recorded_sampler(recorded),
        negative_prompt=settings.negative_prompt or recorded.get("negative_prompt"),
        ddim_eta=recorded.get("ddim_eta") if settings.ddim_eta is None else settings.ddim_eta,
        pad=settings.pad or bool(recorded.get("pad")),
        inpaint_resample_times=recorded.get("resample", settings.inpaint_resample_times),
    )
    if not model.named and not os.environ.get(CONFIG_ENV):
        recorded_path = Path(recorded.get("config_path") or "")
        config = str(recorded_path) if recorded_path.is_file() else recorded.get("config")
        model = dataclasses.replace(model, config=config or model.config)
    return recorded, settings, model


FROM_HELP = "Make an image made by `dalle2 {0}` again (a served one too): its input{1}, seed, steps, scales and config."


@command(app, generation(pad=True))
def variation(
    images: Annotated[list[Path] | None, typer.Argument(help="One or more images to make variations of.")] = None,
    text: Annotated[str | None, typer.Option("--text", help="Text for text-conditioned decoders.")] = None,
    from_image: Annotated[Path | None, typer.Option("--from", help=FROM_HELP.format("variation", ""))] = None,
    *,
    generation: Generation,
) -> None:
    """Make new images with the content and style of existing ones."""
    from dalle2_cli.io.images import open_image
    from dalle2_cli.io.output import recorded_input
    from dalle2_cli.scaleout.works import Work

    if text is not None and not text.strip():
        raise InputError("--text is empty: leave it out, or describe the image")
    settings = generation.sampling.settings
    if from_image is not None:
        recorded, settings, model = _recorded_run(from_image, "variation", settings, generation.model)
        generation = dataclasses.replace(generation, model=model)
        images = images or [recorded_input(from_image, recorded, "source")]
    if not images:
        raise InputError("give one or more images, or --from IMAGE")
    pictures = [open_image(path) for path in images]
    note_fits(images, pictures, generation)
    count, sources = generation.sampling.num_images, [str(p) for p in images]
    work = Work("pipelines.ImageVariation", lambda script: script.run(pictures, count, text=text, sources=sources))
    generate(work, generation, settings)


@command(app, generation(prior=True, pad=True, inpaint=True))
def inpaint(
    image: Annotated[Path | None, typer.Argument(help="The image to edit.")] = None,
    mask: Annotated[
        Path | None, typer.Argument(help="Same size as the image: white (or transparent) = regenerate.")
    ] = None,
    prompt: Annotated[str | None, typer.Argument(help="What to paint; without it, fill from the image.")] = None,
    mask_grow: Annotated[
        int, typer.Option("--mask-grow", metavar="PIXELS", help="Grow the area to regenerate by PIXELS all round.")
    ] = 0,
    from_image: Annotated[
        Path | None, typer.Option("--from", help=FROM_HELP.format("inpaint", ", mask, prompt"))
    ] = None,
    *,
    generation: Generation,
) -> None:
    """Regenerate the masked area of an image."""
    from dalle2_cli.io.images import open_image, open_mask
    from dalle2_cli.io.output import recorded_input
    from dalle2_cli.scaleout.works import Work

    if prompt is not None and not prompt.strip():
        raise InputError("the prompt is empty: leave it out to fill from the image itself")
    settings = generation.sampling.settings
    if from_image is not None:
        if image is not None:
            raise InputError("--from takes the image, mask and prompt from IMAGE: give none of them")
        recorded, settings, model = _recorded_run(from_image, "inpaint", settings, generation.model)
        generation = dataclasses.replace(generation, model=model)
        image, mask = recorded_input(from_image, recorded, "source"), recorded_input(from_image, recorded, "mask")
        prompt, mask_grow = recorded.get("prompt"), mask_grow or recorded.get("mask_grow") or 0
    if image is None or mask is None:
        raise InputError("give the image and its mask (white: regenerate), or --from IMAGE")
    picture = open_image(image)
    regenerate = open_mask(mask, picture.size, grow=mask_grow, pad=settings.pad)
    note_fits([image], [picture], generation)

    def make(script: Any) -> list:
        extra = {"source": str(image), "mask_source": str(mask), "mask_grow": mask_grow}
        return script.run(picture, regenerate, prompt, generation.sampling.num_images, **extra)

    generate(Work("pipelines.Inpainting", make), generation, settings)
