"""One sampling loop for every diffusion stage of every model family.

A stage (a prior, a decoder unet, an upsampler: dalle2-pytorch's in dalle2_cli.sampling.loops)
is what the loop asks four things of: the starting sample, a guided prediction of the clean
sample (and variance) at a timestep, the forward process (a clean sample noised to a
timestep, for RePaint), and the finish. What it computes once per batch (its conditioning, an
upsampler's low-resolution image) it computes when it is made. Guidance is the stage's own:
each family decides what its null branch is and which outputs it blends. The scheduler
chooses the timesteps and steps between them; noise and progress are passed in.

    x = sample(stage, scheduler, noise, progress=advance)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from dalle2_cli.sampling.schedulers import NoiseSource, Prediction, Scheduler

Progress = Callable[[torch.Tensor], None]  # called once per step with the current prediction of the clean sample


@dataclass
class RePaint:
    """RePaint (Lugmayr et al. 2022), in a stage's sample space: `known` is kept where `keep`
    is True; each step is taken `resample_times` times, noising the result back in between,
    so that the regenerated part and the kept one agree."""

    known: torch.Tensor
    keep: torch.Tensor  # booleans, broadcasting over `known`
    resample_times: int = 5


class DiffusionStage(Protocol):
    repaint: RePaint | None  # the part to keep (None: all of the sample is generated)

    def start(self, noise: NoiseSource) -> torch.Tensor:
        """The starting sample, pure noise (drawn from `noise`)."""

    def predict(self, x: torch.Tensor, t: int, previous: Prediction | None) -> Prediction:
        """The guided prediction of the clean sample at timestep `t` (`previous`: the one of
        the step before, for self-conditioned networks)."""

    def noised(self, clean: torch.Tensor, t: int, noise: NoiseSource) -> torch.Tensor:
        """`clean` noised to timestep `t` by the forward process (RePaint's known part)."""

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's output from its last sample."""


def sample(
    stage: DiffusionStage, scheduler: Scheduler, noise: NoiseSource, progress: Progress | None = None
) -> torch.Tensor:
    """Run `stage` down `scheduler`'s timesteps: the stage's output."""
    repaint = stage.repaint
    x = stage.start(noise)
    prediction = None
    repeats = repaint.resample_times if repaint is not None else 1
    for t in scheduler.timesteps:
        last_step = t == scheduler.timesteps[-1]
        for r in reversed(range(repeats)):
            if repaint is not None:  # the known part, noised to t
                x = x * ~repaint.keep + stage.noised(repaint.known, t, noise) * repaint.keep
            prediction = stage.predict(x, t, prediction)
            x = scheduler.step(prediction, t, x, noise)
            if repaint is not None and not (last_step or r == 0):
                x = scheduler.renoise(x, scheduler.previous(t), t, noise)
        if progress is not None:
            clean = prediction.x0
            progress(clean if repaint is None else clean * ~repaint.keep + repaint.known * repaint.keep)
    if repaint is not None:
        x = x * ~repaint.keep + repaint.known * repaint.keep
    return stage.finish(x)
