"""The options the commands share, each group declared once, and the guard every command runs in.

A command lists the groups it takes; `command` adds their options to its signature (typer
reads them from there) and hands the command one typed value per group:

    @command(app, MODEL, sampling(prior=True), OUTPUT, report("the images"))
    def text2im(prompts: ..., model: ModelChoice, sampling: Sampling, output: OutputChoice, report: Report): ...

Torch is never imported here: `dalle2 --help` and every bad option answer at once.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from dalle2_cli.errors import ConfigWarning, Dalle2Error, InputError, SettingError
from dalle2_cli.sampling.settings import SamplingSettings, check_count

CONFIG_ENV = "DALLE2_CONFIG"
THREADS_ENV = "DALLE2_THREADS"
DEFAULT_CONFIG = "shapes"  # the model shipped in the package: works offline, on CPU

# The option that sets each library setting, for messages about a bad value.
FLAGS = {
    "num_images": "--num-images",
    "batch_size": "--batch-size",
    "seed": "--seed",
    "prior_steps": "--prior-steps",
    "prior_cond_scale": "--prior-cond-scale",
    "decoder_steps": "--decoder-steps",
    "decoder_cond_scale": "--decoder-cond-scale",
    "frames": "--frames",
    "max_angle": "--max-angle",
    "duration_ms": "--duration",
    "candidates": "--rerank",
    "source_text": "--from",
    "target_text": "--to",
    "threads": "--threads",
    "grid_rows": "--grid-rows",
    "mask_grow": "--mask-grow",
}


# -- declaring a group once ---------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """Options a command takes as one value: `build(**their values)` makes it, and the command
    receives it as its parameter `name`."""

    name: str
    options: tuple[inspect.Parameter, ...]
    build: Callable[..., Any]


def option(name: str, kind: Any, default: Any, *flags: str, help: str, **extra: Any) -> inspect.Parameter:
    """One keyword option; a bool is a flag (shown without a placeholder)."""
    if kind is bool:
        extra.setdefault("metavar", "")
    annotation = Annotated[kind, typer.Option(*flags, help=help, **extra)]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def command(app: typer.Typer, *groups: Group, name: str | None = None) -> Callable:
    """Register `function` as a command of `app` with the options of `groups` added, run
    inside the guard (one-line errors; tracebacks only with --debug)."""

    def register(function: Callable) -> Callable:
        signature = inspect.signature(function, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name not in {g.name for g in groups}]
        added = [p for g in groups for p in g.options]

        @functools.wraps(function)
        def run(**values: Any) -> None:
            with guard(bool(values.get("debug"))):
                for group in groups:
                    values[group.name] = group.build(**{p.name: values.pop(p.name) for p in group.options})
                function(**values)

        parameters = own + added
        run.__signature__ = signature.replace(parameters=parameters)  # what typer reads
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        app.command(name=name)(run)
        return run

    return register


# -- the groups -----------------------------------------------------------------------------


class Weights(StrEnum):
    ema = "ema"
    raw = "raw"


class Precision(StrEnum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


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
    prefer_ema: bool = True
    strict: bool | None = None  # None: the config's strict_loading
    offline: bool = False
    keep_resident: bool = False
    compile: bool = False
    threads: int | None = None
    named: bool = False  # whether --config was given (else the default or the environment's)

    def manager_options(self) -> dict[str, Any]:
        """DalleModelManager's keyword arguments (imports torch)."""
        import torch

        dtypes = {Precision.fp32: torch.float32, Precision.fp16: torch.float16, Precision.bf16: torch.bfloat16}
        return {
            "offline": True if self.offline else None,  # None: as the user's environment says
            "device": self.device,
            "prefer_ema": self.prefer_ema,
            "strict": self.strict,
            "dtype": dtypes[self.dtype],
            "keep_resident": self.keep_resident,
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
    if offline:
        go_offline()
    return ModelChoice(
        config_name(config),
        device,
        dtype,
        weights == Weights.ema,
        False if non_strict else None,
        offline,
        keep_resident,
        compile_networks,
        threads,
        named=config is not None,
    )


MODEL = Group(
    "model",
    (
        config_option(CONFIG_HELP),
        option("device", str | None, None, "--device", help="auto, cpu, cuda, cuda:N or mps."),
        option("dtype", Precision, Precision.fp32, "--dtype", help="Weights' precision; half samples under autocast."),
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


def sampling(prior: bool = False, count: bool = True, pad: bool = False) -> Group:
    """-n, --seed, --batch-size and the decoder's steps and guidance; with `prior` its steps and
    guidance too, with `pad` the non-square-input option."""
    options = []
    if count:
        options.append(option("num_images", int, 1, "--num-images", "-n", help="Images per prompt or per input image."))
    options += [
        option("seed", int | None, None, "--seed", help="Same seed and settings give the same images."),
        option("batch_size", int, 4, "--batch-size", help="Images sampled at once."),
    ]
    if prior:
        options += [
            option("prior_steps", int | None, None, "--prior-steps", help="Prior sampling steps."),
            option("prior_cond_scale", float | None, None, "--prior-cond-scale", help="Prior guidance scale."),
        ]
    options += [
        option(
            "decoder_steps",
            str | None,
            None,
            "--decoder-steps",
            help="Decoder sampling steps: one value, or comma-separated per unet.",
        ),
        option(
            "decoder_cond_scale",
            str | None,
            None,
            "--decoder-cond-scale",
            help="Decoder guidance scale: one value, or comma-separated per unet.",
        ),
    ]
    if pad:
        options.append(
            option(
                "pad",
                bool,
                False,
                "--pad",
                help="Fit a non-square image whole, padded with white, instead of center-cropping it.",
            )
        )

    def build(
        num_images: int = 1,
        seed: int | None = None,
        batch_size: int = 4,
        prior_steps: int | None = None,
        prior_cond_scale: float | None = None,
        decoder_steps: str | None = None,
        decoder_cond_scale: str | None = None,
        pad: bool = False,
    ) -> Sampling:
        settings = SamplingSettings(
            prior_steps=prior_steps,
            prior_cond_scale=prior_cond_scale,
            decoder_steps=_split(decoder_steps, int, "whole numbers", "decoder_steps"),
            decoder_cond_scale=_split(decoder_cond_scale, float, "numbers", "decoder_cond_scale"),
            batch_size=batch_size,
            seed=seed,
            pad=pad,
        )
        return Sampling(check_count(num_images), settings)

    return Group("sampling", tuple(options), build)


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
class Report:
    """How a command reports: lines on stderr (`info` hidden by --quiet; warnings and errors
    always), one JSON object on stdout with --json."""

    json: bool = False
    quiet: bool = False
    debug: bool = False

    def info(self, message: str) -> None:
        if not self.quiet:
            say(message)

    def warning(self, message: str) -> None:
        say(f"warning: {message}")

    def print_json(self, value: Any) -> None:
        import json

        print(json.dumps(value))


def report(what: str, quiet: bool = False) -> Group:
    """--json (printing one JSON object describing `what`), --debug, and with `quiet` -q."""
    options = [option("json_out", bool, False, "--json", help=f"Print one JSON object describing {what} on stdout.")]
    if quiet:
        options.append(
            option(
                "quiet",
                bool,
                False,
                "--quiet",
                "-q",
                help="Only warnings and errors on stderr: no progress bars, no lines about what was loaded and saved.",
            )
        )
    options.append(option("debug", bool, False, "--debug", help="Show tracebacks."))

    def build(json_out: bool, debug: bool, quiet: bool = False) -> Report:
        return Report(json_out, quiet, debug)

    return Group("report", tuple(options), build)


# -- the guard ------------------------------------------------------------------------------


def say(message: str) -> None:
    print(message, file=sys.stderr)


class Terminated(BaseException):
    """SIGTERM, raised where the program is so that files being written are cleaned up."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    if issubclass(category, ConfigWarning):
        say(f"warning: {message}")
    # Other libraries' warnings (deprecations and the like) are not for the user of the CLI.


@contextmanager
def guard(debug: bool) -> Iterator[None]:
    """Known errors become one line and an exit code, unless --debug; SIGTERM and Ctrl-C stop
    the command cleanly (no half-written file is left)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    # OpenMP threads that spin while waiting collapse when another process shares the cores
    # (scripts/bench_threads.py): waiting threads sleep instead, unless the user chose how
    # they wait. Read when torch loads, which is later.
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    handler = signal.signal(signal.SIGTERM, _terminate) if threading_main() else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", ConfigWarning)
            if not debug:
                warnings.showwarning = _show_warning
            yield
    except (typer.Exit, typer.Abort):
        raise
    except Exception as error:  # noqa: BLE001 - every failure becomes one line (a traceback with --debug)
        if debug:
            raise
        say(f"error: {describe(error)}")
        raise typer.Exit(error.exit_code if isinstance(error, Dalle2Error) else 1) from None
    except KeyboardInterrupt:
        say("interrupted: images finished so far are saved")
        raise typer.Exit(130) from None
    except Terminated:
        say("terminated: images finished so far are saved")
        raise typer.Exit(143) from None
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def describe(error: BaseException, most: int = 400) -> str:
    """One line, at most `most` characters, saying what went wrong (never a bare type name)."""
    if isinstance(error, SettingError):
        text = f"{FLAGS.get(error.field, error.field)} {error.problem}"
    elif isinstance(error, Dalle2Error):
        text = str(error)
    elif isinstance(error, BrokenPipeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # `... --json | head`
        text = "the output pipe was closed"
    elif isinstance(error, MemoryError):
        text = "out of memory: ask for fewer images at once (--batch-size), or use --dtype bf16"
    elif isinstance(error, RecursionError):
        text = "an input is nested too deeply to read"
    elif isinstance(error, OSError):
        where = f": {error.filename}" if error.filename else ""
        text = f"{error.strerror or type(error).__name__}{where}"
    else:
        detail = str(error).strip() or "no details"
        text = f"unexpected {type(error).__name__}: {detail} (run with --debug for the traceback)"
    text = " ".join(text.split())
    return text if len(text) <= most else text[: most - 5] + " ..."
