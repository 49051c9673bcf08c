"""The shapes world and its pixel judge (no model needed)."""

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle2_cli.shapes import COLORS, DEFAULT_BACKGROUND, SHAPES, Scene, caption, judge, random_scene, samples


def test_samples_are_reproducible_from_a_seed():
    first, again, other = samples(20, seed=7), samples(20, seed=7), samples(20, seed=8)
    assert [c for _, c, _ in first] == [c for _, c, _ in again]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (a, _, _), (b, _, _) in zip(first, again, strict=True))
    assert [s for _, _, s in first] != [s for _, _, s in other]


def test_scenes_follow_the_rules():
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(2000)]
    assert {s.shape for s in scenes} == set(SHAPES)
    assert {s.color for s in scenes} == {s.background for s in scenes} == set(COLORS)
    for s in scenes:
        assert s.color != s.background
        assert 0.25 <= s.size <= 0.75
        assert s.size / 2 <= s.x <= 1 - s.size / 2 and s.size / 2 <= s.y <= 1 - s.size / 2  # fully inside


def test_captions_name_colour_and_shape_and_omit_only_a_white_background():
    rng = random.Random(1)
    for _ in range(2000):
        scene = random_scene(rng)
        text = caption(scene, rng)
        assert f"{scene.color} {scene.shape}" in text
        if scene.background != DEFAULT_BACKGROUND:
            assert f"{scene.background} background" in text or text.endswith(f"on {scene.background}")
    phrasings = {caption(Scene("circle", "red", "white", 0.5, 0.5, 0.5), random.Random(k)) for k in range(200)}
    assert "a red circle" in phrasings and "a picture of a red circle" in phrasings
    assert "red circle, white background" in phrasings and "a red circle on a white background" in phrasings


@pytest.mark.parametrize("pixels", [64, 32])
def test_judge_reads_drawn_scenes(pixels):
    data = samples(300, seed=3, pixels=pixels)
    verdicts = [(judge(image), scene) for image, _, scene in data]
    assert all(v.background == s.background and v.color == s.color for v, s in verdicts)
    shape_accuracy = np.mean([v.shape == s.shape for v, s in verdicts])
    assert shape_accuracy >= (1.0 if pixels == 64 else 0.98)


def test_judge_finds_nothing_on_a_plain_image_and_the_fill_ratios():
    assert judge(Image.new("RGB", (64, 64), COLORS["blue"])).color is None
    fills = {shape: judge(Scene(shape, "red", "white", 0.6, 0.5, 0.5).draw()).fill for shape in SHAPES}
    assert fills["triangle"] < 0.6 < fills["circle"] < 0.85 < fills["square"]


def test_phrasings_name_the_scene_and_held_out_forms_are_never_trained_on():
    from dalle2_cli.shapes import COLOR_WORDS, HELD_OUT, SHAPE_WORDS, TRAINING, phrasing

    for forms in (TRAINING, HELD_OUT):
        rng = random.Random(5)
        for _ in range(1000):
            scene = random_scene(rng)
            text = phrasing(scene, rng, forms).lower()
            assert any(word in text for word in COLOR_WORDS[scene.color])
            assert any(word in text for word in SHAPE_WORDS[scene.shape])
            if scene.background != DEFAULT_BACKGROUND:
                assert text.count(" ") >= 3 and any(word in text for word in COLOR_WORDS[scene.background])
    for part in ("openings", "after", "before"):
        assert not set(getattr(TRAINING, part)) & set(getattr(HELD_OUT, part))
    # A form that does not fit (too long for CLIP, say) is turned down and another drawn.
    rng = random.Random(0)
    short = [phrasing(random_scene(rng), rng, TRAINING, fits=lambda t: len(t.split()) <= 6) for _ in range(200)]
    assert all(len(text.split()) <= 6 for text in short)


def test_typos_change_one_word_by_one_slip():
    from dalle2_cli.shapes import typo

    rng = random.Random(3)
    for _ in range(300):
        text = "a photo of a green triangle on a yellow background"
        slipped = typo(text, rng)
        changed = [(a, b) for a, b in zip(text.split(), slipped.split(), strict=True) if a != b]
        assert len(changed) <= 1
        if changed:
            before, after = changed[0]
            swapped = len(after) == len(before) and sorted(after) == sorted(before)
            assert len(before) >= 4 and (swapped or abs(len(after) - len(before)) == 1)


def test_the_shipped_vocabulary_is_every_word_the_captions_taught():
    import json
    import re

    from dalle2_cli.shapes import TRAINING, phrasing, vocabulary

    shipped = json.loads((Path(__file__).resolve().parent.parent / "configs" / "shapes.json").read_text())
    assert shipped["vocabulary"]["words"] == vocabulary()
    rng = random.Random(9)
    words = set(vocabulary())
    for _ in range(2000):
        scene = random_scene(rng)
        for text in (caption(scene, rng), phrasing(scene, rng, TRAINING)):
            assert set(re.findall(r"[^\W\d_]+", text.lower())) <= words, text
