"""The model configuration: dalle2-laion's JSON format, in pydantic 2.

A config names a CLIP, a diffusion prior and a decoder whose unets may come from several
files. Every model file is a `File`: a local path or a url, with optional checksums and cache.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dalle2_cli.errors import InputError

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE_SCHEME = "package://"


class _Strict(BaseModel):
    # A typo in a config key should be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class File(_Strict):
    """One model or config file: `local` (a path) or `url` (downloaded into a cache).

    A `url` is http(s), or a Hugging Face hub file (`hf://ORG/REPO/PATH[@REV]` or a
    huggingface.co `resolve` url), which huggingface_hub fetches into its own cache; for those,
    `cache_dir`, `filename_override` and `checksum_file_path` are not needed and not used."""

    load_type: Literal["local", "url"]
    path: str
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
        return value

    @model_validator(mode="after")
    def _url_scheme(self) -> File:
        # Only http(s), and Hugging Face hub files (fetched over https by huggingface_hub).
        if self.load_type == "url" and not re.match(r"(https?|hf)://", self.path):
            raise ValueError(f"url files need an http://, https:// or hf:// path, got {self.path!r}")
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


class ClipConfig(_Strict):
    """Which CLIP to use, and where its weights come from.

    `make` and `model` are dalle2-laion's (`openai` + `ViT-L/14` downloads from OpenAI).
    `architecture` describes a model that has no name: an open_clip model config
    (`embed_dim`, `vision_cfg`, `text_cfg`) or the keyword arguments of x-clip's / CoCa's
    constructor. `load_model_from` loads the weights from a file instead of the internet.
    """

    make: Literal["openai", "open_clip", "x-clip", "coca"] = "openai"
    model: str | None = None
    pretrained: str | None = None
    architecture: dict[str, Any] | None = None
    load_model_from: File | None = None
    adapter_overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _enough_to_build(self) -> ClipConfig:
        if self.make in ("x-clip", "coca") and self.architecture is None:
            raise ValueError(f"make {self.make!r} needs an 'architecture' (the model's arguments)")
        if self.make in ("openai", "open_clip") and not (self.model or self.architecture):
            raise ValueError(f"make {self.make!r} needs a 'model' name or an 'architecture'")
        if self.make == "openai" and self.architecture is not None:
            raise ValueError("make 'openai' takes a 'model' name, not an 'architecture'")
        return self


class PriorLoadConfig(_Strict):
    load_model_from: File
    load_config_from: File | None = None
    default_sample_timesteps: int | None = Field(default=None, gt=0)
    default_cond_scale: float | None = None


class SingleDecoderLoadConfig(_Strict):
    load_model_from: File
    load_config_from: File | None = None
    unet_numbers: list[int] = Field(min_length=1)
    default_sample_timesteps: list[int] | None = None
    default_cond_scale: list[float] | None = None

    @field_validator("unet_numbers")
    @classmethod
    def _positive(cls, numbers: list[int]) -> list[int]:
        if any(n < 1 for n in numbers):
            raise ValueError("unet numbers start at 1")
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


class DecoderLoadConfig(_Strict):
    unet_sources: list[SingleDecoderLoadConfig] = Field(min_length=1)

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

    @property
    def num_unets(self) -> int:
        return sum(len(s.unet_numbers) for s in self.unet_sources)


class ModelLoadConfig(_Strict):
    """A whole DALL·E 2: CLIP, prior and decoder, and how to load them."""

    clip: ClipConfig | None = None
    prior: PriorLoadConfig | None = None
    decoder: DecoderLoadConfig | None = None
    devices: str | list[str] | None = None
    load_on_cpu: bool = True
    strict_loading: bool = True

    # Where the config came from: its local paths are relative to this directory.
    source_path: Path | None = Field(default=None, exclude=True)

    @field_validator("devices")
    @classmethod
    def _some_device(cls, devices: str | list[str] | None) -> str | list[str] | None:
        if isinstance(devices, list) and not devices:
            raise ValueError("give at least one device, or leave 'devices' out")
        return devices

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
            return cls.model_validate({**data, "source_path": source_path})
        except ValidationError as error:
            raise InputError(describe_validation_error(error, where)) from None

    @classmethod
    def from_json_path(cls, path: str | Path) -> ModelLoadConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as error:
            raise InputError(f"cannot read config {path}: {error.strerror}") from None
        except json.JSONDecodeError as error:
            raise InputError(
                f"config {path} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
            ) from None
        return cls.from_dict(data, source_path=path.resolve())

    @property
    def device(self) -> str | None:
        """The device named in the config (the first one when it lists several)."""
        return self.devices[0] if isinstance(self.devices, list) else self.devices


def _resolve_files(model: BaseModel, base: Path) -> None:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, File):
            object.__setattr__(model, name, value.resolve_relative_to(base))
        elif isinstance(value, BaseModel):
            _resolve_files(value, base)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    _resolve_files(item, base)


def describe_validation_error(error: ValidationError, where: str) -> str:
    """One line per problem: `where: field.path: what is wrong`."""
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling)"
        lines.append(f"{where}: {location}: {message}")
    return "\n".join(lines)


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
    if path.is_file():
        return path
    if path.is_dir():
        raise InputError(f"config {name_or_path} is a directory: give a .json file")
    configs = available_configs()
    if name_or_path in configs:
        return configs[name_or_path]
    if name_or_path.endswith(".json") and name_or_path[:-5] in configs:
        return configs[name_or_path[:-5]]
    known = ", ".join(configs) or "none"
    raise InputError(f"unknown config {name_or_path!r}: not a file, and not one of the shipped configs ({known})")


def load_config(name_or_path: str) -> ModelLoadConfig:
    return ModelLoadConfig.from_json_path(find_config(name_or_path))
