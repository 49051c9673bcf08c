"""How a command takes its options in groups, each group declared once (as `llm` shares its
option groups with one decorator): `command` adds the groups' options to the command's
signature (typer reads them from there) and hands the command one typed value per group,
made by the group's `build`. Torch is never imported here."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from dalle2_cli.cli.guard import guard


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
