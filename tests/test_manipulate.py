"""interpolate, textdiff and --rerank (the DALL·E 2 paper's own features): the math from Python,
the commands through the real CLI on the tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle2_cli.config import load_config
from dalle2_cli.errors import InputError
from dalle2_cli.io.animation import save_animation
from dalle2_cli.io.output import read_metadata
from dalle2_cli.loading.clip import tokenize
from dalle2_cli.loading.manager import DalleModelManager
from dalle2_cli.sampling.manipulate import Interpolation, RerankedTextToImage, TextDiff, candidate_seed, slerp
from dalle2_cli.sampling.pipelines import TextToImage
from dalle2_cli.sampling.script import InferenceScript
from dalle2_cli.sampling.settings import SamplingSettings
from tests.helpers import invoke


@pytest.fixture(scope="module")
def manager(tiny_config) -> DalleModelManager:
    return DalleModelManager(load_config(str(tiny_config)), device="cpu", log=lambda _: None)


def unit(seed: int, dim: int = 32) -> torch.Tensor:
    vector = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(vector, dim=0)


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return math.acos(max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm())))))


def noise_picture(seed: int = 0, size: tuple[int, int] = (32, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def animation_frames(path: str | Path) -> list[tuple[np.ndarray, int]]:
    """Each stored frame of an animation, as RGB, with its duration in milliseconds."""
    frames = []
    with Image.open(path) as animation:
        for number in range(animation.n_frames):
            animation.seek(number)
            frames.append((np.asarray(animation.convert("RGB")), animation.info["duration"]))
    return frames


def report(result) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# -- slerp and seeds -----------------------------------------------------------------------


def test_slerp_returns_the_ends_exactly_and_stays_on_the_sphere():
    a, b = unit(0), unit(1)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    omega = angle(a, b)
    for t in (0.1, 0.25, 0.5, 0.9):
        middle = slerp(a, b, t)
        assert middle.dtype == torch.float32
        assert float(middle.norm()) == pytest.approx(1.0, abs=1e-6)
        # t of the way along the great circle: t·Ω from a, the rest of Ω from b.
        assert angle(middle, a) == pytest.approx(t * omega, abs=1e-5)
        assert angle(middle, b) == pytest.approx((1 - t) * omega, abs=1e-5)


def test_slerp_works_row_by_row_and_on_the_edge_cases():
    a, b = torch.stack([unit(0), unit(2)]), torch.stack([unit(1), unit(3)])
    rows = slerp(a, b, 0.3)
    assert torch.allclose(rows[0], slerp(a[0], b[0], 0.3), atol=1e-7)
    assert torch.allclose(rows[1], slerp(a[1], b[1], 0.3), atol=1e-7)
    same = unit(4)
    assert torch.equal(slerp(same, same, 0.5), same)  # no division by sin(0)
    with pytest.raises(ValueError, match="opposite"):
        slerp(same, -same, 0.5)
    with pytest.raises(ValueError, match="same shape"):
        slerp(same, unit(5, dim=16), 0.5)


def test_candidate_seeds_start_with_the_images_own_and_stay_apart():
    assert candidate_seed(7, 0) == 7
    assert candidate_seed(7, 1) == candidate_seed(7, 1) != candidate_seed(7, 2)
    derived = [candidate_seed(seed, j) for seed in range(200) for j in range(1, 6)]
    assert len(set(derived)) == len(derived)  # no two candidates of a batch share a seed
    assert all(10_000 < s <= 2**63 - 1 for s in derived)  # nor one with image seed + k


# -- animations ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_animation_holds_every_frame_and_loops(tmp_path, fmt):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 0, 0)]
    frames = [Image.new("RGB", (16, 16), colour) for colour in colours]
    path = save_animation(frames, tmp_path / f"move.{fmt}", duration_ms=120)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left beside it
    with Image.open(path) as animation:
        assert animation.format == fmt.upper() and animation.is_animated and animation.info["loop"] == 0
    stored = animation_frames(path)
    assert [duration for _, duration in stored] == [120] * 5
    for (image, _), colour in zip(stored, colours, strict=True):
        assert (image == colour).all()


def test_a_gif_merges_a_repeated_frame_into_the_one_before(tmp_path):
    """Pillow's GIF writer stores a frame equal to the previous one as more time on it."""
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    path = save_animation([red, red, blue], tmp_path / "held.gif", duration_ms=100)
    assert [duration for _, duration in animation_frames(path)] == [200, 100]


# -- the scripts from Python ---------------------------------------------------------------


def test_interpolation_embeddings_walk_the_arc_from_one_image_to_the_other(manager):
    script = Interpolation(manager)
    first, second = noise_picture(0), Image.new("RGB", (32, 32), "blue")
    embeds = script.embeddings(first, second, 5)
    start, end = (script._embed_images([image])[0] for image in (first, second))
    assert torch.equal(embeds[0], start) and torch.equal(embeds[-1], end)
    omega = angle(start, end)
    assert [angle(e, start) for e in embeds] == pytest.approx([k / 4 * omega for k in range(5)], abs=1e-5)
    assert all(float(e.norm()) == pytest.approx(1.0, abs=1e-6) for e in embeds)


def test_text_diff_is_the_normalized_difference_of_the_captions(manager):
    script = TextDiff(manager)
    diff = script.text_diff("a red circle", "a blue circle")
    with torch.inference_mode():
        texts, _ = manager.clip.embed_text(tokenize(manager.clip, ["a red circle", "a blue circle"]))
    expected = torch.nn.functional.normalize(texts[1] - texts[0], dim=0)
    assert torch.allclose(diff, expected, atol=1e-6)
    with pytest.raises(InputError, match="same CLIP text embedding"):
        script.text_diff("a red circle", "a red circle")


def test_text_diff_frames_rotate_the_image_toward_the_diff(manager):
    script = TextDiff(manager)
    image = noise_picture(1)
    embeds = script.embeddings(image, "a red circle", "a blue circle", 4, 0.3)
    image_embed = script._embed_images([image])[0]
    diff = script.text_diff("a red circle", "a blue circle")
    assert torch.equal(embeds[0], image_embed)  # θ = 0: the image itself
    omega = angle(image_embed, diff)
    thetas = [0.0, 0.1, 0.2, 0.3]
    assert [angle(e, image_embed) for e in embeds] == pytest.approx([t * omega for t in thetas], abs=1e-5)
    assert [angle(e, diff) for e in embeds] == pytest.approx([(1 - t) * omega for t in thetas], abs=1e-5)


def test_the_scripts_refuse_bad_counts(manager):
    image = noise_picture()
    # From Python, errors name the argument; the CLI names its option instead (below).
    with pytest.raises(InputError, match="frames must be at least 2"):
        Interpolation(manager).run(image, image, frames=1)
    with pytest.raises(InputError, match="max_angle must be in"):
        TextDiff(manager).run(image, "a", "b", max_angle=0)
    with pytest.raises(InputError, match="candidates must be from 1 to 64"):
        RerankedTextToImage(manager).run(["a red circle"], candidates=0)


# -- the commands --------------------------------------------------------------------------


def test_interpolate_saves_frames_and_animations_whose_ends_are_the_images_variations(tmp_path, tiny_config):
    noise_picture(0).save(tmp_path / "a.png")
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "b.png")
    config = ["-c", str(tiny_config)]
    made = report(
        invoke(
            "interpolate", "a.png", "b.png", "--frames", "5", "--seed", "3", "--duration", "100",
            "--format", "gif", "--format", "webp", "-o", "out", "--json", *config,
            cwd=tmp_path,
        )
    )  # fmt: skip
    frames = made["images"]
    assert [f["index"] for f in frames] == [0, 1, 2, 3, 4] and {f["seed"] for f in frames} == {3}
    assert [f["settings"]["interpolate"]["t"] for f in frames] == [0.0, 0.25, 0.5, 0.75, 1.0]
    paths = [tmp_path / f["path"] for f in frames]
    assert len(set(paths)) == 5 and all(p.suffix == ".png" and p.is_file() for p in paths)
    metadata = read_metadata(paths[2])
    assert metadata["command"] == "interpolate" and metadata["interpolate"]["t"] == 0.5
    assert metadata["interpolate"]["from"] == "a.png" and metadata["interpolate"]["to"] == "b.png"

    gif, webp = (tmp_path / p for p in made["animations"])
    assert gif.suffix == ".gif" and webp.suffix == ".webp"
    # Every frame is in the GIF, in order, 100 ms each. A frame equal to the one before is stored
    # as more time on it (the tiny models' decoder barely reacts to the embedding: their frames
    # are all alike), so the stored frames are spread back over their durations.
    spread = [image for image, duration in animation_frames(gif) for _ in range(duration // 100)]
    assert len(spread) == 5
    for image, frame in zip(spread, paths, strict=True):  # GIF: 256 colours a frame
        assert np.abs(image.astype(float) - pixels(frame)).mean() <= 12.0
    # WebP is lossless: the frames exactly. libwebp merges repeats too, and makes frames that are
    # all alike one still image; test_shipped_model_interpolates_through_distinct_frames has more.
    stored = [image for image, _ in animation_frames(webp)]
    assert np.array_equal(stored[0], pixels(paths[0]))
    assert all(any(np.array_equal(image, pixels(frame)) for frame in paths) for image in stored)

    # Frame 0 decodes A's own CLIP embedding (slerp returns it bit for bit, and it is embedded
    # alone as a variation embeds it) with seed 3's noise: exactly a variation of A with seed 3.
    # That it is exact, although frame 0 shares its decoder batch with other frames, rests on
    # each image's noise being its own (dalle2_cli.sampling.noise_patch) and the CPU computing rows alike.
    for source, frame in (("a.png", paths[0]), ("b.png", paths[-1])):
        variation = report(
            invoke("variation", source, "--seed", "3", "-o", f"var-{source}", "--json", *config, cwd=tmp_path)
        )
        assert np.array_equal(pixels(frame), pixels(tmp_path / variation["images"][0]["path"]))


def test_textdiff_starts_at_the_image_itself(tmp_path, tiny_config):
    noise_picture(2).save(tmp_path / "cat.png")
    config = ["-c", str(tiny_config)]
    made = report(
        invoke(
            "textdiff", "cat.png", "--from", "a red circle", "--to", "a blue circle", "--frames", "4",
            "--max-angle", "0.3", "--seed", "5", "-o", "out", "--json", *config,
            cwd=tmp_path,
        )
    )  # fmt: skip
    frames = made["images"]
    assert [f["settings"]["textdiff"]["theta"] for f in frames] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert {f["seed"] for f in frames} == {5} and all(f["source"] == "cat.png" for f in frames)
    [gif] = made["animations"]
    assert gif.endswith(".gif") and sum(d for _, d in animation_frames(tmp_path / gif)) == 4 * 250
    variation = report(invoke("variation", "cat.png", "--seed", "5", "-o", "var", "--json", *config, cwd=tmp_path))
    assert np.array_equal(pixels(tmp_path / frames[0]["path"]), pixels(tmp_path / variation["images"][0]["path"]))


def test_rerank_1_is_plain_text2im(tmp_path, tiny_config):
    args = ["text2im", "a red circle", "a blue square", "-n", "2", "--seed", "9", "--json", "-c", str(tiny_config)]
    plain = report(invoke(*args, "-o", "plain", cwd=tmp_path))
    result = invoke(*args, "-o", "one", "--rerank", "1", cwd=tmp_path)
    once = report(result)
    assert [i["seed"] for i in once["images"]] == [i["seed"] for i in plain["images"]] == [9, 10, 9, 10]
    for one, other in zip(once["images"], plain["images"], strict=True):
        assert np.array_equal(pixels(tmp_path / one["path"]), pixels(tmp_path / other["path"]))
        assert "rerank" not in one["settings"] and "rerank" not in other["settings"]
    assert "candidate" not in result.stderr and "CLIP" not in result.stderr


def test_a_configs_default_rerank_is_what_text2im_does_unless_told(tmp_path, tiny_config, reranking_config):
    """clip.default_rerank 3 makes text2im exactly `--rerank 3` (one line says so, not a line
    per image); --rerank 1 draws each image once; --from an image it kept makes that image."""
    args = ["text2im", "a red circle", "-n", "2", "--seed", "9", "--json"]
    result = invoke(*args, "-c", str(reranking_config), "-o", "default", cwd=tmp_path)
    by_default = report(result)["images"]
    assert [i["settings"]["rerank"]["candidates"] for i in by_default] == [3, 3]
    assert [i["settings"]["rerank"]["image_seed"] for i in by_default] == [9, 10]
    assert "each image is the best of 3 by CLIP (the config's default_rerank" in result.stderr
    assert "kept candidate" not in result.stderr
    asked = report(invoke(*args, "-c", str(tiny_config), "--rerank", "3", "-o", "asked", cwd=tmp_path))["images"]
    assert [i["seed"] for i in asked] == [i["seed"] for i in by_default]
    for one, other in zip(by_default, asked, strict=True):
        assert np.array_equal(pixels(tmp_path / one["path"]), pixels(tmp_path / other["path"]))

    once = report(invoke(*args, "-c", str(reranking_config), "--rerank", "1", "-o", "once", cwd=tmp_path))["images"]
    plain = report(invoke(*args, "-c", str(tiny_config), "-o", "plain", cwd=tmp_path))["images"]
    assert [i["seed"] for i in once] == [i["seed"] for i in plain] == [9, 10]
    for one, other in zip(once, plain, strict=True):
        assert "rerank" not in one["settings"]
        assert np.array_equal(pixels(tmp_path / one["path"]), pixels(tmp_path / other["path"]))

    kept = by_default[0]
    again = report(invoke("text2im", "--from", kept["path"], "-o", "again", "--json", cwd=tmp_path))["images"]
    assert len(again) == 1 and again[0]["seed"] == kept["seed"] and "rerank" not in again[0]["settings"]
    assert np.array_equal(pixels(tmp_path / again[0]["path"]), pixels(tmp_path / kept["path"]))


def test_text_to_image_from_python_takes_the_configs_default_rerank(reranking_config):
    manager = DalleModelManager(load_config(str(reranking_config)), device="cpu", log=lambda _: None)
    script = TextToImage(manager, SamplingSettings(seed=4))
    assert script.candidates() == 3 and script.candidates(1) == 1
    [best] = script.run(["a blue square"])
    [once] = script.run(["a blue square"], candidates=1)
    assert best.settings["rerank"]["candidates"] == 3 and "rerank" not in once.settings
    assert best.settings["rerank"]["seeds"][0] == once.seed == 4
    with pytest.raises(InputError, match="candidates must be from 1 to 64"):
        script.run(["a blue square"], candidates=65)


def test_rerank_keeps_the_candidate_clip_scores_highest(tmp_path, tiny_config, manager):
    prompt = "a red circle"
    result = invoke(
        "text2im", prompt, "-n", "2", "--seed", "9", "--rerank", "3", "-o", "out", "--json", "-c", str(tiny_config),
        cwd=tmp_path,
    )  # fmt: skip
    made = report(result)
    assert [i["index"] for i in made["images"]] == [0, 1]
    assert result.stderr.count(f"rerank {prompt!r}") == 2

    scorer = InferenceScript(manager)
    with torch.inference_mode():
        text_embed, _ = manager.clip.embed_text(tokenize(manager.clip, [prompt]))
    for index, record in enumerate(made["images"]):
        rerank = record["settings"]["rerank"]
        image_seed = 9 + index
        assert rerank["image_seed"] == image_seed
        assert rerank["seeds"] == [image_seed, candidate_seed(image_seed, 1), candidate_seed(image_seed, 2)]
        # Each candidate made again alone, from its seed, and scored here.
        candidates = [TextToImage(manager, SamplingSettings(seed=s)).run([prompt])[0].image for s in rerank["seeds"]]
        scores = [float(scorer._embed_images([c])[0] @ text_embed[0]) for c in candidates]
        assert rerank["scores"] == pytest.approx(scores, abs=1e-5)
        best = int(np.argmax(scores))
        assert rerank["kept"] == best and rerank["score"] == max(rerank["scores"])
        assert record["seed"] == rerank["seeds"][best]  # its own seed: a plain run with it makes it
        assert np.array_equal(pixels(tmp_path / record["path"]), np.asarray(candidates[best]))
        assert read_metadata(tmp_path / record["path"])["rerank"] == rerank


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["interpolate", "a.png", "b.png", "--frames", "1"], "--frames must be at least 2"),
        (["interpolate", "a.png", "missing.png"], "missing.png"),
        (["interpolate", "a.png", "b.png", "--duration", "0"], "--duration must be at least 1"),
        (["textdiff", "a.png", "--from", "a cat", "--to", "a dog", "--frames", "1"], "--frames must be at least 2"),
        (["textdiff", "a.png", "--from", "a cat", "--to", " "], "--to is empty"),
        (["textdiff", "a.png", "--from", "a cat", "--to", "a dog", "--max-angle", "0"], "--max-angle must be in"),
        (["textdiff", "a.png", "--from", "a cat", "--to", "a dog", "--max-angle", "1.5"], "--max-angle must be in"),
        (["textdiff", "missing.png", "--from", "a cat", "--to", "a dog"], "missing.png"),
        (["text2im", "a red circle", "--rerank", "0"], "--rerank must be from 1 to 64"),
        (["interpolate", "a.png", "b.png", "--frames", "100000"], "--frames must be at most 1,000"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_config, args, message):
    for name in ("a.png", "b.png"):
        noise_picture().save(tmp_path / name)
    result = invoke(*args, "-o", "out", "-c", str(tiny_config), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_shipped_model_interpolates_through_distinct_frames(tmp_path):
    """The tiny models' decoder barely reacts to its embedding; the shipped one does, so every
    frame differs and the GIF stores each one."""
    from dalle2_cli.shapes import Scene

    Scene("circle", "red", "white", 0.5, 0.5, 0.5).draw(64).save(tmp_path / "red.png")
    Scene("square", "blue", "yellow", 0.5, 0.45, 0.55).draw(64).save(tmp_path / "blue.png")
    made = report(
        invoke(
            "interpolate", "red.png", "blue.png", "--frames", "3", "--seed", "0", "--decoder-steps", "10",
            "--format", "gif", "--format", "webp", "-o", "out", "--json",
            cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"},
        )
    )  # fmt: skip
    frames = [pixels(tmp_path / f["path"]) for f in made["images"]]
    assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:], strict=False))
    gif, webp = (animation_frames(tmp_path / path) for path in made["animations"])
    assert [d for _, d in gif] == [d for _, d in webp] == [250, 250, 250]
    assert all(np.array_equal(image, frame) for (image, _), frame in zip(webp, frames, strict=True))
