"""An mkdocs hook: the command reference (docs/reference.md) written from the typer app itself,
each command's help and every option as `--help` shows it, so the manual cannot drift from it."""

from __future__ import annotations

from typing import Any

import typer.main

MARKER = "<!-- commands -->"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 - mkdocs' hook signature
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, commands_reference())


def commands_reference() -> str:
    from dalle2_cli.cli import app

    root = typer.main.get_command(app)  # typer's own click: commands and contexts by duck type
    return "\n".join(_command(root, ["dalle2"], root.context_class(root, info_name="dalle2")))


def _command(command: Any, path: list[str], context: Any) -> list[str]:
    lines: list[str] = []
    if path[1:]:
        lines += [f"{'#' * min(len(path), 4)} `{' '.join(path)}`", ""]
        lines += [_escaped(command.help or command.short_help or ""), ""]
        rows = [record for param in command.get_params(context) if (record := param.get_help_record(context))]
        usage = " ".join(command.collect_usage_pieces(context))
        lines += [f"    {' '.join(path)} {usage}", ""]
        if rows:
            lines += ["| option | what it does |", "|---|---|"]
            lines += [f"| <code>{_escaped(flags)}</code> | {_escaped(help_text)} |" for flags, help_text in rows]
            lines.append("")
    if hasattr(command, "list_commands"):
        for name in command.list_commands(context):
            sub = command.get_command(context, name)
            if sub is not None and not sub.hidden:
                lines += _command(sub, [*path, name], sub.context_class(sub, info_name=name, parent=context))
    return lines


def _escaped(text: str) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
    return " ".join(text.split())
