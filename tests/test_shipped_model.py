"""The shipped shapes model, as a new user runs it: no --config, offline, on CPU.

Its quality over every caption is measured by scripts/eval_shapes.py (figures in the README);
here one image per task is judged from its pixels by the same judge.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle2_cli.config import PACKAGE_DIR, load_config
from dalle2_cli.loading.checkpoint import read_checkpoint
from dalle2_cli.shapes import COLORS, Scene, judge, nearest_color
from tests.helpers import invoke

WEIGHTS = PACKAGE_DIR / "weights" / "shapes"


def only_image(result, cwd: Path) -> tuple[Image.Image, dict]:
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert len(output["images"]) == 1
    return Image.open(cwd / output["images"][0]["path"]), output


def test_shipped_files_fit_the_budget_and_are_what_the_config_names():
    config = load_config("shapes")
    named = {Path(config.prior.load_model_from.path), Path(config.clip.load_model_from.path)}
    named |= {Path(s.load_model_from.path) for s in config.decoder.unet_sources}
    assert named == set(WEIGHTS.iterdir())
    assert sum(path.stat().st_size for path in named) <= 25 * 2**20
    base, upsampler = config.decoder.unet_sources  # two files, stitched like LAION's upsampler
    assert read_checkpoint(Path(base.load_model_from.path)).config["decoder"]["image_sizes"] == [16]
    assert read_checkpoint(Path(upsampler.load_model_from.path)).config["decoder"]["image_sizes"] == [16, 64]
    assert all(read_checkpoint(path).weights == "ema" for path in named if path.suffix == ".pth")


def test_the_default_model_runs_offline_with_no_config(tmp_path):
    result = invoke("text2im", "a red circle", "--seed", "0", "--json", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    image, output = only_image(result, tmp_path)
    assert image.size == (64, 64) and output["config"] == "shapes"
    verdict = judge(image)
    assert (verdict.color, verdict.shape, verdict.background) == ("red", "circle", "white"), verdict


@pytest.fixture(scope="module")
def variation_of_a_square(tmp_path_factory) -> Image.Image:
    cwd = tmp_path_factory.mktemp("variation")
    Scene("square", "blue", "yellow", 0.5, 0.45, 0.55).draw(64).save(cwd / "square.png")
    image, _ = only_image(invoke("variation", "square.png", "--seed", "0", "--json", cwd=cwd), cwd)
    assert image.size == (64, 64)
    return image


def test_variation_keeps_colour_and_background(variation_of_a_square):
    verdict = judge(variation_of_a_square)
    assert (verdict.color, verdict.background) == ("blue", "yellow"), verdict


def test_variation_keeps_shape(variation_of_a_square):
    assert judge(variation_of_a_square).shape == "square"


def test_inpainting_paints_the_colour_asked_for_and_keeps_the_rest(tmp_path):
    Image.new("RGB", (64, 64), COLORS["white"]).save(tmp_path / "plain.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255  # regenerate the right half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    image, _ = only_image(
        invoke("inpaint", "plain.png", "mask.png", "a green triangle", "--seed", "0", "--json", cwd=tmp_path),
        tmp_path,
    )
    pixels = np.asarray(image)
    assert (pixels[:, :32] == 255).all()  # the kept half is the input's white
    painted = [nearest_color(p) for p in pixels[:, 32:].reshape(-1, 3).astype(np.float64)]
    assert painted.count("green") >= 0.03 * len(painted), {c: painted.count(c) for c in set(painted)}
