"""Karlo's networks, loaded from a diffusers unCLIP pipeline (dalle2_cli.karlo.layout) and held
as a prior and a two-stage decoder that sampling drives like dalle2-pytorch's (the stages are in
dalle2_cli.karlo.stages). diffusers provides the three network classes (`PriorTransformer`,
`UNet2DConditionModel`, `UNet2DModel`); the text projection and the schedule are ours, and the
CLIP towers are open_clip's, loaded from transformers' layout (no transformers needed).

Each network is built without weights and takes the file's tensors (memory-mapped), read with
safetensors or `torch.load(weights_only=True)`; half precision and `--low-memory` work as for
dalle2-pytorch's models (the manager places them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dalle2_cli.config import File, UnclipLoadConfig
from dalle2_cli.errors import InputError
from dalle2_cli.io.textfiles import read_json
from dalle2_cli.karlo.layout import NETWORKS, UnclipLayout, first_available, read_index
from dalle2_cli.karlo.schedule import KarloSchedule
from dalle2_cli.karlo.stages import KarloDecoderStage, KarloPriorStage, KarloSuperResStage, Text
from dalle2_cli.karlo.text_proj import TextProjection
from dalle2_cli.loading.checkpoint import load_weights, new_model, read_checkpoint
from dalle2_cli.loading.precision import compute_dtype
from dalle2_cli.sampling.settings import StageDefaults, Trained

NULL_TEXT = ""  # guidance's null branch reads the empty prompt
PRIOR_DEFAULTS = StageDefaults(25, 4.0, "ddpm")
DECODER_DEFAULTS = [StageDefaults(25, 8.0, "ddpm"), StageDefaults(7, 1.0, "ddpm")]


class KarloPrior(nn.Module):
    """`PriorTransformer` and its schedule, read by sampling as a prior."""

    can_classifier_guidance = True
    condition_on_text_encodings = True
    sample_timesteps = None
    null_text = NULL_TEXT

    def __init__(self, net: nn.Module, schedule: KarloSchedule):
        super().__init__()
        self.net, self.noise_scheduler = net, schedule

    @property
    def image_embed_dim(self) -> int:
        return int(self.net.clip_mean.shape[-1])

    def stage(self, conditions: Any, cond_scale: float, batched_guidance: bool = True) -> KarloPriorStage:
        return KarloPriorStage(self, Text.of(conditions), Text.of(conditions.negative), cond_scale, batched_guidance)


class KarloDecoder(nn.Module):
    """The 64 px decoder (with the text projection) and the 256 px super-resolution (first and
    last), read by sampling as a decoder of two unets."""

    num_unets = 2
    condition_on_text_encodings = True
    can_classifier_guidance = True
    # The super-resolution keeps DDPM and its 7 steps whatever the other stages take:
    # super_res_last was trained for the last of exactly 7.
    keeps_schedule = (False, True)
    ddim_sampling_eta = 0.0
    learned_variance_constrain_frac = False
    null_text = NULL_TEXT

    def __init__(self, text_proj: TextProjection, decoder: nn.Module, first: nn.Module, last: nn.Module, schedules):
        super().__init__()
        self.text_proj, self.decoder, self.super_res_first, self.super_res_last = text_proj, decoder, first, last
        self.noise_schedulers = list(schedules)
        self.image_sizes = [int(decoder.config.sample_size), int(first.config.sample_size)]

    @property
    def unets(self) -> list[nn.Module]:
        return [self.decoder, self.super_res_first, self.super_res_last]

    def trained(self, index: int) -> Trained:
        steps = self.noise_schedulers[index].num_timesteps
        return Trained(
            steps,
            guidable=index == 0,
            unguided_because="Karlo's super-resolution reads the 64 px image only: nothing to guide by",
        )

    def unnormalize_img(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1) * 0.5

    def stage(
        self,
        index: int,
        conditions: Any,
        noise: Any,
        cond_scale: float = 1.0,
        lowres_image: torch.Tensor | None = None,
        inpaint: Any = None,
        batched_guidance: bool = True,
        final_timestep: int = 0,
        **unused: Any,
    ):
        if index == 1:
            return KarloSuperResStage(self, lowres_image, final_timestep, inpaint)
        if conditions.text_embed is None:
            raise InputError("Karlo's decoder reads CLIP's text embedding with the text encodings: give the text")
        text, null = Text(conditions.text_embed, conditions.text_encodings), Text.of(conditions.null)
        return KarloDecoderStage(self, conditions.image_embed, text, null, cond_scale, inpaint, batched_guidance)


# -- loading --------------------------------------------------------------------------------

Resolve = Callable[[str, File], Path]  # (role, file) -> local path, recorded by the manager


class KarloLoader:
    """Reads one unCLIP pipeline's parts on demand, through `resolve` (the manager's, which
    records every file for the images' metadata)."""

    def __init__(self, section: UnclipLoadConfig, resolve: Resolve, strict: bool, dtype: torch.dtype, log, warn):
        self.layout = UnclipLayout(section)
        borrowed = section.image_encoder_from
        self.image_layout = UnclipLayout(borrowed) if borrowed is not None else None
        self.section, self.resolve, self.strict, self.dtype = section, resolve, strict, dtype
        self.log, self.warn = log, warn
        self._index: dict | None = None

    @property
    def index(self) -> dict:
        if self._index is None:
            self._index = read_index(self.resolve("model index", self.layout.index()), self.section.path)
        return self._index

    @property
    def kind(self) -> str:
        return self.index["_class_name"]

    def has(self, component: str) -> bool:
        return component in NETWORKS[self.kind]

    def has_image_tower(self) -> bool:
        """Whether CLIP's image tower comes with it: its own, or one borrowed (`image_encoder_from`)."""
        return self.has("image_encoder") or self.image_layout is not None

    def _layout(self, component: str) -> UnclipLayout:
        """Where a component comes from: this pipeline, or the one it borrows its image tower from."""
        if component == "image_encoder" and not self.has(component) and self.image_layout is not None:
            return self.image_layout
        return self.layout

    def _config(self, component: str) -> dict:
        path = self.resolve(f"{component} config", self._layout(component).config(component))
        data = read_json(path, f"{component} config")
        if not isinstance(data, dict):
            raise InputError(f"{path} is not a component config (a JSON object)")
        return data

    def _state_dict(self, component: str) -> tuple[Path, dict[str, torch.Tensor]]:
        resolve = functools.partial(self.resolve, component)
        _, path = first_available(self._layout(component).weights(component), resolve)
        checkpoint = read_checkpoint(path)
        self.log(f"loaded {component} {path.name} ({checkpoint.format})")
        return path, checkpoint.state_dict

    def _network(self, component: str, build: Callable[[dict], nn.Module]) -> nn.Module:
        config = self._config(component)
        try:
            net = new_model(lambda: build(config), weights_follow=self.strict)
        except (TypeError, ValueError) as error:
            raise InputError(f"{component} config of {self.section.path} does not build its network: {error}") from None
        path, state = self._state_dict(component)
        for message in load_weights(net, state, self.strict, f"{component} {path}", None, self.dtype):
            self.warn(message)
        return net.eval().requires_grad_(False)

    def _schedule(self, component: str) -> KarloSchedule:
        try:
            return KarloSchedule(self._config(component))
        except ValueError as error:
            raise InputError(f"{component} of {self.section.path}: {error}") from None

    def clip(self):
        from dalle2_cli.loading.transformers_clip import UnclipClipAdapter, build_open_clip

        towers = ["text_encoder", "image_encoder"] if self.has_image_tower() else ["text_encoder"]
        configs, state, paths = [], {}, []
        for component in towers:
            configs.append(self._config(component))
            path, part = self._state_dict(component)
            state.update(part)
            paths.append(path.name)
        model, warnings = build_open_clip(configs, state, self.strict, f"CLIP {', '.join(paths)}", self.dtype)
        for message in warnings:
            self.warn(message)
        return UnclipClipAdapter(model.eval()).eval().requires_grad_(False)

    def prior(self) -> KarloPrior:
        if not self.has("prior"):
            raise InputError(
                f"{self.section.path} is an image-variations pipeline: it has no prior, which this command needs "
                "(use karlo, the text-to-image one)"
            )
        net = self._network("prior", _network_class("PriorTransformer").from_config)
        return KarloPrior(net, self._schedule("prior_scheduler"))

    def decoder(self) -> KarloDecoder:
        def text_projection(config: dict) -> TextProjection:
            keys = ("clip_extra_context_tokens", "clip_embeddings_dim", "time_embed_dim", "cross_attention_dim")
            return TextProjection(**{key: config[key] for key in keys if key in config})

        return KarloDecoder(
            self._network("text_proj", text_projection),
            self._network("decoder", _network_class("UNet2DConditionModel").from_config),
            self._network("super_res_first", _network_class("UNet2DModel").from_config),
            self._network("super_res_last", _network_class("UNet2DModel").from_config),
            [self._schedule("decoder_scheduler"), self._schedule("super_res_scheduler")],
        )


def _diffusers() -> Any:
    """diffusers, for its network classes (an optional dependency)."""
    try:
        import diffusers
    except ImportError:
        raise InputError("Karlo's networks are diffusers' classes: pip install 'dalle2-cli[karlo]'") from None
    return diffusers


@functools.cache
def _network_class(name: str) -> type:
    """diffusers' network class `name`, its `dtype` saying what its layers compute in.

    diffusers casts some inputs (the prior's and the super-resolution's time embeddings) to the
    network's `dtype`, which it reads from the first parameter. Half-precision weights on a CPU
    without that arithmetic are read through a float32 parametrization
    (dalle2_cli.loading.precision.compute_in_fp32): the layers compute in float32, so those
    inputs must be float32 too."""
    return type(name, (getattr(_diffusers(), name),), {"dtype": property(compute_dtype), "__module__": __name__})
