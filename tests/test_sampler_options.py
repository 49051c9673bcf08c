"""The sampler and negative prompt as a user sets them: `--sampler`, `--ddim-eta`,
`--negative-prompt`, a config's `default_sampler` and `default_ddim_eta`; recorded in the PNG, honoured by `--from`
and `--resume`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dalle2_cli.config import load_config
from dalle2_cli.errors import SettingError
from dalle2_cli.io.output import read_metadata
from dalle2_cli.loading.manager import DalleModelManager
from dalle2_cli.sampling.pipelines import TextToImage
from dalle2_cli.sampling.schedulers import unet_scheduler
from dalle2_cli.sampling.settings import SamplingSettings
from tests.helpers import edit_config, error_lines, invoke

STEPS = ("--prior-steps", "3", "--decoder-steps", "3")


def _made(result) -> list[Path]:
    assert result.returncode == 0, result.stderr
    return [Path(image["path"]) for image in json.loads(result.stdout)["images"]]


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def test_the_sampler_is_recorded_and_from_remakes_the_image(tiny_config, tmp_path):
    c = ("-c", str(tiny_config))
    args = ("text2im", "a red circle", "-n", "2", "--seed", "4", "--sampler", "dpm++2m", *STEPS, *c, "--json")
    first = _made(invoke(*args, cwd=tmp_path))
    recorded = read_metadata(tmp_path / first[1])
    assert recorded["prior_sampler"] == "dpm++2m" and recorded["decoder_sampler"] == ["dpm++2m", "dpm++2m"]

    again = _made(invoke("text2im", "--from", str(first[1]), "-o", "again", "--json", cwd=tmp_path))
    assert read_metadata(tmp_path / again[0])["prior_sampler"] == "dpm++2m"
    assert np.array_equal(_pixels(tmp_path / again[0]), _pixels(tmp_path / first[1]))

    # Another sampler on the command line wins over the recorded one, and gives other pixels.
    other = _made(invoke("text2im", "--from", str(first[1]), "--sampler", "ddim", "-o", "ddim", "--json", cwd=tmp_path))
    assert read_metadata(tmp_path / other[0])["decoder_sampler"] == ["ddim", "ddim"]
    assert not np.array_equal(_pixels(tmp_path / other[0]), _pixels(tmp_path / first[1]))


def test_resume_refuses_another_sampler(tiny_config, tmp_path):
    c = ("-c", str(tiny_config), "-o", "run", "--resume", "--seed", "2", *STEPS)
    assert invoke("text2im", "a red circle", "--sampler", "ddim", *c, cwd=tmp_path).returncode == 0
    refused = invoke("text2im", "a red circle", "--sampler", "dpm++2m", *c, cwd=tmp_path)
    assert refused.returncode == 2
    assert error_lines(refused.stderr) == [
        "error: run was made with --sampler (prior) ddim, not dpm++2m: resume with the first run's settings "
        "to finish it, or use another output directory"
    ]
    assert invoke("text2im", "a red circle", "--sampler", "ddim", *c, cwd=tmp_path).returncode == 0


def test_resume_refuses_other_reranking(reranking_config, tmp_path):
    """The config's default reranking counts as the setting it is: a run made with it does not
    take images drawn once, and a run from before reranking was recorded is a run of 1."""
    c = ("text2im", "a red circle", "-c", str(reranking_config), "-o", "run", "--resume", "--seed", "2", *STEPS)
    assert invoke(*c, cwd=tmp_path).returncode == 0
    refused = invoke(*c, "--rerank", "1", cwd=tmp_path)
    assert refused.returncode == 2
    assert error_lines(refused.stderr) == [
        "error: run was made with --rerank 3, not 1: resume with the first run's settings "
        "to finish it, or use another output directory"
    ]
    assert invoke(*c, "--rerank", "3", cwd=tmp_path).returncode == 0
    [manifest] = (tmp_path / "run").glob("manifest-rank*.jsonl")
    lines = manifest.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["settings"]["candidates"] == 3
    del header["settings"]["candidates"]  # as a manifest written before reranking was recorded
    manifest.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    assert "error: run was made with --rerank 1, not 3: " in invoke(*c, cwd=tmp_path).stderr
    assert invoke(*c, "--rerank", "1", cwd=tmp_path).returncode == 0


def test_ddim_eta_counts_for_ddim_only(tiny_config, tmp_path):
    c = ("text2im", "a red circle", "--seed", "1", "-c", str(tiny_config), *STEPS, "--sampler", "ddim", "--json")
    still = _made(invoke(*c, "--ddim-eta", "0", "-o", "still", cwd=tmp_path))
    noisy = _made(invoke(*c, "--ddim-eta", "1", "-o", "noisy", cwd=tmp_path))
    assert read_metadata(tmp_path / still[0])["ddim_eta"] == 0
    assert not np.array_equal(_pixels(tmp_path / still[0]), _pixels(tmp_path / noisy[0]))

    other = ("text2im", "a red circle", "-c", str(tiny_config), *STEPS, "--sampler", "dpm++2m", "--ddim-eta", "0.5")
    result = invoke(*other, "-o", "dpm", cwd=tmp_path)
    assert result.returncode == 0
    assert "warning: the DDIM eta is ignored: no stage samples with ddim (they use dpm++2m)" in result.stderr
    assert "ddim_eta" not in read_metadata(next((tmp_path / "dpm").glob("*.png")))


def test_a_bad_sampler_is_refused_by_name(tiny_config, tmp_path):
    result = invoke("text2im", "x", "--sampler", "euler", "-c", str(tiny_config), cwd=tmp_path)
    assert result.returncode == 2 and "'euler' is not one of 'ddpm', 'ddim', 'dpm++2m'" in result.stderr
    with pytest.raises(SettingError, match="sampler") as refused:
        SamplingSettings(sampler="euler")
    assert refused.value.field == "sampler"
    negative_eta = invoke("text2im", "x", "--ddim-eta", "-1", "-c", str(tiny_config), cwd=tmp_path)
    assert negative_eta.returncode == 2
    assert error_lines(negative_eta.stderr) == ["error: --ddim-eta must be 0 (deterministic) or more, got -1.0"]
    empty = invoke("text2im", "x", "--negative-prompt", " ", "-c", str(tiny_config), cwd=tmp_path)
    assert empty.returncode == 2 and error_lines(empty.stderr)[0].startswith("error: --negative-prompt is empty")


def test_a_config_chooses_each_stages_sampler(tiny_config, tmp_path):
    def edit(data: dict) -> None:
        data["prior"]["default_sampler"] = "dpm++2m"
        data["decoder"]["unet_sources"][1]["default_sampler"] = "ddpm"

    config = edit_config(tiny_config, tiny_config.parent / "samplers.json", edit)
    manager = DalleModelManager(load_config(str(config)), log=lambda _: None)
    script = TextToImage(manager, SamplingSettings(seed=0, decoder_steps=[3, 3]))
    plan = script.plan()
    assert plan["prior_sampler"] == "dpm++2m"
    assert plan["decoder_sampler"] == ["ddim", "ddpm"]  # unet 1: fewer steps than trained, so DDIM
    asked = TextToImage(manager, SamplingSettings(sampler="ddim", decoder_steps=[3, 3])).plan()
    assert asked["prior_sampler"] == "ddim" and asked["decoder_sampler"] == ["ddim", "ddim"]


def test_a_config_sets_each_stages_ddim_eta(tiny_config):
    def edit(data: dict) -> None:
        data["prior"]["default_ddim_eta"] = 0.0
        data["decoder"]["unet_sources"][0]["default_ddim_eta"] = 0.5

    config = edit_config(tiny_config, tiny_config.parent / "etas.json", edit)
    manager = DalleModelManager(load_config(str(config)), log=lambda _: None)
    plain = DalleModelManager(load_config(str(tiny_config)), log=lambda _: None)
    base = {"seed": 2, "prior_steps": 3, "decoder_steps": [3, 3]}
    script = TextToImage(manager, SamplingSettings(**base))
    assert script.prior_plan().ddim_eta == 0.0
    assert [p.ddim_eta for p in script.decoder_plans()] == [0.5, None]  # unet 2: the decoder's own
    decoder = manager.decoder
    decoder.ddim_sampling_eta = 0.75  # what a decoder file may set; the shipped files keep 0
    etas = [unet_scheduler(decoder, n, plan).eta for n, plan in enumerate(script.decoder_plans())]
    assert etas == [0.5, 0.75]
    asked = TextToImage(manager, SamplingSettings(**base, ddim_eta=0.25))
    assert [asked.prior_plan().ddim_eta, *(p.ddim_eta for p in asked.decoder_plans())] == [0.25, 0.25, 0.25]
    # The config's prior eta is the one sampled with: the same as asking for it, not the default 1.
    embed = script._sample_prior(["a red circle"], seeds=[2])[0][0]
    same = TextToImage(plain, SamplingSettings(**base, ddim_eta=0.0))._sample_prior(["a red circle"], seeds=[2])
    default = TextToImage(plain, SamplingSettings(**base))._sample_prior(["a red circle"], seeds=[2])
    assert torch.equal(embed, same[0][0]) and not torch.equal(embed, default[0][0])


def test_a_negative_prompt_steers_the_prior_and_is_recorded(tiny_config, tmp_path):
    manager = DalleModelManager(load_config(str(tiny_config)), log=lambda _: None)
    base = {"seed": 3, "prior_steps": 3, "decoder_steps": [3], "prior_cond_scale": 3.0}
    plain = TextToImage(manager, SamplingSettings(**base))
    negative = TextToImage(manager, SamplingSettings(**base, negative_prompt="a blue square"))
    assert negative.run(["a red circle"])[0].settings["negative_prompt"] == "a blue square"
    assert "negative_prompt" not in plain.run(["a red circle"])[0].settings
    # (The tiny decoder's random weights saturate its pixels: the prior's embeddings tell.)
    embeds = [script._sample_prior(["a red circle"], seeds=[3])[0][0] for script in (plain, negative)]
    assert (embeds[0] - embeds[1]).abs().max() > 1e-3
    again = TextToImage(manager, SamplingSettings(**base, negative_prompt="a blue square"))
    assert torch.equal(again._sample_prior(["a red circle"], seeds=[3])[0][0], embeds[1])

    warned: list[str] = []
    at_one = DalleModelManager(load_config(str(tiny_config)), log=lambda _: None, warn=warned.append)
    settings = SamplingSettings(**{**base, "prior_cond_scale": 1.0}, negative_prompt="a blue square")
    TextToImage(at_one, settings).run(["a red circle"])
    assert any("negative prompt acts through the prior's guidance, which is off at scale 1" in w for w in warned)
