"""Assemble one cascading decoder from unets that live in several checkpoint files.

A config may take unet 1 from a base decoder and unet 2 from an upsampler trained on its own.
Each file's own decoder config says how its unets were trained (image size, noise schedule,
learned variance, low-resolution conditioning); the stitched decoder takes, for each unet,
the settings of the file it comes from. Those settings are read by building each file's
decoder on the meta device, which allocates no memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from dalle2_pytorch import Decoder
from dalle2_pytorch.train_configs import DecoderConfig
from pydantic import ValidationError

from dalle2_cli.config import SingleDecoderLoadConfig, describe_validation_error
from dalle2_cli.errors import InputError
from dalle2_cli.loading.checkpoint import Checkpoint

# Decoder submodule lists with one entry per unet; their state-dict keys start `NAME.INDEX.`.
PER_UNET_MODULES = ("unets", "noise_schedulers", "vaes", "lowres_conds")


@dataclass
class DecoderPart:
    """One `unet_sources` entry, read: which unets it gives and how they were trained."""

    source: SingleDecoderLoadConfig
    path: Path
    checkpoint: Checkpoint
    config: DecoderConfig
    layout: Decoder  # built on the meta device: settings only, no weights

    @property
    def name(self) -> str:
        return str(self.path)


def parse_decoder_config(data: dict[str, Any], where: str) -> DecoderConfig:
    section = data.get("decoder", data)
    try:
        return DecoderConfig(**{**section, "clip": None})
    except (ValidationError, TypeError, ValueError) as error:
        detail = describe_validation_error(error, where) if isinstance(error, ValidationError) else str(error)
        raise InputError(f"decoder config of {where} is invalid: {detail}") from None


def read_part(
    source: SingleDecoderLoadConfig, path: Path, checkpoint: Checkpoint, config: dict[str, Any]
) -> DecoderPart:
    decoder_config = parse_decoder_config(config, str(path))
    have = len(decoder_config.unets)
    for number in source.unet_numbers:
        if number > have:
            raise InputError(f"unet_sources asks {path} for unet {number}, but its decoder has {have} unet(s)")
        prefix = f"unets.{number - 1}."
        if not any(key.startswith(prefix) for key in checkpoint.state_dict):
            saved = sorted({int(k.split(".")[1]) + 1 for k in checkpoint.state_dict if k.startswith("unets.")})
            raise InputError(
                f"unet_sources asks {path} for unet {number}, but it holds weights for unet(s) {saved} only "
                "(a checkpoint from training other unets?)"
            )
    with torch.device("meta"):
        layout = decoder_config.create()
    return DecoderPart(source, path, checkpoint, decoder_config, layout)


def check_fit(parts_by_unet: dict[int, DecoderPart]) -> None:
    """Refuse pieces that cannot form one cascade, naming the two files that disagree."""
    numbers = sorted(parts_by_unet)
    for lower, upper in pairwise(numbers):
        a, b = parts_by_unet[lower], parts_by_unet[upper]
        size_a, size_b = a.layout.image_sizes[lower - 1], b.layout.image_sizes[upper - 1]
        if size_b <= size_a:
            raise InputError(
                f"unet {upper} ({b.name}) makes {size_b}px images, not larger than unet {lower}'s "
                f"{size_a}px ({a.name}): the unets must go up in size"
            )
        steps_a, steps_b = a.config.timesteps, b.config.timesteps
        if steps_a != steps_b:
            raise InputError(
                f"unet {lower} ({a.name}) was trained with {steps_a} timesteps but unet {upper} "
                f"({b.name}) with {steps_b}: these decoders do not fit together"
            )
        channels_a, channels_b = a.config.channels, b.config.channels
        if channels_a != channels_b:
            raise InputError(
                f"unet {lower} ({a.name}) has {channels_a} channels but unet {upper} ({b.name}) has {channels_b}"
            )


def _beta_schedules(config: DecoderConfig, num_unets: int) -> tuple[str, ...]:
    if config.beta_schedule is not None:
        return tuple(config.beta_schedule)
    # dalle2-pytorch's default: cosine for the base unet, linear for the last upsampler.
    return ("cosine", *(("cosine",) * max(num_unets - 2, 0)), *(("linear",) * int(num_unets > 1)))


def stitched_config(parts_by_unet: dict[int, DecoderPart]) -> DecoderConfig:
    """The decoder config of the whole cascade, each unet keeping its own file's settings."""
    numbers = sorted(parts_by_unet)
    base = parts_by_unet[numbers[0]]
    per_unet: dict[str, list[Any]] = {
        key: []
        for key in (
            "unets",
            "image_sizes",
            "beta_schedule",
            "learned_variance",
            "sample_timesteps",
            "predict_x_start",
            "predict_v",
            "use_noise_for_lowres_cond",
            "use_blur_for_lowres_cond",
        )
    }
    for number in numbers:
        part, index = parts_by_unet[number], number - 1
        layout = part.layout
        lowres = layout.lowres_conds[index]
        per_unet["unets"].append(part.config.unets[index].model_dump())
        per_unet["image_sizes"].append(layout.image_sizes[index])
        per_unet["beta_schedule"].append(_beta_schedules(part.config, len(part.config.unets))[index])
        per_unet["learned_variance"].append(layout.learned_variance[index])
        per_unet["sample_timesteps"].append(layout.sample_timesteps[index])
        per_unet["predict_x_start"].append(layout.predict_x_start[index])
        per_unet["predict_v"].append(layout.predict_v[index])
        per_unet["use_noise_for_lowres_cond"].append(bool(lowres and lowres.use_noise))
        per_unet["use_blur_for_lowres_cond"].append(bool(lowres and lowres.use_blur))
    settings = base.config.model_dump(exclude={"clip", "image_size"})
    settings.update({key: tuple(values) if key != "unets" else values for key, values in per_unet.items()})
    if all(step is None for step in settings["sample_timesteps"]):
        settings["sample_timesteps"] = None
    return DecoderConfig(**settings)


def stitched_state_dict(parts_by_unet: dict[int, DecoderPart]) -> dict[str, torch.Tensor]:
    """Each unet's weights (and noise-schedule buffers) from the file that gives that unet."""
    base = parts_by_unet[min(parts_by_unet)]
    merged = {
        key: value for key, value in base.checkpoint.state_dict.items() if key.split(".", 1)[0] not in PER_UNET_MODULES
    }
    for number, part in parts_by_unet.items():
        prefixes = tuple(f"{module}.{number - 1}." for module in PER_UNET_MODULES)
        merged.update({k: v for k, v in part.checkpoint.state_dict.items() if k.startswith(prefixes)})
    return merged
