"""The inference scripts from Python: reproducibility, settings, inpainting's kept area."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dalle2_cli.config import load_config
from dalle2_cli.errors import InputError
from dalle2_cli.loading.manager import DalleModelManager
from dalle2_cli.sampling.pipelines import ImageVariation, Inpainting, TextToImage
from dalle2_cli.sampling.settings import SamplingSettings


@pytest.fixture(scope="module")
def manager(tiny_config) -> DalleModelManager:
    return DalleModelManager(load_config(str(tiny_config)), device="cpu", log=lambda _: None)


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(item.image) for item in images]


def test_same_seed_same_images_and_another_seed_others(manager):
    first = TextToImage(manager, SamplingSettings(seed=5)).run(["a red circle", "a blue square"], num_images=2)
    again = TextToImage(manager, SamplingSettings(seed=5)).run(["a red circle", "a blue square"], num_images=2)
    other = TextToImage(manager, SamplingSettings(seed=6)).run(["a red circle", "a blue square"], num_images=2)
    assert [(g.prompt, g.index) for g in first] == [
        ("a red circle", 0),
        ("a red circle", 1),
        ("a blue square", 0),
        ("a blue square", 1),
    ]
    assert all(g.image.size == (32, 32) and g.seed == 5 + g.index for g in first)  # each image its own seed
    assert all(np.array_equal(a, b) for a, b in zip(pixels(first), pixels(again), strict=True))
    assert not any(np.array_equal(a, b) for a, b in zip(pixels(first), pixels(other), strict=True))


def test_batch_size_does_not_change_the_count(manager):
    made = TextToImage(manager, SamplingSettings(seed=1, batch_size=3)).run(["a", "b"], num_images=2)
    assert len(made) == 4


def test_steps_and_guidance_reach_the_samplers(manager):
    settings = SamplingSettings(
        seed=2, prior_steps=5, decoder_steps=[4, 3], decoder_cond_scale=[3.0, 1.0], prior_cond_scale=2.0
    )
    made = TextToImage(manager, settings).run(["a green triangle"])
    record = made[0].settings
    assert record["prior_steps"] == 5 and record["decoder_steps"] == [4, 3]
    assert record["decoder_cond_scale"] == [3.0, 1.0] and record["prior_cond_scale"] == 2.0
    assert manager.decoder.sample_timesteps == (None, None)  # restored after the run


def test_prior_guidance_changes_the_embeddings(manager):
    def embedding(scale: float) -> torch.Tensor:
        script = TextToImage(manager, SamplingSettings(seed=2, prior_cond_scale=scale))
        script._start(uses_prior=True)
        return script._sample_prior(["a green triangle"], cond_scale=scale)[0][0]

    assert torch.equal(embedding(1.0), embedding(1.0))
    assert not torch.allclose(embedding(1.0), embedding(4.0))


def test_config_defaults_apply_without_options(manager):
    made = TextToImage(manager, SamplingSettings(seed=0)).run(["x"])
    assert made[0].settings["prior_steps"] == 10 and made[0].settings["decoder_steps"] == [10, 10]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (SamplingSettings(prior_steps=101), "prior_steps must be between 1 and 100"),
        (SamplingSettings(decoder_steps=[1, 2, 3]), "3 values but the decoder has 2 unets"),
        (SamplingSettings(decoder_steps=[500]), "decoder_steps for unet 1 must be between 1 and 100"),
    ],
)
def test_bad_settings_are_refused_before_sampling(manager, settings, message):
    with pytest.raises(InputError, match=message):
        TextToImage(manager, settings).run(["x"])


def test_empty_prompt_and_zero_images_are_refused(manager):
    with pytest.raises(InputError, match="empty"):
        TextToImage(manager).run(["  "])
    with pytest.raises(InputError, match="at least 1"):
        TextToImage(manager).run(["x"], num_images=0)


def test_variation_of_several_images(manager):
    sources = [Image.new("RGB", (48, 40), color) for color in ("red", "blue")]
    made = ImageVariation(manager, SamplingSettings(seed=3)).run(sources, num_images=2, sources=["r.png", "b.png"])
    assert [(g.source, g.index) for g in made] == [("r.png", 0), ("r.png", 1), ("b.png", 0), ("b.png", 1)]
    assert "prior_steps" not in made[0].settings  # variations do not use the prior


def _picture(size=(32, 32)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("prompt", ["a yellow circle", None])
def test_inpainting_keeps_the_unmasked_area_exactly(manager, prompt):
    image = _picture()
    regenerate = np.zeros((32, 32), dtype=bool)
    regenerate[8:24, 4:20] = True
    made = Inpainting(manager, SamplingSettings(seed=4)).run(image, regenerate, prompt, num_images=2)
    original = np.asarray(image)
    for output in pixels(made):
        assert np.array_equal(output[~regenerate], original[~regenerate])
        assert (output[regenerate] != original[regenerate]).any()


def test_inpainting_a_non_square_image_keeps_its_center_crop(manager):
    image = _picture((64, 48))
    regenerate = np.zeros((48, 64), dtype=bool)
    regenerate[:, :32] = True  # the left half
    made = Inpainting(manager, SamplingSettings(seed=4)).run(image, regenerate, "x")
    expected = np.asarray(ImageOps.fit(image, (32, 32), method=Image.Resampling.BICUBIC))
    output = pixels(made)[0]
    assert np.array_equal(output[:, 16:], expected[:, 16:])  # right of the crop's middle: kept


def test_sample_decoder_takes_dalle2_laion_arguments(manager):
    script = TextToImage(manager, SamplingSettings(seed=0))
    script._start(uses_prior=True)
    embeds = script._sample_prior(["a", "b"], sample_count=3)
    assert sorted(embeds) == [0, 1] and all(len(v) == 3 and v[0].shape == (32,) for v in embeds.values())
    encodings = script._text_encodings(["a"])
    images = script._sample_decoder(image_embed=embeds[0][0], text_encoding=encodings, sample_count=2)
    assert list(images) == [0] and len(images[0]) == 2 and images[0][0].size == (32, 32)
    with pytest.raises(ValueError, match="exactly one of images and image_embed"):
        script._sample_decoder()
    assert isinstance(embeds[0][0], torch.Tensor)
