"""The `dalle2` command line. Torch and the models are imported inside the commands, never at
module level, so that `dalle2 --help` answers at once."""

# Imported for their commands, in the order `dalle2 --help` lists them.
# isort: off
from dalle2_cli.cli import generate  # noqa: F401
from dalle2_cli.cli import frames  # noqa: F401
from dalle2_cli.cli import checkpoints  # noqa: F401
from dalle2_cli.cli import cache  # noqa: F401
from dalle2_cli.cli import serve  # noqa: F401
from dalle2_cli.cli.app import app

# isort: on


def main() -> None:
    app()
