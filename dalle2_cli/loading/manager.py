"""`DalleModelManager`: loads a config's CLIP, prior and decoder, each only when first used."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from dalle2_pytorch import Decoder, DiffusionPrior
from dalle2_pytorch.dalle2_pytorch import BaseClipAdapter
from dalle2_pytorch.train_configs import DiffusionPriorConfig
from dalle2_pytorch.version import __version__ as DALLE2_VERSION
from pydantic import ValidationError

from dalle2_cli.config import File, ModelLoadConfig, describe_validation_error
from dalle2_cli.errors import InputError
from dalle2_cli.io.textfiles import read_json
from dalle2_cli.loading.checkpoint import Checkpoint, load_weights, new_model, read_checkpoint, stage_of
from dalle2_cli.loading.choices import Weights
from dalle2_cli.loading.clip import build_clip, text_encoding_dim
from dalle2_cli.loading.devices import resolve_device
from dalle2_cli.loading.precision import (
    aligned_in_memory,
    cast_parameters,
    compute_in_fp32,
    convert_on_first_use,
    cpu_computes_in,
    restore_parameters,
)
from dalle2_cli.loading.stitch import check_fit, read_part, stitched_config, stitched_state_dict
from dalle2_cli.sampling.settings import StageDefaults
from dalle2_cli.sources.resolve import is_offline, resolve_file

M = TypeVar("M", bound=torch.nn.Module)


class DalleModelManager:
    """Holds the models of one config. Nothing is loaded until a script asks for it, so a
    variation, which needs no prior, never reads the prior's file."""

    def __init__(
        self,
        config: ModelLoadConfig,
        device: str | None = None,
        resolve: Callable[[File], Path] | None = None,
        log: Callable[[str], None] | None = None,
        warn: Callable[[str], None] | None = None,
        weights: Weights | str = Weights.ema,
        strict: bool | None = None,
        dtype: torch.dtype = torch.float32,
        keep_resident: bool = False,
        low_memory: bool = False,
        compile: bool | str = False,
        name: str | None = None,
        offline: bool | None = None,
    ):
        """`weights`: a file's EMA weights when it has them (they generate better), or raw;
        `strict`: overrides the config's `strict_loading`; `dtype`: the weights' precision
        (sampling then runs under autocast, see InferenceScript); `keep_resident`: keep every
        model on an accelerator device, instead of only the stage that runs (see `using`);
        `low_memory`: hold only the running stage's weights in memory (see `using`): models
        keep the file's memory-mapped weights, converted to `dtype` for each stage and handed
        back after;
        `compile`: torch.compile the prior's network and each decoder unet (see
        `compile_networks`; a string names the torch.compile backend, default inductor);
        `log` receives what is loaded (default: stderr), `warn` what the user should know
        (default: `log`, as "warning: ..."); `name`: the config's name, for metadata;
        `offline`: never touch the network (default: the user's HF_HUB_OFFLINE); `resolve`
        turns a config's `File` into a path (default: dalle2_cli.sources.resolve.resolve_file)."""
        self.config = config
        # How images' metadata names the config: as the user named it (`shapes`), else its file.
        self.name = name or (str(config.source_path) if config.source_path else "config")
        self.dtype = dtype
        self.weights = Weights(weights)
        self.strict = config.strict_loading if strict is None else strict
        self.device = resolve_device(device or config.device)
        # On an accelerator, models wait in host memory and only the running stage's sits on
        # the device, as dalle2-laion did: a 1.5B decoder and a prior need not fit together.
        self.offload = self.device.type != "cpu" and not keep_resident
        self.low_memory = low_memory
        # Loaded weights stay as the file has them (memory-mapped, read from disk when touched)
        # until they run: with low_memory, converted to `dtype` for each stage (see `using`);
        # on the CPU, converted layer by layer at first use; on an accelerator, at load (it
        # would hold the float32 copy until then).
        self.convert_on_use = dtype != torch.float32 and self.device.type == "cpu" and not low_memory
        self.stored_dtype = torch.float32 if low_memory or self.convert_on_use else dtype
        self.compile = compile
        self.offline = is_offline() if offline is None else offline
        # Named in messages about files missing offline (`dalle2 models download -c NAME`).
        self.resolve = resolve or functools.partial(resolve_file, offline=self.offline, config_name=name)
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.warn = warn or (lambda message: self.log(f"warning: {message}"))
        # What the networks compute in: the weights' dtype, except on a CPU without that
        # arithmetic, where half-precision weights are handed to each layer in float32.
        self.compute_dtype = dtype
        if self.device.type == "cpu" and not cpu_computes_in(dtype):
            self.compute_dtype = torch.float32
            name = str(dtype).removeprefix("torch.")
            self.log(
                f"this CPU has no {name} arithmetic (AVX512-BF16, AVX512-FP16 or AMX): weights are kept in "
                f"{name} (half the memory) and computed in fp32, about as fast as --dtype fp32"
            )
        self.files: dict[str, Path] = {}  # role -> resolved path, for metadata
        self._digests: dict[str, str] = {}  # role -> sha256, see sha256()
        self.versions: dict[str, str | None] = {}  # role -> dalle2-pytorch version that wrote the file
        self._clip: BaseClipAdapter | None = None
        self._prior: DiffusionPrior | None = None
        self._decoder: Decoder | None = None
        # Per unet: the noise level its low-resolution conditioning gets at sampling time, as
        # that unet's own file says (a stitched upsampler keeps its own, not unet 1's).
        self.lowres_noise_levels: list[float] = []
        # A diffusers unCLIP pipeline (Karlo) holds all three parts; see dalle2_cli.karlo.
        self._karlo = None
        if config.unclip is not None:
            from dalle2_cli.karlo.models import KarloLoader

            self._karlo = KarloLoader(config.unclip, self._resolve, self.strict, self.stored_dtype, self.log, self.warn)

    def has(self, part: str) -> bool:
        """Whether the config gives this part (`clip`, `prior` or `decoder`). For a diffusers
        pipeline, the prior is known once its model index is read (variations have none)."""
        if self._karlo is not None:
            return part != "prior" or self._karlo.has("prior")
        return getattr(self.config, part) is not None

    def require_image_tower(self) -> None:
        """Stop before any weights are read when CLIP's image tower, which the run needs
        (variations, reranking), is missing: Karlo's text-to-image pipeline has none."""
        if self._karlo is None:
            self._require("clip")
        elif not self._karlo.has_image_tower():
            from dalle2_cli.loading.transformers_clip import NO_IMAGE_TOWER

            raise InputError(NO_IMAGE_TOWER)

    def sha256(self) -> dict[str, str]:
        """The sha256 of each model file loaded so far, by role: the bytes as this manager read
        them, hashed once each (a server's every batch records them without hashing again)."""
        from dalle2_cli.sources.digests import model_file_sha256

        for role, path in self.files.items():
            if role not in self._digests:
                self._digests[role] = model_file_sha256(path)
        return {role: self._digests[role] for role in self.files}

    @property
    def map_location(self) -> str:
        return "cpu" if self.config.load_on_cpu else str(self.device)

    def _require(self, part: str) -> Any:
        value = getattr(self.config, part)
        if value is None:
            where = self.config.source_path or "the config"
            raise InputError(f"{where} has no '{part}' section, which this command needs")
        return value

    def _resolve(self, role: str, file: File) -> Path:
        path = self.resolve(file)
        self.files[role] = path
        return path

    def _checkpoint(self, role: str, file: File) -> Checkpoint:
        path = self._resolve(role, file)
        checkpoint = read_checkpoint(path, self.weights, map_location=self.map_location)
        stage = stage_of(list(checkpoint.state_dict))
        expected = role.split()[0]  # "prior" or "decoder"
        if stage != "unknown" and not stage.startswith(expected):
            raise InputError(f"{path} holds a {stage}, but the config gives it as the {role}")
        self.log(f"loaded {role} {path.name} ({checkpoint.format}, {checkpoint.weights.upper()} weights)")
        self.versions[role] = checkpoint.version
        if checkpoint.version and checkpoint.version != DALLE2_VERSION:
            self.warn(f"{path.name} was written by dalle2-pytorch {checkpoint.version}; {DALLE2_VERSION} is installed")
        if self.weights == Weights.raw and checkpoint.weights == Weights.ema:
            self.warn(
                f"raw weights asked for, but {path.name} holds only EMA weights ({checkpoint.format}): using them"
            )
        return checkpoint

    def _model_config(self, role: str, checkpoint: Checkpoint, config_file: File | None) -> dict:
        """The training config: `load_config_from`, else the file's own, else a JSON beside it."""
        if config_file is not None:
            return _read_json(self._resolve(f"{role} config", config_file), role)
        if checkpoint.config is not None:
            return checkpoint.config
        beside = checkpoint.path.with_suffix(".json")
        if beside.is_file():
            self.log(f"{checkpoint.path.name} has no embedded config: using {beside.name} beside it")
            self.files[f"{role} config"] = beside
            return _read_json(beside, role)
        raise InputError(
            f"{checkpoint.path} has no embedded config and no {beside.name} beside it: "
            "add 'load_config_from' pointing at its JSON config"
        )

    # -- the three models ---------------------------------------------------------------

    @property
    def clip(self) -> BaseClipAdapter:
        if self._clip is None and self._karlo is not None:
            self._clip = self._placed(self._karlo.clip())
        if self._clip is None:
            clip_config = self._require("clip")
            resolve = lambda file: self._resolve("clip", file)  # noqa: E731
            clip = build_clip(clip_config, resolve, self.strict, self.map_location, self.offline, self.stored_dtype)
            self._clip = self._placed(clip)
        return self._clip

    @property
    def prior(self) -> DiffusionPrior:
        if self._prior is None:
            self._prior = self._compiled(self._placed(self._karlo.prior())) if self._karlo else self._load_prior()
        return self._prior

    @property
    def decoder(self) -> Decoder:
        if self._decoder is None and self._karlo is not None:
            self._decoder = self._compiled(self._placed(self._karlo.decoder()))
            self.lowres_noise_levels = [0.0] * self._decoder.num_unets  # Karlo's upsampler takes its input as it is
        if self._decoder is None:
            self._decoder = self._load_decoder()
        return self._decoder

    def _load_prior(self) -> DiffusionPrior:
        source = self._require("prior")
        checkpoint = self._checkpoint("prior", source.load_model_from)
        data = self._model_config("prior", checkpoint, source.load_config_from)
        section = data.get("prior", data)
        try:
            prior_config = DiffusionPriorConfig(**{**section, "clip": None})
        except (ValidationError, TypeError) as error:
            detail = describe_validation_error(error, "prior") if isinstance(error, ValidationError) else error
            raise InputError(f"prior config of {checkpoint.path} is invalid: {detail}") from None
        clip = self.clip
        if clip.dim_latent != prior_config.image_embed_dim:
            raise InputError(
                f"the prior ({checkpoint.path}) makes {prior_config.image_embed_dim}-d image embeddings "
                f"but the CLIP's are {clip.dim_latent}-d: they were not trained together"
            )
        prior = new_model(prior_config.create, weights_follow=self.strict)
        self._warn(
            load_weights(
                prior,
                checkpoint.state_dict,
                self.strict,
                f"prior {checkpoint.path}",
                checkpoint.version,
                self.stored_dtype,
            )
        )
        prior = self._compiled(self._placed(prior))
        # Set after construction (the prior then reads CLIP's text encodings) and after placing:
        # the CLIP is placed already, and its layers must not get the prior's precision hooks twice.
        prior.clip = clip
        return prior

    def _load_decoder(self) -> Decoder:
        sources = self._require("decoder").unet_sources
        parts_by_unet = {}
        for source in sources:
            role = f"decoder unets {','.join(map(str, source.unet_numbers))}"
            checkpoint = self._checkpoint(role, source.load_model_from)
            data = self._model_config(role, checkpoint, source.load_config_from)
            part = read_part(source, checkpoint.path, checkpoint, data)
            parts_by_unet.update({number: part for number in source.unet_numbers})
        check_fit(parts_by_unet)
        decoder = new_model(stitched_config(parts_by_unet).create, weights_follow=self.strict)
        self.lowres_noise_levels = [
            float(parts_by_unet[number].layout.lowres_noise_sample_level) for number in sorted(parts_by_unet)
        ]
        versions = {p.checkpoint.version for p in parts_by_unet.values()} - {None}
        names = ", ".join(sorted({p.name for p in parts_by_unet.values()}))
        self._warn(
            load_weights(
                decoder,
                stitched_state_dict(parts_by_unet),
                self.strict,
                f"decoder {names}",
                next(iter(versions), None),
                self.stored_dtype,
            )
        )
        self._check_decoder_fits_clip(decoder, names)
        return self._compiled(self._placed(decoder))

    def _check_decoder_fits_clip(self, decoder: Decoder, names: str) -> None:
        if self.config.clip is None:
            return
        clip = self.clip
        first = decoder.unets[0]
        embed_dim = getattr(first, "image_embed_dim", None)
        if embed_dim is not None and embed_dim != clip.dim_latent:
            raise InputError(
                f"the decoder ({names}) takes {embed_dim}-d image embeddings but the CLIP makes "
                f"{clip.dim_latent}-d ones: they were not trained together"
            )
        text_dim = text_encoding_dim(clip)
        for number, unet in enumerate(decoder.unets, 1):
            if unet.cond_on_text_encodings and text_dim is not None and unet.text_embed_dim != text_dim:
                raise InputError(
                    f"decoder unet {number} ({names}) takes {unet.text_embed_dim}-d text encodings "
                    f"but the CLIP makes {text_dim}-d ones"
                )

    def _placed(self, model: M) -> M:
        """On the device, in eval mode, with parameters in the chosen precision (loading stores
        most in it already; a CLIP open_clip downloads comes in float32)."""
        model = model.to("cpu" if self.offload else self.device).eval()
        if self.device.type == "cpu" and self.dtype == torch.float32 and not self.low_memory:
            # Weights used as the file has them: in aligned memory (--low-memory keeps the
            # file's pages, to hand them back between stages).
            aligned_in_memory(model)
        if self.dtype != torch.float32:
            if self.convert_on_use:
                convert_on_first_use(model, self.dtype)
            else:
                cast_parameters(model, self.stored_dtype)
            if self.compute_dtype == torch.float32:
                compute_in_fp32(model)
        return model

    def _compiled(self, model: M) -> M:
        if self.compile:
            compile_networks(model, backend=self.compile if isinstance(self.compile, str) else "inductor")
        return model

    @contextlib.contextmanager
    def using(self, *models: torch.nn.Module) -> Iterator[None]:
        """`models` ready to run for this block: on the device (when offloading, back in host
        memory after) and, with low_memory, with their weights in `dtype` for the block only,
        the file's pages handed back after (they are read again from the file next time)."""
        stored = [self._in_precision(model) for model in models] if self.low_memory else []
        if self.offload:
            for model in models:
                model.to(self.device)
        try:
            yield
        finally:
            # The host-memory weights first: offloading then moves only the buffers back.
            for model, weights in zip(models, stored, strict=False):
                restore_parameters(model, weights)
            if self.offload:
                for model in models:
                    model.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _in_precision(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Convert `model`'s half-precision weights to `dtype`; returns them as they were."""
        weights = {name: parameter.data for name, parameter in model.named_parameters()}
        if self.dtype != torch.float32:
            cast_parameters(model, self.dtype)
        return weights

    def _warn(self, warnings: list[str]) -> None:
        for message in warnings:
            self.warn(message)

    # -- defaults from the config -------------------------------------------------------

    def prior_defaults(self) -> StageDefaults:
        """The config's sampling defaults for the prior."""
        if self._karlo is not None:
            from dalle2_cli.karlo.models import PRIOR_DEFAULTS

            return PRIOR_DEFAULTS
        source = self._require("prior")
        return StageDefaults(
            source.default_sample_timesteps, source.default_cond_scale, source.default_sampler, source.default_ddim_eta
        )

    def rerank_default(self) -> int:
        """Images text to image draws for each one it keeps: the config's `clip.default_rerank`,
        else 1 (no reranking)."""
        clip = self.config.clip
        return clip.default_rerank if clip is not None and clip.default_rerank is not None else 1

    def decoder_defaults(self) -> list[StageDefaults]:
        """The config's sampling defaults for each unet."""
        if self._karlo is not None:
            from dalle2_cli.karlo.models import DECODER_DEFAULTS

            return list(DECODER_DEFAULTS)
        sources = self._require("decoder").unet_sources
        defaults = [StageDefaults()] * self.config.decoder.num_unets
        for source in sources:
            for position, number in enumerate(source.unet_numbers):
                steps = source.default_sample_timesteps[position] if source.default_sample_timesteps else None
                scale = source.default_cond_scale[position] if source.default_cond_scale else None
                defaults[number - 1] = StageDefaults(steps, scale, source.default_sampler, source.default_ddim_eta)
        return defaults


def compile_networks(model: DiffusionPrior | Decoder, backend: str = "inductor") -> None:
    """torch.compile the networks that sampling runs every step: the prior's transformer, each
    decoder unet. Their `forward` is replaced on the instance, since dalle2-pytorch's guided
    sampling calls `forward` itself (not the module). The first batch of each shape pays for
    compiling (a minute or more on a CPU); later batches of that shape run the compiled code.
    Same images as without, up to float rounding (compiled kernels may fuse and reorder)."""
    for net in [model.net] if hasattr(model, "net") else list(model.unets):
        if not getattr(net.forward, "dalle2_cli_compiled", False):
            compiled = torch.compile(net.forward, backend=backend)
            compiled.dalle2_cli_compiled = True
            net.forward = compiled


def _read_json(path: Path, role: str) -> dict:
    data = read_json(path, f"{role} config")
    if not isinstance(data, dict):
        raise InputError(f"{role} config {path} is not a JSON object (a training config or its section)")
    return data
