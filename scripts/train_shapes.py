"""Train the shipped `shapes` model: CLIP, prior, base decoder and upsampler, from a seed.

    python scripts/train_shapes.py                  # everything, into dalle2_cli/weights/shapes
                                                    # (configs/shapes.json names those files)
    python scripts/train_shapes.py --resume         # go on from the last saved step
    python scripts/train_shapes.py --scale 0.05     # a quick smoke run (5 % of the steps)
    python scripts/train_shapes.py --resume --stages clip-text,prior   # the text tower and prior
                                                    # again, on the wider phrasings (decoders kept)
    python scripts/train_shapes.py --resume --stages decoder-base --steps decoder-base=20000 \
        --probe-every 2000      # after rm -r .shapes-train/seed0/decoder-base: a longer base
                                # decoder from scratch (CLIP and prior kept), judged as it trains

Every stage uses dalle2-pytorch's own trainers (except CLIP, which open_clip does not train
for us) and is saved as LAION's files are: tracker model saves with the training config and
version embedded and EMA weights swapped in; the upsampler as unet 2 of its own decoder file.
Stages checkpoint every few minutes under --work-dir, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import packaging.version  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from dalle2_pytorch import DecoderTrainer, DiffusionPriorTrainer  # noqa: E402
from dalle2_pytorch.trackers import Tracker  # noqa: E402
from dalle2_pytorch.train_configs import DecoderConfig, DiffusionPriorConfig  # noqa: E402
from dalle2_pytorch.version import __version__ as DALLE2_VERSION  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from dalle2_cli.config import PACKAGE_DIR, load_config  # noqa: E402
from dalle2_cli.io.atomic import atomic_path  # noqa: E402
from dalle2_cli.io.images import to_pil  # noqa: E402
from dalle2_cli.loading.clip import PrebuiltOpenClipAdapter, cut_off_words, tokenize  # noqa: E402
from dalle2_cli.shapes import TRAINING, caption, judge, phrasing, random_scene, vocabulary  # noqa: E402
from dalle2_cli.sources.digests import sha256_of  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "dalle2_cli" / "weights" / "shapes"
STAGES = ("clip", "clip-text", "prior", "decoder-base", "decoder-upsampler")
EMBED = 64
TEXT_LEN = 16
TIMESTEPS = 1000

CLIP_ARCHITECTURE = {
    "embed_dim": EMBED,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 4, "head_width": 32},
    "text_cfg": {"context_length": TEXT_LEN, "vocab_size": 49408, "width": EMBED, "heads": 2, "layers": 2},
}
PRIOR = {
    "net": {"dim": EMBED, "depth": 4, "dim_head": 32, "heads": 4, "max_text_len": TEXT_LEN, "num_timesteps": TIMESTEPS},
    "image_embed_dim": EMBED,
    "image_size": 32,
    "timesteps": TIMESTEPS,
    "cond_drop_prob": 0.1,
    "condition_on_text_encodings": True,
}
# cond_dim must differ from image_embed_dim: when they are equal, dalle2-pytorch 1.15.6's Unet
# skips its image-to-tokens projection and the image tokens get the wrong shape.
BASE_UNET = {
    "dim": 32,
    "dim_mults": [1, 2, 4],
    "image_embed_dim": EMBED,
    "cond_dim": 128,
    "cond_on_text_encodings": False,
    "attn_dim_head": 16,
    "attn_heads": 4,
    "num_resnet_blocks": 1,
    "attend_at_middle": False,
}
UPSAMPLER_UNET = {
    "dim": 16,
    "dim_mults": [1, 2, 4],
    "cond_dim": 32,
    "attn_dim_head": 16,
    "attn_heads": 2,
    "num_resnet_blocks": 1,
    "attend_at_middle": False,
    "init_cross_embed": False,
}
PLACEHOLDER_UNET = {
    "dim": 8,
    "dim_mults": [1],
    "image_embed_dim": EMBED,
    "cond_dim": 16,
    "self_attn": False,
    "init_cross_embed": False,
}  # unet 1 of the upsampler's file: never trained, never used
# Both decoder unets predict the clean image rather than the noise: on this world of flat
# palette colours that learns colour and background several times faster per step (measured:
# after 400 steps, 69 % colour accuracy against 17 % for noise prediction).
# The base draws 16 px scenes and the upsampler takes them to 64. A 32 px base never learned to
# make a shape out of noise on this CPU budget (7000 steps: at chance, 31-38 %); at 16 px the
# same unet, with decoder guidance 3, climbs from 38 % at 2500 steps to 92 % at 20000 (probes of
# the shipped run).
BASE = {
    "unets": [BASE_UNET],
    "image_sizes": [16],
    "timesteps": TIMESTEPS,
    "image_cond_drop_prob": 0.1,
    "predict_x_start": True,
}
# The probe samples the base at the guidance configs/shapes.json ships: shape needs it.
BASE_COND_SCALE = load_config("shapes").decoder.unet_sources[0].default_cond_scale[0]
# The upsampler trains on whole images: trained on 32 px crops it rounded the corners of squares
# (drawn squares through it judged square 55-62 %, against 92 % after 600 whole-image steps).
# 600 steps: trained longer, it draws wavier edges (the base's squares judged square 60 % after
# 600 steps, 57 % after 1000, 43 % after 2000).
UPSAMPLER = {
    "unets": [PLACEHOLDER_UNET, UPSAMPLER_UNET],
    "image_sizes": [16, 64],
    "timesteps": TIMESTEPS,
    "predict_x_start": [True, True],
}


@dataclass
class Plan:
    pool: int = 20000  # distinct scenes drawn once; every batch is drawn from them
    clip_steps: int = 4000
    clip_text_steps: int = 3000
    prior_steps: int = 12000
    base_steps: int = 20000
    upsampler_steps: int = 600
    batch: int = 32
    clip_batch: int = 128
    prior_batch: int = 128
    precision: str = "fp32"  # or "bf16": the trainers' forward passes under bfloat16 autocast

    def accelerator(self) -> Accelerator:
        """The trainers' accelerator (accelerate keeps one state per process: every stage shares it)."""
        return Accelerator(mixed_precision="bf16" if self.precision == "bf16" else "no")

    def scaled(self, factor: float) -> Plan:
        steps = {
            k: max(2, math.ceil(getattr(self, k) * factor))
            for k in ("pool", "clip_steps", "clip_text_steps", "prior_steps", "base_steps", "upsampler_steps")
        }
        return Plan(**{**self.__dict__, **steps})

    def with_steps(self, overrides: dict[str, int]) -> Plan:
        """`overrides`: a stage's name (see STAGES) -> its step count."""
        return Plan(**{**self.__dict__, **{STEP_FIELDS[stage]: steps for stage, steps in overrides.items()}})


STEP_FIELDS = dict(
    zip(STAGES, ("clip_steps", "clip_text_steps", "prior_steps", "base_steps", "upsampler_steps"), strict=True)
)


class Pool:
    """`size` scenes drawn once from `seed`, each with three captions, kept as uint8 pixels."""

    def __init__(self, size: int, seed: int):
        rng = random.Random(seed)
        self.scenes = scenes = [random_scene(rng) for _ in range(size)]
        self.images = torch.stack([torch.from_numpy(np.array(s.draw(64))).permute(2, 0, 1) for s in scenes])
        self.captions = [[caption(s, rng) for _ in range(3)] for s in scenes]
        self.keys = [(s.color, s.shape, s.background) for s in scenes]
        self.image_embeds: torch.Tensor | None = None  # filled once CLIP is trained

    def batch(self, count: int, seed: int, wide: bool = False) -> tuple[list[int], torch.Tensor, list[str]]:
        """Indices, images [count, 3, 64, 64] in [0, 1], and one caption each: one of the
        scene's three, or with `wide` one drawn then from the wider phrasings (see `phrase`)."""
        rng = random.Random(seed)
        index = [rng.randrange(len(self.keys)) for _ in range(count)]
        captions = [self.phrase(i, rng) if wide else rng.choice(self.captions[i]) for i in index]
        return index, self.images[index].float() / 255, captions

    def phrase(self, index: int, rng: random.Random) -> str:
        """A quarter `caption`'s own templates (what the joint CLIP learned, and the prompts the
        figures have always been measured on), the rest shapes.TRAINING's forms, one in ten with
        a typo; never one that CLIP's context would cut."""
        scene = self.scenes[index]
        if rng.random() < 0.25:
            return caption(scene, rng)
        return phrasing(scene, rng, TRAINING, typo_chance=0.1, fits=fits_context)

    @torch.no_grad()
    def embed_images(self, clip) -> None:
        chunks = [clip.embed_image(self.images[i : i + 1000].float() / 255)[0] for i in range(0, len(self.keys), 1000)]
        self.image_embeds = torch.cat(chunks)


class Probe:
    """How the base decoder draws so far: samples for `count` scenes drawn from their own seed,
    conditioned on those scenes' CLIP image embeddings (a variation without the upsampler) at the
    shipped guidance, resized to 64 px and judged by dalle2_cli.shapes.judge on colour, shape and
    background. Shape is what the base learns last."""

    def __init__(self, clip, count: int = 48, seed: int = 4321, sample_steps: int = 25):
        self.scenes = Pool(count, seed)
        self.scenes.embed_images(clip)
        self.sample_steps = sample_steps

    def __call__(self, trainer: DecoderTrainer) -> str:
        decoder = trainer.decoder
        saved_steps, decoder.sample_timesteps = decoder.sample_timesteps, (self.sample_steps,)
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):  # training draws the same noise with or without probes
            torch.manual_seed(1)
            images = trainer.sample(
                image_embed=self.scenes.image_embeds, cond_scale=BASE_COND_SCALE, stop_at_unet_number=1
            )
        decoder.sample_timesteps = saved_steps
        # As the upsampler would show them; judge's fill ratios are too coarse on 16 px.
        images = F.interpolate(images.float(), size=64, mode="bilinear")
        right = {"colour": 0, "shape": 0, "background": 0}
        for (color, shape, background), image in zip(self.scenes.keys, images, strict=True):
            verdict = judge(to_pil(image))
            right["colour"] += verdict.color == color
            right["shape"] += verdict.shape == shape
            right["background"] += verdict.background == background
        count = len(self.scenes.keys)
        figures = ", ".join(f"{name} {100 * n / count:.0f} %" for name, n in right.items())
        return f"probe ({count} held-out scenes, {self.sample_steps} steps, guidance {BASE_COND_SCALE:g}): {figures}"


def log(stage: str, step: int, total: int, loss: float, started: float, first: int = 0) -> None:
    """`first`: the step this process started at (a resumed run's ETA counts only its own steps)."""
    elapsed = time.time() - started
    eta = elapsed / max(step - first, 1) * (total - step)
    print(f"[{stage}] step {step}/{total} loss {loss:.4f} ({elapsed:.0f}s, eta {eta:.0f}s)", flush=True)


class Stage:
    """A resumable training stage: `state.pt` in the work dir holds its trainer and step."""

    def __init__(self, name: str, work: Path, seed: int, save_every_s: float = 300):
        self.name, self.work, self.seed = name, work / name, seed
        self.work.mkdir(parents=True, exist_ok=True)
        self.save_every_s = save_every_s
        self.last_save = time.time()

    def step_seed(self, step: int) -> int:
        return zlib.crc32(f"{self.name}/{self.seed}/{step}".encode())  # str hash() varies per process

    def save(self, path: Path, write: Callable[[Path], None], last: bool) -> None:
        """At the last step and every few minutes: `write` a temporary file, renamed to `path`
        when whole (a run beside this one may be reading it, a kill may come mid-save)."""
        if last or time.time() - self.last_save > self.save_every_s:
            with atomic_path(path) as tmp:
                write(tmp)
            self.last_save = time.time()


# -- CLIP ----------------------------------------------------------------------------------------


def fits_context(text: str) -> bool:
    return cut_off_words(text, TEXT_LEN) is None


def train_clip(
    plan: Plan, pool: Pool, work: Path, seed: int, resume: bool, joint: open_clip.CLIP | None = None
) -> open_clip.CLIP:
    """The joint stage (`clip`): both towers from scratch on `caption`'s templates. Given the
    `joint` model, the `clip-text` stage: its text tower fine-tuned on the wider phrasings
    (Pool.phrase) against its image tower, frozen. The image embeddings the decoders learned
    from then stay as they were, so the decoders need no retraining."""
    text_only = joint is not None
    stage = Stage("clip-text" if text_only else "clip", work, seed)
    steps, lr_peak = (plan.clip_text_steps, 3e-4) if text_only else (plan.clip_steps, 1e-3)
    torch.manual_seed(seed)
    model = copy.deepcopy(joint) if text_only else open_clip.CLIP(**CLIP_ARCHITECTURE)
    model.visual.requires_grad_(not text_only)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr_peak, weight_decay=0.05)
    state_file = stage.work / "state.pt"
    start = 0
    if resume and state_file.exists():
        state = torch.load(state_file, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    normalize = PrebuiltOpenClipAdapter(model, _normalize()).clip_normalize

    def encode_images(images: torch.Tensor) -> torch.Tensor:
        small = F.interpolate(images, size=32, mode="bilinear", antialias=True)
        return F.normalize(model.encode_image(normalize(small)), dim=-1)

    if text_only:
        with torch.no_grad():
            chunks = range(0, len(pool.keys), 1000)
            frozen = torch.cat([encode_images(pool.images[i : i + 1000].float() / 255) for i in chunks])
    started = time.time()
    for step in range(start, steps):
        lr = lr_peak * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index, images, captions = pool.batch(plan.clip_batch, stage.step_seed(step), wide=text_only)
        keys = [pool.keys[i] for i in index]
        image_features = frozen[index] if text_only else encode_images(images)
        text_features = F.normalize(model.encode_text(open_clip.tokenize(captions, context_length=TEXT_LEN)), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        # Many captions in a batch describe the same thing: all of them are positives.
        same = torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.float32)
        targets = same / same.sum(dim=1, keepdim=True)
        loss = (
            torch.sum(-targets * logits.log_softmax(1), 1).mean()
            + torch.sum(-targets * logits.T.log_softmax(1), 1).mean()
        ) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == steps - 1:
            log(stage.name, step + 1, steps, loss.item(), started, first=start)
        last = step == steps - 1
        stage.save(state_file, lambda tmp, done=step + 1: torch.save(clip_state(model, optimizer, done), tmp), last)
    return model.eval()


def load_clip_file(path: Path) -> open_clip.CLIP:
    """A CLIP as this script saves it (half-precision safetensors), back in float32."""
    from safetensors.torch import load_file

    model = open_clip.CLIP(**CLIP_ARCHITECTURE)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()})
    return model.eval()


def save_clip_file(model: open_clip.CLIP, path: Path) -> None:
    weights = model.state_dict().items()
    with atomic_path(path) as tmp:
        save_file({k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in weights}, tmp)


def clip_state(model: open_clip.CLIP, optimizer: torch.optim.Optimizer, step: int) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}


def _normalize():
    from torchvision.transforms import Normalize

    from dalle2_cli.loading.clip import OPENAI_MEAN, OPENAI_STD

    return Normalize(OPENAI_MEAN, OPENAI_STD)


def clip_adapter(model: open_clip.CLIP) -> PrebuiltOpenClipAdapter:
    adapter = PrebuiltOpenClipAdapter(model, _normalize())
    return adapter.eval().requires_grad_(False)


# -- prior and decoders, through dalle2-pytorch's trainers ---------------------------------------


def full_config(section: str, model: dict, steps: int, batch: int, precision: str) -> dict:
    """The embedded training config, shaped like dalle2-pytorch's train configs."""
    return {
        section: model,
        "train": {"use_ema": True, "steps": steps, "batch_size": batch, "precision": precision},
        "data": {"source": "dalle2_cli.shapes (procedural)", "image_size": 64},
        "tracker": {"log": {"log_type": "console"}, "save": {"save_to": "local"}},
    }


def run_trainer(
    stage: Stage,
    trainer,
    steps: int,
    step_fn,
    resume: bool,
    unet_number: int | None = None,
    probe: Callable[[], str] | None = None,
    probe_every: int = 0,
) -> None:
    checkpoint = stage.work / "trainer.pth"
    start = 0
    if resume and checkpoint.exists():
        with torch.serialization.safe_globals([packaging.version.Version]):  # our own file
            trainer.load(str(checkpoint))
        start = int(trainer.step.item()) if unet_number is None else trainer.num_steps_taken(unet_number)
        print(f"[{stage.name}] resumed at step {start}", flush=True)
    started = time.time()
    for step in range(start, steps):
        loss = step_fn(stage.step_seed(step))
        if step % 50 == 0 or step == steps - 1:
            log(stage.name, step + 1, steps, loss, started, first=start)
        if probe and ((step + 1) % probe_every == 0 or step == steps - 1):
            print(f"[{stage.name}] step {step + 1} {probe()}", flush=True)
        stage.save(checkpoint, lambda tmp: trainer.save(str(tmp)), last=step == steps - 1)


def save_model_file(trainer, path: Path, config: dict) -> None:
    """A tracker "model" save (config, version, EMA weights), then stored in half precision;
    the noise-schedule buffers stay fp32, where half precision would change sampling."""
    tracker = Tracker(data_path=str(path.parent / ".tracker"), dummy_mode=True)
    tracker.save_metadata = {"version": packaging.version.parse(DALLE2_VERSION), "config": config}
    with atomic_path(path) as tmp:
        tracker._save_state_dict(trainer, "model", str(tmp))
        with torch.serialization.safe_globals([packaging.version.Version]):
            saved = torch.load(tmp, weights_only=True)
        saved["model"] = {
            k: v.half() if v.is_floating_point() and not k.startswith(("noise_scheduler", "noise_schedulers")) else v
            for k, v in saved["model"].items()
        }
        torch.save(saved, tmp)


def train_prior(plan: Plan, pool: Pool, work: Path, seed: int, resume: bool, clip, out: Path) -> None:
    stage = Stage("prior", work, seed)
    torch.manual_seed(seed)
    prior = DiffusionPriorConfig(**PRIOR).create()
    trainer = DiffusionPriorTrainer(
        prior,
        accelerator=plan.accelerator(),
        lr=3e-4,
        wd=1e-2,
        max_grad_norm=1.0,
        ema_beta=0.99,
        ema_update_after_step=50,
        ema_update_every=1,
    )

    def step(batch_seed: int) -> float:
        index, _, captions = pool.batch(plan.prior_batch, batch_seed, wide=True)
        with torch.no_grad():
            text_embed, text_encodings = clip.embed_text(tokenize(clip, captions))
        image_embed = pool.image_embeds[index].clone()  # the prior scales its input in place
        loss = trainer(text_embed=text_embed, image_embed=image_embed, text_encodings=text_encodings)
        trainer.update()
        return loss

    run_trainer(stage, trainer, plan.prior_steps, step, resume)
    save_model_file(
        trainer, out / "prior.pth", full_config("prior", PRIOR, plan.prior_steps, plan.prior_batch, plan.precision)
    )


def train_decoder(
    name: str,
    decoder_config: dict,
    unet_number: int,
    steps: int,
    plan: Plan,
    pool: Pool,
    work: Path,
    seed: int,
    resume: bool,
    out: Path,
    probe: Probe | None = None,
    probe_every: int = 0,
) -> None:
    stage = Stage(name, work, seed)
    torch.manual_seed(seed)
    decoder = DecoderConfig(**decoder_config).create()
    trainer = DecoderTrainer(
        decoder,
        accelerator=plan.accelerator(),
        lr=1e-3,
        wd=1e-2,
        warmup_steps=100,
        cosine_decay_max_steps=steps,
        max_grad_norm=1.0,
        ema_beta=0.99,
        ema_update_after_step=50,
        ema_update_every=1,
    )

    def step(batch_seed: int) -> float:
        index, images, _ = pool.batch(plan.batch, batch_seed)
        loss = trainer(images, image_embed=pool.image_embeds[index], unet_number=unet_number)
        trainer.update(unet_number)
        return loss

    check = functools.partial(probe, trainer) if probe else None  # main builds one only with --probe-every
    run_trainer(stage, trainer, steps, step, resume, unet_number=unet_number, probe=check, probe_every=probe_every)
    save_model_file(
        trainer, out / f"{name}.pth", full_config("decoder", decoder_config, steps, plan.batch, plan.precision)
    )


def parse_steps(entries: list[str], parser: argparse.ArgumentParser) -> dict[str, int]:
    overrides = {}
    for entry in entries:
        stage, _, count = entry.partition("=")
        if stage not in STAGES or not count.isdigit() or int(count) < 1:
            parser.error(f"--steps {entry}: give STAGE=N with a stage of {','.join(STAGES)} and N >= 1")
        overrides[stage] = int(count)
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=SHIPPED)
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".shapes-train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--clip-from",
        type=Path,
        default=None,
        metavar="FILE",
        help="start from this joint CLIP (as the clip stage saves it: .shapes-train/seed0/clip/joint.safetensors) "
        "instead of training it",
    )
    parser.add_argument(
        "--record-digests",
        type=Path,
        default=None,
        metavar="CONFIG",
        help="write the trained files' sha256 into CONFIG, which names them (default: configs/shapes.json when "
        "--out is the shipped folder)",
    )
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="comma-separated stages to train (the decoders need CLIP trained first; two processes with "
        "--resume may train the two decoders side by side)",
    )
    parser.add_argument(
        "--steps",
        action="append",
        default=[],
        metavar="STAGE=N",
        help="train STAGE for N steps in all (after --scale); repeatable, e.g. --steps decoder-base=20000",
    )
    parser.add_argument(
        "--probe-every",
        type=int,
        default=0,
        metavar="N",
        help="every N base-decoder steps (and at its last), print how its samples of held-out scenes are judged",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default=Plan.precision,
        help="the prior's and decoders' forward passes: bf16 autocast makes a base-decoder step about 1.5x faster "
        "on a CPU with AVX512-BF16 (weights and optimizer stay fp32)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = Plan(precision=args.precision).scaled(args.scale).with_steps(parse_steps(args.steps, parser))
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work_dir / f"seed{args.seed}"  # a later --resume with a larger --scale trains on
    if not args.resume and work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work} holds an earlier run: pass --resume to continue it, or delete it")
    started = time.time()
    print(f"plan: {plan}", flush=True)
    pool = Pool(plan.pool, args.seed)
    print(f"drew {plan.pool} scenes in {time.time() - started:.0f}s", flush=True)
    stages = set(args.stages.split(","))
    if stages - set(STAGES):
        raise SystemExit(f"unknown stages {sorted(stages - set(STAGES))}; choose from {','.join(STAGES)}")
    # The CLIP stages run whenever a later stage needs them (a finished one resumes at its
    # end): the decoders learn from the joint CLIP's image tower, the prior from the final
    # text tower.
    # The text stage starts from the joint CLIP as saved, in half precision, so that a run
    # from --clip-from that file and a run from scratch compute the same thing.
    joint_file = args.clip_from or work / "clip" / "joint.safetensors"
    if not args.clip_from:
        save_clip_file(train_clip(plan, pool, work, args.seed, args.resume), joint_file)
    joint = load_clip_file(joint_file)
    wants_text = stages & {"clip", "clip-text", "prior"}
    model = train_clip(plan, pool, work, args.seed, args.resume, joint=joint) if wants_text else joint
    if stages & {"clip", "clip-text"}:
        save_clip_file(model, args.out / "clip.safetensors")
    clip = clip_adapter(model)
    pool.embed_images(clip)  # the same image tower as the joint CLIP's
    if "prior" in stages:
        train_prior(plan, pool, work, args.seed, args.resume, clip, args.out)
    probe = Probe(clip) if args.probe_every > 0 and "decoder-base" in stages else None
    for name, config, unet, steps in (
        ("decoder-base", BASE, 1, plan.base_steps),
        ("decoder-upsampler", UPSAMPLER, 2, plan.upsampler_steps),
    ):
        if name in stages:
            checked = probe if unet == 1 else None  # the upsampler's samples need a base to start from
            train_decoder(
                name, config, unet, steps, plan, pool, work, args.seed, args.resume, args.out, checked, args.probe_every
            )
    digests = args.record_digests or (
        ROOT / "configs" / "shapes.json" if args.out.resolve() == SHIPPED.resolve() else None
    )
    if digests is not None:
        record_digests(digests)
    print(f"done in {time.time() - started:.0f}s; files in {args.out}", flush=True)


def record_digests(config_path: Path) -> None:
    """Write each model file's sha256 into the config that names it (`package://` paths, or
    paths relative to the config): a config promises its files' digests, and a retrained file
    under a stale digest would be refused. The words the captions taught go in beside them."""
    import json

    data = json.loads(config_path.read_text())
    if "vocabulary" in data:
        data["vocabulary"]["words"] = vocabulary()
    entries = [data["clip"]["load_model_from"], data["prior"]["load_model_from"]]
    entries += [source["load_model_from"] for source in data["decoder"]["unet_sources"]]
    for entry in entries:
        name = entry["path"]
        path = PACKAGE_DIR / name.removeprefix("package://") if name.startswith("package://") else Path(name)
        entry["sha256"] = sha256_of(config_path.parent / path)
    with atomic_path(config_path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
