"""The loading choices a user names by word: which weights of a file, at which precision.
Torch-free, so that the CLI can offer them before it imports anything heavy."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Weights(StrEnum):
    """The averaged (EMA) weights of a checkpoint when it has them, which generate better, or
    the raw ones training updated last."""

    ema = "ema"
    raw = "raw"


class Precision(StrEnum):
    """The weights' precision; half precision samples under autocast."""

    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"

    @property
    def dtype(self) -> Any:
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]
