"""CLIP from transformers' layout (`config.json` + `model.safetensors` of `CLIPModel`,
`CLIPTextModelWithProjection` or `CLIPVisionModelWithProjection`), built as an open_clip model
and loaded through our own route: no transformers at run time.

The architecture is read off the config (transformers' defaults for what it leaves out), and
the weights are renamed to open_clip's names; the query, key and value projections, separate
in transformers, are one fused projection in open_clip. That is what Karlo's text and image
towers are, and what `openai/clip-vit-large-patch14` is on the hub.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
from dalle2_pytorch.dalle2_pytorch import BaseClipAdapter
from torch.nn import functional as F
from torchvision.transforms import Normalize

from dalle2_cli.errors import InputError
from dalle2_cli.loading.checkpoint import new_model
from dalle2_cli.loading.clip import OPENAI_MEAN, OPENAI_STD, PrebuiltOpenClipAdapter

# transformers' CLIPTextConfig and CLIPVisionConfig defaults, for configs that leave them out.
TEXT_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_attention_heads": 8,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu")
NO_IMAGE_TOWER = (
    "this model has no CLIP image tower (Karlo's text-to-image pipeline has none), which variations, reranking, "
    "interpolate, textdiff and inpainting without a prompt need: use the karlo preset (it borrows the variations "
    "repository's) or karlo-variations"
)


def tower_configs(config: dict[str, Any]) -> tuple[dict | None, dict | None, int]:
    """(text config, vision config, projection width) of a transformers CLIP config: a whole
    `CLIPModel`'s, or one tower's (`clip_text_model`, `clip_vision_model`)."""
    kind = config.get("model_type", "clip")
    text = vision = None
    if kind == "clip":
        text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
    elif kind == "clip_text_model":
        text = config
    elif kind == "clip_vision_model":
        vision = config
    else:
        raise InputError(
            f"not a CLIP config (model_type {kind!r}): expected clip, clip_text_model or clip_vision_model"
        )
    text = None if text is None else {**TEXT_DEFAULTS, **text}
    vision = None if vision is None else {**VISION_DEFAULTS, **vision}
    projection = int(config.get("projection_dim", 512))
    return text, vision, projection


def open_clip_kwargs(text: dict | None, vision: dict | None, projection: int) -> dict[str, Any]:
    """open_clip.CLIP's arguments for these towers (a missing tower gets a one-layer stand-in,
    removed after building: see `build_open_clip`)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    acts = {tower["hidden_act"] for tower in (text, vision) if tower is not None}
    if not acts <= set(SUPPORTED_ACTIVATIONS) or len(acts) > 1:
        raise InputError(f"CLIP activation {', '.join(sorted(acts))} is not supported: quick_gelu or gelu")
    text_cfg = CLIPTextCfg(context_length=8, vocab_size=8, width=8, heads=1, layers=1)
    if text is not None:
        width = int(text["hidden_size"])
        text_cfg = CLIPTextCfg(
            context_length=int(text["max_position_embeddings"]),
            vocab_size=int(text["vocab_size"]),
            width=width,
            heads=int(text["num_attention_heads"]),
            layers=int(text["num_hidden_layers"]),
            mlp_ratio=int(text["intermediate_size"]) / width,
        )
    vision_cfg = CLIPVisionCfg(layers=1, width=8, head_width=8, patch_size=8, image_size=8)
    if vision is not None:
        width = int(vision["hidden_size"])
        vision_cfg = CLIPVisionCfg(
            layers=int(vision["num_hidden_layers"]),
            width=width,
            head_width=width // int(vision["num_attention_heads"]),
            mlp_ratio=int(vision["intermediate_size"]) / width,
            patch_size=int(vision["patch_size"]),
            image_size=int(vision["image_size"]),
        )
    return {
        "embed_dim": projection,
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
        "quick_gelu": acts == {"quick_gelu"},
    }


def _layers(source: str, target: str, state: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """A transformers encoder's layers, renamed (q, k, v fused) into open_clip's resblocks."""
    numbers = sorted({int(key[len(source) :].split(".")[0]) for key in state if key.startswith(source)})
    renames = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    for n in numbers:
        a, b = f"{source}{n}.", f"{target}{n}."
        for kind in ("weight", "bias"):
            parts = [state.pop(f"{a}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            out[f"{b}attn.in_proj_{kind}"] = torch.cat(parts)
            for old, new in renames.items():
                out[f"{b}{new}.{kind}"] = state.pop(f"{a}{old}.{kind}")


def open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIP weights (either tower, or both) under open_clip's names. Raises
    InputError naming a weight that is missing."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {}
    try:
        if any(key.startswith("text_model.") for key in state):
            t = "text_model."
            out["token_embedding.weight"] = state.pop(f"{t}embeddings.token_embedding.weight")
            out["positional_embedding"] = state.pop(f"{t}embeddings.position_embedding.weight")
            _layers(f"{t}encoder.layers.", "transformer.resblocks.", state, out)
            out["ln_final.weight"] = state.pop(f"{t}final_layer_norm.weight")
            out["ln_final.bias"] = state.pop(f"{t}final_layer_norm.bias")
            out["text_projection"] = state.pop("text_projection.weight").t()
        if any(key.startswith("vision_model.") for key in state):
            v = "vision_model."
            out["visual.class_embedding"] = state.pop(f"{v}embeddings.class_embedding")
            out["visual.conv1.weight"] = state.pop(f"{v}embeddings.patch_embedding.weight")
            out["visual.positional_embedding"] = state.pop(f"{v}embeddings.position_embedding.weight")
            for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
                for kind in ("weight", "bias"):
                    out[f"visual.{ours}.{kind}"] = state.pop(f"{v}{theirs}.{kind}")
            _layers(f"{v}encoder.layers.", "visual.transformer.resblocks.", state, out)
            out["visual.proj"] = state.pop("visual_projection.weight").t()
    except KeyError as error:
        raise InputError(f"not a transformers CLIP state dict: it has no weight {error.args[0]}") from None
    # The temperature is not used for embeddings; a tower saved alone has none.
    out["logit_scale"] = state.pop("logit_scale", torch.tensor(math.log(1 / 0.07)))
    return out


def build_open_clip(configs: list[dict[str, Any]], state: dict[str, torch.Tensor], strict: bool, what: str, dtype):
    """open_clip's CLIP for transformers CLIP configs (a whole model's, or one per tower), loaded
    with `state` (transformers' names); a tower none of them has is None. Returns (model,
    warnings of non-strict loading)."""
    import open_clip

    from dalle2_cli.loading.checkpoint import load_weights

    text = vision = None
    projections = set()
    for config in configs:
        text_part, vision_part, projection = tower_configs(config)
        text, vision = text or text_part, vision or vision_part
        projections.add(projection)
    if len(projections) != 1:
        raise InputError(f"{what}: the text and image towers project to different widths ({sorted(projections)})")
    kwargs = open_clip_kwargs(text, vision, projections.pop())
    model = new_model(lambda: open_clip.CLIP(**kwargs), weights_follow=strict)
    if vision is None:
        model.visual = None
    if text is None:
        model.transformer = model.token_embedding = model.ln_final = None
        model.positional_embedding = model.text_projection = None
    warnings = load_weights(model, open_clip_state_dict(state), strict, what, None, dtype)
    return model, warnings


def eos_mask(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """True for every token up to and including the first end-of-text token: the attention
    mask transformers' tokenizer gives (a `!`, token 0 like padding, counts as a word)."""
    before_eos = (tokens == eos_id).cumsum(dim=-1) == 0
    return F.pad(before_eos, (1, -1), value=True)


class UnclipClipAdapter(PrebuiltOpenClipAdapter):
    """CLIP as unCLIP models (Karlo) read it: text and image embeddings unnormalised, per-token
    text encodings zeroed after the end-of-text token (the zero rows are the attention mask, as
    dalle2-pytorch's adapters carry it). Either tower may be absent."""

    def __init__(self, model: torch.nn.Module):
        if model.ln_final is not None:
            self._setup(model, Normalize(OPENAI_MEAN, OPENAI_STD))
        else:  # an image tower alone
            BaseClipAdapter.__init__(self, model)
            self.clip_normalize, self.cleared, self.eos_id = Normalize(OPENAI_MEAN, OPENAI_STD), False, 49407
            self._dim_latent = model.visual.proj.shape[-1]
        self._text_lock = threading.Lock()

    @property
    def has_text(self) -> bool:
        return self.clip.ln_final is not None

    @property
    def has_image(self) -> bool:
        return self.clip.visual is not None

    @property
    def image_size(self) -> int:
        return super().image_size if self.has_image else 224

    @property
    def max_text_len(self) -> int:
        return self.clip.context_length if self.has_text else 77

    def embed_text(self, text: torch.Tensor):
        if not self.has_text:
            raise InputError("this model has no CLIP text tower")
        text = text[..., : self.max_text_len]
        with self._text_lock:
            embed = self.clip.encode_text(text)
            encodings = self.text_encodings
            del self.text_encodings
        keep = eos_mask(text, self.eos_id)
        return embed, encodings.masked_fill(~keep[..., None], 0.0)

    def embed_image(self, image: torch.Tensor):
        if not self.has_image:
            raise InputError(NO_IMAGE_TOWER)
        return self.clip.encode_image(self.clip_normalize(image)), None
