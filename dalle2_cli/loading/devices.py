"""Device names: `auto`, `cpu`, `cuda`, `cuda:N`, `mps`."""

from __future__ import annotations

import re

import torch

from dalle2_cli.errors import InputError


def resolve_device(name: str | None) -> torch.device:
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device {name} asked for, but this machine has no usable CUDA GPU: use --device cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"device {name} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InputError("device mps asked for, but MPS is not available here: use --device cpu")
    return torch.device(name)
