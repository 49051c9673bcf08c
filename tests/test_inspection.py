"""`dalle2 inspect`: what a checkpoint holds, for every format."""

from __future__ import annotations

import hashlib
import json

from dalle2_cli.loading.checkpoint import read_checkpoint
from dalle2_cli.loading.inspection import inspect_file
from tests.helpers import invoke


def test_tracker_decoder_save(tiny_models):
    path = tiny_models["tracker"].parent / "decoder-upsampler.pth"
    report = inspect_file(path)
    assert report.format == "tracker model save" and report.stage == "decoder (2 unets)"
    assert report.has_ema and report.weights == "ema" and report.dalle2_pytorch_version == "1.15.6"
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert report.config["image_sizes"] == [16, 32] and report.config["timesteps"] == 100
    assert set(report.parameters) == {"unets.0", "unets.1"}
    weights = read_checkpoint(path).state_dict
    assert sum(report.parameters.values()) == sum(
        t.numel() for k, t in weights.items() if not k.startswith("noise_schedulers.")
    )


def test_trainer_checkpoints_and_bare_state_dicts(tiny_models):
    prior = inspect_file(tiny_models["checkpoint"].parent / "prior.pth")
    assert prior.format == "DiffusionPriorTrainer checkpoint" and prior.stage == "prior" and prior.has_ema
    raw = inspect_file(tiny_models["checkpoint"].parent / "prior.pth", weights="raw")
    assert raw.weights == "raw" and raw.has_ema
    bare = inspect_file(tiny_models["bare"].parent / "decoder-base.pth")
    assert bare.format == "state dict" and not bare.has_ema and bare.config == {} and bare.stage == "decoder (1 unet)"
    clip = inspect_file(tiny_models["tracker"].parent / "clip.safetensors")
    assert (
        clip.stage == "clip"
        and clip.format == "safetensors"
        and clip.dtypes
        == {"float32": len(read_checkpoint(tiny_models["tracker"].parent / "clip.safetensors").state_dict)}
    )


def test_inspect_command(tiny_models, tmp_path):
    path = tiny_models["tracker"].parent / "prior.pth"
    report = json.loads(invoke("inspect", str(path), "--json", check=True).stdout)
    assert report["stage"] == "prior" and report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    text = invoke("inspect", str(path), check=True).stdout
    assert "tracker model save" in text and "dalle2-pytorch 1.15.6" in text
    missing = invoke("inspect", str(tmp_path / "nope.pth"))
    assert missing.returncode == 2 and "checkpoint not found" in missing.stderr
