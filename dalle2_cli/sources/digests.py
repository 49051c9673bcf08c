"""sha256 of model files: computed (once per process and file version), and recorded beside
a downloaded file (`NAME.sha256`) so that later runs know what its bytes should hash to."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from dalle2_cli.io.atomic import atomic_path

CHUNK = 1 << 20
SIDECAR_SUFFIX = ".sha256"


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
