"""DalleModelManager: loading every layout, stitching multi-file decoders, refusing misfits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dalle2_cli.config import ModelLoadConfig, load_config
from dalle2_cli.errors import InputError
from dalle2_cli.loading.checkpoint import read_checkpoint
from dalle2_cli.loading.manager import DalleModelManager
from tests.helpers import edit_config
from tests.tiny_models import make_decoder


def manager_for(config_path: Path, logs: list[str] | None = None) -> DalleModelManager:
    return DalleModelManager(
        load_config(str(config_path)), device="cpu", log=(logs.append if logs is not None else lambda _: None)
    )


@pytest.mark.parametrize("layout", ["tracker", "checkpoint", "bare", "single"])
def test_every_layout_loads_a_two_unet_cascade(tiny_models, layout):
    manager = manager_for(tiny_models[layout])
    assert manager.decoder.image_sizes == (16, 32)
    assert manager.prior.image_embed_dim == manager.clip.dim_latent == 32


def test_stitched_decoder_takes_each_unet_and_its_schedule_from_its_own_file(tiny_models):
    directory = tiny_models["tracker"].parent
    base = read_checkpoint(directory / "decoder-base.pth").state_dict
    upsampler = read_checkpoint(directory / "decoder-upsampler.pth").state_dict
    decoder = manager_for(tiny_models["tracker"]).decoder
    weights = decoder.state_dict()
    for key in ("unets.0.to_out.weight", "unets.0.init_conv.weight"):
        assert torch.equal(weights[key], base[key])
    assert torch.equal(weights["unets.1.to_out.weight"], upsampler["unets.1.to_out.weight"])
    # The upsampler file's own unet 1 is not the one used.
    assert not torch.equal(weights["unets.0.to_out.weight"], upsampler["unets.0.to_out.weight"])
    # Per-unet training settings follow the file: learned variance on the base unet only, and
    # the upsampler keeps its linear noise schedule (a 2-unet decoder's default for unet 2).
    assert decoder.learned_variance == (True, False)
    assert torch.equal(weights["noise_schedulers.1.betas"], upsampler["noise_schedulers.1.betas"])
    assert not torch.equal(weights["noise_schedulers.0.betas"], weights["noise_schedulers.1.betas"])


def _with_base(tiny_config: Path, tmp_path: Path, base_file: Path) -> Path:
    def edit(data):
        data["decoder"]["unet_sources"][0]["load_model_from"]["path"] = str(base_file)

    return edit_config(tiny_config, tmp_path / "config.json", edit)


def test_unets_that_do_not_grow_in_size_are_refused(tiny_config, tmp_path):
    big_base = tmp_path / "base32.pth"
    make_decoder(big_base, [32], [1])
    with pytest.raises(InputError) as caught:
        manager_for(_with_base(tiny_config, tmp_path, big_base)).decoder
    message = str(caught.value)
    assert "base32.pth" in message and "decoder-upsampler.pth" in message and "go up in size" in message


def test_unets_trained_with_different_timesteps_are_refused(tiny_config, tmp_path):
    other = tmp_path / "base-50-steps.pth"
    make_decoder(other, [16], [1], timesteps=50)
    with pytest.raises(InputError) as caught:
        manager_for(_with_base(tiny_config, tmp_path, other)).decoder
    message = str(caught.value)
    assert "base-50-steps.pth" in message and "decoder-upsampler.pth" in message
    assert "50 timesteps" in message and "100" in message


def test_asking_a_file_for_a_unet_it_does_not_have(tiny_config, tmp_path):
    def edit(data):
        data["decoder"]["unet_sources"] = [
            {**data["decoder"]["unet_sources"][0], "unet_numbers": [1]},
            {**data["decoder"]["unet_sources"][0], "unet_numbers": [2], "default_sample_timesteps": [10]},
        ]

    path = edit_config(tiny_config, tmp_path / "c.json", edit)
    with pytest.raises(InputError, match="asks .*decoder-base.pth for unet 2, but its decoder has 1 unet"):
        manager_for(path).decoder


def test_models_load_only_when_used(tiny_config, tmp_path):
    def edit(data):
        data["prior"]["load_model_from"]["path"] = str(tmp_path / "never-read.pth")

    manager = manager_for(edit_config(tiny_config, tmp_path / "c.json", edit))
    assert manager.decoder is not None and manager.clip is not None
    assert "prior" not in manager.files
    with pytest.raises(InputError, match="model file not found: .*never-read.pth"):
        manager.prior


def test_bare_state_dict_takes_the_json_beside_it_or_needs_load_config_from(tiny_models, tmp_path):
    def edit(data):
        del data["prior"]["load_config_from"]  # prior.json lies beside prior.pth

    logs: list[str] = []
    assert manager_for(edit_config(tiny_models["bare"], tmp_path / "c.json", edit), logs).prior is not None
    assert any("using prior.json beside it" in line for line in logs)
    alone = tmp_path / "prior.pth"
    alone.write_bytes((tiny_models["bare"].parent / "prior.pth").read_bytes())

    def edit_alone(data):
        edit(data)
        data["prior"]["load_model_from"]["path"] = str(alone)

    with pytest.raises(InputError, match="no embedded config and no prior.json beside it: add 'load_config_from'"):
        manager_for(edit_config(tiny_models["bare"], tmp_path / "d.json", edit_alone)).prior


def test_devices_and_load_on_cpu_are_honoured(tiny_config):
    data = json.loads(tiny_config.read_text())
    on_cpu = DalleModelManager(ModelLoadConfig.from_dict({**data, "devices": ["cpu"], "load_on_cpu": False}))
    assert on_cpu.device.type == "cpu" and on_cpu.map_location == "cpu"
    assert next(on_cpu.prior.parameters()).device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no usable CUDA GPU"):
            DalleModelManager(ModelLoadConfig.from_dict({**data, "devices": "cuda:0"}))


def _drifted_prior(tiny_models, tmp_path) -> Path:
    """A prior whose keys were renamed, as happens across dalle2-pytorch versions."""
    directory = tiny_models["bare"].parent
    state = torch.load(directory / "prior.pth", weights_only=True)
    renamed = {k.replace("net.causal_transformer.", "net.transformer."): v for k, v in state.items()}
    assert renamed.keys() != state.keys()
    torch.save(renamed, tmp_path / "prior.pth")

    def edit(data):
        data["prior"]["load_model_from"]["path"] = str(tmp_path / "prior.pth")

    return edit_config(tiny_models["bare"], tmp_path / "c.json", edit)


def test_strict_loading_refuses_a_drifted_checkpoint(tiny_models, tmp_path):
    path = _drifted_prior(tiny_models, tmp_path)
    with pytest.raises(InputError) as caught:
        manager_for(path).prior
    message = str(caught.value)
    assert "missing keys" in message and "net.causal_transformer" in message
    assert "unexpected keys" in message and "net.transformer" in message


def test_non_strict_loading_warns_which_modules_stay_random(tiny_models, tmp_path):
    path = _drifted_prior(tiny_models, tmp_path)
    data = json.loads(path.read_text())
    data["strict_loading"] = False
    logs: list[str] = []
    manager = DalleModelManager(ModelLoadConfig.from_dict(data, source_path=path), device="cpu", log=logs.append)
    assert manager.prior is not None
    assert any("net.causal_transformer" in line and "left random" in line for line in logs)


def test_config_without_a_section_the_command_needs(tiny_config):
    data = json.loads(tiny_config.read_text())
    del data["prior"]
    manager = DalleModelManager(ModelLoadConfig.from_dict(data), device="cpu")
    with pytest.raises(InputError, match="no 'prior' section"):
        manager.prior


def test_a_prior_file_given_as_a_decoder_is_refused(tiny_config, tmp_path):
    prior_file = str(tiny_config.parent / "prior.pth")
    path = edit_config(
        tiny_config,
        tmp_path / "c.json",
        lambda d: d["decoder"]["unet_sources"][0]["load_model_from"].update(path=prior_file),
    )
    with pytest.raises(InputError, match=r"prior.pth holds a prior, but the config gives it as the decoder unets 1"):
        manager_for(path).decoder
    base_file = str(tiny_config.parent / "decoder-base.pth")
    path = edit_config(tiny_config, tmp_path / "d.json", lambda d: d["prior"]["load_model_from"].update(path=base_file))
    with pytest.raises(InputError, match=r"holds a decoder \(1 unet\), but the config gives it as the prior"):
        manager_for(path).prior


def test_a_file_saved_with_only_some_unets(tiny_config, tmp_path):
    """Training only the upsampler can leave files without the base unet's weights."""
    import packaging.version

    with torch.serialization.safe_globals([packaging.version.Version]):
        saved = torch.load(tiny_config.parent / "decoder-upsampler.pth", weights_only=True)
    saved["model"] = {k: v for k, v in saved["model"].items() if not k.startswith(("unets.0.", "noise_schedulers.0."))}
    torch.save(saved, tmp_path / "upsampler-only.pth")
    only = str(tmp_path / "upsampler-only.pth")
    works = edit_config(
        tiny_config,
        tmp_path / "ok.json",
        lambda d: d["decoder"]["unet_sources"][1]["load_model_from"].update(path=only),
    )
    assert manager_for(works).decoder.num_unets == 2

    def both_from_it(data):
        data["decoder"]["unet_sources"] = [
            {
                **data["decoder"]["unet_sources"][1],
                "unet_numbers": [1, 2],
                "default_sample_timesteps": [10, 10],
                "default_cond_scale": [1.0, 1.0],
            }
        ]
        data["decoder"]["unet_sources"][0]["load_model_from"]["path"] = only

    with pytest.raises(
        InputError, match=r"asks .*upsampler-only.pth for unet 1, but it holds weights for unet\(s\) \[2\]"
    ):
        manager_for(edit_config(tiny_config, tmp_path / "bad.json", both_from_it)).decoder
