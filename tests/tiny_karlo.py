"""Tiny random Karlo pipelines in diffusers' layout, written by diffusers' and transformers' own
classes (`save_pretrained`), as Kakao Brain's repositories are; and the matching diffusers
reference pipelines, assembled from the same components, to compare against.

Sizes: CLIP 32 wide with 77 tokens (the prior's sequence is CLIP's), a 16 px decoder and a
16 -> 64 px super-resolution. The tokenizer is made offline from open_clip's BPE vocabulary,
with Karlo's pad token "!".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WIDTH = 32
TEXT_TO_IMAGE, VARIATIONS = "UnCLIPPipeline", "UnCLIPImageVariationPipeline"


def _randomise_zeros(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Parameters diffusers starts at zero (the prior's clip_mean/std, the null image
    embedding, zero-initialised convolutions) get random values, so every one matters."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.abs().max() == 0:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
            if name.endswith("clip_std"):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)


def tokenizer(target: Path | None = None):
    """transformers' CLIPTokenizer over open_clip's BPE files, pad token "!" (Karlo's)."""
    from open_clip.tokenizer import _tokenizer
    from transformers import CLIPTokenizer

    folder = Path(target) if target is not None else Path(__import__("tempfile").mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    # open_clip spells the special tokens <start_of_text>, OpenAI's files <|startoftext|>.
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): index for token, index in _tokenizer.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(_tokenizer.bpe_ranks, key=_tokenizer.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    made = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77)
    if target is not None:
        made.save_pretrained(str(folder))
    return made


def components(kind: str = TEXT_TO_IMAGE, seed: int = 0) -> dict:
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tower = {"hidden_size": WIDTH, "projection_dim": WIDTH, "intermediate_size": 64, "num_attention_heads": 4}
    tower["num_hidden_layers"] = 2
    text_config = CLIPTextConfig(
        **tower,
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )
    parts: dict = {"text_encoder": CLIPTextModelWithProjection(text_config), "tokenizer": tokenizer()}
    if kind == TEXT_TO_IMAGE:
        parts["prior"] = PriorTransformer(
            num_attention_heads=2, attention_head_dim=16, embedding_dim=WIDTH, num_layers=1, num_embeddings=77
        )
        parts["prior_scheduler"] = UnCLIPScheduler(
            variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0
        )
    else:
        vision = CLIPVisionConfig(**tower, image_size=32, patch_size=8)
        parts["image_encoder"] = CLIPVisionModelWithProjection(vision)
    parts["text_proj"] = UnCLIPTextProjModel(
        clip_extra_context_tokens=4, clip_embeddings_dim=WIDTH, time_embed_dim=64, cross_attention_dim=WIDTH
    )
    parts["decoder"] = UNet2DConditionModel(
        sample_size=16,
        in_channels=3,
        out_channels=6,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
        resnet_time_scale_shift="scale_shift",
        class_embed_type="identity",
    )
    for name in ("super_res_first", "super_res_last"):
        parts[name] = UNet2DModel(
            sample_size=64,
            in_channels=6,
            out_channels=3,
            down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
            up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            resnet_time_scale_shift="scale_shift",
        )
    parts["decoder_scheduler"] = UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon")
    parts["super_res_scheduler"] = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon")
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            _randomise_zeros(part, generator)
            part.eval()
    return parts


def write_tiny_karlo(target: Path, kind: str = TEXT_TO_IMAGE, seed: int = 0, safetensors: bool = True) -> dict:
    """A Karlo pipeline folder at `target`, as `save_pretrained` writes each component, and its
    model_index.json; returns the components (for a reference pipeline)."""
    target = Path(target)
    parts = components(kind, seed)
    index = {"_class_name": kind, "_diffusers_version": "0.12.0"}
    libraries = {"text_encoder": "transformers", "image_encoder": "transformers", "tokenizer": "transformers"}
    for name, part in parts.items():
        if name == "tokenizer":
            tokenizer(target / name)
        elif hasattr(part, "save_pretrained"):
            part.save_pretrained(str(target / name))
            if not safetensors:  # pickled weights, as the variations repository's main branch has them
                for written in (target / name).glob("*.safetensors"):
                    bin_name = "pytorch_model.bin" if written.stem == "model" else f"{written.stem}.bin"
                    torch.save(part.state_dict(), target / name / bin_name)
                    written.unlink()
        library = libraries.get(name, "unclip" if name == "text_proj" else "diffusers")
        index[name] = [library, type(part).__name__]
    (target / "model_index.json").write_text(json.dumps(index, indent=2))
    return parts


def reference_pipeline(parts: dict):
    """diffusers' own pipeline over these components (its from_pretrained cannot load them)."""
    from diffusers.pipelines.deprecated.unclip import UnCLIPImageVariationPipeline, UnCLIPPipeline

    if "prior" in parts:
        return UnCLIPPipeline(**{k: v for k, v in parts.items()}).to("cpu")
    from transformers import CLIPImageProcessor

    extractor = CLIPImageProcessor(crop_size=32, size=32)
    return UnCLIPImageVariationPipeline(feature_extractor=extractor, **parts).to("cpu")
