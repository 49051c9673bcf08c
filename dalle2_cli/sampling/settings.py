"""How to sample, as a typed object checked when it is made: no torch here, so that a command
refuses a bad setting before it imports anything heavy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from dalle2_cli.errors import InputError, SettingError

# The most images one run may ask for: a typo (n = 10**9) must be refused, not planned.
MAX_IMAGES = 100_000
MAX_SEED = 2**63 - 1
SAMPLERS = ("ddpm", "ddim", "dpm++2m")  # dalle2_cli.sampling.schedulers
MAX_RESAMPLE = 50


@dataclass
class SamplingSettings:
    """What the user may override; None means the config's default (or the trained value).
    Checked when made: a bad value raises a SettingError naming the field."""

    prior_steps: int | None = None
    prior_cond_scale: float | None = None
    decoder_steps: list[int | None] | None = None  # one per unet, or one for all
    decoder_cond_scale: list[float] | None = None  # likewise (a single number is one for all)
    batch_size: int = 4
    num_samples_per_batch: int = 2  # prior embeddings drawn per image; CLIP keeps the best
    seed: int | None = None  # image k of each input gets seed + k
    pad: bool = False  # non-square input images: padded with white to a square, not center-cropped
    # Guidance's conditional and null passes as one forward over a doubled batch (same images
    # within float rounding, fewer kernel launches); False keeps two passes, half the activations.
    batched_guidance: bool = True
    # `ddpm`, `ddim` or `dpm++2m` for every stage; None: the config's `default_sampler`, else
    # DDIM when fewer steps than trained are asked for and DDPM otherwise (dalle2-pytorch's rule).
    sampler: str | None = None
    ddim_eta: float | None = None  # every stage; None: the config's default_ddim_eta, else dalle2-pytorch's
    negative_prompt: str | None = None  # the prior's guidance moves away from it
    inpaint_resample_times: int = 5  # RePaint's resampling of each step (dalle2-pytorch's 5)

    def __post_init__(self) -> None:
        if isinstance(self.decoder_steps, int):
            self.decoder_steps = [self.decoder_steps]
        if isinstance(self.decoder_cond_scale, int | float):
            self.decoder_cond_scale = [float(self.decoder_cond_scale)]
        check_whole("batch_size", self.batch_size)
        check_whole("num_samples_per_batch", self.num_samples_per_batch)
        if self.prior_steps is not None:
            check_whole("prior_steps", self.prior_steps)
        for steps in self.decoder_steps or []:
            if steps is not None:
                check_whole("decoder_steps", steps)
        if self.prior_cond_scale is not None:
            check_finite("prior_cond_scale", self.prior_cond_scale)
        for scale in self.decoder_cond_scale or []:
            check_finite("decoder_cond_scale", scale)
        if self.seed is not None:
            check_seed(self.seed)
        if self.sampler is not None:
            check_sampler(self.sampler)
        if self.ddim_eta is not None and check_finite("ddim_eta", self.ddim_eta) < 0:
            raise SettingError("ddim_eta", f"must be 0 (deterministic) or more, got {self.ddim_eta}")
        if self.negative_prompt is not None and not self.negative_prompt.strip():
            raise SettingError("negative_prompt", "is empty: leave it out, or say what to steer away from")
        check_whole("inpaint_resample_times", self.inpaint_resample_times, 1, MAX_RESAMPLE)


def check_sampler(name: Any, field: str = "sampler") -> str:
    if name not in SAMPLERS:
        raise SettingError(field, f"must be one of {', '.join(SAMPLERS)}, got {name!r}")
    return name


@dataclass(frozen=True)
class StagePlan:
    """How one network samples (the prior, or one decoder unet), every default filled in."""

    sampler: str
    steps: int
    cond_scale: float
    ddim_eta: float | None = None  # None: the network's own (dalle2-pytorch: 1 for a prior)


class StageDefaults(NamedTuple):
    """What a config sets for one stage (None: not set)."""

    steps: int | None = None
    cond_scale: float | None = None
    sampler: str | None = None
    ddim_eta: float | None = None


@dataclass(frozen=True)
class Trained:
    """What a loaded network says of itself: the steps it was trained with, whether it can be
    guided (and why not), its own default sampling steps."""

    steps: int
    guidable: bool
    sample_steps: int | None = None
    unguided_because: str = "it was trained without conditioning dropout"


def plan_stage(
    name: str,
    trained: Trained,
    steps: int | None,
    cond_scale: float | None,
    sampler: str | None,
    defaults: StageDefaults,
    where: str = "",
    ddim_eta: float | None = None,
) -> StagePlan:
    """One stage's plan: what was asked for, else the config's default, else the network's own.
    `name` is the stage's setting prefix (`prior`, `decoder`) for messages, `where` says which
    unet ("for unet 2 ")."""
    default_steps, default_scale, default_sampler, default_eta = defaults
    chosen = steps or default_steps or trained.sample_steps or trained.steps
    scale = cond_scale if cond_scale is not None else (default_scale if default_scale is not None else 1.0)
    if not 1 <= chosen <= trained.steps:
        raise SettingError(
            f"{name}_steps", f"{where}must be between 1 and {trained.steps} (what it was trained with), got {chosen}"
        )
    if scale != 1.0 and not trained.guidable:
        raise SettingError(f"{name}_cond_scale", f"{where}must be 1: {trained.unguided_because}")
    kind = sampler or default_sampler or ("ddim" if chosen < trained.steps else "ddpm")
    return StagePlan(check_sampler(kind), chosen, float(scale), default_eta if ddim_eta is None else ddim_eta)


def check_whole(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SettingError(name, f"must be a whole number, got {value!r}")
    if value < low:
        raise SettingError(name, f"must be at least {low}, got {value}")
    if high is not None and value > high:
        raise SettingError(name, f"must be at most {high:,}, got {value:,}")
    return value


def check_finite(name: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise SettingError(name, f"must be a finite number, got {value!r}")
    return value


def check_seed(seed: Any, name: str = "seed") -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise SettingError(name, f"must be a whole number from 0 to 2**63-1, got {seed!r}")
    return seed


def check_count(num_images: Any, name: str = "num_images") -> int:
    """Images asked for one input: at least 1, and not more than a run may hold."""
    return check_whole(name, num_images, 1, MAX_IMAGES)


def check_total(total: int) -> None:
    if total > MAX_IMAGES:
        raise InputError(f"this run asks for {total:,} images, more than {MAX_IMAGES:,}: split it into several runs")


# Reranking's candidates per image: each is a whole text-to-image sample, so a typo of 1000
# would take 1000 times as long.
MAX_CANDIDATES = 64


def check_candidates(candidates: Any) -> int:
    """Images drawn for each one kept when reranking (1: no reranking)."""
    if not isinstance(candidates, int) or isinstance(candidates, bool) or not 1 <= candidates <= MAX_CANDIDATES:
        raise SettingError("candidates", f"must be from 1 to {MAX_CANDIDATES} per image, got {candidates!r}")
    return candidates


MAX_FRAMES = 1000


def check_frames(frames: Any) -> int:
    """Frames of an interpolation or a text diff, both ends included."""
    return check_whole("frames", frames, 2, MAX_FRAMES)


def check_text_diff(frames: Any, max_angle: Any, source_text: str, target_text: str) -> None:
    check_frames(frames)
    if not isinstance(max_angle, int | float) or isinstance(max_angle, bool) or not 0 < max_angle <= 1:
        raise SettingError("max_angle", f"must be in (0, 1] (a fraction of the way to z_d), got {max_angle!r}")
    for name, caption in (("source_text", source_text), ("target_text", target_text)):
        if not caption.strip():
            raise SettingError(name, "is empty: describe the image before and after the change")
