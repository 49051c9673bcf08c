"""Each CLIP make built from an architecture or name and loaded from a weights file."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from safetensors.torch import save_file

from dalle2_cli.config import ClipConfig, File
from dalle2_cli.errors import InputError
from dalle2_cli.loading.clip import build_clip, text_encoding_dim, tokenize
from dalle2_cli.sources.resolve import resolve_file

XCLIP = {
    "dim_text": 32,
    "dim_image": 32,
    "dim_latent": 24,
    "num_text_tokens": 49408,
    "text_enc_depth": 1,
    "text_seq_len": 16,
    "text_heads": 2,
    "visual_enc_depth": 1,
    "visual_image_size": 32,
    "visual_patch_size": 8,
    "visual_heads": 2,
}
COCA = {
    "dim": 32,
    "num_tokens": 49408,
    "unimodal_depth": 1,
    "multimodal_depth": 1,
    "dim_head": 16,
    "heads": 2,
    "caption_loss_weight": 1.0,
    "contrastive_loss_weight": 1.0,
}


def _openai_state_dict() -> dict[str, torch.Tensor]:
    """A tiny CLIP in OpenAI's key layout (what OpenAI's `clip.model.CLIP.state_dict()` holds)."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        quick_gelu=True,
        vision_cfg={"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        text_cfg={"context_length": 16, "width": 64, "heads": 1, "layers": 1},
    )
    state = model.state_dict()
    state.pop("logit_bias", None)
    state["input_resolution"], state["context_length"], state["vocab_size"] = (
        torch.tensor(32),
        torch.tensor(16),
        torch.tensor(49408),
    )
    return state


def _saved(model: torch.nn.Module, path) -> File:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return File(load_type="local", path=str(path))


def _embed(adapter, texts=("a red circle", "a blue square")):
    text_embed, encodings = adapter.embed_text(tokenize(adapter, list(texts)))
    image_embed, _ = adapter.embed_image(torch.rand(2, 3, adapter.image_size, adapter.image_size))
    return text_embed, encodings, image_embed


def test_x_clip_from_a_file_loads_its_weights(tmp_path):
    from x_clip import CLIP

    torch.manual_seed(0)
    original = CLIP(**XCLIP)
    config = ClipConfig(make="x-clip", architecture=XCLIP, load_model_from=_saved(original, tmp_path / "x.safetensors"))
    adapter = build_clip(config, resolve_file)
    assert torch.equal(adapter.clip.to_text_latent.weight, original.to_text_latent.weight)
    text_embed, encodings, image_embed = _embed(adapter)
    assert text_embed.shape == image_embed.shape == (2, 24) and adapter.dim_latent == 24
    assert encodings.shape[-1] == text_encoding_dim(adapter) == 32


def test_coca_from_a_file_embeds_text_with_its_adapter_overrides(tmp_path):
    from coca_pytorch import CoCa

    torch.manual_seed(0)
    original = CoCa(**COCA)
    overrides = {"image_size": 32, "image_channels": 3, "max_text_len": 16}
    path = tmp_path / "coca.pth"
    torch.save(original.state_dict(), path)  # CoCa ties weights, which safetensors will not save
    config = ClipConfig(
        make="coca",
        architecture=COCA,
        adapter_overrides=overrides,
        load_model_from=File(load_type="local", path=str(path)),
    )
    adapter = build_clip(config, resolve_file)
    assert adapter.max_text_len == 16 and adapter.dim_latent == 32
    text_embed, encodings = adapter.embed_text(tokenize(adapter, ["a red circle"]))
    assert text_embed.shape == (1, 32) and encodings.shape[:2] == (1, 16)


def test_openai_clip_is_rebuilt_from_a_state_dict_without_jit_or_download(tmp_path):
    state = _openai_state_dict()
    path = tmp_path / "openai.pth"
    torch.save(state, path)
    config = ClipConfig(make="openai", model="ViT-L/14", load_model_from=File(load_type="local", path=str(path)))
    adapter = build_clip(config, resolve_file)
    # The architecture comes from the weights' shapes, not the name (open_clip derives it).
    assert adapter.image_size == 32 and adapter.max_text_len == 16 and adapter.dim_latent == 32
    assert torch.equal(adapter.clip.text_projection, state["text_projection"])
    text_embed, encodings, image_embed = _embed(adapter)
    assert torch.allclose(text_embed.norm(dim=-1), torch.ones(2))  # embeddings come out l2-normalised
    assert encodings.shape == (2, 16, 64) and image_embed.shape == (2, 32)


def test_openai_names_map_to_open_clip():
    from dalle2_cli.loading.clip import openai_name_in_open_clip

    assert openai_name_in_open_clip("ViT-L/14") == "ViT-L-14"
    assert openai_name_in_open_clip("ViT-L/14@336px") == "ViT-L-14-336"


def test_open_clip_weights_that_do_not_fit_the_architecture(tmp_path):
    import open_clip

    small = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "width": 16, "heads": 2, "layers": 1},
    }
    other = {**small, "text_cfg": {**small["text_cfg"], "layers": 2}}
    file = _saved(open_clip.CLIP(**other), tmp_path / "clip.safetensors")
    with pytest.raises(InputError, match="CLIP weights .* does not match its model: .*unexpected keys"):
        build_clip(ClipConfig(make="open_clip", architecture=small, load_model_from=file), resolve_file)
    with pytest.raises(InputError, match="not an open_clip model config"):
        build_clip(ClipConfig(make="open_clip", architecture={"layers": 3}, load_model_from=file), resolve_file)


def _clip_file(route: str, directory) -> dict:
    """A tiny CLIP of each make, saved, as a config's "clip" section."""
    torch.manual_seed(0)
    if route == "openai":
        path = directory / "openai.pth"
        torch.save(_openai_state_dict(), path)
        return {"make": "openai", "model": "ViT-L/14", "load_model_from": {"load_type": "local", "path": str(path)}}
    if route == "open_clip":
        import open_clip

        architecture = {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1},
        }
        saved = _saved(open_clip.CLIP(**architecture), directory / "open_clip.safetensors")
        return {"make": "open_clip", "architecture": architecture, "load_model_from": saved.model_dump()}
    if route == "coca":
        from coca_pytorch import CoCa

        torch.save(CoCa(**COCA).state_dict(), directory / "coca.pth")  # tied weights: not safetensors
        return {
            "make": "coca",
            "architecture": COCA,
            "adapter_overrides": {"image_size": 32, "image_channels": 3, "max_text_len": 16},
            "load_model_from": {"load_type": "local", "path": str(directory / "coca.pth")},
        }
    from x_clip import CLIP

    saved = _saved(CLIP(**XCLIP), directory / "x.safetensors")
    return {"make": "x-clip", "architecture": XCLIP, "load_model_from": saved.model_dump()}


@pytest.mark.parametrize("route", ["openai", "open_clip", "x-clip", "coca"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_clip_route_embeds_in_half_precision(tmp_path, route, dtype):
    """open_clip builds OpenAI-layout models with LayerNormFp32, which computes in float32: its
    weights must stay float32 when the rest is cast (else 'mixed dtype' at the first norm)."""
    from dalle2_cli.config import ModelLoadConfig
    from dalle2_cli.loading.manager import DalleModelManager

    config = ModelLoadConfig.from_dict({"clip": _clip_file(route, tmp_path)})
    full = DalleModelManager(config, log=lambda _: None).clip
    manager = DalleModelManager(config, dtype=dtype, log=lambda _: None)
    half = manager.clip
    # CoCa embeds images only through an image encoder of one's own: its text side is tested.
    embed = _embed if route != "coca" else lambda clip: clip.embed_text(tokenize(clip, ["a red circle"]))
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=manager.compute_dtype, enabled=manager.compute_dtype != torch.float32):
        embeds = embed(half)
    torch.manual_seed(1)
    assert any(p.dtype == dtype for p in half.parameters())
    for low, exact in zip(embeds, embed(full), strict=True):
        similarity = torch.nn.functional.cosine_similarity(low.float().flatten(1), exact.flatten(1))
        assert torch.isfinite(low).all() and similarity.min() > 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_a_cpu_without_its_arithmetic_computes_in_fp32(tmp_path, dtype):
    """Torch's fallback for half convolutions on such a CPU is about 30x slower than fp32: the
    weights stay half (the memory saved) and each layer computes on float32 copies of them."""
    from dalle2_cli.config import ModelLoadConfig
    from dalle2_cli.loading.manager import DalleModelManager
    from dalle2_cli.loading.precision import cpu_computes_in, half_precision_keys

    logs: list[str] = []
    config = ModelLoadConfig.from_dict({"clip": _clip_file("open_clip", tmp_path)})
    manager = DalleModelManager(config, dtype=dtype, device="cpu", log=logs.append)
    name = str(dtype).removeprefix("torch.")
    if cpu_computes_in(dtype):
        assert manager.compute_dtype == dtype and not any("arithmetic" in line for line in logs)
        return
    assert manager.compute_dtype == torch.float32
    assert [line for line in logs if f"this CPU has no {name} arithmetic" in line and "computed in fp32" in line]
    clip = manager.clip
    layer = clip.clip.visual.conv1
    original = layer.parametrizations.weight.original
    assert original.dtype == torch.float32  # converted when the layer first runs, not before
    torch.manual_seed(1)
    embeds = _embed(clip)
    assert original.dtype == dtype  # stored in half precision...
    assert layer.weight.dtype == torch.float32  # ...and read as float32 by the layer
    plain = lambda name: re.sub(r"\.parametrizations\.(\w+)\.original$", r".\1", name)  # noqa: E731
    stored = {plain(n): p for n, p in clip.named_parameters()}
    half_names = {name for name, parameter in stored.items() if parameter.dtype == dtype}
    takes_half = {plain(n) for n in half_precision_keys(clip)}  # all but the norms, which keep float32
    assert half_names <= takes_half and len(half_names) > len(takes_half) // 2  # every layer that ran
    # Exactly what a float32 CLIP computes with those weights half-rounded.
    rounded = DalleModelManager(config, device="cpu", log=lambda _: None).clip
    with torch.no_grad():
        for name, parameter in rounded.named_parameters():
            if name in half_names:
                parameter.copy_(parameter.to(dtype).float())
    torch.manual_seed(1)
    for low, exact in zip(embeds, _embed(rounded), strict=True):
        assert low.dtype == torch.float32 and torch.equal(low, exact)


def test_an_openai_torchscript_file_is_refused_with_the_command_that_converts_it(tmp_path):
    """OpenAI's released CLIP files are TorchScript archives: never run here, but the message
    gives a one-line conversion, whose output loads (in half precision too)."""
    import subprocess
    import sys

    import open_clip

    from dalle2_cli.config import ModelLoadConfig
    from dalle2_cli.loading.manager import DalleModelManager

    state = _openai_state_dict()
    model = open_clip.model.build_model_from_openai_state_dict(dict(state)).float().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (torch.rand(1, 3, 32, 32), torch.zeros(1, 16, dtype=torch.long)), strict=False)
    traced.save(str(tmp_path / "ViT-tiny.pt"))
    section = {"make": "openai", "model": "ViT-L/14", "load_model_from": {"load_type": "local", "path": ""}}
    section["load_model_from"]["path"] = str(tmp_path / "ViT-tiny.pt")
    with pytest.raises(InputError, match="is a TorchScript archive") as refused:
        DalleModelManager(ModelLoadConfig.from_dict({"clip": section}), log=lambda _: None).clip
    command = re.search(r'python -c "(.*?)"', str(refused.value)).group(1)
    run = subprocess.run([sys.executable, "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    section["load_model_from"]["path"] = str(tmp_path / "clip-state-dict.pt")
    manager = DalleModelManager(ModelLoadConfig.from_dict({"clip": section}), dtype=torch.bfloat16, log=lambda _: None)
    clip = manager.clip
    with torch.autocast("cpu", dtype=manager.compute_dtype, enabled=manager.compute_dtype != torch.float32):
        assert all(torch.isfinite(out).all() for out in _embed(clip))
    ran = clip.clip.token_embedding  # a layer that ran: its weights were converted from the file's
    stored = ran.parametrizations.weight.original if hasattr(ran, "parametrizations") else ran.weight
    assert stored.dtype == torch.bfloat16
    assert torch.equal(stored, model.token_embedding.weight.to(torch.bfloat16))
