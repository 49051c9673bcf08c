"""Batched classifier-free guidance: the same images as dalle2-pytorch's two passes, in any
number of threads at once."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from dalle2_cli.config import load_config
from dalle2_cli.loading.manager import DalleModelManager
from dalle2_cli.sampling.guidance import guided
from dalle2_cli.sampling.pipelines import TextToImage
from dalle2_cli.sampling.settings import SamplingSettings

SCALES = {"prior_cond_scale": 3.0, "decoder_cond_scale": [4.0, 2.5]}


@pytest.fixture(scope="module")
def manager(tiny_config) -> DalleModelManager:
    return DalleModelManager(load_config(str(tiny_config)), device="cpu", log=lambda _: None)


def _pixels(made) -> list[np.ndarray]:
    return [np.asarray(g.image, dtype=np.int16) for g in made]


def _text2im(manager: DalleModelManager, batched: bool, **settings) -> list[np.ndarray]:
    script = TextToImage(manager, SamplingSettings(seed=3, batch_size=3, batched_guidance=batched, **settings))
    return _pixels(script.run(["a red circle", "a blue square"], num_images=2))


def _prior_embeds(manager: DalleModelManager, batched: bool, scale: float) -> torch.Tensor:
    script = TextToImage(manager, SamplingSettings(seed=3, batched_guidance=batched, prior_cond_scale=scale))
    script._start(uses_prior=True)
    found = script._sample_prior(["a red circle", "a blue square"], sample_count=2, batch_size=3)
    return torch.stack([embed for embeds in found.values() for embed in embeds])


def test_guided_prior_embeddings_match_two_passes(manager):
    batched, two_pass = _prior_embeds(manager, True, 3.0), _prior_embeds(manager, False, 3.0)
    assert not torch.allclose(batched, _prior_embeds(manager, True, 1.0), atol=1e-3), "guidance had no effect"
    torch.testing.assert_close(batched, two_pass, rtol=1e-4, atol=1e-5)


def test_guided_images_match_two_passes(manager):
    # (The tiny decoder's pixels barely depend on its conditions; test_one_forward_equals_two
    # checks each unet's guided output in floats.)
    for a, b in zip(_text2im(manager, True, **SCALES), _text2im(manager, False, **SCALES), strict=True):
        assert np.abs(a - b).max() <= 1  # 8-bit pixels of the same floats: a rounding step apart


def test_scale_one_is_unchanged(manager):
    ones = {"prior_cond_scale": 1.0, "decoder_cond_scale": [1.0]}
    for a, b in zip(_text2im(manager, True, **ones), _text2im(manager, False, **ones), strict=True):
        assert np.array_equal(a, b)


def _inputs_of_prior(manager, batch: int) -> tuple[torch.nn.Module, tuple, dict]:
    net = manager.prior.net
    dim = manager.prior.image_embed_dim
    generator = torch.Generator().manual_seed(0)
    encodings = torch.randn(batch, 5, dim, generator=generator)
    encodings[0, 3:] = 0  # padding, which the network masks per sample
    args = (torch.randn(batch, dim, generator=generator), torch.tensor([7, 30, 55])[:batch])
    kwargs = {"text_embed": torch.randn(batch, dim, generator=generator), "text_encodings": encodings}
    if net.self_cond:
        kwargs["self_cond"] = torch.randn(batch, dim, generator=generator)
    return net, args, kwargs


def _inputs_of_unet(manager, number: int, batch: int) -> tuple[torch.nn.Module, tuple, dict]:
    decoder = manager.decoder
    unet = decoder.unets[number]
    size = decoder.image_sizes[number]
    generator = torch.Generator().manual_seed(number)
    args = (torch.randn(batch, unet.channels, size, size, generator=generator), torch.tensor([3, 40, 90])[:batch])
    kwargs = {"image_embed": torch.randn(batch, manager.clip.dim_latent, generator=generator)}
    if unet.cond_on_text_encodings:
        kwargs["text_encodings"] = torch.randn(batch, 6, unet.text_embed_dim, generator=generator)
    if unet.lowres_cond:
        kwargs["lowres_cond_img"] = torch.randn(batch, unet.channels, size, size, generator=generator)
        if unet.to_lowres_noise_cond is not None:
            kwargs["lowres_noise_level"] = torch.tensor([100, 200, 300])[:batch]
    return unet, args, kwargs


@pytest.mark.parametrize("which", ["prior", "unet 1", "unet 2"])
@pytest.mark.parametrize("scale", [1.0, 3.5])
@torch.inference_mode()
def test_one_forward_equals_two(manager, which, scale):
    batch = 3
    if which == "prior":
        net, (x, t), kwargs = _inputs_of_prior(manager, batch)
    else:
        net, (x, t), kwargs = _inputs_of_unet(manager, int(which[-1]) - 1, batch)
    expected = net.forward_with_cond_scale(x, t, cond_scale=scale, **kwargs)  # dalle2-pytorch's two passes
    assert torch.equal(guided(net, x, t, scale, kwargs, batched=False), expected)

    batches = []
    original_forward = net.forward

    def counting(*a, **k):
        batches.append(a[0].shape[0])
        return original_forward(*a, **k)

    net.forward = counting
    try:
        got = guided(net, x, t, scale, kwargs)
    finally:
        del net.forward
    conditioned = which != "unet 2"  # the tiny upsampler takes no embedding nor text
    is_guided = scale != 1 and conditioned
    assert batches == ([2 * batch] if is_guided else [batch])  # one pass, doubled only when guided
    if is_guided:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, guided(net, x, t, 1.0, kwargs), atol=1e-4)
    else:  # scale 1, or no condition to guide: the conditional output itself, bit for bit
        assert torch.equal(got, expected)


def test_a_negative_prompt_conditions_the_null_branch_on_its_text(manager):
    net, (x, t), kwargs = _inputs_of_prior(manager, 3)
    negative = {
        "text_embed": torch.randn_like(kwargs["text_embed"]),
        "text_encodings": torch.randn_like(kwargs["text_encodings"]),
    }
    with torch.inference_mode():
        batched = guided(net, x, t, 3.0, kwargs, negative)
        two = guided(net, x, t, 3.0, kwargs, negative, batched=False)
        plain = guided(net, x, t, 3.0, kwargs)
        # The null branch: the negative text kept, the image dropped (as the null branch drops it).
        cond = net.forward(x, t, **kwargs)
        null = net.forward(x, t, text_cond_drop_prob=0.0, image_cond_drop_prob=1.0, **{**kwargs, **negative})
    torch.testing.assert_close(two, null + (cond - null) * 3.0)
    torch.testing.assert_close(batched, two, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched, plain, atol=1e-4)


def test_threads_sampling_at_once_make_what_they_make_one_after_the_other(manager):
    """The one hook into dalle2-pytorch (the keep mask of a doubled batch) is per thread."""
    settings = [
        SamplingSettings(
            seed=seed, batch_size=2, prior_cond_scale=3.0, decoder_cond_scale=[4.0], prior_steps=4, decoder_steps=[4]
        )
        for seed in (1, 2, 3, 4)
    ]
    prompts = [["a red circle"], ["a blue square", "a green triangle"], ["a big black circle"], ["x"]]
    alone = [_pixels(TextToImage(manager, s).run(p, num_images=2)) for s, p in zip(settings, prompts, strict=True)]
    together: list = [None] * 4
    errors: list = []

    def run(k: int) -> None:
        try:
            together[k] = _pixels(TextToImage(manager, settings[k]).run(prompts[k], num_images=2))
        except Exception as error:  # noqa: BLE001 - a thread's error is reported by the test
            errors.append(error)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for mine, theirs in zip(alone, together, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(mine, theirs, strict=True))
