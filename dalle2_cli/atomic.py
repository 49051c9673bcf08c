"""Files appear whole or not at all: written under a temporary name beside the target, renamed
into place only when the writing finished without error."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PART_SUFFIX = ".part"


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes `target`, on error it is removed."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=PART_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); the finished file gets the mode any new file
        # would, so that images on a shared cluster are readable by whom the umask allows.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone already after a successful rename


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
