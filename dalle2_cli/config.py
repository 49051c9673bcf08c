"""The model configuration: dalle2-laion's JSON format, in pydantic 2.

A config names a CLIP, a diffusion prior and a decoder whose unets may come from several
files. Every model file is a `File`: a local path or a url, with optional checksums and cache.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dalle2_cli.errors import ConfigWarning, InputError
from dalle2_cli.io.textfiles import parse_json, read_text
from dalle2_cli.sampling.settings import MAX_CANDIDATES

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE_SCHEME = "package://"
MAX_UNETS = 16  # dalle2-pytorch cascades have 1-4; this only keeps a typo from allocating millions
MAX_NAME_BYTES = 255  # the longest file name common filesystems take
UNCLIP_INDEX = "model_index.json"  # what makes a folder a diffusers pipeline (Karlo's)
_REPO, _REVISION = r"[A-Za-z0-9][\w.-]*/[\w.-]+", r"(@[\w./-]+)?"
HUB_REPO = re.compile(_REPO + _REVISION)  # ORG/REPO[@REVISION]

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
UnetNumber = Annotated[int, Field(ge=1, le=MAX_UNETS)]


class _Section(BaseModel):
    # Python callers get an error for a key that is not a field; a config read from JSON has
    # its unknown keys set aside with a warning first (see `_set_aside_unknown_keys`).
    model_config = ConfigDict(extra="forbid")

    # Keys accepted under another name: {other name: field}.
    ALIASES: typing.ClassVar[dict[str, str]] = {}


class File(_Section):
    """One model or config file: `local` (a path) or `url` (downloaded into a cache).

    A `url` is http(s), or a Hugging Face hub file (`hf://ORG/REPO/PATH[@REV]` or a
    huggingface.co `resolve` url), which huggingface_hub fetches into its own cache; for those,
    `cache_dir`, `filename_override` and `checksum_file_path` are not needed and not used."""

    load_type: Literal["local", "url"]
    path: str = Field(min_length=1)
    checksum_file_path: str | None = None
    cache_dir: str | None = None
    filename_override: str | None = None
    sha256: str | None = None

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("must be 64 hexadecimal characters (a sha256 digest)")
        return value.lower() if value else value

    @field_validator("filename_override")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or "\\" in value or "\0" in value or value in (".", "..")):
            raise ValueError("must be a plain file name, without directories")
        if value is not None and len(value.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"is {len(value.encode())} bytes long; file names can be at most {MAX_NAME_BYTES}")
        return value

    @model_validator(mode="after")
    def _url_scheme(self) -> File:
        # Only http(s), and Hugging Face hub files (fetched over https by huggingface_hub).
        if self.load_type == "url" and not re.match(r"(https?|hf)://", self.path):
            raise ValueError(f"url files need an http://, https:// or hf:// path, got {self.path[:200]!r}")
        return self

    def resolve_relative_to(self, base_dir: Path) -> File:
        """Local paths in a config file are relative to the config file's directory."""
        if self.load_type != "local":
            return self
        if self.path.startswith(PACKAGE_SCHEME):
            path = PACKAGE_DIR / self.path[len(PACKAGE_SCHEME) :]
        else:
            path = base_dir / Path(self.path).expanduser()
        return self.model_copy(update={"path": str(path)})


class ClipConfig(_Section):
    """Which CLIP to use, and where its weights come from.

    dalle2-pytorch's `AdapterConfig` is a valid ClipConfig: `make` (default `openai`), `model`
    (default `ViT-L/14`; `openai` downloads it from OpenAI) and `base_model_kwargs` (x-clip's
    or CoCa's constructor arguments), which is read as `architecture`. `architecture` also
    describes an open_clip model that has no name (`embed_dim`, `vision_cfg`, `text_cfg`).
    `load_model_from` loads the weights from a file instead of the internet.
    """

    ALIASES: typing.ClassVar[dict[str, str]] = {"base_model_kwargs": "architecture"}

    make: Literal["openai", "open_clip", "x-clip", "coca", "transformers"] = "openai"
    model: str = "ViT-L/14"
    pretrained: str | None = None
    architecture: dict[str, Any] | None = None
    load_model_from: File | None = None
    # make "transformers": the model's config.json (its weights are `load_model_from`), as the
    # hub's openai/clip-vit-large-patch14 has them.
    load_config_from: File | None = None
    adapter_overrides: dict[str, Any] = Field(default_factory=dict)
    # Text to image draws this many images for each one it keeps, CLIP keeping the closest to
    # the prompt (DALL·E 2's reranking; `--rerank K` overrides it). Not in dalle2-laion's format.
    default_rerank: int | None = Field(default=None, ge=1, le=MAX_CANDIDATES)

    @model_validator(mode="before")
    @classmethod
    def _dalle2_pytorch_spelling(cls, data: Any) -> Any:
        if isinstance(data, dict) and "base_model_kwargs" in data:
            data = dict(data)
            kwargs = data.pop("base_model_kwargs")
            if data.get("architecture") is not None and kwargs is not None:
                raise ValueError("give 'architecture' or 'base_model_kwargs' (dalle2-pytorch's name for it), not both")
            if kwargs is not None:
                data["architecture"] = kwargs
        return data

    @model_validator(mode="after")
    def _enough_to_build(self) -> ClipConfig:
        if self.make in ("x-clip", "coca") and self.architecture is None:
            raise ValueError(f"make {self.make!r} needs an 'architecture' (the model's arguments)")
        if self.make == "openai" and self.architecture is not None:
            raise ValueError("make 'openai' takes a 'model' name, not an 'architecture'")
        if self.make == "transformers" and (self.load_model_from is None or self.load_config_from is None):
            raise ValueError(
                "make 'transformers' needs 'load_model_from' (its weights) and 'load_config_from' (its config.json)"
            )
        if self.make != "transformers" and self.load_config_from is not None:
            raise ValueError("'load_config_from' is for make 'transformers' (a config.json beside the weights)")
        return self


Sampler = Literal["ddpm", "ddim", "dpm++2m"]


class PriorLoadConfig(_Section):
    load_model_from: File
    load_config_from: File | None = None
    default_sample_timesteps: int | None = Field(default=None, gt=0)
    default_cond_scale: FiniteFloat | None = None
    default_sampler: Sampler | None = None
    default_ddim_eta: FiniteFloat | None = Field(default=None, ge=0)


class SingleDecoderLoadConfig(_Section):
    load_model_from: File
    load_config_from: File | None = None
    unet_numbers: list[UnetNumber] = Field(min_length=1, max_length=MAX_UNETS)
    default_sample_timesteps: list[int] | None = None
    default_cond_scale: list[FiniteFloat] | None = None
    default_sampler: Sampler | None = None  # for every unet of this source
    default_ddim_eta: FiniteFloat | None = Field(default=None, ge=0)  # likewise

    @field_validator("unet_numbers")
    @classmethod
    def _once_each(cls, numbers: list[int]) -> list[int]:
        if len(set(numbers)) != len(numbers):
            raise ValueError("a unet number is listed twice")
        return numbers

    @field_validator("default_sample_timesteps")
    @classmethod
    def _positive_steps(cls, steps: list[int] | None) -> list[int] | None:
        if steps is not None and any(s < 1 for s in steps):
            raise ValueError("sample timesteps must be positive")
        return steps

    @model_validator(mode="after")
    def _one_value_per_unet(self) -> SingleDecoderLoadConfig:
        for name in ("default_sample_timesteps", "default_cond_scale"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.unet_numbers):
                raise ValueError(
                    f"{name} has {len(values)} values for {len(self.unet_numbers)} unets "
                    f"{self.unet_numbers}: give one per unet"
                )
        return self


class DecoderLoadConfig(_Section):
    unet_sources: list[SingleDecoderLoadConfig] = Field(min_length=1, max_length=MAX_UNETS)
    # dalle2-laion computes this (the last unet's number) and its scripts read it; a value in
    # the file is accepted and replaced by the computed one, as dalle2-laion does.
    final_unet_number: int | None = None

    @field_validator("unet_sources")
    @classmethod
    def _cover_every_unet_once(cls, sources: list[SingleDecoderLoadConfig]) -> list[SingleDecoderLoadConfig]:
        seen: dict[int, int] = {}
        for index, source in enumerate(sources):
            for number in source.unet_numbers:
                if number in seen:
                    raise ValueError(
                        f"unet {number} comes from both unet_sources[{seen[number]}] and unet_sources[{index}]"
                    )
                seen[number] = index
        missing = sorted(set(range(1, max(seen) + 1)) - set(seen))
        if missing:
            raise ValueError(f"no source gives unet(s) {missing}: cover 1..{max(seen)} exactly once")
        return sources

    @model_validator(mode="after")
    def _final_unet(self) -> DecoderLoadConfig:
        self.final_unet_number = self.num_unets
        return self

    @property
    def num_unets(self) -> int:
        return sum(len(s.unet_numbers) for s in self.unet_sources)


class UnclipLoadConfig(_Section):
    """A diffusers unCLIP pipeline, as Kakao Brain's Karlo is published: `local`, a folder with
    `model_index.json`; or `url`, a hub repository `hf://ORG/REPO[@REVISION]`. Its CLIP, prior
    and decoder are all in it (each component's files are found by diffusers' layout)."""

    load_type: Literal["local", "url"]
    path: str = Field(min_length=1)
    # Which weight files a hub repository has (None: safetensors, else pickled .bin, read with
    # torch.load(weights_only=True)); a local folder is looked at.
    weights: Literal["safetensors", "bin"] | None = None
    # Another unCLIP pipeline whose CLIP image tower (image_encoder/) this one borrows, when it
    # has none: Karlo's text-to-image repository has none, and reranking needs one.
    image_encoder_from: UnclipLoadConfig | None = None

    @model_validator(mode="after")
    def _folder_or_repository(self) -> UnclipLoadConfig:
        if self.load_type == "url" and not re.fullmatch(rf"hf://{_REPO}/?{_REVISION}", self.path):
            raise ValueError(
                f"a hub unCLIP pipeline is hf://ORG/REPO or hf://ORG/REPO@REVISION, got {self.path[:200]!r}"
            )
        return self

    def resolve_relative_to(self, base_dir: Path) -> UnclipLoadConfig:
        update: dict[str, Any] = {}
        if self.load_type == "local":
            update["path"] = str(base_dir / Path(self.path).expanduser())
        if self.image_encoder_from is not None:
            update["image_encoder_from"] = self.image_encoder_from.resolve_relative_to(base_dir)
        return self.model_copy(update=update)


class Vocabulary(_Section):
    """The words a model was trained on, for a model that knows few (the shipped `shapes`): a
    prompt with other words gets a warning naming them, and `summary` says what it knows."""

    words: list[str] = Field(min_length=1)
    summary: str = ""


class ModelLoadConfig(_Section):
    """A whole DALL·E 2: CLIP, prior and decoder, and how to load them."""

    clip: ClipConfig | None = None
    prior: PriorLoadConfig | None = None
    decoder: DecoderLoadConfig | None = None
    unclip: UnclipLoadConfig | None = None  # a diffusers unCLIP pipeline (Karlo): CLIP, prior and decoder in one
    devices: str | list[str] | None = None
    load_on_cpu: bool = True
    strict_loading: bool = True
    vocabulary: Vocabulary | None = None

    # Where the config came from: its local paths are relative to this directory.
    source_path: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _set_aside_unknown_keys(cls, data: Any, info: ValidationInfo) -> Any:
        """dalle2-laion ignored keys it did not know, so configs in the wild carry some: each is
        dropped with a warning that names the nearest known key (a typo stays visible)."""
        if not isinstance(data, dict):
            return data
        where = (info.context or {}).get("where") or str(data.get("source_path") or "config")
        for message in _drop_unknown_keys(data := dict(data), cls, ""):
            warnings.warn(f"{where}: {message}", ConfigWarning, stacklevel=2)
        return data

    @field_validator("devices")
    @classmethod
    def _some_device(cls, devices: str | list[str] | None) -> str | list[str] | None:
        if isinstance(devices, list) and not devices:
            raise ValueError("give at least one device, or leave 'devices' out")
        return devices

    @model_validator(mode="after")
    def _one_kind_of_model(self) -> ModelLoadConfig:
        given = [name for name in ("clip", "prior", "decoder") if getattr(self, name) is not None]
        if self.unclip is not None and given:
            raise ValueError(f"'unclip' holds its own CLIP, prior and decoder: leave out {', '.join(given)}")
        return self

    @model_validator(mode="after")
    def _relative_paths(self) -> ModelLoadConfig:
        base = self.source_path.parent if self.source_path else Path.cwd()
        _resolve_files(self, base)
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any], source_path: Path | None = None) -> ModelLoadConfig:
        where = str(source_path) if source_path else "config"
        if not isinstance(data, dict):
            raise InputError(f"{where}: a config is a JSON object, got {type(data).__name__}")
        try:
            return cls.model_validate({**data, "source_path": source_path}, context={"where": where})
        except ValidationError as error:
            raise InputError(describe_validation_error(error, where)) from None

    @classmethod
    def from_json_path(cls, path: str | Path) -> ModelLoadConfig:
        path = Path(path)
        data = parse_json(read_text(path, "config"), f"config {path}")
        return cls.from_dict(data, source_path=path.resolve())

    @property
    def device(self) -> str | None:
        """The device named in the config (the first one when it lists several)."""
        return self.devices[0] if isinstance(self.devices, list) else self.devices


def _section_types(annotation: Any) -> list[type[_Section]]:
    """The config sections a field holds: `File | None` and `list[SingleDecoderLoadConfig]` too."""
    if isinstance(annotation, type) and issubclass(annotation, _Section):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        return [found for arg in typing.get_args(annotation) for found in _section_types(arg)]
    return []


def _drop_unknown_keys(data: dict[str, Any], section: type[_Section], path: str) -> list[str]:
    """Remove from `data` (in place, nested sections copied first) the keys `section` does not
    know; one message per key removed."""
    known = [*section.model_fields, *section.ALIASES]
    messages = []
    for key in list(data):
        if key in known:
            continue
        del data[key]
        near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        messages.append(f"{path}{str(key)[:80]}: unknown key, ignored{hint}")
    for name, field in section.model_fields.items():
        kinds = _section_types(field.annotation)
        value = data.get(name)
        if not kinds or value is None:
            continue
        if isinstance(value, dict):
            data[name] = value = dict(value)
            messages += _drop_unknown_keys(value, kinds[0], f"{path}{name}.")
        elif isinstance(value, list):
            data[name] = value = [dict(item) if isinstance(item, dict) else item for item in value]
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    messages += _drop_unknown_keys(item, kinds[0], f"{path}{name}[{index}].")
    return messages


def _resolve_files(model: BaseModel, base: Path) -> None:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, File | UnclipLoadConfig):
            object.__setattr__(model, name, value.resolve_relative_to(base))
        elif isinstance(value, BaseModel):
            _resolve_files(value, base)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    _resolve_files(item, base)


def describe_validation_error(error: ValidationError, where: str, most: int = 3) -> str:
    """One line: `where: field.path: what is wrong`, for the first `most` problems."""
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling)"
        problems.append(f"{location}: {message}")
    more = f" (and {len(problems) - most} more)" if len(problems) > most else ""
    return f"{where}: {'; '.join(problems[:most])}{more}"


def config_dirs() -> list[Path]:
    """Where `-c NAME` looks: configs shipped in the wheel, then the repository's configs/."""
    return [d for d in (PACKAGE_DIR / "configs", PACKAGE_DIR.parent / "configs") if d.is_dir()]


def available_configs() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for directory in reversed(config_dirs()):
        found.update({p.stem: p for p in sorted(directory.glob("*.json"))})
    return dict(sorted(found.items()))


def find_config(name_or_path: str) -> Path:
    """A config named by path, or by the name of a file in configs/ (with or without .json)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        raise InputError(
            f"config {name_or_path} is a directory without {UNCLIP_INDEX}: give a .json config, or a diffusers "
            "unCLIP folder (Karlo's)"
        )
    if path.exists():
        return path  # a pipe or a device is refused, in a line, when it is read
    configs = available_configs()
    name = name_or_path.removesuffix(".json")
    if name in configs:
        return configs[name]
    near = [known for known in configs if known.lower() == name.lower()]
    near = near or difflib.get_close_matches(name, list(configs), n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else f" ({', '.join(configs) or 'none'})"
    raise InputError(f"unknown config {name_or_path!r}: not a file, and not one of the shipped configs{hint}")


def load_config(name_or_path: str) -> ModelLoadConfig:
    """A config by path or shipped name; or a diffusers unCLIP pipeline, by its folder or its
    hub repository id (`kakaobrain/karlo-v1-alpha`, a shipped preset's own when one names it)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / UNCLIP_INDEX).is_file():
        return ModelLoadConfig.from_dict({"unclip": {"load_type": "local", "path": str(path.resolve())}})
    if not path.exists() and name_or_path.removesuffix(".json") not in available_configs():
        # ORG/REPO is a hub repository, unless ORG is a local folder (a mistyped path, then).
        if HUB_REPO.fullmatch(name_or_path) and not path.parent.is_dir():
            return unclip_repository_config(name_or_path)
    return ModelLoadConfig.from_json_path(find_config(name_or_path))


def unclip_repository_config(repo: str) -> ModelLoadConfig:
    """The config of a hub repository holding a diffusers unCLIP pipeline: a shipped preset's
    when one names that repository (its weight format, and the image tower it borrows), else
    the repository's main branch."""
    for preset in available_configs().values() if "@" not in repo else []:
        try:
            config = ModelLoadConfig.from_json_path(preset)
        except InputError:
            continue
        if config.unclip is not None and config.unclip.path.removeprefix("hf://").split("@")[0] == repo:
            return config
    return ModelLoadConfig.from_dict({"unclip": {"load_type": "url", "path": f"hf://{repo}"}})
