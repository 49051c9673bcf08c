"""Errors that the CLI turns into a one-line message and an exit code."""


class Dalle2Error(Exception):
    """A failure the user can read about; exits 1 (something went wrong while running)."""

    exit_code = 1


class InputError(Dalle2Error):
    """Bad usage or bad input (a config, a model file, an image, an option); exits 2."""

    exit_code = 2


class ConfigWarning(UserWarning):
    """Something in a config that is ignored or doubtful, but does not stop the run."""


class SettingError(InputError):
    """A setting with a bad value: `field` names it as the library spells it (the CLI shows
    the option that sets it instead), `problem` says what is wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem
