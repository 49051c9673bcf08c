"""Commands about configs and the model cache: `config list|show`, `models download|list|verify|rm`."""

from __future__ import annotations

from typing import Annotated

import typer

from dalle2_cli.cli.app import config_app, models_app
from dalle2_cli.cli.groups import command
from dalle2_cli.cli.guard import say
from dalle2_cli.cli.options import CONFIG_HELP, config_name, go_offline
from dalle2_cli.cli.report import Report, report
from dalle2_cli.errors import Dalle2Error, InputError


def size_text(size: int) -> str:
    """File sizes, everywhere: decimal units (1.0 MB = 1,000,000 bytes), as the hub shows them."""
    from rich.filesize import decimal

    return decimal(size)


@command(config_app, report("the configs"), name="list")
def config_list(*, report: Report) -> None:
    """The configs that `-c NAME` finds."""
    from dalle2_cli.config import available_configs

    configs = available_configs()
    if report.json:
        report.print_json({"configs": {name: str(path) for name, path in configs.items()}})
        return
    for name, path in configs.items():
        print(f"{name}\t{path}")


@command(config_app, report("the config"), name="show")
def config_show(
    config: Annotated[str | None, typer.Option("--config", "-c", help=CONFIG_HELP)] = None, *, report: Report
) -> None:
    """Validate a config and print it (JSON) with defaults filled in and paths resolved."""
    from dalle2_cli.config import load_config

    print(load_config(config_name(config)).model_dump_json(indent=None if report.json else 2, exclude_none=True))


@command(models_app, report("the files", quiet=True), name="download")
def models_download(
    config: Annotated[str | None, typer.Option("--config", "-c", help=CONFIG_HELP)] = None,
    offline: Annotated[
        bool, typer.Option("--offline", metavar="", help="Only check that every file is cached (no network).")
    ] = False,
    *,
    report: Report,
) -> None:
    """Fetch every file a config needs into the caches (with --offline: check they are there)."""

    if offline:
        go_offline()
    from dalle2_cli.config import load_config
    from dalle2_cli.sources.cache_admin import download_config

    name = config_name(config)
    fetched = download_config(load_config(name), name, quiet=report.quiet, offline=True if offline else None)
    if report.json:
        report.print_json({"config": name, "files": [f.as_dict() for f in fetched]})
    for item in fetched:
        report.info(f"{item.role}: {item.path} ({size_text(item.size)})")
    report.info(f"{len(fetched)} file(s) of {name} ready")


@command(models_app, report("the files"), name="list")
def models_list(
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="Also show which files this config (name or path) uses.")
    ] = None,
    *,
    report: Report,
) -> None:
    """Cached model files: name, size, the configs that use them (shipped configs, and -c)."""
    from dalle2_cli.sources.cache import default_cache_dir
    from dalle2_cli.sources.cache_admin import cached_entries, known_configs

    entries = cached_entries(known_configs(config))
    hub_cache = None
    if any(e.source == "hub" for e in entries):
        from dalle2_cli.sources.hub import hub_cache_dir

        hub_cache = str(hub_cache_dir())
    if report.json:
        files = [e.as_dict() for e in entries]
        report.print_json({"cache_dir": str(default_cache_dir()), "hub_cache_dir": hub_cache, "files": files})
        return
    print(f"cache: {default_cache_dir()}")
    if hub_cache:
        print(f"Hugging Face cache: {hub_cache}")
    if not entries:
        print("no model files cached")
    for e in entries:
        used = ", ".join(e.configs) or "-"
        status = "" if e.status == "complete" else f" [{e.status}]"
        print(f"{e.name}{status}\t{size_text(e.size)}\t{used}\t{e.path}")


@command(models_app, report("each file's verdict"), name="verify")
def models_verify(
    config: Annotated[
        str | None,
        typer.Option("--config", "-c", help="This config's files (missing ones fail); default: all cached files."),
    ] = None,
    *,
    report: Report,
) -> None:
    """Re-hash model files against their known checksums; exit 1 if one is bad or missing."""
    from dalle2_cli.config import load_config
    from dalle2_cli.sources.cache_admin import known_configs, verify_cache, verify_config

    verdicts = verify_config(load_config(config)) if config else verify_cache(known_configs())
    failed = [v for v in verdicts if v.failed]
    if report.json:
        report.print_json({"ok": not failed, "files": [v.as_dict() for v in verdicts]})
    else:
        if not verdicts:
            print("no model files cached")
        for v in verdicts:
            print(f"{v.status}\t{v.name}\t{v.detail}")
    if failed:
        names = ", ".join(v.name for v in failed)
        fetch = f"`dalle2 models download -c {config or 'CONFIG'}`"
        bad = [v.name for v in failed if v.status == "bad"]
        # A bad file is removed first: the Hugging Face cache would keep serving it.
        fix = f"remove with `dalle2 models rm {' '.join(bad)}`, then fetch with {fetch}" if bad else f"run {fetch}"
        raise Dalle2Error(f"{len(failed)} file(s) failed verification ({names}): {fix}")


@command(models_app, report("what was removed"), name="rm")
def models_rm(
    names: Annotated[
        list[str] | None, typer.Argument(help="Names (or paths) as `dalle2 models list` shows them.")
    ] = None,
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="Remove every cached file of this config (name or path).")
    ] = None,
    everything: Annotated[
        bool,
        typer.Option("--all", metavar="", help="Remove everything in dalle2-cli's cache (not the Hugging Face cache)."),
    ] = False,
    *,
    report: Report,
) -> None:
    """Remove cached model files (and their partial downloads)."""
    from dalle2_cli.sources.cache_admin import cached_entries, known_configs, remove_entries, select_entries

    if not names and config is None and not everything:
        raise InputError("say what to remove: NAME ..., -c CONFIG or --all (`dalle2 models list` shows names)")
    entries = cached_entries(known_configs(config))
    removed = remove_entries(select_entries(entries, names or [], config, everything))
    if report.json:
        report.print_json({"removed": [str(p) for p in removed]})
    for path in removed:
        say(f"removed {path}")
    if not removed:
        say("nothing to remove")
