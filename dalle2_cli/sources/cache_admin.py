"""`dalle2 models ...`: fetch a config's files ahead of time, list, verify and remove cached files.

Two caches hold model files: dalle2-cli's own (plain urls; `DALLE2_CACHE_DIR`, else the
per-user cache directory) and the Hugging Face cache (hub files). The Hugging Face cache is
shared with other tools, so only the hub files that a known config uses are listed here.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from dalle2_cli.config import File, ModelLoadConfig, UnclipLoadConfig, available_configs, load_config
from dalle2_cli.errors import Dalle2Error, InputError
from dalle2_cli.io.textfiles import read_json
from dalle2_cli.karlo.layout import UnclipLayout, files, first_available
from dalle2_cli.sources.cache import cache_lock, cache_path, default_cache_dir
from dalle2_cli.sources.digests import SIDECAR_SUFFIX, recorded_digest, sha256_of, sidecar_path
from dalle2_cli.sources.http import PARTIAL_DIR, partial_path
from dalle2_cli.sources.hub import (
    HubFile,
    cached_hub_file,
    expected_blob_digest,
    fetch_hint,
    git_blob_sha1,
    parse_hub_url,
    remove_cached_hub_file,
)
from dalle2_cli.sources.resolve import is_offline, resolve_file


@dataclass(frozen=True)
class ConfigFile:
    """A file a config needs, and what it is for ("prior", "decoder unet 1 config", ...)."""

    role: str
    file: File
    # Where the source may not have `file`, the files to try after it (a hub repository may
    # hold a diffusers component's weights as pickled .bin only).
    alternatives: tuple[File, ...] = ()


def config_files(config: ModelLoadConfig) -> list[ConfigFile]:
    """Every `File` of a config, each once, in loading order."""
    found: list[ConfigFile] = []
    if config.clip is not None and config.clip.load_model_from is not None:
        found.append(ConfigFile("clip", config.clip.load_model_from))
    if config.clip is not None and config.clip.load_config_from is not None:
        found.append(ConfigFile("clip config", config.clip.load_config_from))
    if config.prior is not None:
        found.append(ConfigFile("prior", config.prior.load_model_from))
        if config.prior.load_config_from is not None:
            found.append(ConfigFile("prior config", config.prior.load_config_from))
    if config.unclip is not None:
        found += unclip_files(config.unclip)
    if config.decoder is not None:
        for source in config.decoder.unet_sources:
            numbers = ",".join(str(n) for n in source.unet_numbers)
            label = f"decoder unet{'s' if len(source.unet_numbers) > 1 else ''} {numbers}"
            found.append(ConfigFile(label, source.load_model_from))
            if source.load_config_from is not None:
                found.append(ConfigFile(f"{label} config", source.load_config_from))
    unique: list[ConfigFile] = []
    seen: set[str] = set()
    for item in found:
        key = item.file.model_dump_json()
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


def unclip_files(section: UnclipLoadConfig) -> list[ConfigFile]:
    """Every file of a diffusers unCLIP pipeline. Which components it has is in its
    model_index.json, read from the folder or the Hugging Face cache (when it is not there,
    only the index itself is listed)."""
    index_file = UnclipLayout(section).index()
    hub = parse_hub_url(index_file.path) if index_file.load_type == "url" else None
    index_path = cached_hub_file(hub) if hub is not None else Path(index_file.path)
    index = read_json(index_path, "model index") if index_path is not None and index_path.is_file() else None
    listed = files(section, index if isinstance(index, dict) else None)
    return [ConfigFile(role, first, tuple(others)) for role, (first, *others) in listed]


def clip_pretrained(config: ModelLoadConfig) -> tuple[str, str | None] | None:
    """(open_clip model name, pretrained tag) of a CLIP whose weights open_clip downloads,
    or None when the config gives them as a file (or builds CLIP from an architecture)."""
    clip = config.clip
    if clip is None or clip.load_model_from is not None or clip.architecture is not None:
        return None
    if clip.make == "openai":
        # As dalle2_cli.loading.clip spells OpenAI's names for open_clip: `ViT-L/14@336px` -> `ViT-L-14-336`.
        return clip.model.replace("/", "-").replace("@336px", "-336"), "openai"
    if clip.make == "open_clip":
        return clip.model, clip.pretrained
    return None


def source_of(file: File) -> str:
    if file.load_type == "local":
        return "local"
    return "hub" if parse_hub_url(file.path) is not None else "url"


# -- download -----------------------------------------------------------------------------


@dataclass
class Fetched:
    role: str
    source: str  # local, url, hub, open_clip
    location: str  # what the config names: a path, a url, an open_clip model
    path: Path
    size: int

    def as_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


def download_config(
    config: ModelLoadConfig, config_name: str, quiet: bool = False, offline: bool | None = None
) -> list[Fetched]:
    """Make every file of `config` available locally (offline: check that it is)."""
    fetched = []
    resolve = functools.partial(resolve_file, config_name=config_name, quiet=quiet, offline=offline)
    if config.unclip is not None:  # its index says which files it has: fetched first
        resolve(UnclipLayout(config.unclip).index())
    for item in config_files(config):
        file, path = first_available([item.file, *item.alternatives], resolve)
        item = ConfigFile(item.role, file)
        fetched.append(Fetched(item.role, source_of(item.file), item.file.path, path, path.stat().st_size))
    pretrained = clip_pretrained(config)
    if pretrained is not None:
        name, tag = pretrained
        tag, path = fetch_clip_pretrained(name, tag, config_name, offline)
        fetched.append(Fetched("clip", "open_clip", f"open_clip {name} ({tag})", path, path.stat().st_size))
    return fetched


def fetch_clip_pretrained(
    name: str, tag: str | None, config_name: str, offline: bool | None = None
) -> tuple[str, Path]:
    """CLIP weights that open_clip downloads when the model is built (from the Hugging Face
    hub, into its cache), fetched the same way now so that later runs work offline."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model

    offline = is_offline() if offline is None else offline
    if tag is None:
        tags = list_pretrained_tags_by_model(name)
        if not tags:
            raise InputError(f"open_clip knows no pretrained weights for {name!r}: give clip.load_model_from")
        tag = tags[0]
    cfg = get_pretrained_cfg(name, tag)
    if not cfg:
        raise InputError(f"open_clip knows no pretrained weights {tag!r} for {name!r}")
    what = f"CLIP weights {name} ({tag})"
    if offline and not cfg.get("hf_hub"):
        # open_clip fetches url-only weights with urllib, which knows nothing of offline mode.
        cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg.get("url", ""))
        if not cached.is_file():
            raise Dalle2Error(f"{what} are not cached ({cached}) and offline mode is on: {fetch_hint(config_name)}")
    try:
        path = download_pretrained(cfg)
    except Exception as error:  # noqa: BLE001 - open_clip wraps huggingface_hub's errors in several types
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        if offline:
            raise Dalle2Error(
                f"{what} are not in the Hugging Face cache and offline mode is on: {fetch_hint(config_name)}"
            ) from None
        raise Dalle2Error(f"cannot download {what} through open_clip: {detail}") from None
    return tag, Path(path)


# -- what is cached -----------------------------------------------------------------------


@dataclass
class CachedEntry:
    name: str  # the file name in dalle2-cli's cache, or the hub file's hf:// url
    path: Path
    size: int
    source: str  # url or hub
    status: str  # complete, or partial (an interrupted download, resumed by the next one)
    configs: list[str] = field(default_factory=list)
    sha256: str | None = None  # recorded at download (url) or named by the hub (LFS blobs)

    def as_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


def known_configs(extra: str | None = None) -> dict[str, ModelLoadConfig]:
    """The shipped configs by name, and `extra` (a name or a path) when given."""
    configs: dict[str, ModelLoadConfig] = {}
    for name, path in available_configs().items():
        try:
            configs[name] = load_config(str(path))
        except InputError:
            continue  # a broken config must not hide the cache; `dalle2 config show` reports it
    if extra is not None and extra not in configs:
        configs[extra] = load_config(extra)
    return configs


def cached_entries(configs: dict[str, ModelLoadConfig]) -> list[CachedEntry]:
    """Files in dalle2-cli's cache (and in the cache_dirs the configs name), and the hub files
    the configs use that are in the Hugging Face cache, each with the configs that use it."""
    used_at: dict[Path, list[str]] = {}
    used_hub: dict[HubFile, list[str]] = {}
    directories = [default_cache_dir()]
    for config_name, config in configs.items():
        for item in config_files(config):
            if item.file.load_type != "url":
                continue
            hub = parse_hub_url(item.file.path)
            if hub is not None:
                used_hub.setdefault(hub, []).append(config_name)
                continue
            try:
                path = cache_path(item.file)
            except InputError:
                continue
            used_at.setdefault(path, []).append(config_name)
            if path.parent not in directories:
                directories.append(path.parent)
    entries = []
    for directory in directories:
        entries.extend(_entries_in(directory, used_at))
    for hub, names in used_hub.items():
        path = cached_hub_file(hub)
        if path is not None:
            digest = expected_blob_digest(path)
            sha256 = digest[1] if digest and digest[0] == "sha256" else None
            size = path.stat().st_size
            entries.append(CachedEntry(hub.uri, path, size, "hub", "complete", sorted(set(names)), sha256))
    return entries


def _entries_in(directory: Path, used_at: dict[Path, list[str]]) -> list[CachedEntry]:
    if not directory.is_dir():
        return []
    entries = []
    for path in sorted(directory.iterdir()):
        # Hidden names are the cache's own (.partial, .locks, temporary files), as are the
        # sha256 records: neither is a model file.
        if path.name.startswith(".") or path.name.endswith(SIDECAR_SUFFIX) or not path.is_file():
            continue
        configs = sorted(set(used_at.get(path, [])))
        entries.append(
            CachedEntry(path.name, path, path.stat().st_size, "url", "complete", configs, recorded_digest(path))
        )
    partials = directory / PARTIAL_DIR
    if partials.is_dir():
        for path in sorted(partials.iterdir()):
            if path.suffix == ".json" or not path.is_file():
                continue
            configs = sorted(set(used_at.get(directory / path.name, [])))
            entries.append(CachedEntry(path.name, path, path.stat().st_size, "url", "partial", configs))
    return entries


# -- verify -------------------------------------------------------------------------------


@dataclass
class Verdict:
    name: str
    path: Path | None
    status: str  # ok, bad, missing, partial, unchecked (no known checksum)
    detail: str = ""

    def as_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path) if self.path else None}

    @property
    def failed(self) -> bool:
        return self.status in ("bad", "missing", "partial")


def verify_config(config: ModelLoadConfig) -> list[Verdict]:
    """Re-hash every file of `config` against what is known of it: the config's sha256, the
    digest recorded when it was downloaded, the sha256 (or git id) the hub names it by."""
    verdicts = []
    for item in config_files(config):
        file = item.file
        if file.load_type == "local":
            path = Path(file.path)
            if not path.is_file():
                verdicts.append(Verdict(str(path), path, "missing", f"{item.role}: the local file does not exist"))
            else:
                verdicts.append(_check(str(path), path, file.sha256, None))
            continue
        hub = parse_hub_url(file.path)
        if hub is not None:
            path = cached_hub_file(hub)
            if path is None:
                verdicts.append(Verdict(hub.uri, None, "missing", f"{item.role}: not in the Hugging Face cache"))
            else:
                verdicts.append(_check_hub(hub.uri, path, file.sha256))
            continue
        path = cache_path(file)
        if path.is_file():
            verdicts.append(_check(path.name, path, file.sha256, recorded_digest(path)))
        elif partial_path(path).is_file():
            verdicts.append(Verdict(path.name, partial_path(path), "partial", f"{item.role}: download incomplete"))
        else:
            verdicts.append(Verdict(path.name, None, "missing", f"{item.role}: not downloaded"))
    return verdicts


def verify_cache(configs: dict[str, ModelLoadConfig]) -> list[Verdict]:
    """Re-hash every complete file in the caches (see `cached_entries`)."""
    wanted: dict[Path, str] = {}
    hub_wanted: dict[str, str] = {}
    for config in configs.values():
        for item in config_files(config):
            if item.file.load_type != "url" or item.file.sha256 is None:
                continue
            hub = parse_hub_url(item.file.path)
            if hub is not None:
                hub_wanted[hub.uri] = item.file.sha256
            else:
                try:
                    wanted[cache_path(item.file)] = item.file.sha256
                except InputError:
                    continue
    verdicts = []
    for entry in cached_entries(configs):
        if entry.status != "complete":
            continue
        if entry.source == "hub":
            verdicts.append(_check_hub(entry.name, entry.path, hub_wanted.get(entry.name)))
        else:
            verdicts.append(_check(entry.name, entry.path, wanted.get(entry.path), recorded_digest(entry.path)))
    return verdicts


def _check(name: str, path: Path, configured: str | None, recorded: str | None) -> Verdict:
    expected = configured or recorded
    if expected is None:
        return Verdict(name, path, "unchecked", "no checksum known")
    actual = sha256_of(path)
    if actual == expected:
        return Verdict(name, path, "ok", f"sha256 {actual}")
    source = "the config's sha256" if configured else "the sha256 recorded at download"
    return Verdict(name, path, "bad", f"sha256 {actual}, expected {expected} ({source})")


def _check_hub(name: str, path: Path, configured: str | None) -> Verdict:
    named = expected_blob_digest(path)
    if named is None and configured is None:
        return Verdict(name, path, "unchecked", "no checksum known")
    if named is not None and named[0] == "git-sha1":
        actual = git_blob_sha1(path)
        if actual != named[1]:
            return Verdict(name, path, "bad", f"git object id {actual}, expected {named[1]} (the hub's)")
        if configured is None:
            return Verdict(name, path, "ok", f"git object id {actual}")
    actual = sha256_of(path)
    hubs = named[1] if named is not None and named[0] == "sha256" else None
    for expected, source in ((hubs, "the hub's"), (configured, "the config's")):
        if expected is not None and actual != expected:
            return Verdict(name, path, "bad", f"sha256 {actual}, expected {expected} ({source})")
    return Verdict(name, path, "ok", f"sha256 {actual}")


# -- remove -------------------------------------------------------------------------------


def select_entries(
    entries: list[CachedEntry], names: list[str], config_name: str | None, everything: bool
) -> list[CachedEntry]:
    """The entries `dalle2 models rm` removes: named ones, a config's, or all of dalle2-cli's own."""
    chosen: dict[Path, CachedEntry] = {}
    for name in names:
        matches = [e for e in entries if name in (e.name, str(e.path))]
        if not matches and name.startswith("hf://"):
            # Any hub file may be named, used by a known config or not.
            hub = parse_hub_url(name)
            path = cached_hub_file(hub) if hub is not None else None
            if path is not None:
                matches = [CachedEntry(hub.uri, path, path.stat().st_size, "hub", "complete")]
        if not matches:
            raise InputError(f"{name!r} is not cached: `dalle2 models list` shows the names of cached files")
        chosen.update((e.path, e) for e in matches)
    if config_name is not None:
        chosen.update((e.path, e) for e in entries if config_name in e.configs)
    if everything:
        chosen.update((e.path, e) for e in entries if e.source == "url")
    return list(chosen.values())


def remove_entries(entries: list[CachedEntry]) -> list[Path]:
    """Remove cached files (with their sha256 records and partial downloads); refuses a file
    that another process is downloading. Returns the paths removed."""
    removed: list[Path] = []
    for entry in entries:
        if entry.source == "hub":
            removed.extend(remove_cached_hub_file(entry.path))
            continue
        target = entry.path if entry.status == "complete" else entry.path.parent.parent / entry.path.name
        with cache_lock(target, wait=False):
            partial = partial_path(target)
            for path in (target, sidecar_path(target), partial, partial.with_name(partial.name + ".json")):
                if path.is_file():
                    path.unlink()
                    if not path.name.endswith((SIDECAR_SUFFIX, ".json")):
                        removed.append(path)
    return removed
