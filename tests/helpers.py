"""Helpers shared by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def edit_config(source: Path, target: Path, edit) -> Path:
    data = json.loads(source.read_text())
    edit(data)
    target.write_text(json.dumps(data))
    return target


def run_cli(
    *args: str, cwd: Path | None = None, check: bool = False, env: dict | None = None, input: str | None = None
):
    """The real `dalle2` command in a subprocess (`input`: its standard input)."""
    result = subprocess.run(
        [sys.executable, "-m", "dalle2_cli", *args],
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"dalle2 {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def invoke(*args: str, input: str | None = None, env: dict | None = None):
    """The `dalle2` command in this process (typer's CliRunner): for contracts that need no
    process of their own. Returns click's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from dalle2_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input, env=env)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]
