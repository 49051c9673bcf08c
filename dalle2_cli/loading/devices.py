"""Device names: `auto`, `cpu`, `cuda`, `cuda:N`, `mps`."""

from __future__ import annotations

import re

import torch

from dalle2_cli.errors import SettingError


def resolve_device(name: str | None) -> torch.device:
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise SettingError("device", f"{name!r} is unknown: use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SettingError(
                "device",
                template=f"{{setting}} {name} asked for, but this machine has no usable CUDA GPU: use {{setting}} cpu",
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise SettingError("device", f"{name} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SettingError(
            "device", template="{setting} mps asked for, but MPS is not available here: use {setting} cpu"
        )
    return torch.device(name)
