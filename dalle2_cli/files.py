"""Turn a config `File` into a path on disk: local files as they are, urls through a cache.

Hugging Face hub files go through `huggingface_hub` (see dalle2_cli.hub). Other urls are
downloaded here, because no library does all of this for a plain url:
- stream into `CACHE/.partial/NAME`, with a rich progress bar on stderr when it is a terminal;
- after an interruption (connection reset, a body cut short, Ctrl-C, a crash), resume from
  the partial file with an HTTP Range request, guarded by If-Range so that a changed remote
  file restarts from zero instead of being spliced;
- retry transient failures (reset, timeout, a short body, HTTP 5xx/408/429) with backoff;
- verify the size and, when known, the sha256, then rename into place: a failed or
  interrupted download never leaves a file under its final name;
- hold a lock per cached file (`CACHE/.locks/NAME.lock`), so that processes asking for the
  same file at once download it once;
- offline (HF_HUB_OFFLINE=1, which `--offline` sets), never touch the network.

Environment: DALLE2_CACHE_DIR (the cache), DALLE2_DOWNLOAD_RETRIES (default 5),
DALLE2_DOWNLOAD_BACKOFF (seconds before the first retry, doubling; default 1),
DALLE2_DOWNLOAD_TIMEOUT (seconds without data before a connection counts as lost; default 60).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dalle2_cli import __version__
from dalle2_cli.atomic import atomic_path, remove_leftovers
from dalle2_cli.config import MAX_NAME_BYTES, File
from dalle2_cli.errors import Dalle2Error, InputError
from dalle2_cli.hub import download_hub_file, fetch_hint, parse_hub_url
from dalle2_cli.textfiles import read_text, regular_file

CHUNK = 1 << 20
PARTIAL_DIR = ".partial"
LOCK_DIR = ".locks"
SIDECAR_SUFFIX = ".sha256"
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class DownloadPolicy:
    """How hard to try: attempts without progress, the first backoff wait, the read timeout."""

    retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 60.0

    @classmethod
    def from_env(cls) -> DownloadPolicy:
        return cls(
            retries=int(_env_number("DALLE2_DOWNLOAD_RETRIES", cls.retries, int)),
            backoff_s=_env_number("DALLE2_DOWNLOAD_BACKOFF", cls.backoff_s, float),
            timeout_s=_env_number("DALLE2_DOWNLOAD_TIMEOUT", cls.timeout_s, float),
        )


def _env_number(name: str, default: float, kind: type) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise InputError(f"{name}={text!r} is not a number; unset it or give one") from None
    if value < 0:
        raise InputError(f"{name} must not be negative, got {text}")
    return value


def is_offline() -> bool:
    """Offline mode, as huggingface_hub spells it (the CLI's --offline sets HF_HUB_OFFLINE=1)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in TRUE_VALUES


def default_cache_dir() -> Path:
    env = os.environ.get("DALLE2_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("dalle2-cli"))


def resolve_file(
    file: File, *, config_name: str | None = None, quiet: bool = False, check_updates: bool = True
) -> Path:
    """The local path of `file`, downloading it first if it is a url not cached (or changed),
    and checked: every model file is hashed (once per process) and compared with what is known
    of it (the config's sha256, the digest recorded at download, the hub's), so that a file
    whose bytes changed on disk is never used as if it were the one expected.

    `config_name` only improves messages (how to fetch a file missing offline); `quiet`
    hides the progress bar, which also stays hidden when stderr is not a terminal;
    `check_updates=False` uses a cached url file without asking whether it changed upstream
    (dalle2-laion's `check_updates`)."""
    if file.load_type == "local":
        return _local(file)
    hub = parse_hub_url(file.path)
    if hub is not None:
        return download_hub_file(
            hub,
            offline=is_offline(),
            show_progress=_show_progress(quiet),
            sha256=file.sha256,
            config_name=config_name,
            check_updates=check_updates,
        )
    return _cached_download(file, config_name, quiet, check_updates)


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


def _show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


# -- names in the cache -------------------------------------------------------------------


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


def partial_path(target: Path) -> Path:
    return target.parent / PARTIAL_DIR / target.name


def lock_path(target: Path) -> Path:
    return target.parent / LOCK_DIR / f"{target.name}.lock"


@contextmanager
def cache_lock(target: Path, wait: bool = True) -> Iterator[None]:
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
        print(f"waiting for another process downloading or checking {target.name} ...", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# -- the cached download ------------------------------------------------------------------


def _cached_download(file: File, config_name: str | None, quiet: bool, check_updates: bool) -> Path:
    target = cache_path(file)
    if is_offline():
        return _offline_cached(file, target, config_name)
    upstream = _upstream_version(file, have_cached=target.exists()) if check_updates else None
    expected = file.sha256 or (upstream.sha256 if upstream else None)
    marker = upstream.marker if upstream else None
    target.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(target):
        # A process killed while writing the file's record leaves a temporary file: not a model.
        remove_leftovers(target.parent, {sidecar_path(target).name})
        # Checked under the lock: another process may have just finished this very file.
        if target.exists() and _cached_file_is_good(target, expected, marker, from_config=file.sha256 is not None):
            return target
        _fetch(file.path, target, expected, quiet, DownloadPolicy.from_env(), marker)
    return target


def _offline_cached(file: File, target: Path, config_name: str | None) -> Path:
    if not target.exists():
        raise Dalle2Error(
            f"{file.path} is not cached (expected at {target}) and offline mode is on "
            f"(--offline or HF_HUB_OFFLINE): {fetch_hint(config_name)}"
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


def _cached_file_is_good(target: Path, expected: str | None, marker: str | None, from_config: bool) -> bool:
    """Whether the cached file is the one wanted: its bytes hash to the expected digest (or to
    the one recorded at download), and its checksum file's text has not changed since."""
    actual = file_sha256(target)  # every use: bytes that rot keep their size and mtime
    record = read_record(target)
    if expected is not None:
        if actual == expected:
            if record is None or record.digest != actual:
                write_record(target, actual, marker)
            return True
        if from_config:
            note(f"cached {target} does not match the config's sha256; downloading it again")
        elif record is not None and record.digest == expected:
            note(f"cached {target} is damaged (its sha256 changed since it was downloaded); downloading it again")
        else:
            note(f"{target.name} changed upstream; downloading it again")
        return False
    if record is not None and record.digest != actual:
        note(f"cached {target} is damaged (its sha256 changed since it was downloaded); downloading it again")
        return False
    if marker is not None and (record is None or record.marker != marker):
        note(f"{target.name}: its checksum file changed upstream (or was never seen); downloading it again")
        return False
    if record is None:
        write_record(target, actual, marker)  # a file put there by hand: trust it, and notice changes from now on
    return True


def note(message: str) -> None:
    print(message, file=sys.stderr)


class _Transient(Exception):
    """A failure worth retrying: the connection, a 5xx, a body cut short."""


class _CannotResume(_Transient):
    """The server refuses the Range of the partial file: retry from byte zero."""

    def __init__(self, message: str, total: int | None = None):
        super().__init__(message)
        self.total = total  # the file's size, when the refusal says it


class _AlreadyWhole(Exception):
    """The server answered the Range of the partial file with 416 because the partial file is
    already the whole file (a download killed after its last byte)."""


def _fetch(
    url: str, target: Path, expected_sha256: str | None, quiet: bool, policy: DownloadPolicy, marker: str | None = None
) -> None:
    """Download into the partial file, resuming and retrying, then verify and rename into place.
    The caller holds the file's lock."""
    partial = partial_path(target)
    partial.parent.mkdir(parents=True, exist_ok=True)
    state = _ResumeState.load(partial, url, expected_sha256)
    digest = _PartialDigest(partial)
    best = partial.stat().st_size if partial.exists() else 0
    resumed_earlier_run = best > 0
    left = policy.retries
    waits = 0
    with _Progress(target.name, url, quiet) as progress:
        while True:
            try:
                _attempt(url, partial, state, digest, progress, policy)
                break
            except _AlreadyWhole:
                break
            except _Transient as error:
                size = partial.stat().st_size if partial.exists() else 0
                if size > best:  # progress was made: the retry budget starts afresh
                    best, left, waits = size, policy.retries, 0
                if left <= 0:
                    resume = f"; run the command again to resume from {size} bytes" if size else ""
                    raise Dalle2Error(f"download of {url} failed after retries: {error}{resume}") from None
                left -= 1
                wait = min(policy.backoff_s * 2**waits, 30.0)
                waits += 1
                progress.note(f"{error}; retrying in {wait:.1f} s" + (f" from byte {size}" if size else ""))
                time.sleep(wait)
    actual = digest.hexdigest()
    if expected_sha256 is not None and actual != expected_sha256:
        _discard(partial)
        if resumed_earlier_run:
            # The bytes kept from an earlier run may be what is wrong (a server without
            # validators that changed the file meanwhile): one more try, from zero.
            note(f"{target.name}: sha256 mismatch after resuming; downloading it whole")
            return _fetch(url, target, expected_sha256, quiet, policy, marker)
        raise Dalle2Error(
            f"download of {url} has sha256 {actual}, expected {expected_sha256}; nothing was cached "
            "(the file changed upstream, or the configured sha256 is wrong)"
        )
    # The record is written first, so the file never sits under its final name without one.
    write_record(target, actual, marker)
    os.replace(partial, target)
    _ResumeState.path_for(partial).unlink(missing_ok=True)


def _discard(partial: Path) -> None:
    partial.unlink(missing_ok=True)
    _ResumeState.path_for(partial).unlink(missing_ok=True)


@dataclass
class _ResumeState:
    """What a partial file is part of, kept beside it: resuming the bytes of another url, or of
    a version with another checksum, would splice two files."""

    url: str
    expected_sha256: str | None
    validator: str | None = None  # the strong ETag, or Last-Modified, sent back as If-Range
    total: int | None = None  # the whole file's size, once a response said it

    @staticmethod
    def path_for(partial: Path) -> Path:
        return partial.with_name(partial.name + ".json")

    @classmethod
    def load(cls, partial: Path, url: str, expected_sha256: str | None) -> _ResumeState:
        fresh = cls(url, expected_sha256)
        try:
            saved = json.loads(cls.path_for(partial).read_text())
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict) or saved.get("url") != url or saved.get("expected_sha256") != expected_sha256:
            _discard(partial)
            return fresh
        fresh.validator = saved.get("validator")
        fresh.total = saved.get("total") if isinstance(saved.get("total"), int) else None
        return fresh

    def save(self, partial: Path) -> None:
        with atomic_path(self.path_for(partial)) as tmp:
            tmp.write_text(json.dumps(self.__dict__))


class _PartialDigest:
    """sha256 of the partial file, fed as bytes arrive; re-read from disk when a download
    resumes a file this process did not write."""

    def __init__(self, partial: Path):
        self.partial = partial
        self.hash = hashlib.sha256()
        self.size = 0

    def catch_up(self, offset: int) -> None:
        if self.size == offset:
            return
        self.hash, self.size = hashlib.sha256(), 0
        if offset:
            with open(self.partial, "rb") as handle:
                while self.size < offset and (chunk := handle.read(min(CHUNK, offset - self.size))):
                    self.update(chunk)

    def update(self, chunk: bytes) -> None:
        self.hash.update(chunk)
        self.size += len(chunk)

    def hexdigest(self) -> str:
        self.catch_up(self.partial.stat().st_size)
        return self.hash.hexdigest()


def _attempt(
    url: str, partial: Path, state: _ResumeState, digest: _PartialDigest, progress: _Progress, policy: DownloadPolicy
) -> None:
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": f"dalle2-cli/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if state.validator:
            headers["If-Range"] = state.validator
    try:
        response = _open(url, headers, policy.timeout_s)
    except _CannotResume as refused:
        if offset and offset in (refused.total, state.total):
            raise _AlreadyWhole() from None  # the size the server names is what we have: verified next
        partial.unlink(missing_ok=True)
        raise
    with response:
        total = _length(response)
        if response.status == 206:
            start, total = _content_range(response, url)
            if start != offset:
                partial.unlink(missing_ok=True)
                raise _Transient(f"the server resumed at byte {start}, not {offset}; starting over")
        elif offset:
            # A 200 to a Range request: the server cannot resume, or the file changed (If-Range).
            offset = 0
        validator = _validator(response)
        if validator != state.validator or not state.validator or total != state.total:
            state.validator, state.total = validator, total
            state.save(partial)
        mode = "ab" if offset else "wb"
        digest.catch_up(offset)
        progress.start(total, offset)
        received = offset
        try:
            out = open(partial, mode)
        except OSError as error:
            raise Dalle2Error(f"cannot write {partial}: {error.strerror}") from None
        with out:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as error:
                    raise _Transient(f"connection lost after {received} bytes ({_describe(error)})") from None
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as error:  # a full disk is not worth retrying
                    raise Dalle2Error(f"cannot write {partial}: {error.strerror}") from None
                digest.update(chunk)
                received += len(chunk)
                progress.advance(len(chunk))
    if total is not None and received != total:
        raise _Transient(f"the server sent {received} of {total} bytes")


def _open(url: str, headers: dict[str, str], timeout: float) -> Any:
    request = urllib.request.Request(url, headers=headers)
    try:
        return _OPENER.open(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code >= 500 or error.code in (408, 429):
            raise _Transient(f"HTTP {error.code} {error.reason}") from None
        if 300 <= error.code < 400:  # urllib gave up following them
            raise Dalle2Error(
                f"cannot download {url}: too many redirects (HTTP {error.code}; a redirect loop?)"
            ) from None
        if error.code == 416:  # past the end: the partial file is whole, or no prefix of the file
            match = re.fullmatch(r"bytes \*/(\d+)", (error.headers.get("Content-Range") or "").strip())
            total = int(match.group(1)) if match else None
            raise _CannotResume("HTTP 416: the server cannot resume this file; starting over", total) from None
        raise Dalle2Error(f"cannot download {url}: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, (ConnectionRefusedError, socket.gaierror)):
            # Nobody listens there, or the name is unknown: retrying will not change that.
            raise Dalle2Error(f"cannot download {url}: {_describe(reason)}") from None
        raise _Transient(_describe(reason)) from None
    except (OSError, http.client.HTTPException) as error:
        raise _Transient(_describe(error)) from None


def _describe(error: BaseException) -> str:
    if isinstance(error, socket.gaierror):
        return f"unknown host ({error.strerror})"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _length(response: Any) -> int | None:
    text = response.headers.get("Content-Length")
    return int(text) if text and text.isdigit() else None


def _content_range(response: Any, url: str) -> tuple[int, int | None]:
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
    if match is None:
        raise _Transient(f"{url} answered 206 without a usable Content-Range; starting over")
    total = match.group(3)
    return int(match.group(1)), (int(total) if total != "*" else None)


def _validator(response: Any) -> str | None:
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):  # weak ETags cannot guard a Range request
        return etag
    return response.headers.get("Last-Modified")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would follow a redirect to ftp://; only http and https are fetched."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        if urllib.parse.urlparse(newurl).scheme not in ("http", "https"):
            raise Dalle2Error(f"{req.full_url} redirects to {newurl}: only http and https are followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


class _Progress:
    """A rich progress bar (size, speed, ETA) on stderr when it is a terminal; otherwise one
    line when a download starts. Notes (retries) are printed either way."""

    def __init__(self, name: str, url: str, quiet: bool):
        self.name, self.url, self.quiet = name, url, quiet
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> _Progress:
        if _show_progress(self.quiet):
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.bar.start()
        elif not self.quiet:
            print(f"downloading {self.name} from {self.url}", file=sys.stderr)
        return self

    def start(self, total: int | None, completed: int) -> None:
        if self.bar is None:
            return
        if self.task is None:
            self.task = self.bar.add_task(self.name, total=total, completed=completed)
        else:
            self.bar.update(self.task, total=total, completed=completed)

    def advance(self, size: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, size)

    def note(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.print(message)
        else:
            print(message, file=sys.stderr)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


# -- dalle2-laion's update check ----------------------------------------------------------

CHECKSUM_FILE_LIMIT = 1 << 16  # an LFS pointer is ~130 bytes; anything this size is not one


@dataclass(frozen=True)
class UpstreamVersion:
    """What `checksum_file_path` says of the current upstream file: a sha256 (an LFS pointer or a
    bare digest), or, for any other text, a marker of that text (dalle2-laion compared the
    text itself, so a changed text means a new version)."""

    sha256: str | None = None
    marker: str | None = None


def _upstream_version(file: File, have_cached: bool) -> UpstreamVersion | None:
    if file.checksum_file_path is None:
        return None
    try:
        text = _checksum_file_text(file.checksum_file_path)
    except Dalle2Error as error:
        if have_cached:
            note(f"warning: cannot check {file.path} for updates ({error}); using the cached file")
            return None
        raise
    match = re.search(r"(?:sha256:)?\b([0-9a-f]{64})\b", text)
    if match is not None:
        return UpstreamVersion(sha256=match.group(1))
    return UpstreamVersion(marker=hashlib.sha256(text.encode()).hexdigest())


def _checksum_file_text(location: str) -> str:
    if not re.match(r"https?://", location):
        return read_text(Path(location).expanduser(), "checksum file", limit=CHECKSUM_FILE_LIMIT)
    headers = {"User-Agent": f"dalle2-cli/{__version__}"}
    policy = DownloadPolicy.from_env()
    try:
        with _open(location, headers, min(policy.timeout_s, 30.0)) as response:
            return response.read(CHECKSUM_FILE_LIMIT).decode("utf-8", "replace")
    except (_Transient, OSError, http.client.HTTPException) as error:
        raise Dalle2Error(f"cannot download {location}: {_describe(error)}") from None


# -- sha256: computed, recorded ------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# Digests computed by this process, by file identity: each model file is hashed once per run.
_digests: dict[tuple[int, ...], str] = {}


def file_sha256(path: Path) -> str:
    """The sha256 of `path`'s bytes as they are now (hashed once per process and file version:
    any write changes the file's ctime, which no one can set back, unlike its mtime)."""
    status = Path(path).stat()
    key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    if key not in _digests:
        _digests[key] = sha256_of(path)
    return _digests[key]


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


@dataclass(frozen=True)
class Record:
    """What the cache wrote beside a downloaded file: its sha256, and the marker of the
    checksum file's text it was downloaded under (when that text is not a digest)."""

    digest: str
    marker: str | None = None


def read_record(path: Path) -> Record | None:
    """Lines are `DIGEST [upstream=MARKER]`; earlier versions wrote `DIGEST SIZE MTIME`."""
    try:
        fields = sidecar_path(path).read_text().split()
    except OSError:
        return None
    if not fields or not re.fullmatch(r"[0-9a-f]{64}", fields[0]):
        return None
    marker = next((f.removeprefix("upstream=") for f in fields[1:] if f.startswith("upstream=")), None)
    return Record(fields[0], marker)


def recorded_digest(path: Path) -> str | None:
    """The digest recorded when the file was downloaded, whether or not it changed since."""
    record = read_record(path)
    return record.digest if record else None


def write_record(path: Path, digest: str, marker: str | None = None) -> None:
    with atomic_path(sidecar_path(path)) as tmp:
        tmp.write_text(f"{digest} upstream={marker}\n" if marker else f"{digest}\n")


def model_file_sha256(path: Path) -> str:
    """The sha256 of a model file, for image metadata: the bytes' own, computed this run."""
    return file_sha256(Path(path).resolve())
