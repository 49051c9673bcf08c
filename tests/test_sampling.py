"""Our sampling loops against dalle2-pytorch's own: with the `ddpm` and `ddim` schedulers and the
same noise (torch's global generator, drawn in the same order), the same numbers, on decoders
and priors of every kind (noise, x0 and v prediction, learned variance, text conditioning,
two unets with noised low-resolution conditioning, RePaint inpainting); and the schedulers."""

from __future__ import annotations

import pytest
import torch
from dalle2_pytorch.train_configs import DecoderConfig, DiffusionPriorConfig

from dalle2_cli.sampling.loops import Inpaint, PriorConditions, UnetConditions, best_of, sample_prior, sample_unet
from dalle2_cli.sampling.noise import GlobalNoise
from dalle2_cli.sampling.schedulers import DECODER, PRIOR, make_scheduler
from tests.tiny_models import EMBED_DIM, TEXT_LEN, prior_config, unet_config

TIMESTEPS = 50  # short; a linear schedule of 20 steps would reach a beta of 1 (alphas of 0)


def _decoder(timesteps: int = TIMESTEPS, **settings) -> torch.nn.Module:
    """A random two-unet cascade (8 px, then 16 px), conditioned on text and image embedding."""
    unets = [unet_config(base=True), unet_config(base=False)]
    config = {"unets": unets, "image_sizes": [8, 16], "timesteps": timesteps, "image_cond_drop_prob": 0.1, **settings}
    torch.manual_seed(0)
    decoder = DecoderConfig(**config).create().eval()
    for unet in decoder.unets:  # untrained outputs, made small: a learned variance stays finite
        unet.to_out.weight.data *= 0.05
    return decoder


DECODERS = {
    "noise prediction, learned variance": {},
    "x0 prediction": {"predict_x_start": True, "learned_variance": False},
    "v prediction": {"predict_v": True, "learned_variance": False},
    "noised lowres conditioning": {"use_noise_for_lowres_cond": True, "lowres_noise_sample_level": 0.35},
    "dynamic thresholds": {"use_dynamic_thres": True, "predict_x_start": True, "learned_variance": False},
}


def _theirs(decoder, steps: int, scale: float, **inputs) -> torch.Tensor:
    decoder.sample_timesteps = (steps, steps)
    torch.manual_seed(7)
    with torch.no_grad():
        return decoder.sample(cond_scale=scale, **inputs)


def _ours(decoder, steps: int, scale: float, image_embed, text_encodings, inpaint_image=None, inpaint_mask=None):
    sampler = "ddim" if steps < decoder.noise_schedulers[0].num_timesteps else "ddpm"
    inpaint = None if inpaint_image is None else Inpaint(inpaint_image, inpaint_mask)
    torch.manual_seed(7)
    image = None
    with torch.no_grad():
        for index in range(decoder.num_unets):
            schedule = decoder.noise_schedulers[index]
            eta = decoder.ddim_sampling_eta
            scheduler = make_scheduler(sampler, schedule, steps, DECODER, eta, decoder.learned_variance_constrain_frac)
            conditions = UnetConditions(image_embed, text_encodings)
            image = sample_unet(
                decoder,
                index,
                conditions,
                scheduler,
                GlobalNoise(),
                scale,
                lowres_image=image,
                lowres_noise_level=decoder.lowres_noise_sample_level,
                inpaint=inpaint,
                batched_guidance=False,  # dalle2-pytorch's two passes, for numbers equal bit for bit
            )
    return image


def _inputs(batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(3)
    return {
        "image_embed": torch.randn(batch, EMBED_DIM, generator=generator),
        "text_encodings": torch.randn(batch, TEXT_LEN, EMBED_DIM, generator=generator),
    }


@pytest.mark.parametrize("kind", sorted(DECODERS))
@pytest.mark.parametrize("steps", [TIMESTEPS, 8])
def test_the_decoder_loop_is_dalle2_pytorchs(kind, steps):
    decoder = _decoder(**DECODERS[kind])
    inputs = _inputs()
    assert torch.equal(_ours(decoder, steps, 3.0, **inputs), _theirs(decoder, steps, 3.0, **inputs))


@pytest.mark.parametrize("steps", [20, 5])
def test_repaint_inpainting_is_dalle2_pytorchs(steps):
    decoder = _decoder(timesteps=20, beta_schedule=["cosine", "cosine"])  # five resamples a step: kept short
    inputs = _inputs()
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    keep = torch.zeros(2, 16, 16, dtype=torch.bool)
    keep[:, :, :8] = True
    ours = _ours(decoder, steps, 2.0, **inputs, inpaint_image=image, inpaint_mask=keep)
    theirs = _theirs(decoder, steps, 2.0, **inputs, inpaint_image=image, inpaint_mask=keep)
    assert torch.equal(ours, theirs)
    assert torch.allclose(ours[:, :, :, :8], image[:, :, :, :8], atol=1e-6)  # the kept half, kept


def _prior(clip, **settings):
    torch.manual_seed(1)
    prior = DiffusionPriorConfig(**{**prior_config(timesteps=TIMESTEPS), **settings}).create().eval()
    prior.clip = clip
    return prior


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"predict_x_start": False},
        {"predict_v": True},
        {"sampling_clamp_l2norm": True, "sampling_final_clamp_l2norm": True},
    ],
    ids=["x0", "noise", "v", "l2norm clamps"],
)
@pytest.mark.parametrize("steps", [TIMESTEPS, 6])
def test_the_prior_loop_is_dalle2_pytorchs(tiny_config, settings, steps):
    from dalle2_cli.config import load_config
    from dalle2_cli.loading.clip import tokenize
    from dalle2_cli.loading.manager import DalleModelManager

    clip = DalleModelManager(load_config(str(tiny_config)), device="cpu", log=lambda _: None).clip
    prior = _prior(clip, **settings)
    tokens = tokenize(clip, ["a red circle", "a blue square"])
    for scale in (1.0, 2.5):
        torch.manual_seed(9)
        with torch.no_grad():
            theirs = prior.sample(tokens, num_samples_per_batch=2, cond_scale=scale, timesteps=steps)
        torch.manual_seed(9)
        with torch.no_grad():
            text_embed, encodings = clip.embed_text(tokens.repeat_interleave(2, dim=0))
            sampler = "ddim" if steps < TIMESTEPS else "ddpm"
            scheduler = make_scheduler(sampler, prior.noise_scheduler, steps, PRIOR)
            conditions = PriorConditions(text_embed, encodings)
            embeds = sample_prior(prior, conditions, scheduler, GlobalNoise(), scale, batched_guidance=False)
            ours = best_of(embeds, text_embed, 2)
        assert torch.equal(ours, theirs)


# -- the schedulers -----------------------------------------------------------------------------


def test_each_sampler_evaluates_the_network_as_often_as_asked():
    schedule = _decoder().noise_schedulers[0]
    for steps in (1, 3, 7):
        assert len(make_scheduler("dpm++2m", schedule, steps, DECODER).timesteps) == steps
        assert len(make_scheduler("ddim", schedule, steps, DECODER, 0.0).timesteps) == steps
        assert len(make_scheduler("ddpm", schedule, steps, DECODER).timesteps) == steps
    assert make_scheduler("ddpm", schedule, TIMESTEPS, DECODER).timesteps == list(reversed(range(TIMESTEPS)))


def test_dpm_solver_skips_the_cosine_schedules_noisiest_end():
    from dalle2_pytorch.dalle2_pytorch import NoiseScheduler

    schedule = NoiseScheduler(beta_schedule="cosine", timesteps=1000, loss_type="l2")
    scheduler = make_scheduler("dpm++2m", schedule, 10, DECODER)
    first = scheduler.timesteps[0]
    assert 900 < first < 999 and scheduler.lam[first] >= -5.1 > scheduler.lam[first + 1]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_fewer_steps_come_near_many_steps_on_a_smooth_problem(sampler):
    """On data whose clean sample is known (x0 predicted exactly), every sampler ends on it."""
    from dalle2_pytorch.dalle2_pytorch import NoiseScheduler

    from dalle2_cli.sampling.schedulers import Prediction

    schedule = NoiseScheduler(beta_schedule="cosine", timesteps=1000, loss_type="l2")
    target = torch.full((1, 3, 4, 4), 0.3)
    scheduler = make_scheduler(sampler, schedule, 6, DECODER, 0.0)
    noise = GlobalNoise()
    torch.manual_seed(0)
    x = noise.draw(target.shape)
    for t in scheduler.timesteps:
        x = scheduler.step(Prediction(target), t, x, noise)
    # Ancestral sampling keeps a little noise; dalle2-pytorch's DDIM ends at t = 0, not on x0.
    tolerance = {"ddpm": 0.2, "ddim": 0.05, "dpm++2m": 1e-5}[sampler]
    assert torch.allclose(x, target, atol=tolerance)
