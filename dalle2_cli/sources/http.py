"""Downloading one url into a cache's partial file, because no library does all of this for a
plain url:
- stream into `CACHE/.partial/NAME`, with a rich progress bar on stderr when it is a terminal;
- after an interruption (connection reset, a body cut short, Ctrl-C, a crash), resume from
  the partial file with an HTTP Range request, guarded by If-Range so that a changed remote
  file restarts from zero instead of being spliced; a partial file that is already whole
  (a download killed after its last byte) is finished, not fetched again;
- retry transient failures (reset, timeout, a short body, HTTP 5xx/408/429) with backoff;
- verify the size and, when known, the sha256, then rename into place: a failed or
  interrupted download never leaves a file under its final name.

Environment: DALLE2_DOWNLOAD_RETRIES (default 5), DALLE2_DOWNLOAD_BACKOFF (seconds before the
first retry, doubling; default 1), DALLE2_DOWNLOAD_TIMEOUT (seconds without data before a
connection counts as lost; default 60).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dalle2_cli import __version__
from dalle2_cli.errors import Dalle2Error, InputError
from dalle2_cli.io.atomic import atomic_path
from dalle2_cli.messages import Log, stderr
from dalle2_cli.sources.digests import CHUNK, write_record
from dalle2_cli.sources.progress import DownloadProgress

PARTIAL_DIR = ".partial"


def partial_path(target: Path) -> Path:
    return target.parent / PARTIAL_DIR / target.name


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


def fetch(
    url: str,
    target: Path,
    expected_sha256: str | None,
    quiet: bool,
    policy: DownloadPolicy,
    marker: str | None = None,
    log: Log = stderr,
) -> None:
    """Download into the partial file, resuming and retrying, then verify and rename into place,
    with the digest (and `marker`, the checksum file's text it was fetched under) recorded
    beside it. The caller holds the file's lock. A progress bar shows on a terminal unless
    `quiet`; `log` gets retries and such."""
    partial = partial_path(target)
    partial.parent.mkdir(parents=True, exist_ok=True)
    state = _ResumeState.load(partial, url, expected_sha256)
    digest = _PartialDigest(partial)
    best = partial.stat().st_size if partial.exists() else 0
    resumed_earlier_run = best > 0
    left = policy.retries
    waits = 0
    with DownloadProgress(target.name, url, quiet, log) as progress:
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
            log(f"{target.name}: sha256 mismatch after resuming; downloading it whole")
            return fetch(url, target, expected_sha256, quiet, policy, marker, log)
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
    url: str,
    partial: Path,
    state: _ResumeState,
    digest: _PartialDigest,
    progress: DownloadProgress,
    policy: DownloadPolicy,
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


def read_url_text(url: str, limit: int, what: str = "checksum file") -> str:
    """A small text file at `url` (a checksum file), refused past `limit` bytes (no more than
    `limit` + 1 are read, whatever the server sends), as a local one is."""
    headers = {"User-Agent": f"dalle2-cli/{__version__}"}
    policy = DownloadPolicy.from_env()
    try:
        with _open(url, headers, min(policy.timeout_s, 30.0)) as response:
            data = response.read(limit + 1)
    except (_Transient, OSError, http.client.HTTPException) as error:
        raise Dalle2Error(f"cannot download {url}: {_describe(error)}") from None
    if len(data) > limit:
        raise InputError(f"{what} {url} is over {limit:,} bytes, too large for a {what}: is it the right url?")
    return data.decode("utf-8", "replace")
