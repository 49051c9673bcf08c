"""Read DALLE2-pytorch checkpoint files without unpickling code, and load them strictly.

Formats (see dalle2-pytorch's trainer.py and trackers.py):
- tracker "model" saves: `{"version", "config", "model"}` (EMA weights already swapped in);
- `DecoderTrainer.save`: `{"model", "version", "steps", "optim0", ..., "ema"}`;
- `DiffusionPriorTrainer.save`: `{"model", "ema_model", "ema", "version", "step", ...}`;
- a bare state dict, its config in a separate JSON;
- safetensors, with `config` (JSON) and `dalle2_pytorch_version` in the file's metadata.
"""

from __future__ import annotations

import json
import pickle
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import packaging.version
import torch
from torch import nn

from dalle2_cli.errors import InputError, literal
from dalle2_cli.io.atomic import atomic_path
from dalle2_cli.loading.choices import Weights
from dalle2_cli.loading.precision import FilePages, converted, half_precision_keys, release_freed_memory

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
    weights: Weights = Weights.raw  # the weights picked: the averaged (EMA) ones, or the raw ones
    has_ema: bool = False  # whether the file holds EMA weights at all
    # What the file pickles beside its weights (a scheduler, an optimizer), never built.
    set_aside: list[str] = field(default_factory=list)


# Keys of a trainer's save besides the weights: their presence tells a trainer checkpoint from
# the tracker's model save (which holds only `model` and the tracker's metadata).
TRAINER_KEYS = ("optimizer", "optim0", "scheduler", "sched0", "step", "steps")


def read_checkpoint(path: Path, weights: Weights | str = Weights.ema, map_location: str = "cpu") -> Checkpoint:
    """The weights of a file, EMA ones (when it has them) or raw ones as `weights` says."""
    path = Path(path)
    prefer_ema = Weights(weights) == Weights.ema
    if path.suffix == ".safetensors":
        return _read_safetensors(path, map_location)
    raw, inert = _torch_load(path, map_location)
    if not isinstance(raw, dict):
        raise InputError(f"{path} is not a model checkpoint (it holds a {type(raw).__name__})")
    version = str(raw["version"]) if "version" in raw and not _is_inert(raw["version"]) else None
    config = raw.get("config") if isinstance(raw.get("config"), dict) else None

    has_ema = False
    if isinstance(raw.get("model"), dict):
        state_dict = dict(raw["model"])
        weights = Weights.raw
        if PRIOR_EMA in raw and isinstance(raw[PRIOR_EMA], dict):
            fmt, has_ema = "DiffusionPriorTrainer checkpoint", True
            if prefer_ema:
                state_dict, weights = dict(raw[PRIOR_EMA]), Weights.ema
        elif DECODER_EMA in raw and isinstance(raw[DECODER_EMA], dict):
            fmt, has_ema = "DecoderTrainer checkpoint", True
            if prefer_ema:
                state_dict, weights = _swap_in_decoder_ema(state_dict, raw[DECODER_EMA]), Weights.ema
        elif any(key in raw for key in TRAINER_KEYS):
            fmt = "trainer checkpoint"  # a trainer's save without EMA: trained without it
        else:
            # The tracker's model save swaps the EMA weights in when training used EMA, which
            # is dalle2-pytorch's default; only an embedded config can say it was off.
            fmt = "tracker model save"
            has_ema = _trained_with_ema(config)
            weights = Weights.ema if has_ema else Weights.raw
    elif raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        state_dict, fmt, weights = raw, "state dict", Weights.raw
    elif isinstance(raw.get("state_dict"), dict):
        # A checkpoint of open_clip's (and other) trainers: the weights under `state_dict`, with
        # DistributedDataParallel's `module.` prefix when saved from several GPUs.
        state_dict = {k.removeprefix("module."): v for k, v in raw["state_dict"].items()}
        fmt, weights = "training checkpoint (state_dict)", Weights.raw
    else:
        keys = ", ".join(str(key)[:40] for key in list(raw)[:6])
        raise InputError(f"{path} is not a DALLE2-pytorch checkpoint (its keys: {keys})")

    _refuse_objects_in_weights(path, state_dict)
    checkpoint = Checkpoint(path, strip_clip(state_dict), fmt, config, version, weights, has_ema)
    checkpoint.set_aside = sorted({obj.pickled_as for obj in inert})
    return checkpoint


class _InertType(type):
    """The type of the stand-ins: calling one (as a pickle calls a function or a class) gives
    the stand-in back, so that whatever the pickle does next with the result stays inert."""

    def __call__(cls, *args: Any, **kwargs: Any) -> type:
        if cls.instances is not None:
            cls.instances.append(cls)
        return cls


class Inert(metaclass=_InertType):
    """Stands in for a class or function a checkpoint pickles beside its weights (a learning-rate
    scheduler, an optimizer): it runs no code of the file's, keeps nothing, and is never what
    it stands for. `pickled_as` names that."""

    pickled_as = "?"
    instances: list | None = None  # what was made while reading one file

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        instance = object.__new__(cls)
        if cls.instances is not None:
            cls.instances.append(instance)
        return instance

    # Static, so that the unpickler may set state on a stand-in class or an instance alike.
    __setstate__ = staticmethod(lambda *state: None)

    def __repr__(self) -> str:
        return f"<{self.pickled_as}, not loaded>"


def _is_inert(value: Any) -> bool:
    return isinstance(value, Inert | _InertType)


def _empty_dict(*args: Any, **kwargs: Any) -> dict:
    return {}


def _plain_dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


# Mappings are filled by the unpickler only when they are plain dicts: these names are read
# as dicts (a defaultdict's factory is dropped; nothing of the file's is called).
DICT_STAND_INS = {"builtins.dict": _plain_dict, "collections.defaultdict": _empty_dict}


def _inert_stand_ins(path: Path, made: list) -> list[tuple[Any, str]]:
    """A stand-in for every global of the file that torch's weights-only reader refuses
    (except `packaging.version.Version`, which DiffusionPriorTrainer pickles as the version and
    which is safe to build). A stand-in never calls what it stands for, whatever that is (torch
    itself refuses names from os, sys and the like before any stand-in is asked)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - old (non-zip) files cannot be listed: read them as they are
        return []
    stand_ins: list[tuple[Any, str]] = [(_InertType, f"{__name__}._InertType")]
    for name in names:
        if name in DICT_STAND_INS:
            stand_ins.append((DICT_STAND_INS[name], name))
        elif name != "packaging.version.Version":
            stand_in = type(name.rsplit(".", 1)[-1], (Inert,), {"pickled_as": name, "instances": made})
            stand_ins.append((stand_in, name))
    return stand_ins


def _refuse_objects_in_weights(path: Path, state_dict: dict[str, Any]) -> None:
    """Weights are tensors (an EMA wrapper's `step` and `initted` too): anything else there is a
    pickled object that loading would need code for."""
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            kind = value.pickled_as if _is_inert(value) else type(value).__name__
            raise InputError(
                f"refusing to load {path}: its weights hold a pickled Python object ({kind} at {str(key)[:80]}) "
                "that could run code; re-save its tensors as a plain state dict or safetensors"
            )


def _torch_load(path: Path, map_location: str) -> tuple[Any, list]:
    """The file's contents, read with torch's weights-only unpickler, and the stand-ins made
    for the objects it pickles beside its weights."""
    made: list = []
    allowed = [packaging.version.Version, *_inert_stand_ins(path, made)]
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True), made
        except RuntimeError as error:
            if "mmap" not in str(error):  # old (non-zip) files cannot be memory-mapped
                raise _unreadable(path, error) from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
            raise _unreadable(path, error) from None
        try:
            return torch.load(path, map_location=map_location, weights_only=True), made
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
            raise _unreadable(path, error) from None


def _unreadable(path: Path, error: Exception) -> InputError:
    text = str(error)
    if "TorchScript" in text:
        # OpenAI's released CLIP files are TorchScript archives; reading one means running it.
        return InputError(
            f"{path} is a TorchScript archive (as OpenAI's released CLIP files are), which holds code: "
            'from a file you trust, save its weights once with python -c "import torch; '
            f"torch.save(torch.jit.load('{path}', map_location='cpu').state_dict(), 'clip-state-dict.pt')\" "
            "and give that file instead"
        )
    found = re.search(r"Unsupported global: GLOBAL (\S+)|unsupported GLOBAL (\S+)", text)
    if found:
        name = found.group(1) or found.group(2)
        return InputError(
            f"refusing to load {path}: it holds a pickled Python object ({name}) that could run code; "
            "re-save its tensors as a plain state dict or safetensors"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(error).__name__]
    detail = next((line for line in lines if "Unsupported" in line), lines[0])
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
    weights = Weights.ema if metadata.get("weights") == "ema" else Weights.raw
    version = metadata.get("dalle2_pytorch_version")
    return Checkpoint(path, strip_clip(state_dict), "safetensors", config, version, weights, weights == Weights.ema)


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


def _trained_with_ema(config: dict[str, Any] | None) -> bool:
    """dalle2-pytorch's trainers and training configs use EMA unless told not to."""
    train = (config or {}).get("train")
    return bool(train.get("use_ema", True)) if isinstance(train, dict) else True


def stage_of(keys: list[str]) -> str:
    """`prior`, `decoder (N unets)`, `clip` or `unknown`, from a state dict's key names; for
    the files of a diffusers unCLIP pipeline (Karlo's), which component it is."""
    first = Counter(key.split(".")[0] for key in keys)
    karlo = _karlo_component(set(first), keys)
    if karlo is not None:
        return karlo
    if "unets" in first:
        count = len({key.split(".")[1] for key in keys if key.startswith("unets.")})
        return f"decoder ({count} unet{'s' if count != 1 else ''})"
    if "net" in first:
        return "prior"
    if {"visual", "token_embedding", "text_transformer", "visual_transformer"} & set(first):
        return "clip"
    return "unknown"


def _karlo_component(first: set[str], keys: list[str]) -> str | None:
    """Which part of a Karlo (diffusers unCLIP) pipeline a state dict is, by its key names."""
    if {"clip_mean", "prd_embedding"} <= first:
        return "Karlo prior (diffusers PriorTransformer)"
    if "learned_classifier_free_guidance_embeddings" in first:
        return "Karlo text projection (UnCLIPTextProjModel)"
    if {"conv_in", "down_blocks", "up_blocks"} <= first:
        if any(".add_k_proj." in key for key in keys):  # cross-attention to the text: the decoder
            return "Karlo decoder (diffusers UNet2DConditionModel)"
        return "Karlo super-resolution (diffusers UNet2DModel)"
    towers = [name for prefix, name in (("text_model", "text"), ("vision_model", "image")) if prefix in first]
    if towers:
        return f"CLIP {' and '.join(towers)} tower{'s' if len(towers) > 1 else ''} (transformers layout)"
    return None


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
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    strict: bool,
    what: str,
    version: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Load `state_dict` into `module`; strict mismatches raise one readable error. With a
    half `dtype`, the parameters that take it (precision.half_precision_keys) are stored in it.

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
            template=literal(f"{what} does not match its model: {'; '.join(parts)}.\nFix: {fix}, ")
            + 'or load anyway with {strict=False} (config: "strict_loading": false), which leaves those weights random.'
        )
    # The module adopts the file's (memory-mapped) tensors rather than copying them into its own,
    # so loading holds one copy of the weights; tensors of another dtype are converted first,
    # each handing its file pages back once converted.
    half = half_precision_keys(module) if dtype != torch.float32 else set()
    file_pages = FilePages()
    state_dict = {
        k: converted(v, dtype if k in half else expected[k].dtype, file_pages) if k in expected else v
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
