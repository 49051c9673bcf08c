"""The `dalle2` command: parse options, call an inference script, print what was made.

Torch and the models are imported inside the commands, never at module level, so that
`dalle2 --help` answers at once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from dalle2_cli import __version__
from dalle2_cli.errors import Dalle2Error, InputError

app = typer.Typer(
    name="dalle2",
    help="DALL·E 2 inference on DALLE2-pytorch checkpoints: text2im, variation, inpaint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="List and check model configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")
models_app = typer.Typer(help="Download, list, verify and remove cached model files.", no_args_is_help=True)
app.add_typer(models_app, name="models")

CONFIG_ENV = "DALLE2_CONFIG"
DEFAULT_CONFIG = "shapes"  # the model shipped in the package: works offline, on CPU


def _floats(text: str | None) -> list[float] | None:
    return _split(text, float, "numbers")


def _ints(text: str | None) -> list[int] | None:
    values = _split(text, int, "whole numbers")
    if values is not None and any(v < 1 for v in values):
        raise InputError(f"--decoder-steps must be positive, got {text!r}")
    return values


def _split(text: str | None, kind: Callable, what: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(part) for part in text.split(",")]
    except ValueError:
        raise InputError(f"expected {what}, one or comma-separated per unet, got {text!r}") from None


# Options every generating command shares.
ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        help=f"Config name (`dalle2 config list`) or JSON path. Default: {DEFAULT_CONFIG} (env {CONFIG_ENV}).",
    ),
]
NumOpt = Annotated[int, typer.Option("--num-images", "-n", help="Images per prompt or per input image.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Same seed and settings give the same images.")]
OutOpt = Annotated[Path, typer.Option("--output-dir", "-o", help="Where images are written.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images sampled at once.")]
PriorStepsOpt = Annotated[int | None, typer.Option("--prior-steps", help="Prior sampling steps.")]
DecoderStepsOpt = Annotated[
    str | None, typer.Option("--decoder-steps", help="Decoder sampling steps: one value, or comma-separated per unet.")
]
PriorScaleOpt = Annotated[float | None, typer.Option("--prior-cond-scale", help="Prior guidance scale.")]
DecoderScaleOpt = Annotated[
    str | None,
    typer.Option("--decoder-cond-scale", help="Decoder guidance scale: one value, or comma-separated per unet."),
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
ResidentOpt = Annotated[
    bool,
    typer.Option(
        "--keep-resident", help="Keep every model on the GPU (faster when it fits) instead of only the running stage."
    ),
]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the prior and decoder networks: the first batch waits for compiling (a minute or "
        "more on a CPU), later batches of the same size run faster. For long runs.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object describing the images on stdout.")]
NameOpt = Annotated[
    str | None,
    typer.Option(
        "--name",
        help="File name template; fields {prompt} {seed} {index} {source} {command}. "
        "Default: {prompt}-{seed} ({prompt}-{seed}-{index} for frames).",
    ),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace files of the same name (otherwise new names are found).")
]
GridOpt = Annotated[bool, typer.Option("--grid", help="Also save a contact sheet of all the images (grid.png).")]
GridRowsOpt = Annotated[
    int | None, typer.Option("--grid-rows", help="Rows in the --grid sheet (default: one per prompt or input).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (they also hide when not a terminal).")]


@dataclasses.dataclass(frozen=True)
class OutputChoice:
    """Where and how a generating command writes and reports its images."""

    directory: Path
    name: str | None = None  # None: dalle2_cli.output.DEFAULT_NAME
    overwrite: bool = False
    grid: bool = False
    grid_rows: int | None = None
    json: bool = False
    quiet: bool = False


def _output_choice(
    directory: Path,
    name: str | None,
    overwrite: bool,
    grid: bool,
    grid_rows: int | None,
    json_out: bool,
    quiet: bool,
) -> OutputChoice:
    from dalle2_cli.output import check_name_template

    if name is not None:
        check_name_template(name)
    if grid_rows is not None and grid_rows < 1:
        raise InputError(f"--grid-rows must be at least 1, got {grid_rows}")
    return OutputChoice(directory, name, overwrite, grid or grid_rows is not None, grid_rows, json_out, quiet)


PadOpt = Annotated[
    bool,
    typer.Option("--pad", help="Fit a non-square image whole, padded with white, instead of center-cropping it."),
]


class Weights(StrEnum):
    ema = "ema"
    raw = "raw"


WeightsOpt = Annotated[
    Weights, typer.Option("--weights", help="ema (the averaged weights, when a file has them) or raw.")
]


class Precision(StrEnum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


DtypeOpt = Annotated[
    Precision, typer.Option("--dtype", help="Weights' precision; half precision samples under autocast.")
]
NonStrictOpt = Annotated[
    bool, typer.Option("--non-strict", help="Load checkpoints whose keys do not match (those weights stay random).")
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks and the libraries' own progress bars.")]
OfflineOpt = Annotated[
    bool,
    typer.Option("--offline", help="Never touch the network: use cached model files or fail (as HF_HUB_OFFLINE=1)."),
]


def _go_offline(offline: bool) -> None:
    """--offline is HF_HUB_OFFLINE=1, set before huggingface_hub (or open_clip) is imported,
    so that it reaches them too, and every child process."""
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _guard(debug: bool, body: Callable[[], None]) -> None:
    """Run a command: known errors become one line and an exit code, unless --debug."""
    if not debug:
        os.environ.setdefault("TQDM_DISABLE", "1")  # dalle2-pytorch's per-step bars
    try:
        body()
    except Dalle2Error as error:
        if debug:
            raise
        _say(f"error: {error}")
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        _say("interrupted")
        raise typer.Exit(130) from None
    except BrokenPipeError:  # stdout closed early (`dalle2 ... --json | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(1) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as error:  # noqa: BLE001 - the last line of defence against tracebacks
        if debug:
            raise
        _say(f"error: {type(error).__name__}: {error} (run with --debug for details)")
        raise typer.Exit(1) from None


def _config_name(config: str | None) -> str:
    return config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


def _output_dir(path: Path) -> Path:
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


def _generate(
    command: str,
    config: str | None,
    load: dict[str, Any],
    output: OutputChoice,
    settings: dict[str, Any],
    script: str,
    run: Callable[[Any], list],
    after: Callable[[list, Path], dict[str, Any]] | None = None,
) -> None:
    """Shared by the generating commands: build the inference `script` (a class of
    dalle2_cli.inference, or "manipulate.Name" for one of dalle2_cli.manipulate), `run` it,
    save the images, report. `after(generated, directory)` writes what else the command makes
    once the images are saved, and returns its entries for the report."""
    from dalle2_cli import scaleout
    from dalle2_cli.config import load_config

    if scaleout.world_size() > 1:
        raise InputError(f"dalle2 {command} runs in one process: launch only text2im with accelerate or torchrun")
    # Check what is cheap to check before the (slow) torch import.
    name = _config_name(config)
    model_config = load_config(name)
    directory = _output_dir(output.directory)

    from dalle2_cli import inference

    load = _with_torch_dtype(load)
    from dalle2_cli.files import resolve_file
    from dalle2_cli.manager import DalleModelManager
    from dalle2_cli.output import DEFAULT_NAME, rows_by_input, run_metadata, write_grid, write_images
    from dalle2_cli.progress import NoProgress, StageProgress

    # The config's name goes into messages about files missing offline (how to fetch them).
    resolve = functools.partial(resolve_file, config_name=name)
    manager = DalleModelManager(model_config, resolve=resolve, **load)
    module_name, _, class_name = script.rpartition(".")
    if module_name:
        import importlib

        script_class = getattr(importlib.import_module(f"dalle2_cli.{module_name}"), class_name)
    else:
        script_class = getattr(inference, script)
    with StageProgress() if not output.quiet and sys.stderr.isatty() else NoProgress() as bars:
        generated = run(script_class(manager, inference.SamplingSettings(**settings), progress=bars))

    common = run_metadata(command, name, model_config.source_path, manager.files)
    records = write_images(generated, directory, common, output.name or DEFAULT_NAME, output.overwrite)
    report: dict[str, Any] = {"images": records, "config": name, "device": str(manager.device)}
    _say(f"saved {len(records)} image(s) to {directory}")
    for record in records:
        _say(f"  {record['path']}")
    if output.grid:
        groups = rows_by_input((item.index, item.image) for item in generated)
        grid = write_grid(groups, directory, [r["path"] for r in records], output.grid_rows, output.overwrite)
        report["grid"] = str(grid)
        _say(f"  {grid} (grid)")
    if after is not None:
        report.update(after(generated, directory))
    if output.json:
        print(json.dumps(report))


def _load_options(
    device: str | None, weights: Weights, non_strict: bool, dtype: Precision, keep_resident: bool = False
) -> dict[str, Any]:
    # The dtype stays a name here: importing torch (seconds) waits until the config and the
    # output directory passed their checks (see _with_torch_dtype).
    return {
        "device": device,
        "prefer_ema": weights == Weights.ema,
        "strict": False if non_strict else None,
        "dtype": dtype,
        "keep_resident": keep_resident,
    }


def _with_torch_dtype(load: dict[str, Any]) -> dict[str, Any]:
    import torch

    dtypes = {Precision.fp32: torch.float32, Precision.fp16: torch.float16, Precision.bf16: torch.bfloat16}
    return {**load, "dtype": dtypes[load["dtype"]]}


def _joined(values: list | None) -> str | None:
    """A recorded per-unet list as the comma-separated option text."""
    return ",".join(str(v) for v in values) if values else None


def _settings(
    num: int,
    seed: int | None,
    batch: int,
    prior_steps: int | None,
    decoder_steps: str | None,
    prior_scale: float | None,
    decoder_scale: str | None,
    pad: bool = False,
) -> dict[str, Any]:
    if num < 1:
        raise InputError(f"--num-images must be at least 1, got {num}")
    if batch < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch}")
    if prior_steps is not None and prior_steps < 1:
        raise InputError(f"--prior-steps must be positive, got {prior_steps}")
    if seed is not None:
        from dalle2_cli.prompts import check_seed

        check_seed(seed)
    return dict(
        seed=seed,
        batch_size=batch,
        prior_steps=prior_steps,
        decoder_steps=_ints(decoder_steps),
        prior_cond_scale=prior_scale,
        decoder_cond_scale=_floats(decoder_scale),
        pad=pad,
    )


def _note_fits(paths: Sequence[Path], pictures: Sequence[Any], pad: bool) -> None:
    """Say which inputs are not square, and so get center-cropped (or padded, with --pad)."""
    from dalle2_cli.images import fit_note

    for path, picture in zip(paths, pictures, strict=True):
        if note := fit_note(path, picture, pad):
            _say(note)


@app.command()
def text2im(
    prompts: Annotated[list[str] | None, typer.Argument(help="One or more prompts.", show_default=False)] = None,
    prompts_file: Annotated[
        str | None,
        typer.Option(
            "--prompts-file",
            help='Prompts, one per line; or a JSON list; or JSON lines {"prompt": ..., "n": ..., "seed": ...}. '
            "- reads stdin.",
        ),
    ] = None,
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
    config: ConfigOpt = None,
    num_images: NumOpt = 1,
    seed: SeedOpt = None,
    output_dir: OutOpt = Path("outputs"),
    name: NameOpt = None,
    overwrite: OverwriteOpt = False,
    grid: GridOpt = False,
    grid_rows: GridRowsOpt = None,
    batch_size: BatchOpt = 4,
    prior_steps: PriorStepsOpt = None,
    decoder_steps: DecoderStepsOpt = None,
    prior_cond_scale: PriorScaleOpt = None,
    decoder_cond_scale: DecoderScaleOpt = None,
    device: DeviceOpt = None,
    keep_resident: ResidentOpt = False,
    compile_networks: CompileOpt = False,
    weights: WeightsOpt = Weights.ema,
    non_strict: NonStrictOpt = False,
    dtype: DtypeOpt = Precision.fp32,
    offline: OfflineOpt = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Record finished images in a manifest in the output directory (always done under accelerate "
            "launch) and skip those it records: the same command with --resume finishes an interrupted run.",
        ),
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Make images from text prompts (spread over the processes of `accelerate launch`)."""

    def body() -> None:
        nonlocal config, seed, prior_steps, decoder_steps, prior_cond_scale, decoder_cond_scale
        from dalle2_cli import scaleout
        from dalle2_cli.prompts import Prompt, read_prompts

        _go_offline(offline)
        if any(not p.strip() for p in prompts or []):
            raise InputError("a prompt is empty: describe the image to make")
        requests = [Prompt(p) for p in prompts or []]
        if prompts_file == "-" and scaleout.world_size() > 1:
            raise InputError("--prompts-file -: processes of a launch cannot share standard input; give a file")
        if prompts_file is not None:
            requests += read_prompts(prompts_file)
        if from_image is not None:
            from dalle2_cli.output import recorded_run

            recorded = recorded_run(from_image)  # what the command line leaves unset comes from it
            requests = requests or [Prompt(recorded["prompt"])]
            seed = recorded.get("seed") if seed is None else seed
            prior_steps = prior_steps or recorded.get("prior_steps")
            prior_cond_scale = recorded.get("prior_cond_scale") if prior_cond_scale is None else prior_cond_scale
            decoder_steps = decoder_steps or _joined(recorded.get("decoder_steps"))
            decoder_cond_scale = decoder_cond_scale or _joined(recorded.get("decoder_cond_scale"))
            if config is None and not os.environ.get(CONFIG_ENV):
                recorded_path = Path(recorded.get("config_path") or "")
                config = str(recorded_path) if recorded_path.is_file() else recorded.get("config")
        if not requests:
            raise InputError("give a prompt, --prompts-file FILE, or --from IMAGE")
        if rerank is not None and rerank < 1:
            raise InputError(f"--rerank must be at least 1 candidate per image, got {rerank}")
        settings = _settings(
            num_images, seed, batch_size, prior_steps, decoder_steps, prior_cond_scale, decoder_cond_scale
        )
        load = _load_options(device, weights, non_strict, dtype, keep_resident)
        load["compile"] = compile_networks
        output = _output_choice(output_dir, name, overwrite, grid, grid_rows, json_out, quiet)
        if resume or scaleout.launched():
            if rerank is not None:
                raise InputError("--rerank runs in one process, without --resume: leave one of them out")
            _scale_out(config, load, output, settings, requests, num_images, resume)
            return

        _generate(
            "text2im",
            config,
            load,
            output,
            settings,
            "TextToImage" if rerank is None else "manipulate.RerankedTextToImage",
            _reranked(requests, num_images, rerank) if rerank else lambda script: script.run(requests, num_images),
        )

    _guard(debug, body)


def _scale_out(
    config: str | None,
    load: dict[str, Any],
    output: OutputChoice,
    settings: dict[str, Any],
    requests: list,
    num_images: int,
    resume: bool,
) -> None:
    """text2im's work shared by the processes of a launch, resumable (dalle2_cli.scaleout)."""
    from dalle2_cli import scaleout
    from dalle2_cli.config import load_config
    from dalle2_cli.inference import SamplingSettings
    from dalle2_cli.output import DEFAULT_NAME

    name = _config_name(config)
    model_config = load_config(name)
    directory = _output_dir(output.directory)

    try:
        report = scaleout.run_text2im(
            model_config,
            requests,
            directory,
            num_images,
            SamplingSettings(**settings),
            config_name=name,
            load=_with_torch_dtype(load),
            template=output.name or DEFAULT_NAME,
            resume=resume,
            overwrite=output.overwrite,
            grid=output.grid,
            grid_rows=output.grid_rows,
            progress=not output.quiet and sys.stderr.isatty(),
            say=_say,
        )
    except scaleout.MainRefused as refused:  # the main process prints it: one line, not one per process
        raise typer.Exit(refused.exit_code) from None
    if report is not None and output.json:
        print(json.dumps(report))


@app.command()
def variation(
    images: Annotated[list[Path], typer.Argument(help="One or more images to make variations of.")],
    text: Annotated[str | None, typer.Option("--text", help="Text for text-conditioned decoders.")] = None,
    config: ConfigOpt = None,
    num_images: NumOpt = 1,
    seed: SeedOpt = None,
    output_dir: OutOpt = Path("outputs"),
    name: NameOpt = None,
    overwrite: OverwriteOpt = False,
    grid: GridOpt = False,
    grid_rows: GridRowsOpt = None,
    batch_size: BatchOpt = 4,
    decoder_steps: DecoderStepsOpt = None,
    decoder_cond_scale: DecoderScaleOpt = None,
    device: DeviceOpt = None,
    keep_resident: ResidentOpt = False,
    weights: WeightsOpt = Weights.ema,
    non_strict: NonStrictOpt = False,
    dtype: DtypeOpt = Precision.fp32,
    offline: OfflineOpt = False,
    pad: PadOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Make new images with the content and style of existing ones."""

    def body() -> None:
        _go_offline(offline)
        from dalle2_cli.images import open_image

        if text is not None and not text.strip():
            raise InputError("--text is empty: leave it out, or describe the image")
        settings = _settings(num_images, seed, batch_size, None, decoder_steps, None, decoder_cond_scale, pad)
        pictures = [open_image(path) for path in images]
        _note_fits(images, pictures, pad)
        _generate(
            "variation",
            config,
            _load_options(device, weights, non_strict, dtype, keep_resident),
            _output_choice(output_dir, name, overwrite, grid, grid_rows, json_out, quiet),
            settings,
            "ImageVariation",
            lambda script: script.run(pictures, num_images, text=text, sources=[str(p) for p in images]),
        )

    _guard(debug, body)


@app.command()
def inpaint(
    image: Annotated[Path, typer.Argument(help="The image to edit.")],
    mask: Annotated[Path, typer.Argument(help="Same size as the image: white (or transparent) = regenerate.")],
    prompt: Annotated[str | None, typer.Argument(help="What to paint; without it, fill from the image.")] = None,
    config: ConfigOpt = None,
    num_images: NumOpt = 1,
    seed: SeedOpt = None,
    output_dir: OutOpt = Path("outputs"),
    name: NameOpt = None,
    overwrite: OverwriteOpt = False,
    grid: GridOpt = False,
    grid_rows: GridRowsOpt = None,
    batch_size: BatchOpt = 4,
    prior_steps: PriorStepsOpt = None,
    decoder_steps: DecoderStepsOpt = None,
    prior_cond_scale: PriorScaleOpt = None,
    decoder_cond_scale: DecoderScaleOpt = None,
    device: DeviceOpt = None,
    keep_resident: ResidentOpt = False,
    weights: WeightsOpt = Weights.ema,
    non_strict: NonStrictOpt = False,
    dtype: DtypeOpt = Precision.fp32,
    offline: OfflineOpt = False,
    pad: PadOpt = False,
    mask_grow: Annotated[
        int, typer.Option("--mask-grow", metavar="PIXELS", help="Grow the area to regenerate by PIXELS all round.")
    ] = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Regenerate the masked area of an image."""

    def body() -> None:
        _go_offline(offline)
        from dalle2_cli.images import open_image, open_mask

        if prompt is not None and not prompt.strip():
            raise InputError("the prompt is empty: leave it out to fill from the image itself")
        settings = _settings(
            num_images, seed, batch_size, prior_steps, decoder_steps, prior_cond_scale, decoder_cond_scale, pad
        )
        picture = open_image(image)
        regenerate = open_mask(mask, picture.size, grow=mask_grow, pad=pad)
        _note_fits([image], [picture], pad)
        _generate(
            "inpaint",
            config,
            _load_options(device, weights, non_strict, dtype, keep_resident),
            _output_choice(output_dir, name, overwrite, grid, grid_rows, json_out, quiet),
            settings,
            "Inpainting",
            lambda script: script.run(picture, regenerate, prompt, num_images, source=str(image)),
        )

    _guard(debug, body)


@app.command()
def info(
    image: Annotated[Path, typer.Argument(help="A PNG written by dalle2.")],
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show the settings recorded in an image dalle2 made (re-run one with `text2im --from`)."""

    def body() -> None:
        from dalle2_cli.output import recorded_settings

        metadata = recorded_settings(image)
        if json_out:
            print(json.dumps(metadata))
            return
        for key, value in metadata.items():
            shown = value if isinstance(value, str) else json.dumps(value)
            print(f"{key}: {shown}")

    _guard(debug, body)


def _reranked(requests: list, num_images: int, candidates: int) -> Callable[[Any], list]:
    """text2im --rerank K: run dalle2_cli.manipulate.RerankedTextToImage, print each image's scores."""

    def run(script: Any) -> list:
        from dalle2_cli.manipulate import rerank_summary

        made = script.run(requests, num_images, candidates=candidates)
        for item in made:
            _say(rerank_summary(item))
        return made

    return run


class Animation(StrEnum):
    gif = "gif"
    webp = "webp"


FRAME_NAME = "{prompt}-{seed}-{index}"  # every frame has the same seed: the index tells them apart
FramesOpt = Annotated[int, typer.Option("--frames", help="Frames, both ends included (at least 2).")]
AnimationOpt = Annotated[
    list[Animation] | None,
    typer.Option("--format", help="Animation file: gif or webp (lossless); repeat for both. Default: gif."),
]
DurationOpt = Annotated[int, typer.Option("--duration", metavar="MS", help="Milliseconds per animation frame.")]
FrameTextOpt = Annotated[
    str | None, typer.Option("--text", help="Text for text-conditioned decoders (every frame gets it).")
]


def _check_frames(frames: int, duration: int, formats: list[Animation] | None, text: str | None) -> list[Animation]:
    if frames < 2:
        raise InputError(f"--frames must be at least 2 (the two ends), got {frames}")
    if duration < 1:
        raise InputError(f"--duration must be at least 1 millisecond, got {duration}")
    if text is not None and not text.strip():
        raise InputError("--text is empty: leave it out, or describe the image")
    chosen = list(dict.fromkeys(formats or [Animation.gif]))
    if Animation.webp in chosen:
        from PIL import features

        if not features.check("webp"):
            raise InputError("this Pillow was built without WebP support: use --format gif")
    return chosen


def _animations(command: str, formats: list[Animation], duration: int, overwrite: bool) -> Callable:
    """`_generate`'s `after`: the saved frames as animations, named after the command and seed."""

    def after(generated: list, directory: Path) -> dict[str, Any]:
        from dalle2_cli.manipulate import animation_path, save_animation

        frames = [item.image for item in generated]
        paths = []
        for fmt in formats:
            path = animation_path(directory, f"{command}-{generated[0].seed}", fmt, overwrite)
            save_animation(frames, path, fmt, duration)
            _say(f"  {path} (animation)")
            paths.append(str(path))
        return {"animations": paths}

    return after


@app.command()
def interpolate(
    first: Annotated[Path, typer.Argument(help="The image at the start.")],
    second: Annotated[Path, typer.Argument(help="The image at the end.")],
    frames: FramesOpt = 8,
    animation: AnimationOpt = None,
    duration: DurationOpt = 250,
    text: FrameTextOpt = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    output_dir: OutOpt = Path("outputs"),
    name: NameOpt = None,
    overwrite: OverwriteOpt = False,
    grid: GridOpt = False,
    grid_rows: GridRowsOpt = None,
    batch_size: BatchOpt = 4,
    decoder_steps: DecoderStepsOpt = None,
    decoder_cond_scale: DecoderScaleOpt = None,
    device: DeviceOpt = None,
    keep_resident: ResidentOpt = False,
    weights: WeightsOpt = Weights.ema,
    non_strict: NonStrictOpt = False,
    dtype: DtypeOpt = Precision.fp32,
    offline: OfflineOpt = False,
    pad: PadOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Morph one image into another: slerp between their CLIP image embeddings, every frame
    decoded with the same noise; saves the frames ({prompt}-{seed}-{index}.png unless --name)
    and an animation."""

    def body() -> None:
        _go_offline(offline)
        from dalle2_cli.images import open_image

        formats = _check_frames(frames, duration, animation, text)
        settings = _settings(1, seed, batch_size, None, decoder_steps, None, decoder_cond_scale, pad)
        pictures = [open_image(path) for path in (first, second)]
        _note_fits((first, second), pictures, pad)
        _generate(
            "interpolate",
            config,
            _load_options(device, weights, non_strict, dtype, keep_resident),
            _output_choice(output_dir, name or FRAME_NAME, overwrite, grid, grid_rows, json_out, quiet),
            settings,
            "manipulate.Interpolation",
            lambda script: script.run(*pictures, frames=frames, text=text, sources=(str(first), str(second))),
            _animations("interpolate", formats, duration, overwrite),
        )

    _guard(debug, body)


@app.command()
def textdiff(
    image: Annotated[Path, typer.Argument(help="The image to change.")],
    from_text: Annotated[str, typer.Option("--from", help="A caption of the image as it is.")],
    to_text: Annotated[str, typer.Option("--to", help="The same caption, changed as the image should change.")],
    frames: FramesOpt = 6,
    max_angle: Annotated[
        float,
        typer.Option(
            "--max-angle",
            help="How far the last frame goes: the fraction of the angle from the image embedding to the text "
            "diff (θ in the DALL·E 2 paper, which uses 0.25-0.5; 1 decodes the diff alone).",
        ),
    ] = 0.5,
    animation: AnimationOpt = None,
    duration: DurationOpt = 250,
    text: FrameTextOpt = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    output_dir: OutOpt = Path("outputs"),
    name: NameOpt = None,
    overwrite: OverwriteOpt = False,
    grid: GridOpt = False,
    grid_rows: GridRowsOpt = None,
    batch_size: BatchOpt = 4,
    decoder_steps: DecoderStepsOpt = None,
    decoder_cond_scale: DecoderScaleOpt = None,
    device: DeviceOpt = None,
    keep_resident: ResidentOpt = False,
    weights: WeightsOpt = Weights.ema,
    non_strict: NonStrictOpt = False,
    dtype: DtypeOpt = Precision.fp32,
    offline: OfflineOpt = False,
    pad: PadOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Edit an image by a change of caption (the paper's text diff): move its CLIP image
    embedding toward normalize(text(--to) - text(--from)); saves the frames
    ({prompt}-{seed}-{index}.png unless --name) and an animation."""

    def body() -> None:
        _go_offline(offline)
        from dalle2_cli.images import open_image

        formats = _check_frames(frames, duration, animation, text)
        for option, caption in (("--from", from_text), ("--to", to_text)):
            if not caption.strip():
                raise InputError(f"{option} is empty: describe the image before and after the change")
        if not 0 < max_angle <= 1:
            raise InputError(f"--max-angle must be in (0, 1] (a fraction of the way to the text diff), got {max_angle}")
        settings = _settings(1, seed, batch_size, None, decoder_steps, None, decoder_cond_scale, pad)
        picture = open_image(image)
        _note_fits([image], [picture], pad)
        _generate(
            "textdiff",
            config,
            _load_options(device, weights, non_strict, dtype, keep_resident),
            _output_choice(output_dir, name or FRAME_NAME, overwrite, grid, grid_rows, json_out, quiet),
            settings,
            "manipulate.TextDiff",
            lambda script: script.run(
                picture, from_text, to_text, frames=frames, max_angle=max_angle, text=text, source=str(image)
            ),
            _animations("textdiff", formats, duration, overwrite),
        )

    _guard(debug, body)


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="A checkpoint: .pth/.pt (any dalle2-pytorch format) or .safetensors.")],
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show what a checkpoint file holds: format, stage, sizes, dtype, version, EMA, config, sha256."""

    def body() -> None:
        from dalle2_cli.inspection import inspect_file

        if not file.is_file():
            raise InputError(f"{file} is not a file")
        report = inspect_file(file)
        if json_out:
            print(json.dumps(report.as_dict()))
        else:
            print("\n".join(report.lines()))

    _guard(debug, body)


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="A checkpoint in any format dalle2-cli reads.")],
    target: Annotated[Path, typer.Argument(help="Where to write the .safetensors file.")],
    weights: WeightsOpt = Weights.ema,
    model_config: Annotated[
        Path | None,
        typer.Option("--model-config", help="JSON training config to embed, for files that carry none."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace TARGET if it exists.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Write a checkpoint's weights (EMA by default) as safetensors, with its config and version."""

    def body() -> None:
        if target.suffix != ".safetensors":
            raise InputError(f"{target}: the converted file's name must end in .safetensors")
        if target.exists() and not overwrite:
            raise InputError(f"{target} exists: pass --overwrite to replace it")
        if not source.is_file():
            raise InputError(f"{source} is not a file")
        extra = None
        if model_config is not None:
            try:
                extra = json.loads(model_config.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise InputError(f"cannot read --model-config {model_config}: {error}") from None
        from dalle2_cli.checkpoint import read_checkpoint, write_safetensors

        checkpoint = read_checkpoint(source, prefer_ema=weights == Weights.ema)
        if checkpoint.config is None and extra is None:
            _say(f"warning: {source} carries no config; pass --model-config so {target.name} loads on its own")
        write_safetensors(checkpoint, target, extra)
        _say(f"wrote {target} ({checkpoint.weights.upper()} weights of {checkpoint.format})")

    _guard(debug, body)


@config_app.command("list")
def config_list(json_out: JsonOpt = False) -> None:
    """The configs that `-c NAME` finds."""
    from dalle2_cli.config import available_configs

    configs = available_configs()
    if json_out:
        print(json.dumps({"configs": {name: str(path) for name, path in configs.items()}}))
        return
    for name, path in configs.items():
        print(f"{name}\t{path}")


@config_app.command("show")
def config_show(config: ConfigOpt = None, debug: DebugOpt = False) -> None:
    """Validate a config and print it with defaults filled in and paths resolved."""

    def body() -> None:
        from dalle2_cli.config import load_config

        loaded = load_config(_config_name(config))
        print(loaded.model_dump_json(indent=2, exclude_none=True))

    _guard(debug, body)


def _size(size: int) -> str:
    from rich.filesize import decimal

    return decimal(size)


@models_app.command("download")
def models_download(
    config: ConfigOpt = None,
    offline: OfflineOpt = False,
    quiet: QuietOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object listing the files.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Fetch every file a config needs into the caches (with --offline: check they are there)."""

    def body() -> None:
        _go_offline(offline)
        from dalle2_cli.config import load_config
        from dalle2_cli.models import download_config

        name = _config_name(config)
        fetched = download_config(load_config(name), name, quiet=quiet)
        if json_out:
            print(json.dumps({"config": name, "files": [f.as_dict() for f in fetched]}))
        for item in fetched:
            _say(f"{item.role}: {item.path} ({_size(item.size)})")
        _say(f"{len(fetched)} file(s) of {name} ready")

    _guard(debug, body)


@models_app.command("list")
def models_list(
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="Also show which files this config (name or path) uses.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object listing the files.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Cached model files: name, size, the configs that use them (shipped configs, and -c)."""

    def body() -> None:
        from dalle2_cli.files import default_cache_dir
        from dalle2_cli.models import cached_entries, known_configs

        entries = cached_entries(known_configs(config))
        hub_cache = None
        if any(e.source == "hub" for e in entries):
            from dalle2_cli.hub import hub_cache_dir

            hub_cache = str(hub_cache_dir())
        if json_out:
            print(
                json.dumps(
                    {
                        "cache_dir": str(default_cache_dir()),
                        "hub_cache_dir": hub_cache,
                        "files": [e.as_dict() for e in entries],
                    }
                )
            )
            return
        print(f"cache: {default_cache_dir()}")
        if hub_cache:
            print(f"Hugging Face cache: {hub_cache}")
        if not entries:
            print("no model files cached")
        for e in entries:
            used = ", ".join(e.configs) or "-"
            status = "" if e.status == "complete" else f" [{e.status}]"
            print(f"{e.name}{status}\t{_size(e.size)}\t{used}\t{e.path}")

    _guard(debug, body)


@models_app.command("verify")
def models_verify(
    config: Annotated[
        str | None,
        typer.Option("--config", "-c", help="This config's files (missing ones fail); default: all cached files."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object with each file's verdict.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Re-hash cached files against their known checksums; exit 1 if one is bad or missing."""

    def body() -> None:
        from dalle2_cli.config import load_config
        from dalle2_cli.models import known_configs, verify_cache, verify_config

        verdicts = verify_config(load_config(config)) if config else verify_cache(known_configs())
        failed = [v for v in verdicts if v.failed]
        if json_out:
            print(json.dumps({"ok": not failed, "files": [v.as_dict() for v in verdicts]}))
        else:
            if not verdicts:
                print("no model files cached")
            for v in verdicts:
                print(f"{v.status}\t{v.name}\t{v.detail}")
        if failed:
            names = ", ".join(v.name for v in failed)
            fetch = f"`dalle2 models download -c {config or 'CONFIG'}`"
            bad = [v.name for v in failed if v.status == "bad"]
            # A bad file is removed first: the Hugging Face cache would keep serving it.
            fix = f"remove with `dalle2 models rm {' '.join(bad)}`, then fetch with {fetch}" if bad else f"run {fetch}"
            raise Dalle2Error(f"{len(failed)} file(s) failed verification ({names}): {fix}")

    _guard(debug, body)


@models_app.command("rm")
def models_rm(
    names: Annotated[
        list[str] | None, typer.Argument(help="Names (or paths) as `dalle2 models list` shows them.")
    ] = None,
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="Remove every cached file of this config (name or path).")
    ] = None,
    everything: Annotated[
        bool, typer.Option("--all", help="Remove everything in dalle2-cli's cache (not the Hugging Face cache).")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object listing what was removed.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Remove cached model files (and their partial downloads)."""

    def body() -> None:
        from dalle2_cli.models import cached_entries, known_configs, remove_entries, select_entries

        if not names and config is None and not everything:
            raise InputError("say what to remove: NAME ..., -c CONFIG or --all (`dalle2 models list` shows names)")
        entries = cached_entries(known_configs(config))
        removed = remove_entries(select_entries(entries, names or [], config, everything))
        if json_out:
            print(json.dumps({"removed": [str(p) for p in removed]}))
        for path in removed:
            _say(f"removed {path}")
        if not removed:
            _say("nothing to remove")

    _guard(debug, body)


def _version(value: bool) -> None:
    if value:
        print(f"dalle2-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def main() -> None:
    app()
