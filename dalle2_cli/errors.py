"""Errors that the CLI turns into a one-line message and an exit code.

A message may name settings: its template writes `{field}` where a setting goes, and the
library's message names it as Python spells it (`seed`, `resume=True`) while the CLI names
the option that sets it (`--seed`, `--resume`), through `naming`."""

from __future__ import annotations

import string
from collections.abc import Callable


def literal(text: object) -> str:
    """`text` as it is inside a message template (its braces are not placeholders)."""
    return str(text).replace("{", "{{").replace("}", "}}")


class Dalle2Error(Exception):
    """A failure the user can read about; exits 1 (something went wrong while running)."""

    exit_code = 1

    def __init__(self, message: str = "", *, template: str | None = None, setting: str | None = None):
        self.template = template  # None: `message` names no setting
        self.field = setting  # the setting `{setting}` stands for in the template
        super().__init__(self.naming() if template is not None else message)

    def naming(self, name_of: Callable[[str], str] = str) -> str:
        """The message, each setting named by `name_of(field)` (a field, or an option)."""
        if self.template is None:
            return str(self)
        fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name}
        names = {name: name_of(self.field if name == "setting" else name) for name in fields}
        return self.template.format(**names)


class InputError(Dalle2Error):
    """Bad usage or bad input (a config, a model file, an image, an option); exits 2."""

    exit_code = 2


class Cancelled(Dalle2Error):
    """A run stopped at a step before it finished, because its caller asked (nobody waits for
    its images any more, or a server is stopping); nothing of it was saved."""


class ConfigWarning(UserWarning):
    """Something in a config that is ignored or doubtful, but does not stop the run."""


class SettingError(InputError):
    """A setting with a bad value: `field` names it, `problem` says what is wrong; or
    `template` is the whole message, with `{setting}` standing for the field."""

    def __init__(self, field: str, problem: str = "", template: str | None = None):
        self.problem = problem
        super().__init__(template=template or "{setting} " + literal(problem), setting=field)
