"""dalle2-cli's cache of url files: where each lives (`CACHE/NAME`, its partial download, its
lock), and whether a cached file is the one wanted, else a download.

A lock per cached file (`CACHE/.locks/NAME.lock`) makes processes asking for the same file at
once download it once. A cached file is used when its bytes hash to the config's sha256, else
to the one its `checksum_file_path` gives, else to the one recorded when it was downloaded;
a checksum file whose text is no digest is a version marker (dalle2-laion compared the text).
Offline, nothing touches the network: a cached file is checked, a missing one is an error.

Environment: DALLE2_CACHE_DIR (the cache).
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dalle2_cli.config import MAX_NAME_BYTES, File
from dalle2_cli.errors import Dalle2Error, InputError, literal
from dalle2_cli.io.atomic import remove_leftovers
from dalle2_cli.io.textfiles import read_text
from dalle2_cli.messages import Log, stderr
from dalle2_cli.sources.digests import (
    SIDECAR_SUFFIX,
    file_sha256,
    read_record,
    recorded_digest,
    sidecar_path,
    write_record,
)
from dalle2_cli.sources.http import DownloadPolicy, fetch, read_url_text
from dalle2_cli.sources.hub import fetch_hint

LOCK_DIR = ".locks"


def default_cache_dir() -> Path:
    env = os.environ.get("DALLE2_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("dalle2-cli"))


def file_cache_dir(file: File) -> Path:
    return Path(file.cache_dir).expanduser() if file.cache_dir else default_cache_dir()


def cache_path(file: File) -> Path:
    """Where a (non-hub) url file is cached: its `filename_override`, else the url's last part."""
    cache_dir = file_cache_dir(file)
    if file.filename_override is not None:
        name = check_cache_name(file.filename_override, f"filename_override of {file.path}")
    else:
        name = check_cache_name(_name_from_url(file.path), f"the file name of {file.path}", hint=True)
    path = cache_dir / name
    # Belt and braces: whatever the checks above missed must still land inside the cache.
    if os.path.normpath(path.parent) != os.path.normpath(cache_dir):
        raise InputError(f"{file.path}: cache name {name!r} would leave the cache directory {cache_dir}")
    return path


def check_cache_name(name: str, what: str, hint: bool = False) -> str:
    """A plain file name inside the cache: no directories, no '..', no NUL, not one of the
    cache's own files (hidden names, `*.sha256` records)."""
    fix = ": set filename_override to a plain file name" if hint else ": use a plain file name like model.pth"
    if not name or "\0" in name or "/" in name or "\\" in name or name in (".", ".."):
        raise InputError(f"{what} {name!r} is not a plain file name{fix}")
    if Path(name).is_absolute() or name.startswith("."):
        raise InputError(f"{what} {name!r} is reserved (absolute or hidden){fix}")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InputError(f"{what} {name[:40]}... is {len(name.encode())} bytes long, more than a file name can be{fix}")
    if name.endswith(SIDECAR_SUFFIX):
        raise InputError(f"{what} {name!r} ends in {SIDECAR_SUFFIX}, which the cache uses for checksums{fix}")
    return name


def _name_from_url(url: str) -> str:
    path = urllib.parse.urlparse(url).path
    # The last segment of the path as sent: an encoded slash (`%2F`) stays inside the name,
    # and is refused below rather than read as a directory.
    return urllib.parse.unquote(path.rsplit("/", 1)[-1])


def lock_path(target: Path) -> Path:
    return target.parent / LOCK_DIR / f"{target.name}.lock"


@contextmanager
def cache_lock(target: Path, wait: bool = True, log: Log = stderr) -> Iterator[None]:
    """The per-file lock: held while a file is checked, downloaded or removed."""
    from filelock import FileLock, Timeout

    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0.2)
    except Timeout:
        if not wait:
            raise Dalle2Error(
                f"{target.name} is being downloaded by another process; try again when it finishes"
            ) from None
        log(f"waiting for another process downloading or checking {target.name} ...")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# -- the cached download ------------------------------------------------------------------


def cached_download(
    file: File,
    *,
    offline: bool,
    config_name: str | None = None,
    quiet: bool = False,
    check_updates: bool = True,
    log: Log = stderr,
) -> Path:
    """The cached, checked copy of url `file`, downloaded first when missing or not the one
    wanted (see the module's docstring)."""
    target = cache_path(file)
    if offline:
        return _offline_cached(file, target, config_name)
    upstream = _upstream_version(file, target.exists(), log) if check_updates else None
    expected = file.sha256 or (upstream.sha256 if upstream else None)
    marker = upstream.marker if upstream else None
    target.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(target, log=log):
        # A process killed while writing the file's record leaves a temporary file: not a model.
        remove_leftovers(target.parent, {sidecar_path(target).name})
        # Checked under the lock: another process may have just finished this very file.
        if target.exists() and _is_good(target, expected, marker, file.sha256 is not None, log):
            return target
        fetch(file.path, target, expected, quiet, DownloadPolicy.from_env(), marker, log)
    return target


def _offline_cached(file: File, target: Path, config_name: str | None) -> Path:
    if not target.exists():
        raise Dalle2Error(
            template=literal(f"{file.path} is not cached (expected at {target}) and offline mode is on ")
            + "({offline=True} or HF_HUB_OFFLINE): "
            + literal(fetch_hint(config_name))
        )
    expected = file.sha256 or recorded_digest(target)
    actual = file_sha256(target)
    if expected is not None and actual != expected:
        what = "the config's sha256" if file.sha256 else "the sha256 recorded when it was downloaded"
        raise Dalle2Error(
            f"cached {target} has sha256 {actual}, not {what} ({expected}): it is damaged, and offline mode "
            f"is on: {fetch_hint(config_name)} (it downloads the file again)"
        )
    return target


def _is_good(target: Path, expected: str | None, marker: str | None, from_config: bool, log: Log) -> bool:
    """Whether the cached file is the one wanted: its bytes hash to the expected digest (or to
    the one recorded at download), and its checksum file's text has not changed since."""
    actual = file_sha256(target)  # every use: bytes that rot keep their size and mtime
    record = read_record(target)
    damaged = f"cached {target} is damaged (its sha256 changed since it was downloaded); downloading it again"
    if expected is not None:
        if actual == expected:
            if record is None or record.digest != actual:
                write_record(target, actual, marker)
            return True
        if from_config:
            log(f"cached {target} does not match the config's sha256; downloading it again")
        elif record is not None and record.digest == expected:
            log(damaged)
        else:
            log(f"{target.name} changed upstream; downloading it again")
        return False
    if record is not None and record.digest != actual:
        log(damaged)
        return False
    if marker is not None and (record is None or record.marker != marker):
        log(f"{target.name}: its checksum file changed upstream (or was never seen); downloading it again")
        return False
    if record is None:
        write_record(target, actual, marker)  # a file put there by hand: trust it, and notice changes from now on
    return True


# -- dalle2-laion's update check ----------------------------------------------------------

CHECKSUM_FILE_LIMIT = 1 << 16  # an LFS pointer is ~130 bytes; anything this size is not one


@dataclass(frozen=True)
class UpstreamVersion:
    """What `checksum_file_path` says of the current upstream file: a sha256 (an LFS pointer or a
    bare digest), or, for any other text, a marker of that text (dalle2-laion compared the
    text itself, so a changed text means a new version)."""

    sha256: str | None = None
    marker: str | None = None


def _upstream_version(file: File, have_cached: bool, log: Log) -> UpstreamVersion | None:
    if file.checksum_file_path is None:
        return None
    location = file.checksum_file_path
    try:
        if re.match(r"https?://", location):
            text = read_url_text(location, CHECKSUM_FILE_LIMIT)
        else:
            text = read_text(Path(location).expanduser(), "checksum file", limit=CHECKSUM_FILE_LIMIT)
    except Dalle2Error as error:
        if have_cached:
            log(f"warning: cannot check {file.path} for updates ({error}); using the cached file")
            return None
        raise
    match = re.search(r"(?:sha256:)?\b([0-9a-f]{64})\b", text)
    if match is not None:
        return UpstreamVersion(sha256=match.group(1))
    return UpstreamVersion(marker=hashlib.sha256(text.encode()).hexdigest())
