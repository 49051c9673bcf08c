"""Generation as users expect it: prompts files, per-image seeds, names, grids, metadata, --from,
progress; through the real CLI on the tiny models."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from dalle2_cli.config import load_config
from dalle2_cli.io.output import read_metadata
from dalle2_cli.io.prompts import Prompt, parse_prompts
from dalle2_cli.loading.manager import DalleModelManager
from dalle2_cli.sampling.pipelines import TextToImage
from dalle2_cli.sampling.progress import StageProgress
from dalle2_cli.sampling.settings import SamplingSettings
from tests.helpers import invoke

FAST = ("--prior-steps", "4", "--decoder-steps", "4")


def generate(*args: str, cwd: Path, stdin: str | None = None) -> dict:
    result = invoke(*args, *FAST, "--json", cwd=cwd, input=stdin)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def refused(result) -> str:
    """A bad input: exit 2, one line on stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# -- prompts files ---------------------------------------------------------------------------


def test_prompts_file_formats_parse_alike():
    text = parse_prompts("a red circle\n\n  a blue square  \n")
    listed = parse_prompts('["a red circle", {"prompt": "a blue square"}]')
    lines = parse_prompts('{"prompt": "a red circle"}\n{"prompt": "a blue square", "n": 3, "seed": 9}\n')
    assert [p.text for p in text] == [p.text for p in listed] == [p.text for p in lines]
    assert lines[1] == Prompt("a blue square", 3, 9) and text[0] == Prompt("a red circle")


def test_prompts_file_with_per_prompt_count_and_seed(tiny_config, tmp_path):
    (tmp_path / "prompts.jsonl").write_text(
        '{"prompt": "a red circle", "n": 2}\n{"prompt": "a blue square", "n": 1, "seed": 40}\n'
    )
    made = generate("text2im", "--prompts-file", "prompts.jsonl", "-c", str(tiny_config), "--seed", "7", cwd=tmp_path)
    assert [(i["prompt"], i["seed"], i["index"]) for i in made["images"]] == [
        ("a red circle", 7, 0),
        ("a red circle", 8, 1),
        ("a blue square", 40, 0),
    ]


def test_prompts_from_stdin_and_from_arguments_together(tiny_config, tmp_path):
    made = generate(
        "text2im", "a green triangle", "--prompts-file", "-", "-c", str(tiny_config), "--seed", "1", cwd=tmp_path,
        stdin="a red circle\na blue square\n",
    )  # fmt: skip
    assert [i["prompt"] for i in made["images"]] == ["a green triangle", "a red circle", "a blue square"]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("", "holds no prompts"),
        ('{"prompt": "a red circle", "steps": 3}\n', "unknown key(s) steps"),
        ('{"prompt": "a red circle", "n": 0}\n', '"n" must be at least 1, got 0'),
        ('["a red circle", ""]', "item 2: the prompt is missing or empty"),
        ('{"prompt": "a red circle"\n', "line 1 is not a JSON object"),
    ],
)
def test_bad_prompts_files_are_refused(tiny_config, tmp_path, content, says):
    (tmp_path / "p.txt").write_text(content)
    line = refused(invoke("text2im", "--prompts-file", "p.txt", "-c", str(tiny_config), cwd=tmp_path))
    assert says in line
    assert not (tmp_path / "outputs").exists()


def test_no_prompt_at_all_and_bad_seeds_are_refused(tiny_config, tmp_path):
    assert "give a prompt" in refused(invoke("text2im", "-c", str(tiny_config), cwd=tmp_path))
    assert "--seed" in refused(invoke("text2im", "a red circle", "--seed", "-1", cwd=tmp_path))


# -- seeds -------------------------------------------------------------------------------------


def test_same_seed_twice_gives_identical_pixels_and_image_s_of_a_batch_is_a_lone_run_with_seed_s(tiny_config, tmp_path):
    c = str(tiny_config)
    batch = generate("text2im", "a red circle", "-n", "4", "--seed", "20", "-c", c, "-o", "a", cwd=tmp_path)["images"]
    again = generate("text2im", "a red circle", "-n", "4", "--seed", "20", "-c", c, "-o", "b", cwd=tmp_path)["images"]
    assert [i["seed"] for i in batch] == [20, 21, 22, 23]
    for first, second in zip(batch, again, strict=True):
        assert np.array_equal(pixels(tmp_path / first["path"]), pixels(tmp_path / second["path"]))
    assert not np.array_equal(pixels(tmp_path / batch[0]["path"]), pixels(tmp_path / batch[1]["path"]))

    lone = generate("text2im", "a red circle", "-n", "1", "--seed", "22", "-c", c, "-o", "c", cwd=tmp_path)["images"]
    in_batch, alone = pixels(tmp_path / batch[2]["path"]), pixels(tmp_path / lone[0]["path"])
    # Same noise, same model: only float rounding, which differs with the batch's shape, may
    # move a pixel by one level.
    assert np.abs(in_batch - alone).max() <= 1
    assert (in_batch == alone).mean() > 0.99


# -- names, overwrite, grid --------------------------------------------------------------------


def test_name_template_and_overwrite(tiny_config, tmp_path):
    c = str(tiny_config)
    args = ("text2im", "a red circle!", "--seed", "3", "-c", c, "--name", "{seed}_{prompt}_{index}")
    first = generate(*args, cwd=tmp_path)["images"][0]["path"]
    assert Path(first).name == "3_a-red-circle_0.png"
    second = generate(*args, cwd=tmp_path)["images"][0]["path"]
    assert Path(second).name == "3_a-red-circle_0-2.png"  # not replaced without --overwrite
    (tmp_path / first).write_bytes(b"old")
    third = generate(*args, "--overwrite", cwd=tmp_path)["images"][0]["path"]
    assert third == first and read_metadata(tmp_path / third)["seed"] == 3
    assert "unknown field {colour}" in refused(invoke("text2im", "x", "-c", c, "--name", "{colour}", cwd=tmp_path))
    assert "without directories" in refused(invoke("text2im", "x", "-c", c, "--name", "../x", cwd=tmp_path))


def test_grid_has_a_row_per_prompt_or_the_rows_asked_for(tiny_config, tmp_path):
    c = str(tiny_config)
    made = generate("text2im", "a", "b", "-n", "3", "--seed", "1", "-c", c, "--grid", "-o", "g", cwd=tmp_path)
    grid = Image.open(tmp_path / made["grid"])
    assert grid.size == (3 * 32 + 2 * 2, 2 * 32 + 2)  # 3 images a row, one row per prompt, 2 px gaps
    cell = np.asarray(grid.convert("RGB"))[:32, 34:66]
    assert np.array_equal(cell, pixels(tmp_path / made["images"][1]["path"]))  # row 1, column 2
    made = generate("text2im", "a", "b", "-n", "3", "--seed", "1", "-c", c, "--grid-rows", "3", "-o", "g", cwd=tmp_path)
    assert Image.open(tmp_path / made["grid"]).size == (2 * 32 + 2, 3 * 32 + 2 * 2)
    assert Path(made["grid"]).name == "grid-2.png"


# -- metadata, info, --from --------------------------------------------------------------------


def test_metadata_info_and_from_rerun(tiny_config, tmp_path):
    made = generate("text2im", "a red circle", "-n", "2", "--seed", "5", "-c", str(tiny_config), cwd=tmp_path)
    second = tmp_path / made["images"][1]["path"]
    metadata = read_metadata(second)
    assert metadata["prompt"] == "a red circle" and metadata["seed"] == 6
    assert metadata["prior_steps"] == 4 and metadata["decoder_steps"] == [4, 4]
    assert metadata["tool"].startswith("dalle2-cli ") and metadata["config"] == str(tiny_config)
    for role, path in metadata["model_files"].items():
        assert metadata["model_sha256"][role] == hashlib.sha256(Path(path).read_bytes()).hexdigest()

    shown = invoke("info", str(second), "--json", cwd=tmp_path, check=True)
    assert json.loads(shown.stdout) == metadata
    assert "seed: 6" in invoke("info", str(second), cwd=tmp_path, check=True).stdout

    # --from takes prompt, seed, steps and config from the image: a lone run of image 6.
    result = invoke("text2im", "--from", str(second), "-o", "again", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rerun = json.loads(result.stdout)["images"][0]
    assert (rerun["prompt"], rerun["seed"], rerun["settings"]["decoder_steps"]) == ("a red circle", 6, [4, 4])
    assert np.abs(pixels(tmp_path / rerun["path"]) - pixels(second)).max() <= 1

    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert "holds no dalle2 settings" in refused(invoke("info", "plain.png", cwd=tmp_path))
    assert "holds no dalle2 settings" in refused(invoke("text2im", "--from", "plain.png", cwd=tmp_path))


def test_long_prompts_are_cut_with_a_warning_naming_the_words_left_out(tiny_config, tmp_path):
    words = " ".join(f"word{n}" for n in range(100))
    result = invoke("text2im", words, "-c", str(tiny_config), *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "longer than CLIP" in line]
    assert len(warning) == 1 and "word99" in warning[0] and "word0 " not in warning[0]
    assert len(warning[0]) < 200 and "(93 words)" in warning[0]  # one short line, however long the prompt


# -- progress ----------------------------------------------------------------------------------


def test_progress_shows_one_bar_per_stage_with_its_steps(tiny_config):
    manager = DalleModelManager(load_config(str(tiny_config)), log=lambda _: None)
    screen = io.StringIO()
    with StageProgress(Console(file=screen, force_terminal=True, width=120)) as bars:
        settings = SamplingSettings(seed=0, batch_size=2, prior_steps=3, decoder_steps=[4, 5])
        TextToImage(manager, settings, progress=bars).run(["a", "b", "c"])
    final = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue()).splitlines()[-3:]
    # 3 images in batches of 2: two loops of each stage's steps (dalle2-pytorch's prior runs
    # one DDIM step fewer than asked for: the bar counts what runs).
    assert [line.split()[0] for line in final] == ["prior", "decoder", "decoder"]
    assert "4/4" in final[0] and "decoder unet 1" in final[1] and "8/8" in final[1]
    assert "decoder unet 2" in final[2] and "10/10" in final[2]


def test_no_bars_when_stderr_is_not_a_terminal(tiny_config, tmp_path):
    result = invoke("text2im", "a", "-c", str(tiny_config), *FAST, cwd=tmp_path)
    assert result.returncode == 0 and "it/s" not in result.stderr and "sampling loop" not in result.stderr
