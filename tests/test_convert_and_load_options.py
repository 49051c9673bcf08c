"""`dalle2 convert`, and the load options: --weights raw, --non-strict, version warnings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import packaging.version
import pytest
import torch
from safetensors import safe_open
from torch.nn.utils import parametrize

from dalle2_cli.config import load_config
from dalle2_cli.loading.manager import DalleModelManager
from dalle2_cli.sampling.pipelines import TextToImage
from dalle2_cli.sampling.settings import SamplingSettings
from tests.helpers import edit_config, invoke


def images(config_path: Path, **manager_options) -> list[np.ndarray]:
    manager = DalleModelManager(load_config(str(config_path)), device="cpu", log=lambda _: None, **manager_options)
    made = TextToImage(manager, SamplingSettings(seed=9)).run(["a red circle"], num_images=2)
    return [np.asarray(item.image) for item in made]


def test_converted_files_make_identical_images(tiny_models, tmp_path):
    source = tiny_models["checkpoint"]  # trainer checkpoints, configs in JSON files beside them
    data = json.loads(source.read_text())
    entries = [data["prior"], *data["decoder"]["unet_sources"]]
    for entry in entries:
        original = Path(entry["load_model_from"]["path"])
        target = tmp_path / f"{original.stem}.safetensors"
        result = invoke("convert", str(original), str(target), "--model-config", entry["load_config_from"]["path"])
        assert result.returncode == 0, result.stderr
        assert "EMA weights of" in result.stderr
        entry["load_model_from"]["path"] = str(target)
        del entry["load_config_from"]  # the converted file carries its config
    converted = tmp_path / "converted.json"
    converted.write_text(json.dumps(data))
    for before, after in zip(images(source), images(converted), strict=True):
        assert np.array_equal(before, after)
    with safe_open(str(tmp_path / "prior.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["weights"] == "ema" and metadata["dalle2_pytorch_version"] == "1.15.6"
    assert json.loads(metadata["config"])["prior"]["image_embed_dim"] == 32


def test_convert_raw_weights_and_refusals(tiny_models, tmp_path):
    source = tiny_models["checkpoint"].parent / "decoder-base.pth"
    saved = torch.load(source, weights_only=True)
    target = tmp_path / "raw.safetensors"
    assert invoke("convert", str(source), str(target), "--weights", "raw").returncode == 0
    with safe_open(str(target), "pt") as handle:
        assert torch.equal(handle.get_tensor("unets.0.to_out.weight"), saved["model"]["unets.0.to_out.weight"])
    again = invoke("convert", str(source), str(target))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    wrong = invoke("convert", str(source), str(tmp_path / "out.pth"))
    assert wrong.returncode == 2 and "must end in .safetensors" in wrong.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.safetensors"]  # nothing half-written


def test_raw_weights_can_be_chosen_over_ema(tiny_models):
    config = tiny_models["checkpoint"]
    saved = torch.load(config.parent / "decoder-base.pth", weights_only=True)
    key = "unets.0.to_out.weight"
    raw = DalleModelManager(load_config(str(config)), device="cpu", log=lambda _: None, weights="raw")
    ema = DalleModelManager(load_config(str(config)), device="cpu", log=lambda _: None)
    assert torch.equal(raw.decoder.state_dict()[key], saved["model"][key])
    assert torch.equal(ema.decoder.state_dict()[key], saved["ema"]["0.ema_model.to_out.weight"])


def test_non_strict_flag_loads_a_drifted_checkpoint(tiny_models, tmp_path):
    state = torch.load(tiny_models["bare"].parent / "prior.pth", weights_only=True)
    torch.save(
        {k.replace("net.causal_transformer.", "net.transformer."): v for k, v in state.items()}, tmp_path / "prior.pth"
    )
    config = edit_config(
        tiny_models["bare"],
        tmp_path / "c.json",
        lambda d: d["prior"]["load_model_from"].update(path=str(tmp_path / "prior.pth")),
    )
    strict = invoke("text2im", "x", "-c", str(config), "-o", str(tmp_path / "out"))
    assert strict.returncode == 2 and "--non-strict" in strict.stderr and "Traceback" not in strict.stderr
    loose = invoke("text2im", "x", "-c", str(config), "-o", str(tmp_path / "out"), "--non-strict")
    assert loose.returncode == 0, loose.stderr
    assert "net.causal_transformer" in loose.stderr and "left random" in loose.stderr


def test_a_version_mismatch_is_reported(tiny_models, tmp_path):
    with torch.serialization.safe_globals([packaging.version.Version]):
        saved = torch.load(tiny_models["tracker"].parent / "prior.pth", weights_only=True)
    saved["version"] = "1.10.0"
    torch.save(saved, tmp_path / "old-prior.pth")
    config = edit_config(
        tiny_models["tracker"],
        tmp_path / "c.json",
        lambda d: d["prior"]["load_model_from"].update(path=str(tmp_path / "old-prior.pth")),
    )
    logs: list[str] = []
    DalleModelManager(load_config(str(config)), device="cpu", log=logs.append).prior
    assert any("written by dalle2-pytorch 1.10.0; 1.15.6 is installed" in line for line in logs)


def test_half_precision_weights_sample_under_autocast(tiny_config, tmp_path):
    reference = images(tiny_config)
    manager = DalleModelManager(load_config(str(tiny_config)), device="cpu", log=lambda _: None, dtype=torch.bfloat16)
    made = TextToImage(manager, SamplingSettings(seed=9)).run(["a red circle"], num_images=2)
    # Converted as each layer ran: stored in bf16 (on a CPU without bf16 kernels, computed in
    # float32 through a parametrization, whose `original` is what is stored).
    conv = manager.decoder.unets[0].init_conv
    stored = conv.parametrizations.weight.original if parametrize.is_parametrized(conv, "weight") else conv.weight
    assert stored.dtype == torch.bfloat16
    assert manager.decoder.noise_schedulers[0].betas.dtype == torch.float32  # schedules keep full precision
    for full, half in zip(reference, [np.asarray(item.image) for item in made], strict=True):
        assert np.abs(full.astype(int) - half.astype(int)).mean() < 8  # same picture, rounding aside
    result = invoke("text2im", "x", "-c", str(tiny_config), "--dtype", "fp16", "--json", "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["images"][0]["settings"]["dtype"] == "float16"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_memory_holds_a_stage_in_its_precision_only_while_it_runs(tiny_config, dtype):
    """--low-memory: the same images; between stages, every weight is the file's memory-mapped
    float32 tensor (its pages handed back), converted to the dtype only while its stage runs."""
    from dalle2_cli.loading.precision import FilePages

    low, plain = images(tiny_config, dtype=dtype, low_memory=True), images(tiny_config, dtype=dtype)
    if dtype == torch.float32:
        assert [a.tolist() for a in low] == [a.tolist() for a in plain]
    else:  # a CPU's bf16 kernels may round a rare pixel by one level between the two ways' buffers
        assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(low, plain, strict=True))
    manager = DalleModelManager(
        load_config(str(tiny_config)), device="cpu", log=lambda _: None, dtype=dtype, low_memory=True
    )
    prior = manager.prior
    mapped = FilePages().ranges

    def file_backed(tensor: torch.Tensor) -> bool:
        return any(low <= tensor.data_ptr() < high for low, high in mapped)

    weights = [p for p in prior.net.parameters() if p.dim() == 2]
    assert weights and all(p.dtype == torch.float32 and file_backed(p) for p in weights)
    with manager.using(prior):
        assert all(p.dtype == dtype for p in weights)
        assert dtype == torch.float32 or not any(file_backed(p) for p in weights)
    assert all(p.dtype == torch.float32 and file_backed(p) for p in weights)


def test_low_memory_and_keep_resident_are_refused_together(tiny_config, tmp_path):
    result = invoke("text2im", "x", "-c", str(tiny_config), "--low-memory", "--keep-resident", "-o", str(tmp_path))
    assert result.returncode != 0
    assert "--low-memory and --keep-resident pull opposite ways: choose one" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())
