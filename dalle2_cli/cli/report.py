"""How a command reports: lines on stderr, one JSON object on stdout with --json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dalle2_cli.cli.groups import Group, option
from dalle2_cli.cli.guard import say


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
