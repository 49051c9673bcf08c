"""The `dalle2` command as a user runs it, real files: in this process, and in a process of its
own where that is the contract (imports, the installed console script, tracebacks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle2_cli.io.output import read_metadata
from tests.helpers import edit_config, invoke, run_cli


def generate(*args: str, cwd: Path) -> dict:
    result = invoke(*args, "--json", cwd=cwd, check=True)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"stdout must hold exactly one JSON object, got: {result.stdout!r}"
    return json.loads(lines[0])


def test_text2im_writes_pngs_with_metadata_and_reproduces_by_seed(tiny_config, tmp_path):
    c = str(tiny_config)
    first = generate(
        "text2im", "a red circle", "a blue square", "-c", c, "-n", "2", "--seed", "11", "-o", "out", cwd=tmp_path
    )["images"]
    assert [(i["prompt"], i["index"]) for i in first] == [
        ("a red circle", 0),
        ("a red circle", 1),
        ("a blue square", 0),
        ("a blue square", 1),
    ]
    for item in first:
        path = tmp_path / item["path"]
        assert path.is_file() and item["seed"] == 11 + item["index"] and (item["width"], item["height"]) == (32, 32)
        metadata = read_metadata(path)
        assert metadata["prompt"] == item["prompt"] and metadata["seed"] == item["seed"]
        assert metadata["command"] == "text2im" and metadata["decoder_steps"] == [10, 10]
        assert metadata["model_files"]["prior"].endswith("prior.pth")
    again = generate(
        "text2im", "a red circle", "a blue square", "-c", c, "-n", "2", "--seed", "11", "-o", "out", cwd=tmp_path
    )["images"]
    # Nothing is overwritten: the same names get a suffix; the pixels are the same.
    assert {i["path"] for i in again}.isdisjoint({i["path"] for i in first})
    for old, new in zip(first, again, strict=True):
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / old["path"])), np.asarray(Image.open(tmp_path / new["path"]))
        )
    assert len(list((tmp_path / "out").iterdir())) == 8  # and no temporary files left


def test_variation_of_several_images(tiny_config, tmp_path):
    for name, color in (("red.png", "red"), ("blue.jpg", "blue")):
        Image.new("RGB", (40, 40), color).save(tmp_path / name)
    images = generate(
        "variation", "red.png", "blue.jpg", "-c", str(tiny_config), "-n", "2", "--seed", "1", cwd=tmp_path
    )["images"]
    assert [(Path(i["source"]).name, i["index"]) for i in images] == [
        ("red.png", 0),
        ("red.png", 1),
        ("blue.jpg", 0),
        ("blue.jpg", 1),
    ]
    assert all((tmp_path / i["path"]).parent == tmp_path / "outputs" for i in images)  # the default -o


def _noise(path: Path) -> np.ndarray:
    array = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return array


def test_inpaint_white_regenerates_and_black_is_kept_exactly(tiny_config, tmp_path):
    original = _noise(tmp_path / "photo.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[4:20, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    images = generate(
        "inpaint",
        "photo.png",
        "mask.png",
        "a purple triangle",
        "-c",
        str(tiny_config),
        "-n",
        "2",
        "--seed",
        "3",
        cwd=tmp_path,
    )["images"]
    assert len(images) == 2 and images[0]["prompt"] == "a purple triangle"
    keep = mask == 0
    for item in images:
        output = np.asarray(Image.open(tmp_path / item["path"]))
        assert np.array_equal(output[keep], original[keep])
        assert (output[~keep] != original[~keep]).any()


def test_inpaint_without_prompt_uses_transparency_in_an_rgba_mask(tiny_config, tmp_path):
    original = _noise(tmp_path / "photo.png")
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere: colour must not matter once there is transparency
    rgba[..., 3] = 255
    rgba[16:, :, 3] = 0  # the bottom half is transparent: regenerate it
    Image.fromarray(rgba, "RGBA").save(tmp_path / "mask.png")
    images = generate("inpaint", "photo.png", "mask.png", "-c", str(tiny_config), "--seed", "4", cwd=tmp_path)["images"]
    output = np.asarray(Image.open(tmp_path / images[0]["path"]))
    assert images[0]["prompt"] is None
    assert np.array_equal(output[:16], original[:16])
    assert (output[16:] != original[16:]).any()


def _bad_inputs(tmp: Path, config: Path) -> dict[str, list[str]]:
    """The bad inputs found only once the models (or torch) are loaded; those refused before,
    images and masks among them, are in test_inputs.py."""
    edit_config(config, tmp / "invalid.json", lambda d: d["prior"].update(default_sample_timesteps=-3))
    c = ["-c", str(config), "-o", str(tmp / "out")]
    return {
        "too many steps": ["text2im", "x", "--prior-steps", "5000", *c],
        "invalid config": ["text2im", "x", "-c", str(tmp / "invalid.json"), "-o", str(tmp / "out")],
        "unknown device": ["text2im", "x", "--device", "tpu", *c],
    }


EXPECTED = {
    "too many steps": "between 1 and 100",
    "invalid config": "prior.default_sample_timesteps",
    "unknown device": "--device 'tpu' is unknown: use auto, cpu",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_input_exits_2_with_one_clear_line(tiny_config, tmp_path, case):
    result = invoke(*_bad_inputs(tmp_path, tiny_config)[case], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and EXPECTED[case] in errors[0], result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_other_failures_exit_1_and_debug_shows_the_traceback(tiny_config, tmp_path):
    def edit(data):
        data["prior"]["load_model_from"] = {
            "load_type": "url",
            "path": "http://127.0.0.1:9/prior.pth",
            "cache_dir": str(tmp_path / "cache"),
        }

    config = str(edit_config(tiny_config, tmp_path / "c.json", edit))
    result = invoke("text2im", "x", "-c", config, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: cannot download http://127.0.0.1:9/prior.pth" in result.stderr
    debug = run_cli("text2im", "x", "-c", config, "--debug", cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    # Nothing cached: only the cache's own bookkeeping (.locks) may be there.
    cache = tmp_path / "cache"
    assert not cache.exists() or [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []
    assert not (cache / ".partial").exists() or not any((cache / ".partial").iterdir())


def test_help_answers_without_importing_torch():
    code = "import sys, dalle2_cli.cli; print('torch' in sys.modules, 'dalle2_pytorch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == [
        "False",
        "False",
    ]
    for command in ([], ["text2im"], ["variation"], ["inpaint"], ["config"]):
        result = run_cli(*command, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout


def test_console_script_and_version():
    dalle2 = Path(sys.executable).parent / "dalle2"
    result = subprocess.run([str(dalle2), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("dalle2-cli ")


def test_config_list_and_show(tiny_config):
    listed = json.loads(invoke("config", "list", "--json", check=True).stdout)
    assert {"shapes", "laion-1.5B", "laion-1.5B-upsampler"} <= set(listed["configs"])
    shown = json.loads(invoke("config", "show", "-c", str(tiny_config), check=True).stdout)
    assert shown["strict_loading"] is True and len(shown["decoder"]["unet_sources"]) == 2
