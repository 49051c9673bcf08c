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


# Environment variables the CLI may set for the libraries it drives (--offline, the guard):
# restored after every in-process run, so that one test's run leaves nothing to the next.
_SET_BY_THE_CLI = ("HF_HUB_OFFLINE", "TQDM_DISABLE", "OMP_WAIT_POLICY")


def invoke(
    *args: str, cwd: Path | None = None, check: bool = False, env: dict | None = None, input: str | None = None
) -> subprocess.CompletedProcess:
    """The `dalle2` command in this process (typer's CliRunner), for contracts that need no
    process of their own; answers as `run_cli` does (returncode, stdout, stderr)."""
    import contextlib

    from typer.testing import CliRunner

    from dalle2_cli.cli import app

    environment = {name: os.environ.get(name) for name in _SET_BY_THE_CLI} | (env or {})
    with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
        result = CliRunner().invoke(app, [str(a) for a in args], input=input, env=environment)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a bug, not an exit: show its traceback
    done = subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)
    if check and done.returncode != 0:
        raise AssertionError(f"dalle2 {' '.join(map(str, args))} failed ({done.returncode}):\n{done.stderr}")
    return done


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]
