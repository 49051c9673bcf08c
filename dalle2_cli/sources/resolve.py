"""Turn a config `File` into a path on disk, checked: local files as they are, Hugging Face hub
files through huggingface_hub (dalle2_cli.sources.hub), other urls through dalle2-cli's own
cache (dalle2_cli.sources.cache). Every model file is hashed once per run and compared with
what is known of it, so that a file whose bytes changed is never used as the one expected."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dalle2_cli.config import File
from dalle2_cli.errors import InputError
from dalle2_cli.io.textfiles import regular_file
from dalle2_cli.messages import Log, stderr
from dalle2_cli.sources.cache import cached_download
from dalle2_cli.sources.digests import file_sha256
from dalle2_cli.sources.hub import download_hub_file, parse_hub_url

TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


def is_offline() -> bool:
    """Whether the user asked for offline mode, as huggingface_hub spells it (HF_HUB_OFFLINE)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in TRUE_VALUES


def resolve_file(
    file: File,
    *,
    offline: bool | None = None,
    config_name: str | None = None,
    quiet: bool = False,
    check_updates: bool = True,
    log: Log = stderr,
) -> Path:
    """The local path of `file`, downloading it first if it is a url not cached (or changed),
    and checked: every model file is hashed (once per process) and compared with what is known
    of it (the config's sha256, the digest recorded at download, the hub's), so that a file
    whose bytes changed on disk is never used as if it were the one expected.

    `offline`: never touch the network (default: the user's HF_HUB_OFFLINE); `config_name`
    only improves messages (how to fetch a file missing offline); `quiet` hides the progress
    bar, which also stays hidden when stderr is not a terminal; `check_updates=False` uses a
    cached url file without asking whether it changed upstream (dalle2-laion's
    `check_updates`); `log` gets what the user should know (retries, re-downloads)."""
    if file.load_type == "local":
        return _local(file)
    offline = is_offline() if offline is None else offline
    hub = parse_hub_url(file.path)
    if hub is not None:
        return download_hub_file(
            hub,
            offline=offline,
            show_progress=not quiet and sys.stderr.isatty(),
            sha256=file.sha256,
            config_name=config_name,
            check_updates=check_updates,
            log=log,
        )
    return cached_download(
        file, offline=offline, config_name=config_name, quiet=quiet, check_updates=check_updates, log=log
    )


def _local(file: File) -> Path:
    path = Path(file.path)
    regular_file(path, "model file")
    if file.sha256 is not None:
        actual = file_sha256(path)
        if actual != file.sha256:
            raise InputError(
                f"model file {path} has sha256 {actual}, but the config expects {file.sha256}: "
                "the file is damaged or not the one the config names"
            )
    return path
