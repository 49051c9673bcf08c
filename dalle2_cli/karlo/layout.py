"""Where a diffusers unCLIP pipeline keeps its parts: `model_index.json` and one folder per
component (`prior/config.json`, `prior/diffusion_pytorch_model.safetensors`, ...), in a local
folder or a hub repository. Every file becomes a config `File`, so it comes through our sources
like any model file (the Hugging Face cache, offline mode, digests)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dalle2_cli.config import UNCLIP_INDEX as INDEX
from dalle2_cli.config import File, UnclipLoadConfig
from dalle2_cli.errors import InputError
from dalle2_cli.io.textfiles import read_json

TEXT_TO_IMAGE, VARIATIONS = "UnCLIPPipeline", "UnCLIPImageVariationPipeline"
# The components each pipeline has (the tokenizer and feature extractor are not read: CLIP's
# BPE and image preprocessing are open_clip's and ours).
NETWORKS = {
    TEXT_TO_IMAGE: ("text_encoder", "prior", "text_proj", "decoder", "super_res_first", "super_res_last"),
    VARIATIONS: ("text_encoder", "image_encoder", "text_proj", "decoder", "super_res_first", "super_res_last"),
}
SCHEDULERS = {
    TEXT_TO_IMAGE: ("prior_scheduler", "decoder_scheduler", "super_res_scheduler"),
    VARIATIONS: ("decoder_scheduler", "super_res_scheduler"),
}
TRANSFORMERS_PARTS = ("text_encoder", "image_encoder")  # transformers' file names, not diffusers'


def weights_name(component: str, fmt: str) -> str:
    base = "model" if component in TRANSFORMERS_PARTS else "diffusion_pytorch_model"
    if fmt == "bin":
        return "pytorch_model.bin" if component in TRANSFORMERS_PARTS else f"{base}.bin"
    return f"{base}.safetensors"


def component_weights(folder: Path) -> Path | None:
    """The weights file in one component's folder (`prior/`, `text_encoder/`), safetensors
    first; None where it holds none."""
    # Each format under diffusers' name (as `prior/` has it), then transformers' (`text_encoder/`).
    names = (weights_name(part, fmt) for fmt in ("safetensors", "bin") for part in ("prior", "text_encoder"))
    return next((folder / name for name in names if (folder / name).is_file()), None)


def config_name(component: str) -> str:
    return "scheduler_config.json" if component.endswith("scheduler") else "config.json"


class UnclipLayout:
    """The files of one unCLIP pipeline, as config `File`s."""

    def __init__(self, section: UnclipLoadConfig):
        self.section = section
        self.local = section.load_type == "local"
        if self.local:
            self.root = Path(section.path)
            if not (self.root / INDEX).is_file():
                raise InputError(f"{self.root} has no {INDEX}: it is not a diffusers pipeline folder")
        else:
            repo, _, revision = section.path.removeprefix("hf://").partition("@")
            self.repo, self.revision = repo.strip("/"), revision

    def file(self, relative: str) -> File:
        if self.local:
            return File(load_type="local", path=str(self.root / relative))
        revision = f"@{self.revision}" if self.revision else ""
        return File(load_type="url", path=f"hf://{self.repo}/{relative}{revision}")

    def index(self) -> File:
        return self.file(INDEX)

    def config(self, component: str) -> File:
        return self.file(f"{component}/{config_name(component)}")

    def weights(self, component: str) -> list[File]:
        """The component's weights file, safetensors first where either may be there."""
        formats = [self.section.weights] if self.section.weights else ["safetensors", "bin"]
        if self.local:
            present = [f for f in formats if (self.root / component / weights_name(component, f)).is_file()]
            return [self.file(f"{component}/{weights_name(component, f)}") for f in present or formats[:1]]
        files = [self.file(f"{component}/{weights_name(component, f)}") for f in formats]
        # The one in the Hugging Face cache first (offline, the only one that can be had).
        from dalle2_cli.sources.hub import cached_hub_file, parse_hub_url

        return sorted(files, key=lambda file: cached_hub_file(parse_hub_url(file.path)) is None)


def first_available(candidates: list[File], resolve: Callable[[File], Path]) -> tuple[File, Path]:
    """The first of a component's weights files (`UnclipLayout.weights`) that its source has,
    and where it lies: a hub repository may hold a component as pickled .bin only."""
    from dalle2_cli.sources.hub import NotOnHub

    for file in candidates[:-1]:
        try:
            return file, resolve(file)
        except NotOnHub:
            continue
    return candidates[-1], resolve(candidates[-1])


def read_index(path: Path, where: str) -> dict:
    """A pipeline's model_index.json, checked to be unCLIP's (`where` names the pipeline)."""
    index = read_json(path, "model index")
    if not isinstance(index, dict):
        raise InputError(f"{path} is not a diffusers model index (a JSON object)")
    pipeline_kind(index, where)
    return index


def pipeline_kind(index: dict, where: str) -> str:
    kind = index.get("_class_name")
    if kind not in NETWORKS:
        raise InputError(
            f"{where} is a diffusers {kind or 'pipeline'} folder, not unCLIP's (UnCLIPPipeline or "
            "UnCLIPImageVariationPipeline, as Karlo's repositories are)"
        )
    return kind


def files(section: UnclipLoadConfig, index: dict | None) -> list[tuple[str, list[File]]]:
    """(role, files) of every file the pipeline loads from, `index` its model_index.json read
    (None: not readable here, so only the index is listed). `files` is one file, or a
    component's weights files in the order to try them (see `first_available`)."""
    layout = UnclipLayout(section)
    found = [("model index", [layout.index()])]
    if index is None:
        return found
    kind = pipeline_kind(index, section.path)

    def network(source: UnclipLayout, component: str) -> list[tuple[str, list[File]]]:
        return [(f"{component} config", [source.config(component)]), (component, source.weights(component))]

    for component in NETWORKS[kind]:
        found += network(layout, component)
    found += [(f"{component} config", [layout.config(component)]) for component in SCHEDULERS[kind]]
    borrowed = section.image_encoder_from
    if borrowed is not None and "image_encoder" not in NETWORKS[kind]:
        found += network(UnclipLayout(borrowed), "image_encoder")
    return found
