"""The speed-ups change no image: each is checked against the plain way (the speed itself is
measured by scripts/bench.py, never asserted here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalle2_cli.sampling.noise import ImageNoise, stage_seed


def _reference(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """Per-image noise as first written: a randn per image, concatenated."""
    generators = [torch.Generator().manual_seed(stage_seed(seed, "decoder")) for seed in seeds]
    if not shape or shape[0] % len(seeds):
        return torch.randn(shape, generator=generators[0])
    rows = shape[0] // len(seeds)
    return torch.cat([torch.randn((rows, *shape[1:]), generator=g) for g in generators])


@pytest.mark.parametrize(
    ("shape", "seeds"),
    [
        ((8, 3, 64, 64), list(range(8))),  # a decoder batch
        ((1, 3, 5, 5), [7]),  # a lone image, odd sizes (not a multiple of the vector width)
        ((6, 64), [3, 4, 5]),  # the prior: 2 candidates per image, side by side
        ((5, 4), [1, 2]),  # not one block per image: from the first seed
        ((), [1]),
    ],
)
def test_noise_drawn_into_one_buffer_equals_a_randn_per_image(shape, seeds):
    first = ImageNoise(seeds, "decoder").draw(shape)
    assert torch.equal(first, _reference(shape, seeds))
    assert first.dtype == torch.float32 and first.device.type == "cpu"


def test_noise_continues_per_image_across_steps():
    seeds = [11, 12, 13]
    noise = ImageNoise(seeds, "prior")
    draws = [noise.draw((3, 2, 4)) for _ in range(3)]
    generators = [torch.Generator().manual_seed(stage_seed(s, "prior")) for s in seeds]
    for draw in draws:
        expected = torch.cat([torch.randn((1, 2, 4), generator=g) for g in generators])
        assert torch.equal(draw, expected)


def test_noise_dtype_and_device_follow_the_call():
    noise = ImageNoise([1], "decoder")
    assert noise.like(torch.zeros(2, 3, dtype=torch.float64)).dtype == torch.float64
    assert noise.draw((2, 3), dtype=torch.bfloat16).dtype == torch.bfloat16
    assert noise.draw((2, 3), device="cpu").shape == (2, 3)


# -- --compile -----------------------------------------------------------------------------------


def test_compiled_networks_make_the_same_images_and_compile_once(tiny_config):
    """torch.compile'd prior network and unets (`text2im --compile`), guided so that the batched
    guidance's mask runs inside the compiled forward. The aot_eager backend traces and runs the
    graphs as inductor would get them, without inductor's slow C++ build (bench.py --compile
    measures inductor itself, and its pixel difference)."""
    from torch._dynamo.utils import counters

    from dalle2_cli.config import load_config
    from dalle2_cli.loading.manager import DalleModelManager
    from dalle2_cli.sampling.pipelines import TextToImage
    from dalle2_cli.sampling.settings import SamplingSettings

    settings = SamplingSettings(
        seed=5, batch_size=2, prior_steps=3, decoder_steps=[3], prior_cond_scale=3.0, decoder_cond_scale=[4.0]
    )

    def images(compile: bool | str) -> tuple[DalleModelManager, list[np.ndarray]]:
        manager = DalleModelManager(load_config(str(tiny_config)), device="cpu", log=lambda _: None, compile=compile)
        made = TextToImage(manager, settings).run(["a red circle"], num_images=2)
        return manager, [np.asarray(g.image, dtype=np.int16) for g in made]

    _, plain = images(False)
    manager, compiled = images("aot_eager")
    assert all(getattr(unet.forward, "dalle2_cli_compiled", False) for unet in manager.decoder.unets)
    assert getattr(manager.prior.net.forward, "dalle2_cli_compiled", False)
    for a, b in zip(plain, compiled, strict=True):
        assert np.abs(a - b).max() <= 1  # float rounding at most
    graphs = counters["stats"]["unique_graphs"]
    again = [np.asarray(g.image, dtype=np.int16) for g in TextToImage(manager, settings).run(["a red circle"], 2)]
    assert counters["stats"]["unique_graphs"] == graphs, "a second run of the same shapes compiled again"
    assert all(np.array_equal(a, b) for a, b in zip(compiled, again, strict=True))


def test_text2im_offers_compile():
    from tests.helpers import run_cli

    result = run_cli("text2im", "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0 and "--compile" in result.stdout
