"""Tiny random-weight DALL·E 2 models, written in the formats real checkpoints use.

Used by the tests. Every file is written by
dalle2-pytorch's own code: one optimisation step through `DiffusionPriorTrainer` /
`DecoderTrainer`, then saved by the trainer (`checkpoint` layout), by the tracker's model
save (`tracker` layout: config and version embedded, EMA weights swapped in) or as a bare
state dict with a JSON config beside it (`bare` layout).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import packaging.version
import torch
from dalle2_pytorch import DecoderTrainer, DiffusionPriorTrainer
from dalle2_pytorch.trackers import Tracker
from dalle2_pytorch.train_configs import DecoderConfig, DiffusionPriorConfig
from dalle2_pytorch.version import __version__ as DALLE2_VERSION

Layout = Literal["tracker", "checkpoint", "bare"]

EMBED_DIM = 32
TEXT_LEN = 16
TRAIN_STEPS = 3  # the first EMA update copies the weights; later ones make EMA differ from them

CLIP_ARCHITECTURE: dict[str, Any] = {
    "embed_dim": EMBED_DIM,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": TEXT_LEN, "vocab_size": 49408, "width": EMBED_DIM, "heads": 2, "layers": 1},
}


def prior_config(timesteps: int = 100) -> dict[str, Any]:
    return {
        "net": {
            "dim": EMBED_DIM,
            "depth": 1,
            "dim_head": 16,
            "heads": 2,
            "max_text_len": TEXT_LEN,
            "num_timesteps": timesteps,
        },
        "image_embed_dim": EMBED_DIM,
        "image_size": 32,
        "timesteps": timesteps,
        "cond_drop_prob": 0.1,
        "condition_on_text_encodings": True,
    }


def unet_config(base: bool) -> dict[str, Any]:
    config = {
        "dim": 8,
        "dim_mults": [1, 2],
        "cond_dim": 16,
        "attn_dim_head": 8,
        "attn_heads": 2,
        "self_attn": [False, False],
        "init_cross_embed": False,
    }
    if base:
        config.update(image_embed_dim=EMBED_DIM, text_embed_dim=EMBED_DIM, cond_on_text_encodings=True)
    return config


def decoder_config(image_sizes: list[int], base: bool, timesteps: int = 100) -> dict[str, Any]:
    """A decoder with one unet per image size; unet 1 is the base only when `base`."""
    unets = [unet_config(base=(i == 0)) for i in range(len(image_sizes))]
    return {
        "unets": unets,
        "image_sizes": image_sizes,
        "timesteps": timesteps,
        "image_cond_drop_prob": 0.1,
        "text_cond_drop_prob": 0.5,
    }


def training_config(section: str, model_config: dict[str, Any]) -> dict[str, Any]:
    """The shape of a real embedded config: the whole training config, model under `section`."""
    return {
        section: model_config,
        "train": {"use_ema": True, "epochs": 1},
        "tracker": {"log": {"log_type": "console"}, "save": {"save_to": "local"}},
    }


def _tracker(config: dict[str, Any]) -> Tracker:
    tracker = Tracker(data_path=".tracker_data", dummy_mode=True)
    tracker.save_metadata = {"version": packaging.version.parse(DALLE2_VERSION), "config": config}
    return tracker


def _save(trainer, layout: Layout, path: Path, section: str, model_config: dict[str, Any]) -> None:
    full = training_config(section, model_config)
    if layout == "tracker":
        _tracker(full)._save_state_dict(trainer, "model", str(path))
    elif layout == "checkpoint":
        trainer.save(str(path))
    else:
        model = trainer.diffusion_prior if section == "prior" else trainer.decoder
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("clip.")}
        torch.save(state, path)
    if layout != "tracker":
        path.with_suffix(".json").write_text(json.dumps(full, indent=2))


def make_prior(path: Path, layout: Layout = "tracker") -> None:
    config = prior_config()
    prior = DiffusionPriorConfig(**config).create()
    trainer = DiffusionPriorTrainer(prior, lr=1e-4, ema_beta=0.9, ema_update_after_step=0, ema_update_every=1)
    batch = 2
    for _ in range(TRAIN_STEPS):
        trainer(
            text_embed=torch.randn(batch, EMBED_DIM),
            image_embed=torch.randn(batch, EMBED_DIM),
            text_encodings=torch.randn(batch, TEXT_LEN, EMBED_DIM),
        )
        trainer.update()
    _save(trainer, layout, path, "prior", config)


def make_decoder(
    path: Path,
    image_sizes: list[int],
    train_unets: list[int],
    layout: Layout = "tracker",
    timesteps: int = 100,
    extra: dict[str, Any] | None = None,
) -> None:
    """`extra`: more of the decoder's config (its `use_noise_for_lowres_cond`, say)."""
    config = {**decoder_config(image_sizes, base=True, timesteps=timesteps), **(extra or {})}
    decoder = DecoderConfig(**config).create()
    trainer = DecoderTrainer(decoder, lr=1e-4, ema_beta=0.9, ema_update_after_step=0, ema_update_every=1)
    batch = 2
    images = torch.rand(batch, 3, image_sizes[-1], image_sizes[-1])
    takes_text = any(unet.get("cond_on_text_encodings") for unet in config["unets"])
    for number in train_unets:
        for _ in range(TRAIN_STEPS):
            text = {"text_encodings": torch.randn(batch, TEXT_LEN, EMBED_DIM)} if takes_text else {}
            trainer(images, image_embed=torch.randn(batch, EMBED_DIM), unet_number=number, **text)
            trainer.update(number)
    _save(trainer, layout, path, "decoder", config)


def make_clip(path: Path) -> None:
    import open_clip

    model = open_clip.CLIP(**CLIP_ARCHITECTURE)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)


def file_entry(path: Path, with_config: bool = False) -> dict[str, Any]:
    """A `load_model_from` entry (and `load_config_from`, for files without an embedded config)."""

    def local(p: Path) -> dict[str, Any]:
        return {"load_type": "local", "path": str(p)}

    entry = {"load_model_from": local(path)}
    if with_config:
        entry["load_config_from"] = local(path.with_suffix(".json"))
    return entry


def write_tiny_model(
    directory: Path,
    layout: Layout = "tracker",
    split_decoder: bool = True,
    seed: int = 0,
) -> Path:
    """Write CLIP, prior and decoder files and `config.json` naming them into `directory`;
    return the config's path.

    With `split_decoder`, unet 1 (16 px) and the upsampler (32 px) live in two files, the
    upsampler as unet 2 of its own two-unet decoder, as LAION's upsampler is.
    """
    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".pth"
    make_clip(directory / "clip.safetensors")
    make_prior(directory / f"prior{suffix}", layout)
    with_config = layout != "tracker"
    if split_decoder:
        make_decoder(directory / f"decoder-base{suffix}", [16], [1], layout)
        make_decoder(directory / f"decoder-upsampler{suffix}", [16, 32], [2], layout)
        sources = [
            {
                **file_entry(directory / f"decoder-base{suffix}", with_config=with_config),
                "unet_numbers": [1],
                "default_sample_timesteps": [10],
                "default_cond_scale": [1.0],
            },
            {
                **file_entry(directory / f"decoder-upsampler{suffix}", with_config=with_config),
                "unet_numbers": [2],
                "default_sample_timesteps": [10],
                "default_cond_scale": [1.0],
            },
        ]
    else:
        make_decoder(directory / f"decoder{suffix}", [16, 32], [1, 2], layout)
        sources = [
            {
                **file_entry(directory / f"decoder{suffix}", with_config=with_config),
                "unet_numbers": [1, 2],
                "default_sample_timesteps": [10, 10],
            }
        ]
    config = {
        "clip": {
            "make": "open_clip",
            "architecture": CLIP_ARCHITECTURE,
            "load_model_from": file_entry(directory / "clip.safetensors")["load_model_from"],
        },
        "prior": {**file_entry(directory / f"prior{suffix}", with_config=with_config), "default_sample_timesteps": 10},
        "decoder": {"unet_sources": sources},
    }
    config_path = directory / "config.json"
    config_path.write_text(json.dumps(config, indent=2))
    return config_path
