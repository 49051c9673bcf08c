"""The option groups the commands share, each declared once (see dalle2_cli.cli.groups):
which models and how to load them (MODEL), how to sample (`sampling`), where to write
(OUTPUT), and `generation`, all of these with the report options, as every generating command
takes them:

    @command(app, generation(prior=True))
    def text2im(prompts: ..., *, generation: Generation) -> None: ...

Torch is never imported here: `dalle2 --help` and every bad option answer at once.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from dalle2_cli.cli.groups import Group, option
from dalle2_cli.cli.report import Report, report
from dalle2_cli.errors import InputError, SettingError
from dalle2_cli.loading.choices import Precision, Weights
from dalle2_cli.sampling.settings import SAMPLERS, SamplingSettings, check_count

CONFIG_ENV = "DALLE2_CONFIG"
THREADS_ENV = "DALLE2_THREADS"
DEFAULT_CONFIG = "shapes"  # the model shipped in the package: works offline, on CPU


def go_offline() -> None:
    """--offline: dalle2-cli's own code is told so directly; HF_HUB_OFFLINE=1 is set too, before
    huggingface_hub and open_clip are imported, for the downloads they make on their own (and
    for the processes of a launch)."""
    os.environ["HF_HUB_OFFLINE"] = "1"


def config_name(config: str | None) -> str:
    return config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


def config_option(help: str) -> inspect.Parameter:
    return option("config", str | None, None, "--config", "-c", help=help)


CONFIG_HELP = f"Config name (`dalle2 config list`) or JSON path. Default: {DEFAULT_CONFIG} (env {CONFIG_ENV})."


@dataclass(frozen=True)
class ModelChoice:
    """Which models, and how to load and run them."""

    config: str
    device: str | None = None
    dtype: Precision = Precision.fp32
    weights: Weights = Weights.ema
    strict: bool | None = None  # None: the config's strict_loading
    offline: bool = False
    keep_resident: bool = False
    low_memory: bool = False
    compile: bool = False
    threads: int | None = None
    named: bool = False  # whether --config was given (else the default or the environment's)

    def manager_options(self) -> dict[str, Any]:
        """DalleModelManager's keyword arguments (imports torch)."""
        return {
            "offline": True if self.offline else None,  # None: as the user's environment says
            "device": self.device,
            "weights": self.weights,
            "strict": self.strict,
            "dtype": self.dtype.dtype,
            "keep_resident": self.keep_resident,
            "low_memory": self.low_memory,
            "compile": self.compile,
        }


def _model(
    config: str | None,
    device: str | None,
    dtype: Precision,
    weights: Weights,
    non_strict: bool,
    offline: bool,
    keep_resident: bool,
    low_memory: bool,
    compile_networks: bool,
    threads: int | None,
) -> ModelChoice:
    if threads is None and os.environ.get(THREADS_ENV):
        try:
            threads = int(os.environ[THREADS_ENV])
        except ValueError:
            raise InputError(
                f"{THREADS_ENV}={os.environ[THREADS_ENV]!r} is not a whole number: unset it or fix it"
            ) from None
    if threads is not None and threads < 1:
        raise SettingError("threads", f"must be at least 1, got {threads}")
    if low_memory and keep_resident:
        raise InputError("--low-memory and --keep-resident pull opposite ways: choose one")
    if offline:
        go_offline()
    return ModelChoice(
        config_name(config),
        device,
        dtype,
        weights,
        False if non_strict else None,
        offline,
        keep_resident,
        low_memory,
        compile_networks,
        threads,
        named=config is not None,
    )


MODEL = Group(
    "model",
    (
        config_option(CONFIG_HELP),
        option("device", str | None, None, "--device", help="auto, cpu, cuda, cuda:N or mps."),
        option(
            "dtype",
            Precision,
            Precision.fp32,
            "--dtype",
            help="Weights' precision: bf16 and fp16 halve their memory (computed in fp32 on a CPU without them).",
        ),
        option(
            "weights", Weights, Weights.ema, "--weights", help="ema (averaged weights, when a file has them) or raw."
        ),
        option(
            "non_strict",
            bool,
            False,
            "--non-strict",
            help="Load checkpoints whose keys do not match (those weights stay random).",
        ),
        option(
            "offline",
            bool,
            False,
            "--offline",
            help="Never touch the network: use cached model files or fail (as HF_HUB_OFFLINE=1).",
        ),
        option(
            "keep_resident",
            bool,
            False,
            "--keep-resident",
            help="Keep every model on the GPU (faster when it fits) instead of only the running stage.",
        ),
        option(
            "low_memory",
            bool,
            False,
            "--low-memory",
            help="Hold in memory only the weights of the stage that runs (read again from the model files for "
            "each stage): peak memory near the largest model's, at the cost of reading and converting per batch.",
        ),
        option(
            "compile_networks",
            bool,
            False,
            "--compile",
            help="torch.compile the prior and decoder networks: the first batch of each size waits for compiling "
            "(minutes on a CPU, the first time), later ones run faster. For long runs.",
        ),
        option(
            "threads",
            int | None,
            None,
            "--threads",
            help=f"CPU threads for torch (env {THREADS_ENV}); default: torch's choice, one per core.",
        ),
    ),
    _model,
)


@dataclass(frozen=True)
class Sampling:
    num_images: int
    settings: SamplingSettings


def _split(text: str | None, kind: Callable, what: str, field: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(part) for part in text.split(",")]
    except ValueError:
        raise SettingError(field, f"expects {what}, one or comma-separated per unet, got {text!r}") from None


# typer offers an Enum's values as the choices.
Sampler = StrEnum("Sampler", {name: name for name in SAMPLERS})
SAMPLER_HELP = (
    "ddpm (ancestral), ddim, or dpm++2m (DPM-Solver++ 2M: as good in fewer steps), for every stage. "
    "Default: the config's, else ddim when fewer steps than trained are asked for, else ddpm."
)
NUM_IMAGES = option("num_images", int, 1, "--num-images", "-n", help="Images per prompt or per input image.")
COMMON_SAMPLING = (
    option("seed", int | None, None, "--seed", help="Same seed and settings give the same images."),
    option("batch_size", int, 4, "--batch-size", help="Images sampled at once."),
    option("sampler", Sampler | None, None, "--sampler", help=SAMPLER_HELP),
    option(
        "ddim_eta",
        float | None,
        None,
        "--ddim-eta",
        help="ddim's noise for every stage: 0 deterministic, 1 as ddpm (default: the config's, else dalle2-pytorch's).",
    ),
)
PRIOR_SAMPLING = (
    option("prior_steps", int | None, None, "--prior-steps", help="Prior sampling steps."),
    option("prior_cond_scale", float | None, None, "--prior-cond-scale", help="Prior guidance scale."),
    option(
        "negative_prompt",
        str | None,
        None,
        "--negative-prompt",
        help="What the image should not be: the prior's guidance steers away from this text.",
    ),
)
DECODER_SAMPLING = (
    option(
        "decoder_steps", str | None, None, "--decoder-steps", help="Decoder steps: one, or comma-separated per unet."
    ),
    option(
        "decoder_cond_scale",
        str | None,
        None,
        "--decoder-cond-scale",
        help="Decoder guidance scale: one value, or comma-separated per unet.",
    ),
)
PAD = option(
    "pad", bool, False, "--pad", help="Fit a non-square image whole, padded with white, instead of center-cropping it."
)
RESAMPLE = option(
    "inpaint_resample_times",
    int,
    SamplingSettings.inpaint_resample_times,
    "--resample",
    metavar="N",
    help="RePaint's rounds per step: more make the fill agree with what is kept, at N times the cost.",
)


def sampling(prior: bool = False, count: bool = True, pad: bool = False, inpaint: bool = False) -> Group:
    """-n, --seed, --batch-size, --sampler and the decoder's steps and guidance; with `prior` its
    steps, guidance and --negative-prompt too, with `pad` the non-square-input option, with
    `inpaint` RePaint's resampling rounds."""
    options = (
        *([NUM_IMAGES] if count else []),
        *COMMON_SAMPLING,
        *(PRIOR_SAMPLING if prior else ()),
        *DECODER_SAMPLING,
        *([PAD] if pad else []),
        *([RESAMPLE] if inpaint else []),
    )

    def build(
        num_images: int = 1,
        decoder_steps: str | None = None,
        decoder_cond_scale: str | None = None,
        sampler: Sampler | None = None,
        **values: Any,
    ) -> Sampling:
        settings = SamplingSettings(
            decoder_steps=_split(decoder_steps, int, "whole numbers", "decoder_steps"),
            decoder_cond_scale=_split(decoder_cond_scale, float, "numbers", "decoder_cond_scale"),
            sampler=None if sampler is None else sampler.value,
            **values,
        )
        return Sampling(check_count(num_images), settings)

    return Group("sampling", options, build)


@dataclass(frozen=True)
class OutputChoice:
    """Where and how a generating command writes its images."""

    directory: Path
    name: str | None = None  # None: the command's default template
    overwrite: bool = False
    grid: bool = False
    grid_rows: int | None = None


def _output(output_dir: Path, name: str | None, overwrite: bool, grid: bool, grid_rows: int | None) -> OutputChoice:
    from dalle2_cli.io.output import check_name_template

    if name is not None:
        check_name_template(name)
    if grid_rows is not None and grid_rows < 1:
        raise SettingError("grid_rows", f"must be at least 1, got {grid_rows}")
    return OutputChoice(output_dir, name, overwrite, grid or grid_rows is not None, grid_rows)


OUTPUT = Group(
    "output",
    (
        option("output_dir", Path, Path("outputs"), "--output-dir", "-o", help="Where images are written."),
        option(
            "name",
            str | None,
            None,
            "--name",
            help="File name template; fields {prompt} {seed} {index} {source} {command}. "
            "Default: {prompt}-{seed} ({prompt}-{seed}-{index} for frames).",
        ),
        option(
            "overwrite",
            bool,
            False,
            "--overwrite",
            help="Replace files of the same name (otherwise new names are found).",
        ),
        option("grid", bool, False, "--grid", help="Also save a contact sheet of all the images (grid.png)."),
        option(
            "grid_rows",
            int | None,
            None,
            "--grid-rows",
            help="Rows in the --grid sheet (default: one per prompt or input).",
        ),
    ),
    _output,
)


@dataclass(frozen=True)
class Generation:
    """What every generating command takes: how to sample, which models, where to write, how
    to report."""

    sampling: Sampling
    model: ModelChoice
    output: OutputChoice
    report: Report


def generation(
    what: str = "the images", prior: bool = False, count: bool = True, pad: bool = False, inpaint: bool = False
) -> Group:
    """The sampling, MODEL, OUTPUT and report groups as one (`what` the report describes)."""
    parts = (sampling(prior, count, pad, inpaint), MODEL, OUTPUT, report(what, quiet=True))

    def build(**values: Any) -> Generation:
        return Generation(*(part.build(**{p.name: values[p.name] for p in part.options}) for part in parts))

    return Group("generation", tuple(p for part in parts for p in part.options), build)
