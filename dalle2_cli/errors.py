"""Errors that the CLI turns into a one-line message and an exit code."""


class Dalle2Error(Exception):
    """A failure the user can read about; exits 1 (something went wrong while running)."""

    exit_code = 1


class InputError(Dalle2Error):
    """Bad usage or bad input (a config, a model file, an image, an option); exits 2."""

    exit_code = 2
