"""dalle2-laion's inference scripts (the module names are dalle2-laion's, so that imports such
as `from dalle2_cli.laion.scripts.InferenceScript import InferenceScript` work too)."""

from dalle2_cli.laion.scripts.BasicInference import BasicInference
from dalle2_cli.laion.scripts.BasicInpainting import BasicInpainting
from dalle2_cli.laion.scripts.ImageVariation import ImageVariation
from dalle2_cli.laion.scripts.InferenceScript import CliInferenceScript, InferenceScript

__all__ = ["BasicInference", "BasicInpainting", "CliInferenceScript", "ImageVariation", "InferenceScript"]
