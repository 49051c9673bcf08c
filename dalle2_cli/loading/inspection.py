"""What is in a checkpoint file: format, stage, sizes, precision, version, EMA, config."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dalle2_cli.loading.checkpoint import read_checkpoint, stage_of
from dalle2_cli.loading.choices import Weights
from dalle2_cli.sources.digests import file_sha256


@dataclass
class Inspection:
    path: str
    size_bytes: int
    sha256: str
    format: str
    stage: str
    dalle2_pytorch_version: str | None
    installed_dalle2_pytorch_version: str
    has_ema: bool
    weights: Weights
    dtypes: dict[str, int]  # dtype -> number of tensors
    parameters: dict[str, int]  # module -> number of values
    config: dict[str, Any]
    set_aside: list[str]  # objects pickled beside the weights, not loaded

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        from rich.filesize import decimal  # sizes as `models list` shows them (1 MB = 10**6 bytes)

        version = self.dalle2_pytorch_version or "not recorded"
        if self.dalle2_pytorch_version and self.dalle2_pytorch_version != self.installed_dalle2_pytorch_version:
            version += f" (installed: {self.installed_dalle2_pytorch_version})"
        out = [
            f"file      {self.path} ({decimal(self.size_bytes)})",
            f"sha256    {self.sha256}",
            f"format    {self.format}",
            f"stage     {self.stage}",
            f"version   dalle2-pytorch {version}",
            f"ema       {'yes' if self.has_ema else 'no'} (loading uses the {self.weights} weights)",
            "dtypes    " + ", ".join(f"{name}: {count}" for name, count in self.dtypes.items()),
            f"params    {sum(self.parameters.values()):,} in all",
        ]
        out += [f"  {module:<24}{count:>14,}" for module, count in self.parameters.items()]
        out += [f"config    {key}: {value}" for key, value in self.config.items()] or ["config    none embedded"]
        if self.set_aside:
            out.append(f"not read  {', '.join(self.set_aside)} (pickled beside the weights; never built)")
        return out


def module_of(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] in ("unets", "vaes") and len(parts) > 2 else parts[0]


def summarize_config(config: dict[str, Any] | None) -> dict[str, Any]:
    if not config:
        return {}
    if "decoder" in config:
        decoder = config["decoder"]
        unets = [
            {k: u.get(k) for k in ("dim", "dim_mults", "cond_on_text_encodings") if k in u}
            for u in decoder.get("unets", [])
        ]
        return {
            "image_sizes": decoder.get("image_sizes") or [decoder.get("image_size")],
            "timesteps": decoder.get("timesteps", 1000),
            "unets": unets,
        }
    if "prior" in config:
        prior = config["prior"]
        net = prior.get("net", {})
        return {
            "image_embed_dim": prior.get("image_embed_dim"),
            "timesteps": prior.get("timesteps", 1000),
            "net": {k: net.get(k) for k in ("dim", "depth", "heads", "max_text_len") if k in net},
            "condition_on_text_encodings": prior.get("condition_on_text_encodings", True),
        }
    return {"keys": sorted(config)}


def inspect_file(path: str | Path, weights: Weights | str = Weights.ema) -> Inspection:
    from dalle2_pytorch.version import __version__ as installed

    path = Path(path)
    checkpoint = read_checkpoint(path, weights)
    tensors = checkpoint.state_dict
    parameters: Counter[str] = Counter()
    for key, tensor in tensors.items():
        if not key.startswith(("noise_scheduler.", "noise_schedulers.")):  # schedules, not weights
            parameters[module_of(key)] += tensor.numel()
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())
    return Inspection(
        path=str(path),
        size_bytes=path.stat().st_size,
        sha256=file_sha256(path),
        format=checkpoint.format,
        stage=stage_of(list(tensors)),
        dalle2_pytorch_version=checkpoint.version,
        installed_dalle2_pytorch_version=installed,
        has_ema=checkpoint.has_ema,
        weights=checkpoint.weights,
        dtypes=dict(dtypes.most_common()),
        parameters=dict(parameters),
        config=summarize_config(checkpoint.config),
        set_aside=checkpoint.set_aside,
    )


@dataclass
class PipelineInspection:
    """A diffusers unCLIP pipeline folder (Karlo's): its kind, and each component's file."""

    path: str
    pipeline: str
    components: dict[str, Inspection | str]  # what each file is, or why it could not be read

    def as_dict(self) -> dict[str, Any]:
        parts = {
            name: part.as_dict() if isinstance(part, Inspection) else part for name, part in self.components.items()
        }
        return {"path": self.path, "pipeline": self.pipeline, "components": parts}

    def lines(self) -> list[str]:
        from rich.filesize import decimal

        out = [f"folder    {self.path}", f"pipeline  {self.pipeline} (diffusers' unCLIP layout: Karlo)"]
        total = 0
        for name, part in self.components.items():
            if isinstance(part, str):
                out.append(f"  {name:<18}{part}")
                continue
            count = sum(part.parameters.values())
            total += count
            dtypes = ", ".join(part.dtypes)
            out.append(
                f"  {name:<18}{part.stage}: {count:,} parameters, {dtypes}, "
                f"{Path(part.path).name} ({decimal(part.size_bytes)})"
            )
        out.append(f"params    {total:,} in all")
        return out


def inspect_folder(path: str | Path) -> PipelineInspection:
    """What a diffusers unCLIP pipeline folder holds, component by component."""
    from dalle2_cli.config import UnclipLoadConfig
    from dalle2_cli.karlo.layout import NETWORKS, UnclipLayout, read_index

    path = Path(path)
    layout = UnclipLayout(UnclipLoadConfig(load_type="local", path=str(path)))
    kind = read_index(Path(layout.index().path), str(path))["_class_name"]
    components: dict[str, Inspection | str] = {}
    for name in NETWORKS[kind]:
        file = Path(layout.weights(name)[0].path)
        components[name] = inspect_file(file) if file.is_file() else f"missing: no weights in {file.parent}"
    return PipelineInspection(str(path), kind, components)
