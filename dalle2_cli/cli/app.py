"""The `dalle2` command: its typer apps. The commands live beside this module, one module per
kind (generate, frames, checkpoints, cache); importing `dalle2_cli.cli` registers them all."""

from __future__ import annotations

from typing import Annotated

import typer

from dalle2_cli import __version__

app = typer.Typer(
    name="dalle2",
    help="DALL·E 2 inference on DALLE2-pytorch checkpoints: text2im, variation, inpaint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: compact, and no placeholders on flags
)
config_app = typer.Typer(help="List and check model configs.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(config_app, name="config")
models_app = typer.Typer(
    help="Download, list, verify and remove cached model files.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(models_app, name="models")


def _version(value: bool) -> None:
    if value:
        print(f"dalle2-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, metavar="", help="Print the version and exit."),
    ] = False,
) -> None:
    pass
