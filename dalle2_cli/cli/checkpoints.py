"""Commands about files: what a checkpoint holds (`inspect`), re-saving one as safetensors
(`convert`), and the settings an image was made with (`info`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dalle2_cli.cli.app import app
from dalle2_cli.cli.groups import command
from dalle2_cli.cli.guard import say
from dalle2_cli.cli.report import Report, report
from dalle2_cli.errors import InputError
from dalle2_cli.loading.choices import Weights


@command(app, report("the checkpoint"))
def inspect(
    file: Annotated[
        Path,
        typer.Argument(
            help="A checkpoint: .pth/.pt (any dalle2-pytorch format), .bin or .safetensors; or a diffusers "
            "unCLIP folder (Karlo's, with model_index.json), or one of its components' folders."
        ),
    ],
    *,
    report: Report,
) -> None:
    """Show what a checkpoint file holds: format, stage, sizes, dtype, version, EMA, config, sha256.
    For a Karlo folder: each component's file."""
    from dalle2_cli.config import UNCLIP_INDEX
    from dalle2_cli.io.textfiles import regular_file
    from dalle2_cli.karlo.layout import component_weights
    from dalle2_cli.loading.inspection import inspect_file, inspect_folder

    if file.is_dir() and (file / UNCLIP_INDEX).is_file():
        inspection = inspect_folder(file)
    elif file.is_dir() and (weights := component_weights(file)) is not None:  # one component's folder
        inspection = inspect_file(weights)
    elif file.is_dir():
        raise InputError(
            f"{file} is a folder with no model_index.json and no weights file: give a checkpoint file, a diffusers "
            "unCLIP folder or one of its components' folders"
        )
    else:
        regular_file(file, "checkpoint")
        inspection = inspect_file(file)
    if report.json:
        report.print_json(inspection.as_dict())
    else:
        print("\n".join(inspection.lines()))


@command(app, report("the converted file"))
def convert(
    source: Annotated[Path, typer.Argument(help="A checkpoint in any format dalle2-cli reads.")],
    target: Annotated[Path, typer.Argument(help="Where to write the .safetensors file (folders are made).")],
    weights: Annotated[
        Weights, typer.Option("--weights", help="ema (the averaged weights, when the file has them) or raw.")
    ] = Weights.ema,
    model_config: Annotated[
        Path | None,
        typer.Option("--model-config", help="JSON training config to embed, for files that carry none."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", metavar="", help="Replace TARGET if it exists.")] = False,
    *,
    report: Report,
) -> None:
    """Write a checkpoint's weights (EMA by default) as safetensors, with its config and version."""
    from dalle2_cli.io.textfiles import read_json, regular_file

    if target.suffix != ".safetensors":
        raise InputError(f"{target}: the converted file's name must end in .safetensors")
    if target.is_dir():
        raise InputError(f"{target} is a directory: give the file's name, ending in .safetensors")
    if target.exists() and not overwrite:
        raise InputError(f"{target} exists: pass --overwrite to replace it")
    regular_file(source, "checkpoint")
    extra = read_json(model_config, "--model-config") if model_config is not None else None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the folder of {target}: {error.strerror or error}") from None

    from dalle2_cli.loading.checkpoint import read_checkpoint, write_safetensors

    checkpoint = read_checkpoint(source, weights)
    if weights == Weights.raw and checkpoint.weights == Weights.ema:
        say(f"warning: {source} holds only EMA weights ({checkpoint.format}): converting those")
    if checkpoint.config is None and extra is None:
        say(f"warning: {source} carries no config; pass --model-config so {target.name} loads on its own")
    write_safetensors(checkpoint, target, extra)
    say(f"wrote {target} ({checkpoint.weights.upper()} weights of {checkpoint.format})")
    if report.json:
        report.print_json({"path": str(target), "weights": checkpoint.weights, "source_format": checkpoint.format})


@command(app, report("the recorded settings"))
def info(
    image: Annotated[Path, typer.Argument(help="A PNG written by dalle2.")],
    *,
    report: Report,
) -> None:
    """Show the settings recorded in an image dalle2 made (re-run one with `text2im --from`)."""
    import json

    from dalle2_cli.io.output import recorded_settings

    metadata = recorded_settings(image)
    if report.json:
        report.print_json(metadata)
        return
    for key, value in metadata.items():
        shown = value if isinstance(value, str) else json.dumps(value)
        print(f"{key}: {shown}")
