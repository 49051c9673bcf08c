import json
from pathlib import Path

import pytest

from dalle2_cli.config import ModelLoadConfig, available_configs, find_config, load_config
from dalle2_cli.errors import InputError

# The shape of dalle2-laion's example configs (its README), with its upsampler source.
LAION_STYLE = {
    "decoder": {
        "unet_sources": [
            {
                "unet_numbers": [1],
                "default_cond_scale": [1.7],
                "load_model_from": {
                    "load_type": "url",
                    "path": "https://huggingface.co/laion/DALLE2-PyTorch/resolve/main/decoder/v1.0.2/latest.pth",
                    "cache_dir": "./models",
                    "filename_override": "new_decoder.pth",
                },
            },
            {
                "unet_numbers": [2],
                "load_model_from": {
                    "load_type": "url",
                    "path": "https://huggingface.co/Veldrovive/upsamplers/resolve/main/working/latest.pth",
                    "cache_dir": "./models",
                    "filename_override": "second_decoder.pth",
                },
                "load_config_from": {
                    "load_type": "url",
                    "path": "https://huggingface.co/Veldrovive/upsamplers/raw/main/working/decoder_config.json",
                    "checksum_file_path": "https://huggingface.co/Veldrovive/upsamplers/raw/main/working/decoder_config.json",
                    "cache_dir": "./models",
                    "filename_override": "second_decoder_config.json",
                },
            },
        ]
    },
    "prior": {
        "load_model_from": {
            "load_type": "url",
            "path": "https://huggingface.co/laion/DALLE2-PyTorch/resolve/main/prior/latest.pth",
            "cache_dir": "./models",
            "filename_override": "prior.pth",
        },
        "load_config_from": {
            "load_type": "url",
            "path": "https://huggingface.co/laion/DALLE2-PyTorch/raw/main/prior/prior_config.json",
            "checksum_file_path": "https://huggingface.co/laion/DALLE2-PyTorch/raw/main/prior/prior_config.json",
            "cache_dir": "./models",
        },
    },
    "clip": {"make": "openai", "model": "ViT-L/14"},
    "devices": "cuda:0",
    "strict_loading": False,
}


def test_dalle2_laion_config_loads_unchanged(tmp_path):
    path = tmp_path / "laion.json"
    path.write_text(json.dumps(LAION_STYLE))
    config = ModelLoadConfig.from_json_path(path)
    assert config.decoder.num_unets == 2
    assert config.decoder.unet_sources[0].default_cond_scale == [1.7]
    assert config.decoder.unet_sources[1].load_config_from.filename_override == "second_decoder_config.json"
    assert config.clip.make == "openai" and config.clip.model == "ViT-L/14"
    assert config.strict_loading is False
    assert config.device == "cuda:0"


def test_strict_loading_is_the_default():
    config = ModelLoadConfig.from_dict({"clip": {"make": "openai", "model": "ViT-B/32"}})
    assert config.strict_loading is True
    assert config.load_on_cpu is True


def _error(data) -> str:
    with pytest.raises(InputError) as caught:
        ModelLoadConfig.from_dict(data)
    return str(caught.value)


def _source(numbers, **extra):
    return {"unet_numbers": numbers, "load_model_from": {"load_type": "local", "path": "x.pth"}, **extra}


def test_unet_sources_must_cover_each_unet_once():
    gap = _error({"decoder": {"unet_sources": [_source([1]), _source([3])]}})
    assert "decoder.unet_sources" in gap and "[2]" in gap
    twice = _error({"decoder": {"unet_sources": [_source([1, 2]), _source([2])]}})
    assert "unet 2 comes from both unet_sources[0] and unet_sources[1]" in twice


def test_per_unet_defaults_must_match_the_unet_count():
    message = _error({"decoder": {"unet_sources": [_source([1, 2], default_sample_timesteps=[10])]}})
    assert "default_sample_timesteps has 1 values for 2 unets" in message


@pytest.mark.parametrize(
    ("data", "location", "words"),
    [
        ({"prior": {}}, "prior.load_model_from", "Field required"),
        (
            {"prior": {"load_model_from": {"load_type": "ftp", "path": "x"}}},
            "prior.load_model_from.load_type",
            "'local' or 'url'",
        ),
        (
            {"prior": {"load_model_from": {"load_type": "url", "path": "file:///etc/passwd"}}},
            "prior.load_model_from",
            "http",
        ),
        (
            {"prior": {"load_model_from": {"load_type": "local", "path": "x", "sha256": "abc"}}},
            "prior.load_model_from.sha256",
            "64 hexadecimal",
        ),
        (
            {"prior": {"load_model_from": {"load_type": "url", "path": "https://a/b", "filename_override": "../x"}}},
            "filename_override",
            "plain file name",
        ),
        (
            {"prior": {"load_model_from": {"load_type": "local", "path": "x"}, "default_cond_scale": float("nan")}},
            "prior.default_cond_scale",
            "finite number",
        ),
        ({"decoder": {"unet_sources": [{"unet_numbers": [1, 10**7]}]}}, "unet_numbers.1", "less than or equal to 16"),
        (
            {"decoder": {"unet_sources": [{"unet_numbers": [1], "default_ddim_eta": -0.5}]}},
            "decoder.unet_sources.0.default_ddim_eta",
            "greater than or equal to 0",
        ),
        (
            {"prior": {"load_model_from": {"load_type": "url", "path": "https://a/b", "filename_override": "x" * 300}}},
            "filename_override",
            "at most 255",
        ),
        ({"clip": {"make": "x-clip"}}, "clip", "architecture"),
        ({"clip": {"make": "dalle"}}, "clip.make", "'openai'"),
        ({"clip": {"default_rerank": 0}}, "clip.default_rerank", "greater than or equal to 1"),
        ({"clip": {"default_rerank": 1000}}, "clip.default_rerank", "less than or equal to 64"),
    ],
)
def test_validation_errors_name_the_field(data, location, words):
    message = _error(data)
    assert location in message and words in message


def test_invalid_json_is_reported_with_its_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"prior": ')
    with pytest.raises(InputError, match=r"not valid JSON: .* \(line 1"):
        ModelLoadConfig.from_json_path(path)


def test_local_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "c.json"
    path.write_text(json.dumps({"prior": {"load_model_from": {"load_type": "local", "path": "weights/p.pth"}}}))
    config = ModelLoadConfig.from_json_path(path)
    assert Path(config.prior.load_model_from.path) == tmp_path / "sub" / "weights" / "p.pth"


def test_configs_are_found_by_name_and_by_path(tmp_path):
    assert "shapes" in available_configs()
    assert find_config("shapes") == find_config("shapes.json")
    config = load_config("shapes")
    # package:// points inside the installed package, wherever that is.
    assert Path(config.prior.load_model_from.path).is_file()
    with pytest.raises(InputError, match="unknown config 'no-such'.*shapes"):
        find_config("no-such")
    with pytest.raises(InputError, match="is a directory"):
        find_config(str(tmp_path))
