"""Reading every checkpoint format dalle2-pytorch writes, safely, and loading strictly."""

from __future__ import annotations

import pickle
from pathlib import Path

import packaging.version
import pytest
import torch
from safetensors.torch import save_file

from dalle2_cli.cli.guard import FLAGS
from dalle2_cli.errors import InputError
from dalle2_cli.loading.checkpoint import load_weights, read_checkpoint, summarize_keys


def raw(path: Path) -> dict:
    with torch.serialization.safe_globals([packaging.version.Version]):
        return torch.load(path, weights_only=True)


def test_tracker_save_carries_config_and_version(tiny_models):
    checkpoint = read_checkpoint(tiny_models["tracker"].parent / "decoder-base.pth")
    assert checkpoint.format == "tracker model save"
    assert checkpoint.config["decoder"]["image_sizes"] == [16]
    assert checkpoint.version == "1.15.6"
    assert checkpoint.weights == "ema"


def test_decoder_trainer_checkpoint_uses_ema_weights(tiny_models):
    path = tiny_models["checkpoint"].parent / "decoder-base.pth"
    saved = raw(path)
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "DecoderTrainer checkpoint" and checkpoint.weights == "ema"
    key = "unets.0.to_out.weight"
    ema = saved["ema"]["0.ema_model.to_out.weight"]
    assert not torch.equal(ema, saved["model"][key])  # the test means something
    assert torch.equal(checkpoint.state_dict[key], ema)
    assert torch.equal(read_checkpoint(path, "raw").state_dict[key], saved["model"][key])


def test_prior_trainer_checkpoint_uses_ema_model(tiny_models):
    path = tiny_models["checkpoint"].parent / "prior.pth"
    saved = raw(path)
    assert isinstance(saved["version"], packaging.version.Version)  # the one allowed class
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "DiffusionPriorTrainer checkpoint" and checkpoint.weights == "ema"
    key = next(
        k
        for k in saved["ema_model"]
        if k.startswith("net.")
        and saved["ema_model"][k].is_floating_point()
        and not torch.equal(saved["ema_model"][k], saved["model"][k])
    )
    assert torch.equal(checkpoint.state_dict[key], saved["ema_model"][key])


def test_bare_state_dict(tiny_models):
    checkpoint = read_checkpoint(tiny_models["bare"].parent / "prior.pth")
    assert checkpoint.format == "state dict" and checkpoint.config is None


def test_clip_keys_are_stripped(tmp_path):
    path = tmp_path / "with_clip.pth"
    torch.save({"model": {"net.w": torch.ones(2), "clip.visual.w": torch.ones(3)}, "version": "1.15.6"}, path)
    assert list(read_checkpoint(path).state_dict) == ["net.w"]


def test_safetensors_with_metadata(tmp_path):
    path = tmp_path / "prior.safetensors"
    save_file(
        {"net.w": torch.arange(4.0)},
        str(path),
        metadata={"config": '{"prior": {"image_embed_dim": 4}}', "dalle2_pytorch_version": "1.15.6"},
    )
    checkpoint = read_checkpoint(path)
    assert checkpoint.config == {"prior": {"image_embed_dim": 4}}
    assert checkpoint.version == "1.15.6"
    assert torch.equal(checkpoint.state_dict["net.w"], torch.arange(4.0))


def test_non_checkpoint_files_are_refused(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(InputError, match="cannot read .* as a PyTorch checkpoint"):
        read_checkpoint(text)
    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    with pytest.raises(InputError, match="not a model checkpoint"):
        read_checkpoint(listing)


def test_strict_loading_reports_missing_and_unexpected_keys_by_module():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    state = {"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2), "extra.layer.w": torch.zeros(1)}
    with pytest.raises(InputError) as caught:
        load_weights(module, state, strict=True, what="decoder x.pth", version="1.0.0")
    message = str(caught.value)
    assert "missing keys 2 (1: 2)" in message
    assert "unexpected keys 1 (extra.layer: 1)" in message
    # The library names its own argument; the CLI the option that sets it.
    assert "pip install dalle2-pytorch==1.0.0" in message and "load anyway with strict=False" in message
    assert "load anyway with --non-strict" in caught.value.naming(FLAGS.__getitem__)
    # Non-strict: loads what matches and says what stays random.
    warnings = load_weights(module, state, strict=False, what="decoder x.pth")
    assert torch.equal(module[0].weight, torch.zeros(2, 2))
    assert warnings and "left random" in warnings[0]


def test_shape_mismatch_is_always_an_error():
    module = torch.nn.Linear(2, 2)
    with pytest.raises(InputError, match="wrong shape"):
        load_weights(module, {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)}, strict=False, what="m")


def test_summarize_keys_groups_by_prefix():
    keys = [f"unets.0.downs.{i}.w" for i in range(3)] + ["unets.1.ups.w"]
    assert summarize_keys(keys) == "4 (unets.0: 3, unets.1: 1)"


def test_prior_trainer_checkpoint_needs_only_the_version_class(tiny_models):
    path = tiny_models["checkpoint"].parent / "prior.pth"
    with pytest.raises(pickle.UnpicklingError, match="packaging.version.Version"):
        torch.load(path, weights_only=True)  # plain weights_only refuses the pickled Version...
    assert read_checkpoint(path).version == "1.15.6"  # ...which is the one class we allow
