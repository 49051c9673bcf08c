"""dalle2-laion's Python API on dalle2-cli: scripts written for LAION's `dalle2_laion` run with
`dalle2_laion` replaced by `dalle2_cli.laion` and nothing else changed.

    from dalle2_cli.laion import DalleModelManager, ModelLoadConfig, utils
    from dalle2_cli.laion.scripts import BasicInference, ImageVariation, BasicInpainting

Inside this package masks keep dalle2-laion's convention, which is dalle2-pytorch's: True
marks the pixels to KEEP. Everywhere else in dalle2-cli, True (or white) marks the pixels to
regenerate.
"""

from dalle2_cli.laion import scripts, utils
from dalle2_cli.laion.config import ModelLoadConfig
from dalle2_cli.laion.manager import DalleModelManager

__all__ = ["DalleModelManager", "ModelLoadConfig", "scripts", "utils"]
