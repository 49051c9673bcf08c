"""How fast each sampler converges: from the same starting noise, each sampler's output at a few
step counts against a many-step deterministic DDIM reference (eta 0), on the shipped model's
prior and base decoder unet.

    python scripts/convergence.py [-c shapes] [--steps 5,10,15,25,50] [--reference 1000]
                                  [--images 8] [--json]

- prior: the image embeddings of `--images` captions (the config's default guidance), error
  = 1 - cosine similarity to the reference embedding, mean over the images;
- decoder unet 1: images from the CLIP image embeddings of drawn scenes (the config's default
  guidance), error = RMS pixel difference from the reference, in 0-255 levels, mean over the
  images.

ddim runs with eta 0 (the reference's own flavour, so it converges to it exactly);
dpm++2m is deterministic too. ddpm draws fresh noise at every step, so it converges in
distribution, not to this one image: its row shows how far a stochastic sampler's image
lands from the deterministic one, not an error that vanishes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from dalle2_cli.config import load_config  # noqa: E402
from dalle2_cli.loading.manager import DalleModelManager  # noqa: E402
from dalle2_cli.sampling.loops import PriorConditions, UnetConditions, sample_prior, sample_unet  # noqa: E402
from dalle2_cli.sampling.noise import ImageNoise  # noqa: E402
from dalle2_cli.sampling.pipelines import TextToImage  # noqa: E402
from dalle2_cli.sampling.schedulers import DECODER, PRIOR, SAMPLERS, make_scheduler  # noqa: E402
from dalle2_cli.shapes import COLORS, SHAPES, caption, random_scene  # noqa: E402


def _captions(count: int) -> list[str]:
    rng = random.Random(7)
    captions = []
    for _ in range(count):
        color, background = rng.sample(list(COLORS), 2)
        captions.append(f"a {color} {rng.choice(SHAPES)} on a {background} background")
    return captions


@torch.inference_mode()
def prior_outputs(manager, captions: list[str], runs: list[tuple[str, int]]) -> dict:
    script = TextToImage(manager)
    prior = manager.prior
    plan = script.prior_plan()
    text_embed, encodings = script._embed_text(script._tokens(captions))
    conditions = PriorConditions(text_embed, encodings if prior.condition_on_text_encodings else None)
    seeds = list(range(len(captions)))
    outputs = {}
    for sampler, steps in runs:
        scheduler = make_scheduler(sampler, prior.noise_scheduler, steps, PRIOR, eta=0.0)
        noise = ImageNoise(seeds, "prior")
        outputs[sampler, steps] = sample_prior(prior, conditions, scheduler, noise, plan.cond_scale)
    return outputs


@torch.inference_mode()
def decoder_outputs(manager, count: int, runs: list[tuple[str, int]]) -> dict:
    script = TextToImage(manager)
    decoder = manager.decoder
    plan = script.decoder_plans()[0]
    rng = random.Random(11)
    scenes = [random_scene(rng) for _ in range(count)]
    image_embed = script._embed_images([scene.draw(64) for scene in scenes])
    texts = [caption(scene, rng) for scene in scenes]
    encodings = script._text_encodings(texts) if script._takes_text() else None
    conditions = UnetConditions(image_embed, encodings)
    seeds = list(range(count))
    outputs = {}
    for sampler, steps in runs:
        scheduler = make_scheduler(sampler, decoder.noise_schedulers[0], steps, DECODER, eta=0.0)
        noise = ImageNoise(seeds, "decoder")
        outputs[sampler, steps] = sample_unet(decoder, 0, conditions, scheduler, noise, plan.cond_scale)
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="shapes")
    parser.add_argument("--steps", type=lambda t: [int(x) for x in t.split(",")], default=[5, 10, 15, 25, 50])
    parser.add_argument("--reference", type=int, default=1000, help="steps of the DDIM (eta 0) reference")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    started = time.time()
    manager = DalleModelManager(load_config(args.config), log=lambda _: None)
    runs = [("ddim", args.reference)] + [(sampler, steps) for sampler in SAMPLERS for steps in args.steps]

    prior = prior_outputs(manager, _captions(args.images), runs)
    reference = torch.nn.functional.normalize(prior["ddim", args.reference], dim=-1)
    prior_error = {
        key: float(1 - (torch.nn.functional.normalize(value, dim=-1) * reference).sum(-1).mean())
        for key, value in prior.items()
    }
    decoder = decoder_outputs(manager, args.images, runs)
    pixels = decoder["ddim", args.reference]
    decoder_error = {
        key: float((((value - pixels) * 255) ** 2).mean(dim=(1, 2, 3)).sqrt().mean()) for key, value in decoder.items()
    }
    result = {
        "config": args.config,
        "reference_steps": args.reference,
        "images": args.images,
        "seconds": round(time.time() - started, 1),
        "prior_1_minus_cosine": {f"{s}@{n}": prior_error[s, n] for s, n in runs[1:]},
        "decoder_rms_levels": {f"{s}@{n}": decoder_error[s, n] for s, n in runs[1:]},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.config}: {args.images} images, against DDIM (eta 0) at {args.reference} steps")
    header = f"{'steps':>6}" + "".join(f"{s:>12}" for s in SAMPLERS)
    print(f"\nprior: 1 - cosine similarity of the image embedding\n{header}")
    for steps in args.steps:
        print(f"{steps:>6}" + "".join(f"{prior_error[s, steps]:>12.5f}" for s in SAMPLERS))
    print(f"\ndecoder unet 1: RMS difference, 0-255 levels\n{header}")
    for steps in args.steps:
        print(f"{steps:>6}" + "".join(f"{decoder_error[s, steps]:>12.2f}" for s in SAMPLERS))
    print(f"\n({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
