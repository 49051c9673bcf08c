"""Build the CLIP that the prior and decoder were trained against, as a dalle2-pytorch adapter.

dalle2-pytorch's own adapters download their weights (OpenAI's servers, the open_clip hub).
Here a CLIP can instead be built from a name or an `architecture` and loaded from a `File`,
which is how offline and custom CLIPs work.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from dalle2_pytorch.dalle2_pytorch import (
    BaseClipAdapter,
    CoCaAdapter,
    OpenClipAdapter,
    XClipAdapter,
)
from torchvision.transforms import Normalize

from dalle2_cli.config import ClipConfig, File
from dalle2_cli.errors import InputError
from dalle2_cli.loading.checkpoint import load_weights, new_model, read_checkpoint

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class _Prebuilt:
    """Wrap an already-built open_clip model the way dalle2-pytorch's adapters do."""

    def _setup(self, model: torch.nn.Module, normalize: Normalize) -> None:
        BaseClipAdapter.__init__(self, model)
        self.eos_id = 49407  # the tokenizer's end-of-text id; 0 pads
        self.handle = model.ln_final.register_forward_hook(self._hook)
        self.clip_normalize = normalize
        self.cleared = False
        # dalle2-pytorch reports the text width here; the embeddings have the joint size.
        self._dim_latent = _joint_dim(model)


class PrebuiltOpenClipAdapter(_Prebuilt, OpenClipAdapter):
    def __init__(self, model: torch.nn.Module, normalize: Normalize):
        self._setup(model, normalize)
        self._text_lock = threading.Lock()

    def embed_text(self, text: torch.Tensor):
        # dalle2-pytorch's adapter catches the per-token encodings with a hook that stores them
        # on the adapter, then reads them back: one text embedding at a time, whatever the threads.
        with self._text_lock:
            return super().embed_text(text)


def _joint_dim(model: torch.nn.Module) -> int:
    projection = getattr(model, "text_projection", None)
    if isinstance(projection, torch.nn.Linear):
        return projection.out_features
    if isinstance(projection, torch.Tensor):
        return projection.shape[-1]
    return model.ln_final.weight.shape[0]


def text_encoding_dim(adapter: BaseClipAdapter) -> int | None:
    """Width of the per-token text encodings the decoder and prior are conditioned on."""
    clip = adapter.clip
    if hasattr(clip, "ln_final"):
        return clip.ln_final.weight.shape[0]
    if hasattr(clip, "dim_text"):
        return clip.dim_text
    return getattr(clip, "dim", None)


def build_clip(
    config: ClipConfig,
    resolve: Callable[[File], Path],
    strict: bool = True,
    map_location: str = "cpu",
    offline: bool = False,
    dtype: torch.dtype = torch.float32,
) -> BaseClipAdapter:
    """`offline` only words the message when weights open_clip would download are missing
    (open_clip itself follows HF_HUB_OFFLINE, which the CLI's --offline sets for it); `dtype`:
    the precision weights read from a file are stored in (see load_weights)."""
    hint = " (offline mode is on: `dalle2 models download -c CONFIG` fetches the CLIP weights while online)"
    hint = hint if offline else ""
    if config.make == "openai":
        adapter = _openai(config, resolve, strict, map_location, hint, dtype)
    elif config.make == "open_clip":
        adapter = _open_clip(config, resolve, strict, map_location, hint, dtype)
    elif config.make == "transformers":
        adapter = _transformers(config, resolve, strict, map_location, dtype)
    else:
        adapter = _x_clip_or_coca(config, resolve, strict, map_location, dtype)
    adapter.eval().requires_grad_(False)
    return adapter


def _load_file(model: torch.nn.Module, file: File, resolve, strict: bool, map_location: str, dtype) -> None:
    path = resolve(file)
    checkpoint = read_checkpoint(path, map_location=map_location)
    load_weights(model, checkpoint.state_dict, strict, f"CLIP weights {path}", checkpoint.version, dtype)


def openai_name_in_open_clip(name: str) -> str:
    """OpenAI's model names as open_clip spells them: `ViT-L/14@336px` -> `ViT-L-14-336`."""
    return name.replace("/", "-").replace("@336px", "-336")


def _openai(config: ClipConfig, resolve, strict: bool, map_location: str, hint: str, dtype) -> BaseClipAdapter:
    # OpenAI's models are built by open_clip: dalle2-pytorch's OpenAIClipAdapter goes through
    # clip-anytorch, which imports pkg_resources and so fails under current setuptools.
    import open_clip

    if config.load_model_from is None:
        name = openai_name_in_open_clip(config.model)
        try:
            model = open_clip.create_model(name, pretrained="openai")
        except (RuntimeError, OSError) as error:  # OSError: the download failed, or offline and not cached
            raise InputError(
                f"cannot get OpenAI CLIP {config.model!r} through open_clip: {_first_line(error)}{hint}"
            ) from None
    else:
        path = resolve(config.load_model_from)
        checkpoint = read_checkpoint(path, map_location=map_location)
        # Sizes OpenAI's files carry as tensors, and the causal mask, which open_clip makes.
        derived = ("input_resolution", "context_length", "vocab_size", "attn_mask")
        weights = {k: v for k, v in checkpoint.state_dict.items() if k not in derived}
        try:
            # open_clip reads the architecture off the shapes (and loads a copy of the weights,
            # into parameters without memory when every weight is loaded again below).
            build = open_clip.model.build_model_from_openai_state_dict
            with warnings.catch_warnings():  # its copy into weightless parameters does nothing, as meant
                warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
                model = new_model(lambda: build(dict(weights)).float(), strict)
        except (KeyError, RuntimeError, IndexError, ValueError) as error:
            raise InputError(f"{path} is not an OpenAI CLIP state dict ({error})") from None
        load_weights(model, weights, strict, f"CLIP weights {path}", checkpoint.version, dtype)
    return PrebuiltOpenClipAdapter(model, Normalize(OPENAI_MEAN, OPENAI_STD))


def _open_clip(config: ClipConfig, resolve, strict: bool, map_location: str, hint: str, dtype) -> BaseClipAdapter:
    import open_clip

    if config.architecture is not None:
        try:
            model = new_model(lambda: open_clip.CLIP(**config.architecture), _from_file(config, strict))
        except TypeError as error:
            raise InputError(f"clip.architecture is not an open_clip model config: {error}") from None
    else:
        pretrained = None
        weights_file = config.pretrained is not None and Path(config.pretrained).expanduser().exists()
        if config.load_model_from is None and not weights_file:
            tags = open_clip.list_pretrained_tags_by_model(config.model)
            pretrained = config.pretrained or (tags[0] if tags else None)
        try:
            model = open_clip.create_model(config.model, pretrained=pretrained)
        except (RuntimeError, OSError) as error:
            message = f"open_clip cannot build {config.model!r}: {_first_line(error)}"
            raise InputError(message + hint) from None
        if weights_file:
            # A path given as `pretrained` is read here, never by open_clip's own torch.load.
            local = File(load_type="local", path=str(Path(config.pretrained).expanduser()))
            _load_file(model, local, resolve, strict, map_location, dtype)
    if config.load_model_from is not None:
        _load_file(model, config.load_model_from, resolve, strict, map_location, dtype)
    mean = getattr(model.visual, "image_mean", None) or OPENAI_MEAN
    std = getattr(model.visual, "image_std", None) or OPENAI_STD
    return PrebuiltOpenClipAdapter(model, Normalize(mean, std))


def _transformers(config: ClipConfig, resolve, strict: bool, map_location: str, dtype) -> BaseClipAdapter:
    """A CLIP in transformers' layout (config.json and weights), built as open_clip's model."""
    from dalle2_cli.io.textfiles import read_json
    from dalle2_cli.loading.transformers_clip import build_open_clip

    config_path = resolve(config.load_config_from)
    model_config = read_json(config_path, "CLIP config")
    if not isinstance(model_config, dict):
        raise InputError(f"{config_path} is not a transformers CLIP config (a JSON object)")
    path = resolve(config.load_model_from)
    checkpoint = read_checkpoint(path, map_location=map_location)
    model, _ = build_open_clip([model_config], checkpoint.state_dict, strict, f"CLIP weights {path}", dtype)
    if model.visual is None or model.ln_final is None:
        raise InputError(f"{config_path} is one CLIP tower; dalle2-pytorch's models need both (a CLIPModel)")
    return PrebuiltOpenClipAdapter(model, Normalize(OPENAI_MEAN, OPENAI_STD))


def _x_clip_or_coca(config: ClipConfig, resolve, strict: bool, map_location: str, dtype) -> BaseClipAdapter:
    if config.make == "x-clip":
        from x_clip import CLIP as XCLIP

        build, adapter_class = XCLIP, XClipAdapter
    else:
        from coca_pytorch import CoCa

        build, adapter_class = CoCa, CoCaAdapter
    try:
        model = new_model(lambda: build(**config.architecture), _from_file(config, strict))
    except TypeError as error:
        raise InputError(f"clip.architecture does not fit {config.make}: {error}") from None
    if config.load_model_from is not None:
        _load_file(model, config.load_model_from, resolve, strict, map_location, dtype)
    return adapter_class(model, **config.adapter_overrides)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _from_file(config: ClipConfig, strict: bool) -> bool:
    """Whether every weight will be loaded from a file (so none need initialising)."""
    return strict and config.load_model_from is not None


def tokenize(adapter: BaseClipAdapter, texts: list[str]) -> torch.Tensor:
    """CLIP's BPE tokens, truncated to the text length this CLIP was trained with."""
    from open_clip.tokenizer import tokenize as bpe_tokenize

    return bpe_tokenize(texts, context_length=adapter.max_text_len)


def cut_off_words(text: str, context_length: int) -> str | None:
    """The end of `text` that CLIP's `context_length` tokens leave out, or None if it fits."""
    from open_clip.tokenizer import _tokenizer

    room = context_length - 2  # start and end of text take a token each
    if len(_tokenizer.encode(text)) <= room:
        return None
    words = text.split()
    low, high = 0, len(words)  # bisect for the most whole words that fit
    while low < high:
        middle = (low + high + 1) // 2
        if len(_tokenizer.encode(" ".join(words[:middle]))) <= room:
            low = middle
        else:
            high = middle - 1
    return " ".join(words[low:])
