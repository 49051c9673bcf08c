"""Read DALLE2-pytorch checkpoint files without unpickling code, and load them strictly.

Formats (see dalle2-pytorch's trainer.py and trackers.py):
- tracker "model" saves: `{"version", "config", "model"}` (EMA weights already swapped in);
- `DecoderTrainer.save`: `{"model", "version", "steps", "optim0", ..., "ema"}`;
- `DiffusionPriorTrainer.save`: `{"model", "ema_model", "ema", "version", "step", ...}`;
- a bare state dict, its config in a separate JSON;
- safetensors, with `config` (JSON) and `dalle2_pytorch_version` in the file's metadata.
"""

from __future__ import annotations

import ctypes
import json
import pickle
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import packaging.version
import torch
from torch import nn

from dalle2_cli.atomic import atomic_path
from dalle2_cli.errors import InputError

T = TypeVar("T", bound=nn.Module)

DECODER_EMA = "ema"  # DecoderTrainer: state dict of the list of per-unet EMA wrappers
PRIOR_EMA = "ema_model"  # DiffusionPriorTrainer: the EMA prior's own state dict


@dataclass
class Checkpoint:
    path: Path
    state_dict: dict[str, torch.Tensor]
    format: str
    config: dict[str, Any] | None = None
    version: str | None = None
    weights: str = "raw"  # "ema" when the weights picked are the averaged (EMA) ones
    has_ema: bool = False  # whether the file holds EMA weights at all


def read_checkpoint(path: Path, prefer_ema: bool = True, map_location: str = "cpu") -> Checkpoint:
    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path, map_location)
    raw = _torch_load(path, map_location)
    if not isinstance(raw, dict):
        raise InputError(f"{path} is not a model checkpoint (it holds a {type(raw).__name__})")
    version = str(raw["version"]) if "version" in raw else None
    config = raw.get("config") if isinstance(raw.get("config"), dict) else None

    has_ema = False
    if isinstance(raw.get("model"), dict):
        state_dict = dict(raw["model"])
        weights = "raw"
        if PRIOR_EMA in raw and isinstance(raw[PRIOR_EMA], dict):
            fmt, has_ema = "DiffusionPriorTrainer checkpoint", True
            if prefer_ema:
                state_dict, weights = dict(raw[PRIOR_EMA]), "ema"
        elif DECODER_EMA in raw and isinstance(raw[DECODER_EMA], dict):
            fmt, has_ema = "DecoderTrainer checkpoint", True
            if prefer_ema:
                state_dict, weights = _swap_in_decoder_ema(state_dict, raw[DECODER_EMA]), "ema"
        elif config is not None:
            fmt = "tracker model save"
            has_ema = _trained_with_ema(config)  # the tracker saves the EMA weights in place
            weights = "ema" if has_ema else "raw"
        else:
            fmt = "trainer checkpoint"
    elif raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        state_dict, fmt, weights = raw, "state dict", "raw"
    else:
        keys = ", ".join(list(raw)[:6])
        raise InputError(f"{path} is not a DALLE2-pytorch checkpoint (its keys: {keys})")

    return Checkpoint(path, strip_clip(state_dict), fmt, config, version, weights, has_ema)


def _torch_load(path: Path, map_location: str) -> Any:
    # DiffusionPriorTrainer pickles `version` as a packaging Version: the one class we allow.
    with torch.serialization.safe_globals([packaging.version.Version]):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):  # old (non-zip) files cannot be memory-mapped
                raise _unreadable(path, error) from None
        except (pickle.UnpicklingError, EOFError, ValueError) as error:
            raise _unreadable(path, error) from None
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as error:
            raise _unreadable(path, error) from None


def _unreadable(path: Path, error: Exception) -> InputError:
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return InputError(
            f"refusing to load {path}: it holds a pickled Python object ({found.group(1)}) that could "
            "run code; re-save its tensors as a plain state dict or safetensors"
        )
    detail = next((line.strip() for line in text.splitlines() if "Unsupported" in line), text.splitlines()[0])
    return InputError(f"cannot read {path} as a PyTorch checkpoint: {detail[:200]}")


def _read_safetensors(path: Path, map_location: str) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=map_location) as handle:
            metadata = handle.metadata() or {}
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise InputError(f"cannot read {path} as safetensors: {error}") from None
    config = json.loads(metadata["config"]) if "config" in metadata else None
    weights = metadata.get("weights", "raw")
    version = metadata.get("dalle2_pytorch_version")
    return Checkpoint(path, strip_clip(state_dict), "safetensors", config, version, weights, weights == "ema")


def _swap_in_decoder_ema(model: dict[str, torch.Tensor], ema: dict[str, Any]) -> dict[str, Any]:
    """Replace `unets.I.*` by the EMA copy stored under `I.ema_model.*`."""
    swapped = dict(model)
    for key, value in ema.items():
        index, kind, rest = key.split(".", 2) if key.count(".") >= 2 else (None, None, None)
        if kind == "ema_model" and index is not None and index.isdigit():
            name = f"unets.{index}.{rest}"
            if name in swapped:
                swapped[name] = value
    return swapped


def _trained_with_ema(config: dict[str, Any]) -> bool:
    return bool(config.get("train", {}).get("use_ema", False))


def stage_of(keys: list[str]) -> str:
    """`prior`, `decoder (N unets)`, `clip` or `unknown`, from a state dict's key names."""
    first = Counter(key.split(".")[0] for key in keys)
    if "unets" in first:
        count = len({key.split(".")[1] for key in keys if key.startswith("unets.")})
        return f"decoder ({count} unet{'s' if count != 1 else ''})"
    if "net" in first:
        return "prior"
    if {"visual", "token_embedding", "text_transformer", "visual_transformer"} & set(first):
        return "clip"
    return "unknown"


def strip_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP is loaded on its own; some checkpoints still carry its weights under `clip.*`."""
    return {k: v for k, v in state_dict.items() if not k.startswith("clip.")}


def summarize_keys(keys: list[str], depth: int = 2, limit: int = 6) -> str:
    """`12 (unets.0: 8, noise_schedulers.1: 4)`: a count grouped by module prefix."""
    groups = Counter(".".join(key.split(".")[: min(depth, key.count("."))] or [key]) for key in keys)
    shown = ", ".join(f"{prefix}: {count}" for prefix, count in groups.most_common(limit))
    more = f", +{len(groups) - limit} more groups" if len(groups) > limit else ""
    return f"{len(keys)} ({shown}{more})"


def load_weights(
    module: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool, what: str, version: str | None = None
) -> list[str]:
    """Load `state_dict` into `module`; strict mismatches raise one readable error.

    Returns warnings (for non-strict loading that left modules without weights).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if mismatched:
        raise InputError(
            f"{what}: {len(mismatched)} weights have the wrong shape for the configured model "
            f"(file vs model: {'; '.join(mismatched[:3])}); is the config the one it was trained with?"
        )
    if (missing or unexpected) and strict:
        parts = []
        if missing:
            parts.append(f"missing keys {summarize_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {summarize_keys(unexpected)}")
        from dalle2_pytorch.version import __version__ as installed

        if version and version != installed:
            fix = f"pip install dalle2-pytorch=={version} (the file's version; {installed} is installed)"
        else:
            fix = "check that the config is the one this file was trained with"
        raise InputError(
            f"{what} does not match its model: {'; '.join(parts)}.\n"
            f"Fix: {fix}, or load anyway with --non-strict (config: "
            '"strict_loading": false), which leaves those weights random.'
        )
    # The module adopts the file's (memory-mapped) tensors rather than copying them into its own,
    # so loading holds one copy of the weights; tensors of another dtype are converted first.
    state_dict = {
        k: v.to(expected[k].dtype) if k in expected and v.dtype != expected[k].dtype else v
        for k, v in state_dict.items()
    }
    del expected  # the module's initial weights: free them once replaced
    module.load_state_dict(state_dict, strict=False, assign=True)
    release_freed_memory()
    if missing:
        return [f"{what}: {summarize_keys(missing)} weights missing, left random (non-strict loading)"]
    return []


def new_model(build: Callable[[], T], weights_follow: bool) -> T:
    """`build()` the module a checkpoint is loaded into. When every weight will come from the
    file (`weights_follow`: strict loading), its parameters are created on the meta device,
    without memory or random initialisation (which costs twice the weights' size at its peak);
    buffers are still computed for real, since some are not saved in checkpoints."""
    if not weights_follow:
        return build()
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps large freed blocks (here: a model's
    random initial weights, replaced by the file's) resident otherwise, which doubles the
    peak memory of loading once the file's weights are read."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def write_safetensors(checkpoint: Checkpoint, target: Path, config: dict[str, Any] | None = None) -> None:
    """Save the checkpoint's chosen weights as safetensors, with its config and version in the
    metadata so it loads without anything beside it. Written whole or not at all."""
    from safetensors.torch import save_file

    metadata = {"weights": checkpoint.weights, "source_format": checkpoint.format}
    config = config if config is not None else checkpoint.config
    if config is not None:
        metadata["config"] = json.dumps(config)
    if checkpoint.version:
        metadata["dalle2_pytorch_version"] = checkpoint.version
    tensors, seen = {}, set()
    for key, tensor in checkpoint.state_dict.items():
        # safetensors refuses tensors that share memory (tied weights): store each once.
        pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        tensors[key] = tensor.clone().contiguous() if pointer in seen else tensor.contiguous()
        seen.add(pointer)
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
