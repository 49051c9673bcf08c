"""The DALL·E 2 paper's manipulations as commands: interpolate and textdiff, which save their
frames and an animation of them."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from dalle2_cli.cli.app import app
from dalle2_cli.cli.generate import generate, note_fits
from dalle2_cli.cli.groups import Group, command, option
from dalle2_cli.cli.options import Generation, generation
from dalle2_cli.errors import InputError
from dalle2_cli.io.animation import AnimationFormat, check_animation_format, check_duration
from dalle2_cli.sampling.settings import check_frames, check_text_diff

FRAME_NAME = "{prompt}-{seed}-{index}"  # every frame has the same seed: the index tells them apart
FramesOpt = Annotated[int, typer.Option("--frames", help="Frames, both ends included (2 to 1000).")]


@dataclass(frozen=True)
class AnimationChoice:
    formats: list[AnimationFormat]
    duration: int
    text: str | None  # for text-conditioned decoders: every frame gets it


def _animation(animation: list[AnimationFormat] | None, duration: int, text: str | None) -> AnimationChoice:
    check_duration(duration)
    if text is not None and not text.strip():
        raise InputError("--text is empty: leave it out, or describe the image")
    formats = [check_animation_format(fmt) for fmt in dict.fromkeys(animation or [AnimationFormat.gif])]
    return AnimationChoice(formats, duration, text)


ANIMATION = Group(
    "animation",
    (
        option(
            "animation",
            list[AnimationFormat] | None,
            None,
            "--format",
            help="Animation file: gif or webp (lossless); repeat for both. Default: gif.",
        ),
        option("duration", int, 250, "--duration", metavar="MS", help="Milliseconds per animation frame."),
        option("text", str | None, None, "--text", help="Text for text-conditioned decoders (every frame gets it)."),
    ),
    _animation,
)
FRAMES = (ANIMATION, generation("the frames and animations", count=False, pad=True))


def _make_frames(script: str, run: Callable, animation: AnimationChoice, options: Generation) -> None:
    """Generate the frames, then the animations of them, named as the frames are without their
    index (`cat-7-0.png` ... `cat-7-5.png`, `cat-7.gif`)."""
    from dalle2_cli.scaleout.works import Work

    template = options.output.name or FRAME_NAME

    def after(frames: list, directory: Path, say: Callable[[str], None]) -> dict[str, Any]:
        from dalle2_cli.io.animation import write_animation
        from dalle2_cli.io.output import DEFAULT_NAME, ImageWriter

        without_index = re.sub(r"[-_. ]*\{index\}", "", template).strip("-_. ") or DEFAULT_NAME
        stem = ImageWriter(directory, without_index).stem(frames[0])
        paths = []
        for fmt in animation.formats:
            images = [item.image for item in frames]
            path = write_animation(images, directory, stem, fmt, animation.duration, options.output.overwrite)
            say(f"  {path} (animation)")
            paths.append(str(path))
        return {"animations": paths}

    generate(Work(script, run, after), options, default_name=FRAME_NAME)


@command(app, *FRAMES)
def interpolate(
    first: Annotated[Path, typer.Argument(help="The image at the start.")],
    second: Annotated[Path, typer.Argument(help="The image at the end.")],
    frames: FramesOpt = 8,
    *,
    animation: AnimationChoice,
    generation: Generation,
) -> None:
    """Morph one image into another: slerp between their CLIP image embeddings, every frame
    decoded with the same noise; saves the frames ({prompt}-{seed}-{index}.png unless --name)
    and an animation."""
    from dalle2_cli.io.images import open_image

    check_frames(frames)
    pictures = [open_image(path) for path in (first, second)]
    note_fits((first, second), pictures, generation)
    sources = (str(first), str(second))
    run = lambda script: script.run(*pictures, frames=frames, text=animation.text, sources=sources)  # noqa: E731
    _make_frames("manipulate.Interpolation", run, animation, generation)


@command(app, *FRAMES)
def textdiff(
    image: Annotated[Path, typer.Argument(help="The image to change.")],
    from_text: Annotated[str, typer.Option("--from", help="A caption of the image as it is.")],
    to_text: Annotated[str, typer.Option("--to", help="The same caption, changed as the image should change.")],
    frames: FramesOpt = 6,
    max_angle: Annotated[
        float,
        typer.Option(
            "--max-angle",
            help="How far the last frame goes: the fraction of the angle from the image embedding to the text "
            "diff (θ in the DALL·E 2 paper, which uses 0.25-0.5; 1 decodes the diff alone).",
        ),
    ] = 0.5,
    *,
    animation: AnimationChoice,
    generation: Generation,
) -> None:
    """Edit an image by a change of caption (the paper's text diff): move its CLIP image
    embedding toward normalize(text(--to) - text(--from)); saves the frames
    ({prompt}-{seed}-{index}.png unless --name) and an animation."""
    from dalle2_cli.io.images import open_image

    check_text_diff(frames, max_angle, from_text, to_text)
    picture = open_image(image)
    note_fits([image], [picture], generation)

    def run(script: Any) -> list:
        return script.run(
            picture, from_text, to_text, frames=frames, max_angle=max_angle, text=animation.text, source=str(image)
        )

    _make_frames("manipulate.TextDiff", run, animation, generation)
