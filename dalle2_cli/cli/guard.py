"""The guard every command runs in: a known error becomes one line on stderr and an exit code
(a traceback only with --debug), SIGTERM and Ctrl-C stop a command cleanly. A library error
names the setting as the library spells it; `describe` names the option that sets it."""

from __future__ import annotations

import os
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer

from dalle2_cli.errors import ConfigWarning, Dalle2Error

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
    "sampler": "--sampler",
    "negative_prompt": "--negative-prompt",
    "ddim_eta": "--ddim-eta",
    "inpaint_resample_times": "--resample",
    "weights": "--weights",
    "name": "--name",
    "dtype": "--dtype",
    "prior_samples_per_image": "prior samples per image",
    "prior_sampler": "--sampler (prior)",
    "decoder_sampler": "--sampler (decoder)",
    "device": "--device",
    "strict=False": "--non-strict",
    "pad=True": "--pad",
    "template": "--name",
    "directory": "--output-dir",
    "resume=True": "--resume",
    "overwrite=True": "--overwrite",
    "offline=True": "--offline",
    "animation format": "--format",
}


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
    if isinstance(error, Dalle2Error):
        text = error.naming(lambda field: FLAGS.get(field, field))
    elif isinstance(error, BrokenPipeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # `... --json | head`
        text = "the output pipe was closed"
    elif isinstance(error, MemoryError):
        text = "out of memory: ask for fewer images at once (--batch-size), use --dtype bf16, or --low-memory"
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
