"""Files appear whole or not at all: written under a temporary name beside the target, renamed
into place only when the writing finished without error. New files claim a free name
atomically, so that two runs writing into one directory never replace each other's files."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

PART_SUFFIX = ".part"


@contextmanager
def atomic_path(target: Path, publish: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes `target` (unless not `publish`:
    then the caller gives it a name inside the block), on error or afterwards it is removed."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=PART_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        if publish:
            _usual_mode(Path(tmp))
            os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone already after a successful rename


def numbered(directory: Path, stem: str, suffix: str, number: int) -> Path:
    """`stem.png` for number 1, `stem-N.png` for number N."""
    return directory / (f"{stem}{suffix}" if number == 1 else f"{stem}-{number}{suffix}")


def write_new(
    directory: Path, stem: str, suffix: str, write: Callable[[Path], None], overwrite: bool = False, first: int = 1
) -> tuple[Path, int]:
    """Write a file with `write(temporary path)`, then give it the first free name of `stem`,
    `stem-2`, `stem-3`, ... from number `first` on (with `overwrite`: `stem` itself, replacing
    whatever is there). The name is claimed atomically: a file another process put under that
    name meanwhile is never replaced. Returns the path and its number."""
    if overwrite:
        target = numbered(directory, stem, suffix, first)
        with atomic_path(target) as tmp:
            write(tmp)
        return target, first
    with atomic_path(directory / f"{stem}{suffix}", publish=False) as tmp:
        write(tmp)
        _usual_mode(tmp)
        number = first
        while True:
            target = numbered(directory, stem, suffix, number)
            if _claim(tmp, target):
                return target, number
            number += 1


def _usual_mode(path: Path) -> None:
    """mkstemp (and libraries that write through temporary files of their own) make a file
    private (0600); a finished file gets the mode any new file would, so that images on a
    shared cluster are readable by whom the umask allows."""
    os.chmod(path, 0o666 & ~current_umask())


def _claim(tmp: Path, target: Path) -> bool:
    """Give `tmp`'s content the name `target` unless that name exists; whether it did."""
    try:
        os.link(tmp, target)  # fails if the name exists: the check and the claim are one step
        return True
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK, errno.EOPNOTSUPP):
            raise
    # A filesystem without hard links: claim the name with an empty file, then fill it.
    try:
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except FileExistsError:
        return False
    os.replace(tmp, target)
    return True


def remove_leftovers(directory: Path, names: set[str]) -> None:
    """Remove the temporary files that killed writes of these file names left in `directory`
    (never anything else)."""
    for path in directory.glob(f".*{PART_SUFFIX}"):
        target = path.name[1 : -len(PART_SUFFIX)].rpartition(".")[0]  # .NAME.RANDOM.part -> NAME
        if target in names:
            path.unlink(missing_ok=True)


def current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask
