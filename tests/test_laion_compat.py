"""What dalle2-laion and DALLE2-pytorch users already have: their configs, their scripts (called
the way dalle2-laion's example_inference.py, gradio_inference.py and README call the API, with
`dalle2_laion` replaced by `dalle2_cli.laion`), and files DALLE2-pytorch's trainers write."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle2_cli.config import ModelLoadConfig
from dalle2_cli.errors import ConfigWarning, InputError
from dalle2_cli.loading.checkpoint import read_checkpoint
from tests.helpers import invoke
from tests.tiny_models import EMBED_DIM, TEXT_LEN, make_decoder, prior_config, training_config

# -- configs ----------------------------------------------------------------------------------


def test_a_clip_section_is_dalle2_pytorchs_adapter_config():
    # As a training config writes it: model defaults to ViT-L/14; base_model_kwargs is the architecture.
    assert ModelLoadConfig.from_dict({"clip": {"make": "openai"}}).clip.model == "ViT-L/14"
    xclip = {"make": "x-clip", "model": "ViT-L/14", "base_model_kwargs": {"dim_text": 8, "dim_image": 8}}
    assert ModelLoadConfig.from_dict({"clip": xclip}).clip.architecture == {"dim_text": 8, "dim_image": 8}
    with pytest.raises(InputError, match="not both"):
        ModelLoadConfig.from_dict({"clip": {**xclip, "architecture": {"dim_text": 8}}})


def test_a_clip_given_as_base_model_kwargs_loads_and_generates(tiny_config, tmp_path):
    data = json.loads(tiny_config.read_text())
    data["clip"]["base_model_kwargs"] = data["clip"].pop("architecture")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(data))
    result = invoke("text2im", "a red circle", "-c", config, "--seed", "1", "-o", tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["images"]) == 1


def test_unknown_keys_warn_naming_the_nearest_and_dalle2_laions_own_load(tmp_path):
    data = {
        "decoder": {
            "final_unet_number": 2,  # dalle2-laion computes it; its configs and callers carry it
            "unet_sources": [
                {
                    "unet_numbers": [1],
                    "defualt_cond_scale": [2.0],
                    "load_model_from": {"load_type": "local", "path": "a"},
                },
                {"unet_numbers": [2], "load_model_from": {"load_type": "local", "path": "b", "cache_dri": "x"}},
            ],
        },
        "verbose": True,
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = ModelLoadConfig.from_dict(data)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
    assert config.decoder.final_unet_number == 2
    assert any(
        "unet_sources[0].defualt_cond_scale: unknown key, ignored (did you mean 'default_cond_scale'?)" in m
        for m in messages
    )
    assert any("unet_sources[1].load_model_from.cache_dri" in m and "'cache_dir'" in m for m in messages)
    assert any(m.endswith("verbose: unknown key, ignored") for m in messages)
    assert not any("final_unet_number" in m for m in messages)


def test_the_cli_prints_config_warnings_as_one_line_each_and_runs(tiny_config, tmp_path):
    data = json.loads(tiny_config.read_text())
    data["prior"]["defualt_cond_scale"] = 2.0
    data["decoder"]["final_unet_number"] = 2
    config = tmp_path / "config.json"
    config.write_text(json.dumps(data))
    result = invoke("config", "show", "-c", config)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (
        f"warning: {config}: prior.defualt_cond_scale: unknown key, ignored (did you mean 'default_cond_scale'?)"
    )
    assert json.loads(result.stdout)["decoder"]["final_unet_number"] == 2


# -- files DALLE2-pytorch's trainers write ------------------------------------------------------


def _warmup_prior_trainer():
    from dalle2_pytorch import DiffusionPriorTrainer
    from dalle2_pytorch.train_configs import DiffusionPriorConfig

    prior = DiffusionPriorConfig(**prior_config()).create()
    # DALLE2-pytorch's example prior config sets warmup_steps: the trainer then pickles a
    # pytorch_warmup scheduler object beside the weights.
    trainer = DiffusionPriorTrainer(prior, lr=1e-4, warmup_steps=10, ema_update_after_step=0, ema_update_every=1)
    for _ in range(2):
        trainer(
            text_embed=torch.randn(2, EMBED_DIM),
            image_embed=torch.randn(2, EMBED_DIM),
            text_encodings=torch.randn(2, TEXT_LEN, EMBED_DIM),
        )
        trainer.update()
    return trainer


def test_a_trainer_file_that_pickles_a_warmup_scheduler_loads_its_weights_and_runs(tiny_config, tmp_path):
    trainer = _warmup_prior_trainer()
    path = tmp_path / "prior.pth"
    trainer.save(str(path))
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "DiffusionPriorTrainer checkpoint" and checkpoint.weights == "ema"
    assert "pytorch_warmup.base.LinearWarmup" in checkpoint.set_aside
    ema = trainer.ema_diffusion_prior.ema_model.state_dict()
    assert all(torch.equal(checkpoint.state_dict[key], ema[key]) for key in checkpoint.state_dict)
    (tmp_path / "prior.json").write_text(json.dumps(training_config("prior", prior_config())))
    data = json.loads(tiny_config.read_text())
    data["prior"]["load_model_from"]["path"] = str(path)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(data))
    result = invoke("text2im", "a red circle", "-c", config, "--seed", "2", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


class Payload:
    """Unpickling this would create a file: the proof that code ran."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_code_pickled_beside_the_weights_never_runs_and_inside_them_is_refused(tmp_path):
    payload = Payload()
    payload.marker = tmp_path / "code-ran"
    beside = tmp_path / "beside.pth"
    torch.save({"model": {"net.w": torch.ones(2)}, "version": "1.15.6", "step": 1, "extra": payload}, beside)
    checkpoint = read_checkpoint(beside)
    assert list(checkpoint.state_dict) == ["net.w"] and checkpoint.set_aside
    inside = tmp_path / "inside.pth"
    torch.save({"model": {"net.w": torch.ones(2), "net.evil": payload}, "version": "1.15.6"}, inside)
    with pytest.raises(InputError, match=r"refusing to load .*its weights hold a pickled Python object"):
        read_checkpoint(inside)
    assert not payload.marker.exists()


class Shell:
    def __reduce__(self):
        import os

        return (os.system, ("touch code-ran",))


def test_a_file_calling_the_shell_is_refused_wherever_it_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model": {"net.w": torch.ones(2)}, "step": 1, "extra": Shell()}, path)
    with pytest.raises(InputError, match=r"refusing to load .*pickled Python object \((posix|os)\.system\)"):
        read_checkpoint(path)
    assert not (tmp_path / "code-ran").exists()


def test_a_prior_tracker_save_without_a_config_is_named_as_such(tmp_path):
    trainer = _warmup_prior_trainer()
    path = tmp_path / "prior.pth"
    # The tracker's model save, with no config in its metadata: the EMA weights and the version.
    state = trainer.ema_diffusion_prior.ema_model.state_dict()
    torch.save({"version": "1.15.6", "model": state}, path)
    checkpoint = read_checkpoint(path)
    assert (checkpoint.format, checkpoint.weights, checkpoint.has_ema) == ("tracker model save", "ema", True)
    result = invoke("inspect", path)
    assert "format    tracker model save" in result.stdout and "loading uses the ema weights" in result.stdout


def _levels_config(tiny_models, tmp_path: Path, base_level: float | None, upsampler_level: float | None) -> Path:
    """The tiny model with an upsampler trained on noised low-resolution images, each file's
    decoder config (a JSON beside it) saying the noise level to sample with."""
    folder = tmp_path / f"levels-{base_level}-{upsampler_level}"
    folder.mkdir()
    shared = tmp_path / "upsampler.pth"
    if not shared.exists():
        make_decoder(shared, [16, 32], [2], "bare", extra={"use_noise_for_lowres_cond": True})
    base = tiny_models["bare"].parent / "decoder-base.pth"
    for name, source, level in (("decoder-base", base, base_level), ("decoder-upsampler", shared, upsampler_level)):
        shutil.copy(source, folder / f"{name}.pth")
        data = json.loads(source.with_suffix(".json").read_text())
        if level is not None:
            data["decoder"]["lowres_noise_sample_level"] = level
        (folder / f"{name}.json").write_text(json.dumps(data))
    config = json.loads(tiny_models["bare"].read_text())
    for source in config["decoder"]["unet_sources"]:
        name = Path(source["load_model_from"]["path"]).stem
        source["load_model_from"]["path"] = str(folder / f"{name}.pth")
        source["load_config_from"]["path"] = str(folder / f"{name}.json")
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


def test_each_upsampler_samples_with_its_own_files_lowres_noise_level(tiny_models, tmp_path):
    from dalle2_cli.config import load_config
    from dalle2_cli.loading.manager import DalleModelManager
    from dalle2_cli.sampling.pipelines import TextToImage
    from dalle2_cli.sampling.settings import SamplingSettings

    def images(base_level: float | None, upsampler_level: float | None) -> tuple[list[float], list[np.ndarray]]:
        config = _levels_config(tiny_models, tmp_path, base_level, upsampler_level)
        manager = DalleModelManager(load_config(str(config)), device="cpu", log=lambda _: None)
        made = TextToImage(manager, SamplingSettings(seed=4)).run(["a red circle"], num_images=2)
        return manager.lowres_noise_levels, [np.asarray(item.image) for item in made]

    levels, default = images(None, None)
    assert levels == [0.2, 0.2]  # dalle2-pytorch's default
    levels, upsampler_high = images(None, 0.35)
    assert levels == [0.2, 0.35]
    levels, both_high = images(0.35, 0.35)
    assert levels == [0.35, 0.35]
    levels, base_high = images(0.35, None)
    assert levels == [0.35, 0.2]
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))  # noqa: E731
    # The level changes what the upsampler makes; it is the upsampler file's that counts.
    assert not same(default, upsampler_high)
    assert same(upsampler_high, both_high) and same(default, base_high)


# -- dalle2-laion's scripts, as its callers call them ----------------------------------------


@pytest.fixture(scope="module")
def laion_manager(tiny_config):
    from dalle2_cli.laion import DalleModelManager, ModelLoadConfig

    return DalleModelManager(ModelLoadConfig.from_json_path(str(tiny_config)), check_updates=False)


def test_the_manager_has_dalle2_laions_attributes(laion_manager, tiny_config):
    assert laion_manager.model_config.decoder.final_unet_number == 2
    assert laion_manager.decoder_info.data_requirements.text_encoding is True
    assert str(laion_manager.decoder_info.model_version) == "1.15.6"
    assert laion_manager.prior_info.model is laion_manager.prior
    assert laion_manager.devices[0].type == "cpu" and laion_manager.check_updates is False
    for unet_source in laion_manager.model_config.decoder.unet_sources:  # example_inference.py `test`
        assert unet_source.load_model_from.checksum_file_path is None


def test_basic_inference_as_example_inference_dream_calls_it(tiny_config, tmp_path, capsys):
    from dalle2_cli.laion.scripts import BasicInference

    dreamer = BasicInference.create(str(tiny_config), verbose=True, check_updates=False)
    output_map = dreamer.run(["a red circle", "a blue square"], prior_sample_count=2, decoder_batch_size=10)
    assert "Generating images for texts" in capsys.readouterr().out  # self.print, verbose
    assert list(output_map) == ["a red circle", "a blue square"]
    assert {text: list(by_embedding) for text, by_embedding in output_map.items()} == {
        "a red circle": [0, 1],
        "a blue square": [2, 3],
    }
    for by_embedding in output_map.values():
        for images in by_embedding.values():
            assert len(images) == 1 and images[0].size == (32, 32)
            images[0].save(tmp_path / "out.png")


def test_gradio_dream_with_a_cond_scale_per_unet(laion_manager):
    from dalle2_cli.laion.scripts import BasicInference

    scales = [1.0] * laion_manager.model_config.decoder.final_unet_number
    script = BasicInference(laion_manager, verbose=False)
    output = script.run(
        ["a red circle"],
        prior_sample_count=2,
        decoder_batch_size=40,
        prior_cond_scale=1.0,
        decoder_cond_scale=tuple(scales),
    )
    assert [len(images) for images in output["a red circle"].values()] == [1, 1]


def test_image_variation_as_example_inference_calls_it(laion_manager):
    from dalle2_cli.laion import utils
    from dalle2_cli.laion.scripts import ImageVariation

    images = [Image.new("RGB", (48, 40), "red"), Image.new("RGB", (40, 40), "blue")]
    variation = ImageVariation(laion_manager, verbose=False)
    text = [utils.get_prompt_from_filestem("red_thing"), "a blue square"]
    output_map = variation.run(images, text=text, sample_count=2, batch_size=10)
    assert {index: len(made) for index, made in output_map.items()} == {0: 2, 1: 2}
    assert text[0] == "Red thing"


def test_inpainting_keeps_what_dalle2_laions_mask_says_to_keep(laion_manager):
    from dalle2_cli.laion import utils
    from dalle2_cli.laion.scripts import BasicInpainting

    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    sketch = np.zeros((32, 32, 3), dtype=np.uint8)
    sketch[:, 16:] = 255  # the area painted in gradio's sketch tool: regenerate it
    keep = ~utils.get_mask_from_image(Image.fromarray(sketch))  # as gradio_inference.py builds it
    output = BasicInpainting(laion_manager, verbose=False).run(
        images=[image], masks=[keep], text=["a blue square"], sample_count=2
    )
    assert list(output) == [0] and len(output[0]) == 2  # sample_count=2 for one image
    for made in output[0]:
        made = np.asarray(made)
        assert np.array_equal(made[:, :16], pixels[:, :16])  # True = keep: kept exactly
        assert (made[:, 16:] != pixels[:, 16:]).any()


def test_a_script_written_as_dalle2_laions_readme_shows(laion_manager):
    from dalle2_cli.laion.scripts import InferenceScript

    class ExampleInference(InferenceScript):
        def run(self, text: str) -> Image.Image:
            text = [text]
            image_embedding_map = self._sample_prior(text)
            image_embedding = image_embedding_map[0][0]
            image_map = self._sample_decoder(text=text, image_embed=image_embedding)
            return image_map[0][0]

    image = ExampleInference(laion_manager).run("Hello World")
    assert isinstance(image, Image.Image) and image.size == (32, 32)


def test_the_helpers_of_dalle2_laions_scripts(tmp_path):
    from dalle2_cli.laion import utils
    from dalle2_cli.laion.scripts import CliInferenceScript

    Image.new("RGB", (30, 20), "white").save(tmp_path / "wide.png")
    (tmp_path / "notes.txt").write_text("x")
    found = utils.get_images_in_dir(tmp_path)
    assert [p.name for p in found] == ["wide.png"] and utils.is_text_file(tmp_path / "notes.txt")
    image = utils.get_images_from_paths(found)[0]
    assert utils.center_crop_to_square(image).size == (20, 20)
    assert utils.get_mask_from_image(Image.new("RGB", (4, 3), (200, 0, 0))).shape == (3, 4)
    with pytest.raises(NotImplementedError):
        CliInferenceScript(None)
