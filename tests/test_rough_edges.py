"""Rough edges a new user met with the README in hand: each now does what the user expected,
or says why not."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle2_cli.io.output import read_metadata, slug
from tests.helpers import edit_config, error_lines, invoke


def test_convert_makes_the_folder_it_writes_into(tiny_config, tmp_path):
    target = tmp_path / "new" / "dir" / "decoder.safetensors"
    result = invoke("convert", tiny_config.parent / "decoder-base.pth", target)
    assert result.returncode == 0, result.stderr
    assert target.is_file() and not list(target.parent.glob(".*"))


def test_a_text_the_decoder_cannot_use_is_named_and_not_used(tiny_config, tmp_path):
    from tests.tiny_models import decoder_config, make_decoder

    unet = {**decoder_config([16], base=True)["unets"][0], "cond_on_text_encodings": False}
    make_decoder(tmp_path / "textless.pth", [16], [1], extra={"unets": [unet]})

    def edit(data):
        data["decoder"]["unet_sources"] = [
            {"unet_numbers": [1], "load_model_from": {"load_type": "local", "path": str(tmp_path / "textless.pth")}}
        ]

    config = edit_config(tiny_config, tmp_path / "c.json", edit)
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    result = invoke(
        "variation", tmp_path / "red.png", "--text", "a blue dog", "-c", config, "-o", tmp_path / "out", "--json"
    )
    assert result.returncode == 0, result.stderr
    assert "warning: this decoder is not conditioned on text: the text 'a blue dog' is ignored" in result.stderr
    [image] = json.loads(result.stdout)["images"]
    assert image["prompt"] is None and Path(image["path"]).name.startswith("red-")


def test_raw_weights_asked_of_a_file_that_has_only_ema_weights_says_so(tiny_config, tmp_path):
    result = invoke("text2im", "a red circle", "-c", tiny_config, "--weights", "raw", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "warning: raw weights asked for, but prior.pth holds only EMA weights (tracker model save)" in result.stderr


def test_threads_from_the_option_or_the_environment(tiny_config, tmp_path):
    assert invoke("text2im", "a red circle", "-c", tiny_config, "--threads", "1", "-o", tmp_path / "o").returncode == 0
    result = invoke("text2im", "x", "-c", tiny_config, "-o", tmp_path / "o", env={"DALLE2_THREADS": "many"})
    assert result.returncode == 2 and error_lines(result.stderr) == [
        "error: DALLE2_THREADS='many' is not a whole number: unset it or fix it"
    ]


def test_compiling_on_a_cpu_silences_torchs_cuda_home_warning():
    from dalle2_cli.cli.generate import apply_threads
    from dalle2_cli.cli.options import ModelChoice

    apply_threads(ModelChoice("shapes", compile=True))
    assert not logging.getLogger("torch.utils.cpp_extension").isEnabledFor(logging.WARNING)


def test_inpaint_records_how_the_mask_was_made(tiny_config, tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[10:20, 15:25] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = invoke(
        "inpaint",
        tmp_path / "wide.png",
        tmp_path / "mask.png",
        "a dog",
        "-c",
        tiny_config,
        "--pad",
        "--mask-grow",
        "2",
        "-o",
        tmp_path / "out",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    [image] = json.loads(result.stdout)["images"]
    recorded = read_metadata(Path(image["path"]))
    assert (recorded["mask"], recorded["mask_grow"], recorded["pad"]) == (str(tmp_path / "mask.png"), 2, True)
    assert (image["width"], image["height"]) == (32, 24)  # the input's shape, not the padded square
    info = invoke("info", image["path"])
    assert f"mask: {tmp_path / 'mask.png'}" in info.stdout and "mask_grow: 2" in info.stdout


def test_the_shipped_files_verify_against_the_digests_their_config_ships():
    result = invoke("models", "verify", "-c", "shapes")
    assert result.returncode == 0, result.stdout
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == ["ok"] * 4


def test_the_readme_python_example_prints_no_progress_bars_and_saves_metadata(tmp_path):
    code = textwrap.dedent(
        """
        from dalle2_cli import DalleModelManager, SamplingSettings, TextToImage, load_config

        manager = DalleModelManager(load_config("shapes"), device="cpu")
        for made in TextToImage(manager, SamplingSettings(seed=0)).run(["a red circle"], num_images=2):
            made.save(f"circle-{made.index}.png")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "it/s" not in result.stderr and "sampling loop" not in result.stderr
    assert all(line.startswith("loaded ") for line in result.stderr.splitlines()), result.stderr
    metadata = read_metadata(tmp_path / "circle-1.png")
    assert metadata["prompt"] == "a red circle" and metadata["command"] == "text2im"
    rerank = metadata["rerank"]  # shapes reranks 4 by default: image 1 is the best of seed 1's candidates
    assert rerank["image_seed"] == 1 and rerank["candidates"] == 4
    assert metadata["seed"] == rerank["seeds"][rerank["kept"]]
    assert metadata["model_sha256"]["prior"]


def test_file_names_keep_accented_and_other_letters():
    assert slug("über ñandú") == "uber-nandu"
    assert slug("Ça ﬁt") == "ca-fit"
    assert slug("猫が好き") == "猫が好き"
    assert slug("a red circle!") == "a-red-circle"


def test_reranked_images_keep_short_seeds(tiny_config, tmp_path):
    result = invoke(
        "text2im", "a red circle", "-c", tiny_config, "--rerank", "3", "--seed", "1", "-o", tmp_path / "out", "--json"
    )
    assert result.returncode == 0, result.stderr
    [image] = json.loads(result.stdout)["images"]
    seeds = image["settings"]["rerank"]["seeds"]
    assert seeds[0] == 1 and all(0 <= s < 2**31 for s in seeds)


@pytest.mark.parametrize(
    ("command", "what"),
    [
        (["text2im"], "the images"),
        (["inspect"], "the checkpoint"),
        (["info"], "the recorded settings"),
        (["config", "list"], "the configs"),
        (["models", "verify"], "each file's verdict"),
    ],
)
def test_help_says_what_json_describes_and_shows_flags_bare(command, what):
    result = invoke(*command, "--help", env={"COLUMNS": "300"})
    assert result.returncode == 0
    assert f"Print one JSON object describing {what} on stdout." in " ".join(result.stdout.split())
    assert "<bool>" not in result.stdout and "BOOLEAN" not in result.stdout


def test_quiet_leaves_only_warnings_and_errors(tiny_config, tmp_path):
    loud = invoke("text2im", "a red circle", "-c", tiny_config, "-o", tmp_path / "out")
    assert "loaded prior" in loud.stderr and "saved 1 image(s)" in loud.stderr
    quiet = invoke("text2im", "a red circle", "-c", tiny_config, "-o", tmp_path / "out", "-q", "--weights", "raw")
    assert quiet.returncode == 0
    assert quiet.stderr and all(line.startswith("warning: ") for line in quiet.stderr.splitlines())


def test_inspect_and_models_list_give_sizes_in_the_same_units(tiny_config):
    inspected = invoke("inspect", tiny_config.parent / "prior.pth").stdout.splitlines()[0]
    assert inspected.endswith(" kB)") and "MiB" not in inspected


def test_textdiff_names_its_animation_as_its_frames(tiny_config, tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "cat.png")
    args = ["textdiff", tmp_path / "cat.png", "--from", "a red circle", "--to", "a blue circle", "--frames", "2"]
    result = invoke(*args, "-c", tiny_config, "--seed", "7", "-o", tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [Path(i["path"]).name for i in report["images"]] == ["cat-7-0.png", "cat-7-1.png"]
    assert [Path(p).name for p in report["animations"]] == ["cat-7.gif"]


def test_words_the_shipped_model_never_saw_are_named(tmp_path):
    result = invoke("text2im", "a cyan square", "-o", tmp_path / "out", "--decoder-steps", "2", "--prior-steps", "2")
    assert result.returncode == 0, result.stderr
    assert (
        "warning: 'a cyan square': the model was not trained on the word(s) 'cyan'; it knows the colours red"
        in result.stderr
    )
