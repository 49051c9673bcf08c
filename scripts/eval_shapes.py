"""Measure the shipped shapes model: generate, then judge every image from its pixels alone.

    python scripts/eval_shapes.py                       # default config and its default settings
    python scripts/eval_shapes.py -c shapes --seeds 3 --json
    python scripts/eval_shapes.py --grid docs/shapes-samples.png --phrasing-grid docs/shapes-phrasings.png
    python scripts/eval_shapes.py --sweep ddim:15,6 dpm++2m:15,6 dpm++2m:7,3   # quality per step budget

text2im: every colour x shape x background (colour != background), captioned
"a <colour> <shape> on a <background> background", `--seeds` images each; scored on
foreground colour, shape and background. held-out phrasings: `--phrasings` drawn scenes,
each asked for in a form the training never used (shapes.HELD_OUT: "show me a tiny violet
disk against orange", "over black, a green triangle"), then again with a typo in each, then
(the control) in the training's own templates; scored like text2im; then variations of the
same scenes' drawn images, the most the decoder makes of them with no prior between (its
ceiling). variation: drawn scenes, scored on keeping their colour and shape; then the same
scenes drawn at the base's size and upsampled by the last unet alone (the upsampler's ceiling,
what it keeps of a perfect base's work). inpainting:
"a <colour> <shape> on a <background> background" into the masked half of a plain background
of that colour (the prompt describes the whole new image, as OpenAI's image edits ask;
`--part-prompt` leaves the background out), scored on that colour covering at least 3 % of
the half, on the shape its pixels make there (how they fill their bounding box, as the
text2im judge reads shapes), and on the rest being kept.

`--seed N` starts every set's seeds at N instead of 0; text2im and phrasings images are made
as `dalle2 text2im` makes them, each the best of the config's `default_rerank` by CLIP (4 for
shapes); `--rerank K` asks for K instead, `--rerank 1` for each image drawn once.
`--sweep SAMPLER:STEPS ...` runs text2im and variation once per sampler and decoder steps
(one per unet), and prints one row each with the decoder's network evaluations per image.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time
from collections import defaultdict

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dalle2_cli.config import load_config  # noqa: E402
from dalle2_cli.io.images import to_pil, to_tensor  # noqa: E402
from dalle2_cli.loading.manager import DalleModelManager  # noqa: E402
from dalle2_cli.sampling.pipelines import ImageVariation, Inpainting, TextToImage  # noqa: E402
from dalle2_cli.sampling.settings import SamplingSettings  # noqa: E402
from dalle2_cli.shapes import (  # noqa: E402
    COLORS,
    FILL_RATIO,
    HELD_OUT,
    SHAPES,
    caption,
    judge,
    nearest_color,
    phrasing,
    random_scene,
)


def text2im_cases() -> list[tuple[str, str, str]]:
    return [(c, s, b) for c in COLORS for s in SHAPES for b in COLORS if b != c]


def evaluate_text2im(manager, settings: SamplingSettings, seeds: int, rerank: int | None = None) -> tuple[dict, list]:
    cases = text2im_cases()
    prompts = [f"a {c} {s} on a{'n' if b[0] in 'aeiou' else ''} {b} background" for c, s, b in cases]
    made = TextToImage(manager, settings).run(prompts, num_images=seeds, candidates=rerank)
    rows = []
    for item in made:
        color, shape, background = cases[prompts.index(item.prompt)]
        verdict = judge(item.image)
        rows.append(
            {
                "color": color,
                "shape": shape,
                "background": background,
                "color_ok": verdict.color == color,
                "shape_ok": verdict.shape == shape,
                "background_ok": verdict.background == background,
                "image": item.image,
            }
        )
    return summarize(rows, ("color_ok", "shape_ok", "background_ok")), rows


PHRASING_SCENES, VARIATION_SCENES = 2024, 1234  # the seeds the two sets of scenes are drawn from
CEILING = "the same scenes from their drawn images (variation: the decoder's own ceiling)"
UPSAMPLER_ALONE = "the same scenes drawn at the base's size, upsampled (the upsampler's own ceiling)"
PHRASINGS = {
    "held-out phrasings": (HELD_OUT, False),
    "held-out phrasings, one typo each": (HELD_OUT, True),
    "the same scenes in the training's own templates": (None, False),
}


def evaluate_phrasings(
    manager, settings: SamplingSettings, count: int, forms=HELD_OUT, typos: bool = False, rerank: int | None = None
) -> dict:
    """text2im of `count` scenes, each asked for in one of `forms` (shapes.HELD_OUT: openings,
    background phrases and orders the training never used; None: `caption`'s own templates,
    the control), with `typos` one slip of the keyboard each; one image each, judged like
    `evaluate_text2im`. The scenes, sizes included, are the same whatever the forms."""
    from dalle2_cli.loading.clip import cut_off_words

    context = manager.clip.max_text_len
    scenes = drawn_scenes(count, PHRASING_SCENES)
    wording = random.Random(2025)
    prompts = [
        caption(scene, wording)
        if forms is None
        else phrasing(
            scene, wording, forms, typo_chance=1.0 if typos else 0.0, fits=lambda t: not cut_off_words(t, context)
        )
        for scene in scenes
    ]
    made = TextToImage(manager, settings).run(prompts, candidates=rerank)
    rows = [
        {**scene_scores(scene, judge(item.image)), "prompt": item.prompt, "image": item.image}
        for scene, item in zip(scenes, made, strict=True)
    ]
    return summarize(rows, ("color_ok", "shape_ok", "background_ok")), rows


def scene_scores(scene, verdict) -> dict:
    return {
        "color": scene.color,
        "shape": scene.shape,
        "background": scene.background,
        "color_ok": verdict.color == scene.color,
        "shape_ok": verdict.shape == scene.shape,
        "background_ok": verdict.background == scene.background,
    }


def drawn_scenes(count: int, seed: int) -> list:
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(count)]


def evaluate_variation(manager, settings: SamplingSettings, scenes: list) -> dict:
    """Variations of the drawn `scenes`, judged against them: the decoder from true image
    embeddings, with no prior between."""
    made = ImageVariation(manager, settings).run([s.draw(64) for s in scenes], num_images=1)
    rows = [scene_scores(scene, judge(item.image)) for scene, item in zip(scenes, made, strict=True)]
    return summarize(rows, ("color_ok", "shape_ok", "background_ok"))


def evaluate_upsampler(manager, settings: SamplingSettings, scenes: list) -> dict:
    """The last unet alone: the drawn `scenes` at the size the unet before it makes, resized as
    dalle2-pytorch resizes its training images (nearest), then upsampled with the config's
    settings and judged against them: what the upsampler keeps of a perfect base's work."""
    import torch
    import torch.nn.functional as F

    from dalle2_cli.sampling.loops import UnetConditions, sample_unet
    from dalle2_cli.sampling.noise import ImageNoise
    from dalle2_cli.sampling.schedulers import unet_scheduler

    script = ImageVariation(manager, settings)
    decoder, last = manager.decoder, manager.decoder.num_unets - 1
    plan = script.decoder_plans()[last]
    pictures = [s.draw(64) for s in scenes]
    drawn = torch.stack([to_tensor(picture) for picture in pictures])
    embeds = script._embed_images(pictures)  # as a variation embeds them (an upsampler may ignore them)
    images = []
    for start in range(0, len(scenes), settings.batch_size):
        batch = drawn[start : start + settings.batch_size]
        scheduler = unet_scheduler(decoder, last, plan)
        with torch.no_grad():
            images.append(
                sample_unet(
                    decoder,
                    last,
                    UnetConditions(embeds[start : start + len(batch)]),
                    scheduler,
                    ImageNoise(range(settings.seed + start, settings.seed + start + len(batch)), "decoder"),
                    plan.cond_scale,
                    lowres_image=F.interpolate(batch, decoder.image_sizes[last - 1], mode="nearest"),
                    lowres_noise_level=manager.lowres_noise_levels[last],
                )
            )
    made = torch.cat(images).float().clamp(0, 1)
    rows = [scene_scores(scene, judge(to_pil(image))) for scene, image in zip(scenes, made, strict=True)]
    return summarize(rows, ("color_ok", "shape_ok", "background_ok"))


def evaluate_inpainting(manager, settings: SamplingSettings, count: int, part_prompt: bool = False) -> dict:
    """The prompt describes the whole new image, kept background included, as OpenAI's image
    edits ask of a prompt; with `part_prompt` only what to paint (which, in this world, means
    "on white", at odds with the kept half)."""
    rng = random.Random(99)
    rows = []
    for number in range(count):
        background = rng.choice(list(COLORS))
        color = rng.choice([c for c in COLORS if c != background])
        shape = rng.choice(SHAPES)
        image = Image.new("RGB", (64, 64), COLORS[background])
        regenerate = np.zeros((64, 64), dtype=bool)
        half = slice(0, 32) if number % 2 == 0 else slice(32, 64)
        regenerate[:, half] = True
        script = Inpainting(manager, SamplingSettings(**{**settings.__dict__, "seed": settings.seed + number}))
        prompt = f"a {color} {shape}" + ("" if part_prompt else f" on a {background} background")
        output = np.asarray(script.run(image, regenerate, prompt)[0].image, dtype=np.float64)
        names = np.array([[nearest_color(p) for p in row] for row in output])
        painted = names[regenerate].tolist()
        # The colour asked for must be put into the masked half, on a visible part of it (the
        # smallest shape covers about 6 % of the half). The prompt names no background, which
        # means white in this world, so white painted around the shape is not held against it.
        rows.append(
            {
                "color": color,
                "shape": shape,
                "background": background,
                "color_ok": painted.count(color) >= 0.03 * regenerate.sum(),
                "shape_ok": painted_shape(names, regenerate, color) == shape,
                "kept_ok": bool((names[~regenerate] == background).all()),
            }
        )
    return summarize(rows, ("color_ok", "shape_ok", "kept_ok"))


def painted_shape(names: np.ndarray, area: np.ndarray, color: str) -> str | None:
    """The shape the pixels of `color` make inside `area`, by how they fill their bounding box."""
    painted = (names == color) & area
    if painted.sum() < 4:
        return None
    ys, xs = np.nonzero(painted)
    fill = painted.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return min(FILL_RATIO, key=lambda name: abs(FILL_RATIO[name] - fill))


def summarize(rows: list[dict], scores: tuple[str, ...]) -> dict:
    summary: dict = {"count": len(rows)}
    for score in scores:
        summary[score.removesuffix("_ok") + "_accuracy"] = float(np.mean([r[score] for r in rows]))
    for group in ("color", "shape"):
        table = defaultdict(list)
        for row in rows:
            table[row[group]].append(row)
        summary[f"by_{group}"] = {
            key: {score.removesuffix("_ok"): float(np.mean([r[score] for r in items])) for score in scores}
            for key, items in sorted(table.items())
        }
    return summary


def save_grid(rows: list[dict], path: str) -> None:
    """One image per colour (rows) and shape (columns), on white and on black."""
    picks = {}
    for row in rows:
        if row["background"] in ("white", "black"):
            picks.setdefault((row["color"], row["shape"], row["background"]), row["image"])
    colors = [c for c in COLORS if c not in ("white", "black")]
    columns = [(s, b) for b in ("white", "black") for s in SHAPES]
    cell = 64
    grid = Image.new("RGB", (cell * len(columns), cell * len(colors)), "gray")
    for r, color in enumerate(colors):
        for c, (shape, background) in enumerate(columns):
            image = picks.get((color, shape, background))
            if image is not None:
                grid.paste(image.resize((cell, cell)), (c * cell, r * cell))
    grid.save(path)


def save_captioned(rows: list[dict], path: str, count: int = 12, columns: int = 4) -> None:
    """The first `count` images, each over its prompt, wrapped to the cell's width."""
    from PIL import ImageDraw

    cell, text_height = 160, 44
    rows = rows[:count]
    sheet = Image.new("RGB", (cell * columns, (cell + text_height) * -(-len(rows) // columns)), "white")
    draw = ImageDraw.Draw(sheet)
    for number, row in enumerate(rows):
        x, y = (number % columns) * cell, (number // columns) * (cell + text_height)
        sheet.paste(row["image"].resize((cell - 8, cell - 8), Image.Resampling.NEAREST), (x + 4, y + 4))
        lines, line = [], ""
        for word in row["prompt"].split():
            if line and draw.textlength(f"{line} {word}") > cell - 8:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        draw.multiline_text((x + 4, y + cell), "\n".join([*lines, line][:3]), fill="black", spacing=2)
    sheet.save(path)


def print_table(name: str, summary: dict) -> None:
    scores = [k for k in summary if k.endswith("_accuracy")]
    print(f"\n{name}: {summary['count']} images; " + ", ".join(f"{k} {summary[k]:.1%}" for k in scores))
    for group in ("by_color", "by_shape"):
        for key, values in summary[group].items():
            print(f"  {key:>8}: " + "  ".join(f"{k} {v:.0%}" for k, v in values.items()))


def sweep(manager, settings: SamplingSettings, args: argparse.Namespace) -> None:
    """text2im and variation once per SAMPLER:STEPS, one row each."""
    rows = []
    for entry in args.sweep:
        sampler, _, steps = entry.partition(":")
        chosen = dataclasses.replace(settings, sampler=sampler, decoder_steps=[int(s) for s in steps.split(",")])
        started = time.time()
        text2im, _ = evaluate_text2im(manager, chosen, args.seeds, args.rerank)
        variation = evaluate_variation(manager, chosen, drawn_scenes(args.variations, VARIATION_SCENES))
        plans = TextToImage(manager, chosen).decoder_plans()
        rows.append(
            {
                "sampler": sampler,
                "decoder_steps": [p.steps for p in plans],
                "decoder_evaluations": sum(p.steps for p in plans),
                "text2im": {k: v for k, v in text2im.items() if k.endswith("accuracy")},
                "variation": {k: v for k, v in variation.items() if k.endswith("accuracy")},
                "seconds": round(time.time() - started, 1),
            }
        )
        row = rows[-1]
        print(
            f"{sampler:>8} {','.join(map(str, row['decoder_steps'])):>6} "
            f"{row['decoder_evaluations']:>4} evals | text2im "
            + " ".join(f"{k.removesuffix('_accuracy')} {v:.1%}" for k, v in row["text2im"].items())
            + " | variation "
            + " ".join(f"{k.removesuffix('_accuracy')} {v:.1%}" for k, v in row["variation"].items())
            + f" | {row['seconds']:.0f} s",
            flush=True,
        )
    if args.json:
        print(json.dumps(rows, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="shapes")
    parser.add_argument("--seeds", type=int, default=2, help="text2im images per caption")
    parser.add_argument("--seed", type=int, default=0, help="the first image's seed (image k of a prompt: seed + k)")
    parser.add_argument(
        "--rerank",
        type=int,
        metavar="K",
        help="text2im and phrasings: each image the best of K by CLIP (default: the config's default_rerank)",
    )
    parser.add_argument("--phrasings", type=int, default=192, help="text2im scenes asked for in held-out phrasings")
    parser.add_argument("--variations", type=int, default=192)
    parser.add_argument("--inpaintings", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--prior-steps", type=int)
    parser.add_argument("--decoder-steps", type=lambda t: [int(x) for x in t.split(",")])
    parser.add_argument("--decoder-cond-scale", type=lambda t: [float(x) for x in t.split(",")])
    parser.add_argument("--prior-cond-scale", type=float)
    parser.add_argument("--prior-candidates", type=int, help="prior embeddings drawn per image, CLIP keeping the best")
    parser.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++2m"])
    parser.add_argument("--resample", type=int, help="inpainting: RePaint's rounds per step")
    parser.add_argument(
        "--part-prompt", action="store_true", help="inpainting: prompts name only what to paint, not the background"
    )
    parser.add_argument("--sweep", nargs="+", metavar="SAMPLER:STEPS", help="e.g. ddim:15,6 dpm++2m:7,3")
    parser.add_argument("--only", choices=["text2im", "phrasings", "variation", "inpaint"])
    parser.add_argument("--grid", help="also save a grid of text2im samples to this PNG")
    parser.add_argument("--phrasing-grid", help="also save held-out phrasings' first 12 images, captioned, to this PNG")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.rerank is not None and args.rerank < 1:
        parser.error(f"--rerank {args.rerank}: give K of 1 or more (1: no reranking)")

    manager = DalleModelManager(load_config(args.config), log=lambda _: None)
    settings = SamplingSettings(
        seed=args.seed,
        batch_size=args.batch_size,
        prior_steps=args.prior_steps,
        decoder_steps=args.decoder_steps,
        decoder_cond_scale=args.decoder_cond_scale,
        prior_cond_scale=args.prior_cond_scale,
        **({"num_samples_per_batch": args.prior_candidates} if args.prior_candidates else {}),
        sampler=args.sampler,
        **({"inpaint_resample_times": args.resample} if args.resample else {}),
    )
    if args.sweep:
        sweep(manager, settings, args)
        return
    results, timings = {}, {}
    if args.only in (None, "text2im"):
        started = time.time()
        results["text2im"], rows = evaluate_text2im(manager, settings, args.seeds, args.rerank)
        timings["text2im"] = time.time() - started
        if args.grid:
            save_grid(rows, args.grid)
    if args.only in (None, "phrasings"):
        for name, (forms, typos) in PHRASINGS.items():
            started = time.time()
            results[name], rows = evaluate_phrasings(manager, settings, args.phrasings, forms, typos, args.rerank)
            if args.phrasing_grid and forms is HELD_OUT and not typos:
                save_captioned(rows, args.phrasing_grid)
            timings[name] = time.time() - started
        started = time.time()
        results[CEILING] = evaluate_variation(manager, settings, drawn_scenes(args.phrasings, PHRASING_SCENES))
        timings[CEILING] = time.time() - started
    if args.only in (None, "variation"):
        started = time.time()
        scenes = drawn_scenes(args.variations, VARIATION_SCENES)
        results["variation"] = evaluate_variation(manager, settings, scenes)
        timings["variation"] = time.time() - started
        started = time.time()
        results[UPSAMPLER_ALONE] = evaluate_upsampler(manager, settings, scenes)
        timings[UPSAMPLER_ALONE] = time.time() - started
    if args.only in (None, "inpaint"):
        started = time.time()
        results["inpainting"] = evaluate_inpainting(manager, settings, args.inpaintings, args.part_prompt)
        timings["inpainting"] = time.time() - started
    for name, summary in results.items():
        summary["seconds"] = round(timings[name], 1)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, summary in results.items():
            print_table(f"{name} ({summary['seconds']:.0f}s)", summary)


if __name__ == "__main__":
    main()
