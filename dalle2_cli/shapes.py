"""The shapes world: one circle, square or triangle on a plain background, with captions.

The project's shipped model is trained on this world because it can be drawn from a seed
(training and tests are reproducible) and judged from pixels alone (`judge`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (245, 225, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "purple": (140, 40, 190),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle")
DEFAULT_BACKGROUND = "white"  # what a caption that names no background means

# How much of its bounding box each shape fills: what the judge tells them apart by.
FILL_RATIO = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    size: float  # the shape's width as a fraction of the image's
    x: float  # the shape's centre, as fractions of the image
    y: float

    def draw(self, pixels: int = 64, supersample: int = 4) -> Image.Image:
        """Drawn large and scaled down, so edges are anti-aliased like a photograph's."""
        big = pixels * supersample
        image = Image.new("RGB", (big, big), COLORS[self.background])
        draw = ImageDraw.Draw(image)
        half = self.size * big / 2
        cx, cy = self.x * big, self.y * big
        box = (cx - half, cy - half, cx + half, cy + half)
        if self.shape == "circle":
            draw.ellipse(box, fill=COLORS[self.color])
        elif self.shape == "square":
            draw.rectangle(box, fill=COLORS[self.color])
        else:
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=COLORS[self.color])
        return image.resize((pixels, pixels), Image.Resampling.LANCZOS)


def random_scene(
    rng: random.Random, shape: str | None = None, color: str | None = None, background: str | None = None
) -> Scene:
    background = background or rng.choice(list(COLORS))
    color = color or rng.choice([c for c in COLORS if c != background])
    size = rng.uniform(0.25, 0.75)
    margin = size / 2
    return Scene(
        shape or rng.choice(SHAPES),
        color,
        background,
        size,
        rng.uniform(margin, 1 - margin),
        rng.uniform(margin, 1 - margin),
    )


def caption(scene: Scene, rng: random.Random) -> str:
    """One of several phrasings; a caption names no background only when it is white."""
    thing = f"{scene.color} {scene.shape}"
    size_word = "small" if scene.size < 0.4 else "big" if scene.size > 0.6 else None
    on = f"on {_a(scene.background)} background"
    with_background = [
        f"{_a(thing)} {on}",
        f"{thing}, {scene.background} background",
        f"{_a(thing)} on {scene.background}",
    ]
    without = [_a(thing), f"a picture of {_a(thing)}"]
    if size_word:
        without.append(f"a picture of a {size_word} {thing}")
        with_background.append(f"a {size_word} {thing} {on}")
    phrasings = with_background + (without if scene.background == DEFAULT_BACKGROUND else [])
    return rng.choice(phrasings)


def _a(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


# -- how people phrase a request ------------------------------------------------------------
# `caption` knows five templates; people type many more forms. `phrasing` draws from a wider
# grammar: an opening ("a photo of"), an article or none, a size word, colour and shape
# synonyms, the background after the thing or before it, a full stop, a typo. Openings,
# background phrases and orders come in two disjoint sets: TRAINING's teach CLIP's text tower
# and the prior (scripts/train_shapes.py), HELD_OUT's measure what they never saw
# (scripts/eval_shapes.py --phrasings). Every form names the thing before the scene's extras,
# and a form without a background means white, as in `caption`.

COLOR_WORDS = {
    "red": ("red", "scarlet", "crimson"),
    "orange": ("orange", "tangerine"),
    "yellow": ("yellow", "lemon yellow"),
    "green": ("green", "emerald green"),
    "blue": ("blue", "royal blue"),
    "purple": ("purple", "violet"),
    "white": ("white", "snow white"),
    "black": ("black", "jet black"),
}
SHAPE_WORDS = {"circle": ("circle", "disc", "disk", "dot"), "square": ("square",), "triangle": ("triangle",)}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large", "huge")}


@dataclass(frozen=True)
class Phrasings:
    """One set of forms. `{thing}` is an article (or none), maybe a size, a colour and a shape;
    `{bg}` a background colour word."""

    openings: tuple[str, ...]
    after: tuple[str, ...]  # background phrases that follow the thing
    before: tuple[str, ...]  # whole forms with the background first


TRAINING = Phrasings(
    openings=(
        "",
        "a photo of",
        "a picture of",
        "a drawing of",
        "an image of",
        "a painting of",
        "an illustration of",
        "a sketch of",
        "a photograph of",
        "clip art of",
        "a render of",
    ),
    after=(
        "on a {bg} background",
        "on {bg}",
        ", {bg} background",
        "against a {bg} background",
        "on a {bg} backdrop",
        "with a {bg} background",
        "in front of a {bg} background",
        "over a {bg} background",
    ),
    before=("on {bg}, {thing}", "{bg} background, {thing}", "a {bg} background with {thing}"),
)
HELD_OUT = Phrasings(
    openings=("a close-up photo of", "a digital painting of", "show me", "draw", "a simple drawing of", "an icon of"),
    after=(
        "against {bg}",
        "on top of a {bg} background",
        "on a plain {bg} background",
        "set against a {bg} backdrop",
        "; the background is {bg}",
    ),
    before=("on a {bg} background, {thing}", "{bg} background: {thing}", "over {bg}, {thing}"),
)


def phrasing(
    scene: Scene,
    rng: random.Random,
    forms: Phrasings = TRAINING,
    typo_chance: float = 0.0,
    fits: Callable[[str], bool] = lambda text: True,
) -> str:
    """One way a person might ask for `scene`, drawn from `forms`; `fits` turns down a form
    (one too long for CLIP's context, say) and another is drawn."""
    for _ in range(100):
        text = _phrasing(scene, rng, forms, typo_chance)
        if fits(text):
            return text
    return caption(scene, rng)


def _phrasing(scene: Scene, rng: random.Random, forms: Phrasings, typo_chance: float) -> str:
    words = [rng.choice(COLOR_WORDS[scene.color]), rng.choice(SHAPE_WORDS[scene.shape])]
    size = "small" if scene.size < 0.4 else "big" if scene.size > 0.6 else None
    if size and rng.random() < 0.5:
        words.insert(0, rng.choice(SIZE_WORDS[size]))
    thing = " ".join(words)
    article = rng.choice(["a", "a", "a", "one", "the", ""])
    if article == "a":
        thing = _a(thing)
    elif article:
        thing = f"{article} {thing}"
    bg = rng.choice(COLOR_WORDS[scene.background])
    background_first = rng.random() < 0.25
    if scene.background == DEFAULT_BACKGROUND and rng.random() < 0.3:
        text = f"{rng.choice(forms.openings)} {thing}"
    elif background_first:
        text = rng.choice(forms.before).format(bg=bg, thing=thing)
    else:
        text = f"{rng.choice(forms.openings)} {thing} {rng.choice(forms.after).format(bg=bg)}"
    text = " ".join(text.split()).replace(" ,", ",").replace(" ;", ";")
    if rng.random() < 0.2:
        text += "."
    if rng.random() < 0.2:
        text = text[0].upper() + text[1:]
    return typo(text, rng) if rng.random() < typo_chance else text


def vocabulary() -> list[str]:
    """Every word the training captions use (`caption`'s templates and TRAINING's forms): the
    words a config's `vocabulary` lists, so that a prompt's others are pointed out."""
    texts = [*TRAINING.openings, *TRAINING.after, *TRAINING.before, "a an one the picture of on background"]
    for table in (COLOR_WORDS, SHAPE_WORDS, SIZE_WORDS):
        texts += [word for words in table.values() for word in words]
    return sorted({word for text in texts for word in re.findall(r"[^\W\d_]+", text.format(bg="", thing=""))})


def typo(text: str, rng: random.Random) -> str:
    """`text` with one slip of the keyboard in one word of four letters or more: two letters
    swapped, one dropped or one doubled."""
    words = text.split(" ")
    long_words = [i for i, word in enumerate(words) if len(word) >= 4 and word.isalpha()]
    if not long_words:
        return text
    i = rng.choice(long_words)
    word = words[i]
    at = rng.randrange(1, len(word) - 1)
    slip = rng.choice(["swap", "drop", "double"])
    if slip == "swap":
        word = word[: at - 1] + word[at] + word[at - 1] + word[at + 1 :]
    elif slip == "drop":
        word = word[:at] + word[at + 1 :]
    else:
        word = word[:at] + word[at] + word[at:]
    words[i] = word
    return " ".join(words)


def samples(count: int, seed: int, pixels: int = 64) -> list[tuple[Image.Image, str, Scene]]:
    """`count` (image, caption, scene) triples, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        scene = random_scene(rng)
        out.append((scene.draw(pixels), caption(scene, rng), scene))
    return out


@dataclass(frozen=True)
class Judgement:
    color: str | None  # None when no foreground was found
    shape: str | None
    background: str
    fill: float  # foreground pixels / bounding-box area


def nearest_color(rgb: np.ndarray) -> str:
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


def judge(image: Image.Image, threshold: float = 80.0) -> Judgement:
    """What the image shows, from its pixels: background colour from the border, foreground as
    what differs from it, the shape from how the foreground fills its bounding box."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    background = nearest_color(background_rgb)
    distance = np.sqrt(((pixels - np.array(COLORS[background])) ** 2).sum(axis=2))
    foreground = distance > threshold
    if foreground.sum() < 4:
        return Judgement(None, None, background, 0.0)
    ys, xs = np.nonzero(foreground)
    box_area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = float(foreground.sum() / box_area)
    color = nearest_color(np.median(pixels[foreground], axis=0))
    shape = min(FILL_RATIO, key=lambda name: abs(FILL_RATIO[name] - fill))
    return Judgement(color, shape, background, fill)
