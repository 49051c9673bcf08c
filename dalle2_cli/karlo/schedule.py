"""Karlo's noise schedule and its ancestral sampler, re-implemented from what diffusers'
deprecated `UnCLIPScheduler` computes (its arithmetic, operand for operand, so that images
equal diffusers' `UnCLIPPipeline`'s):

- a cosine schedule (squaredcos_cap_v2: betas from alpha_bar(t) = cos((t + 0.008) / 1.008 * pi/2)^2,
  capped at 0.999), 1000 trained steps;
- respaced DDPM: step times round(k * 999 / (n - 1)), the posterior between two kept times, the
  learned variance interpolating between the two log variances, no noise drawn at t = 0.

`KarloSchedule` also gives the formulas our other samplers read off a schedule (DDIM, DPM-Solver++
and RePaint's forward process), so `--sampler ddim|dpm++2m` and inpainting work on Karlo too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from dalle2_cli.sampling.schedulers import DECODER, NoiseSource, Prediction, Scheduler


def _cosine_betas(steps: int, max_beta: float = 0.999) -> torch.Tensor:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)]
    return torch.tensor(betas, dtype=torch.float32)


class KarloSchedule:
    """One unCLIP scheduler config (`scheduler_config.json`): the schedule's buffers, what the
    network predicts (`epsilon` or the clean `sample`), the clamp of the clean prediction and
    the variance type (`fixed_small_log`, or `learned_range` for a network that outputs it)."""

    ddim_flavour = DECODER  # plain DDIM: dalle2-pytorch's prior variant is its own

    def __init__(self, config: dict[str, Any] | None = None):
        config = config or {}
        if config.get("beta_schedule", "squaredcos_cap_v2") != "squaredcos_cap_v2":
            raise ValueError(f"unCLIP schedules are squaredcos_cap_v2, not {config['beta_schedule']!r}")
        self.num_timesteps = int(config.get("num_train_timesteps", 1000))
        self.variance_type = config.get("variance_type", "fixed_small_log")
        self.prediction_type = config.get("prediction_type", "epsilon")
        self.clip_sample = bool(config.get("clip_sample", True))
        self.clip_sample_range = float(config.get("clip_sample_range", 1.0))
        self.betas = _cosine_betas(self.num_timesteps)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat((torch.ones(1), self.alphas_cumprod[:-1]))
        self.one = torch.tensor(1.0)

    def ancestral(self) -> KarloDDPM:
        return KarloDDPM(self)

    def clean(self, x: torch.Tensor, t: int, output: torch.Tensor) -> torch.Tensor:
        """The clean sample the network's output predicts at `t`, clamped as configured."""
        if self.prediction_type == "epsilon":
            alpha_prod = self.alphas_cumprod[t]
            x0 = (x - (1 - alpha_prod) ** 0.5 * output) / alpha_prod**0.5
        elif self.prediction_type == "sample":
            x0 = output
        else:
            raise ValueError(f"unCLIP networks predict epsilon or sample, not {self.prediction_type!r}")
        if self.clip_sample:
            x0 = torch.clamp(x0, -self.clip_sample_range, self.clip_sample_range)
        return x0

    # -- what the other samplers and RePaint read off a schedule -----------------------------

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.device)[t].reshape(-1, *((1,) * (like.ndim - 1))).to(like.dtype)

    def predict_noise_from_start(self, x: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        a = self._at(self.alphas_cumprod, t, x)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    def q_sample(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self._at(self.alphas_cumprod, t, x)
        return a.sqrt() * x + (1 - a).sqrt() * noise

    def q_sample_from_to(self, x: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor, noise: torch.Tensor):
        """x at `t_from` noised forward to the later `t_to`."""
        ratio = self._at(self.alphas_cumprod, t_to, x) / self._at(self.alphas_cumprod, t_from, x)
        return ratio.sqrt() * x + (1 - ratio).sqrt() * noise


class KarloDDPM(Scheduler):
    """Ancestral sampling on a respaced schedule, as diffusers' `UnCLIPScheduler` steps."""

    name = "ddpm"

    def __init__(self, schedule: KarloSchedule):
        super().__init__(schedule)

    def set_timesteps(self, steps: int) -> None:
        total = self.trained_steps
        if steps <= 1:  # one step: the clean prediction from pure noise
            self.timesteps = [total - 1]
            return
        ratio = (total - 1) / (steps - 1)
        self.timesteps = (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64).tolist()

    def step(self, prediction: Prediction, t: int, x: torch.Tensor, noise: NoiseSource) -> torch.Tensor:
        s = self.schedule
        t_prev = self.previous(t)
        alpha_prod = s.alphas_cumprod[t]
        alpha_prod_prev = s.alphas_cumprod[t_prev] if t_prev >= 0 else s.one
        beta_prod, beta_prod_prev = 1 - alpha_prod, 1 - alpha_prod_prev
        if t_prev == t - 1:
            beta, alpha = s.betas[t], s.alphas[t]
        else:
            beta = 1 - alpha_prod / alpha_prod_prev
            alpha = 1 - beta
        x0_coefficient = (alpha_prod_prev**0.5 * beta) / beta_prod
        x_coefficient = alpha**0.5 * beta_prod_prev / beta_prod
        mean = x0_coefficient * prediction.x0 + x_coefficient * x
        if t <= 0:
            return mean
        drawn = noise.like(prediction.x0)
        variance = beta_prod_prev / beta_prod * beta
        if s.variance_type == "learned_range" and prediction.variance is not None:
            fraction = (prediction.variance + 1) / 2
            log_variance = fraction * beta.log() + (1 - fraction) * variance.log()
            return mean + (0.5 * log_variance).exp() * drawn
        return mean + torch.exp(0.5 * torch.log(torch.clamp(variance, min=1e-20))) * drawn
