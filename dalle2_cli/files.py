"""Turn a config `File` into a path on disk: local files as they are, urls through a cache.

Downloads stream into a temporary file beside their final name and are renamed into place
only once complete and verified, so an interrupted or failed download never leaves a file
under its final name.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from dalle2_cli.atomic import atomic_path
from dalle2_cli.config import File
from dalle2_cli.errors import Dalle2Error, InputError

CHUNK = 1 << 20
TIMEOUT_S = 60


def default_cache_dir() -> Path:
    env = os.environ.get("DALLE2_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dalle2-cli"


def resolve_file(file: File) -> Path:
    """The local path of `file`, downloading it first if it is a url not yet cached."""
    if file.load_type == "local":
        return _local(file)
    return _cached_download(file)


def _local(file: File) -> Path:
    path = Path(file.path)
    if not path.exists():
        raise InputError(f"model file not found: {path}")
    if path.is_dir():
        raise InputError(f"model file {path} is a directory, not a file")
    return path


def cache_path(file: File) -> Path:
    cache_dir = Path(file.cache_dir).expanduser() if file.cache_dir else default_cache_dir()
    name = file.filename_override or _name_from_url(file.path)
    return cache_dir / name


def _name_from_url(url: str) -> str:
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    if not name or name in (".", "..") or "\0" in name:
        raise InputError(f"cannot derive a file name from {url}: set filename_override")
    return name


def _cached_download(file: File) -> Path:
    target = cache_path(file)
    expected = file.sha256 or _remote_checksum(file, have_cached=target.exists())
    if target.exists():
        if expected is None or _recorded_sha256(target) == expected:
            return target
        if file.sha256 is None:
            # The remote checksum changed: the file was updated upstream.
            print(f"{file.path} changed upstream; downloading it again", file=sys.stderr)
        elif sha256_of(target) == expected:
            _record_sha256(target, expected)
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    download(file.path, target, expected_sha256=expected)
    return target


def download(url: str, target: Path, expected_sha256: str | None = None) -> None:
    """Fetch `url` into `target` atomically, verifying size and (if given) sha256."""
    digest = hashlib.sha256()
    try:
        with atomic_path(target) as tmp, open(tmp, "wb") as out, _open_url(url) as response:
            length = response.headers.get("Content-Length")
            received = 0
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
            if length is not None and received != int(length):
                raise Dalle2Error(f"download of {url} stopped early: got {received} of {length} bytes")
            actual = digest.hexdigest()
            if expected_sha256 is not None and actual != expected_sha256:
                raise Dalle2Error(
                    f"download of {url} has sha256 {actual}, expected {expected_sha256}; nothing was cached"
                )
    except (http.client.HTTPException, OSError) as error:
        raise Dalle2Error(f"download of {url} failed: {error!r}") from None
    _record_sha256(target, actual)


def _open_url(url: str):
    try:
        return urllib.request.urlopen(url, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        raise Dalle2Error(f"cannot download {url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise Dalle2Error(f"cannot download {url}: {reason}") from None


def _remote_checksum(file: File, have_cached: bool) -> str | None:
    """The sha256 named by `checksum_file_path` (a Hugging Face LFS pointer or a bare digest)."""
    if file.checksum_file_path is None:
        return None
    try:
        if re.match(r"https?://", file.checksum_file_path):
            with _open_url(file.checksum_file_path) as response:
                text = response.read(1 << 16).decode("utf-8", "replace")
        else:
            text = Path(file.checksum_file_path).read_text()
    except (Dalle2Error, OSError) as error:
        if have_cached:
            print(f"warning: cannot check {file.path} for updates ({error}); using the cached file", file=sys.stderr)
            return None
        raise
    match = re.search(r"(?:sha256:)?\b([0-9a-f]{64})\b", text)
    if match is None:
        raise InputError(f"checksum file {file.checksum_file_path} holds no sha256 digest")
    return match.group(1)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _recorded_sha256(path: Path) -> str | None:
    """The digest recorded when the file was downloaded, if the file is unchanged since."""
    sidecar = _sidecar(path)
    try:
        digest, size, mtime = sidecar.read_text().split()
        stat = path.stat()
    except (OSError, ValueError):
        return None
    if int(size) != stat.st_size or int(mtime) != stat.st_mtime_ns:
        return None
    return digest


def _record_sha256(path: Path, digest: str) -> None:
    stat = path.stat()
    with atomic_path(_sidecar(path)) as tmp:
        tmp.write_text(f"{digest} {stat.st_size} {stat.st_mtime_ns}\n")
