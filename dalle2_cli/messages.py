"""How the library tells the user something: a callable taking one line. The CLI passes its
own (quiet or not); from Python the default prints to stderr."""

from __future__ import annotations

import sys
from collections.abc import Callable

Log = Callable[[str], None]


def stderr(message: str) -> None:
    print(message, file=sys.stderr)
