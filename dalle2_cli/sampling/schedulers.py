"""Samplers as objects with one small interface (as diffusers' schedulers), built from a
network's own noise schedule (dalle2-pytorch's `NoiseScheduler` buffers):

    scheduler = make_scheduler("dpm++2m", schedule, steps=15, flavour=DECODER)
    x = noise.like(shape)
    for t in scheduler.timesteps:
        x = scheduler.step(denoise(x, t), t, x, noise)

`denoise(x, t)` gives a `Prediction`: the clean sample it predicts (already clamped as the
model's config says) and, for networks that learn it, the raw variance output. Schedulers
derive the noise from it; noise for stochastic steps comes from `noise.like(x)`, drawn only
when a step needs it (the order of draws is part of what makes an image reproducible).

- `ddpm`: ancestral sampling, learned variance where the network has it; with fewer steps
  than trained, on a respaced schedule.
- `ddim`: dalle2-pytorch's own DDIM (its choice of timesteps and, per network, its alphas and
  eta), so that its images are the ones dalle2-pytorch makes; `eta` settable.
- `dpm++2m`: DPM-Solver++ (Lu et al. 2022), second-order multistep, data prediction; the
  cosine schedule's last, nearly pure-noise timesteps (log-SNR below -5.1) are left out, as
  the literature does, and the last step is first order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dalle2_cli.sampling.settings import StagePlan

SAMPLERS = ("ddpm", "ddim", "dpm++2m")
PRIOR, DECODER = "prior", "decoder"  # dalle2-pytorch's DDIM differs between the two
LAMBDA_MIN = -5.1  # DPM-Solver's clipping of the log-SNR for cosine schedules


@dataclass
class Prediction:
    x0: torch.Tensor  # the clean sample, clamped as the model's config says
    variance: torch.Tensor | None = None  # a learned-variance network's raw interpolation output


class NoiseSource(Protocol):
    """Standard normal noise: `like(x)` draws a tensor of x's shape, `draw(shape, device)` one
    of that shape (dalle2_cli.sampling.noise.ImageNoise draws each image's rows from its seed)."""

    def like(self, x: torch.Tensor) -> torch.Tensor: ...

    def draw(self, shape: tuple[int, ...], device: Any = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor: ...


def _at(buffer: torch.Tensor, t: int, like: torch.Tensor) -> torch.Tensor:
    """dalle2-pytorch's `extract` for one timestep shared by the batch: the value, shaped to
    broadcast over `like` (same dtype and device as the buffer)."""
    index = torch.full((like.shape[0],), t, dtype=torch.long, device=buffer.device)
    return buffer.gather(-1, index).reshape(like.shape[0], *((1,) * (like.ndim - 1)))


class Scheduler:
    """What every sampler has: the schedule, the timesteps it evaluates the network at, and a
    `step` from one of them to the next."""

    name = "?"

    def __init__(self, schedule: Any):
        self.schedule = schedule  # dalle2-pytorch's NoiseScheduler: its buffers, its formulas
        self.timesteps: list[int] = []

    @property
    def trained_steps(self) -> int:
        return int(self.schedule.num_timesteps)

    def set_timesteps(self, steps: int) -> None:
        raise NotImplementedError

    def step(self, prediction: Prediction, t: int, x: torch.Tensor, noise: NoiseSource) -> torch.Tensor:
        raise NotImplementedError

    def noise_from(self, x0: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        times = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        return self.schedule.predict_noise_from_start(x, t=times, x0=x0)

    def renoise(self, x: torch.Tensor, t_from: int, t_to: int, noise: NoiseSource) -> torch.Tensor:
        """x at `t_from` taken forward (noised) to the later `t_to`: RePaint's jump back."""
        times_from = torch.full((x.shape[0],), t_from, dtype=torch.long, device=x.device)
        times_to = torch.full((x.shape[0],), t_to, dtype=torch.long, device=x.device)
        return self.schedule.q_sample_from_to(x, times_from, times_to, noise=noise.like(x))

    def previous(self, t: int) -> int:
        """The timestep the step from `t` lands on (-1 past the end)."""
        index = self.timesteps.index(t)
        return self.timesteps[index + 1] if index + 1 < len(self.timesteps) else -1


class DDPM(Scheduler):
    """Ancestral sampling. At the trained number of steps it is dalle2-pytorch's own loop (its
    buffers, its arithmetic, a noise draw at every step); with fewer, the schedule is respaced
    (the posterior between two kept timesteps, as improved DDPM respaces it)."""

    name = "ddpm"

    def __init__(self, schedule: Any, learned_variance_constrain_frac: bool = False):
        super().__init__(schedule)
        self.constrain = learned_variance_constrain_frac

    def set_timesteps(self, steps: int) -> None:
        total = self.trained_steps
        if steps >= total:
            self.timesteps = list(reversed(range(total)))
        else:
            kept = torch.linspace(0, total - 1, steps).round().long().tolist()
            self.timesteps = sorted(set(kept), reverse=True)

    def step(self, prediction: Prediction, t: int, x: torch.Tensor, noise: NoiseSource) -> torch.Tensor:
        s = self.schedule
        t_prev = self.previous(t)
        if len(self.timesteps) == self.trained_steps:
            mean = _at(s.posterior_mean_coef1, t, x) * prediction.x0 + _at(s.posterior_mean_coef2, t, x) * x
            min_log = _at(s.posterior_log_variance_clipped, t, x)
            max_log = _at(torch.log(s.betas), t, x)
        else:
            mean, min_log, max_log = self._respaced(prediction.x0, x, t, t_prev)
        log_variance = min_log
        if prediction.variance is not None:
            # Improved DDPM's eq. 15: the network interpolates between the two log variances.
            fraction = (prediction.variance + 1) * 0.5
            if self.constrain:
                fraction = fraction.sigmoid()
            log_variance = fraction * max_log + (1 - fraction) * min_log
        drawn = noise.like(x)  # drawn at every step, the last too, as dalle2-pytorch does
        return mean + (0.0 if t == 0 else 1.0) * (0.5 * log_variance).exp() * drawn

    def _respaced(self, x0: torch.Tensor, x: torch.Tensor, t: int, t_prev: int) -> tuple:
        a = self.schedule.alphas_cumprod
        a_t = _at(a, t, x)
        a_prev = _at(a, t_prev, x) if t_prev >= 0 else torch.ones_like(a_t)
        beta = 1 - a_t / a_prev
        mean = (beta * a_prev.sqrt() / (1 - a_t)) * x0 + ((1 - a_prev) * (1 - beta).sqrt() / (1 - a_t)) * x
        variance = beta * (1 - a_prev) / (1 - a_t)
        return mean, torch.log(variance.clamp(min=1e-20)), torch.log(beta)


class DDIM(Scheduler):
    """dalle2-pytorch's DDIM: its timesteps, and for the prior its alphas (the schedule's
    `alphas_cumprod_prev`) and eta 1, for the decoder `alphas_cumprod` and the decoder's eta."""

    name = "ddim"

    def __init__(self, schedule: Any, flavour: str, eta: float):
        super().__init__(schedule)
        self.flavour = flavour
        self.eta = float(eta)
        self.alphas = schedule.alphas_cumprod_prev if flavour == PRIOR else schedule.alphas_cumprod

    def set_timesteps(self, steps: int) -> None:
        total = self.trained_steps
        if self.flavour == PRIOR:
            times = torch.linspace(-1.0, total, steps=steps + 1)[:-1]
        else:
            times = torch.linspace(0.0, total, steps=steps + 2)[:-1]
        times = list(reversed(times.int().tolist()))
        pairs = [(a, b) for a, b in zip(times[:-1], times[1:], strict=True) if self.flavour == PRIOR or a > b]
        self.timesteps = [a for a, _ in pairs]
        self._next = dict(pairs)

    def previous(self, t: int) -> int:
        return self._next[t]

    def step(self, prediction: Prediction, t: int, x: torch.Tensor, noise: NoiseSource) -> torch.Tensor:
        t_next = self._next[t]
        if t_next < 0:  # the prior's last step: its clean prediction
            return prediction.x0
        pred_noise = self.noise_from(prediction.x0, t, x)
        alpha, alpha_next = self.alphas[t], self.alphas[t_next]
        c1 = self.eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
        c2 = ((1 - alpha_next) - torch.square(c1)).sqrt()
        last = t_next == 0 if self.flavour == DECODER else False
        drawn = noise.like(x) if (t_next > 0 and not last) else 0.0
        return prediction.x0 * alpha_next.sqrt() + c1 * drawn + c2 * pred_noise


class DPMSolverPP2M(Scheduler):
    """DPM-Solver++(2M): second-order multistep in log-SNR, on the network's data prediction.
    Deterministic; the last step is first order and lands on the clean sample."""

    name = "dpm++2m"

    def __init__(self, schedule: Any, lambda_min: float = LAMBDA_MIN):
        super().__init__(schedule)
        a = schedule.alphas_cumprod.double()
        self.alpha = a.sqrt()
        self.sigma = (1 - a).sqrt()
        self.lam = torch.log(self.alpha) - torch.log(self.sigma)
        self.lambda_min = lambda_min
        self._history: list[tuple[int, torch.Tensor]] = []  # (t, its clean prediction), the last step's

    def set_timesteps(self, steps: int) -> None:
        usable = (self.lam >= self.lambda_min).nonzero().flatten()
        last = int(usable.max()) if len(usable) else self.trained_steps - 1
        times = torch.linspace(last, 0, steps + 1).round().long().tolist()[:-1]
        self.timesteps = list(dict.fromkeys(times))
        self._history = []

    def step(self, prediction: Prediction, t: int, x: torch.Tensor, noise: NoiseSource) -> torch.Tensor:
        x0 = prediction.x0
        t_next = self.previous(t)
        if t_next < 0:  # past the last evaluation: the clean sample (sigma 0)
            self._history = []
            return x0
        dtype = x.dtype
        lam_t, lam_next = float(self.lam[t]), float(self.lam[t_next])
        h = lam_next - lam_t
        ratio = float(self.sigma[t_next] / self.sigma[t])
        alpha_next = float(self.alpha[t_next])
        factor = math.expm1(-h)  # exp(-h) - 1
        if self._history:
            t_last, x0_last = self._history[-1]
            r = (lam_t - float(self.lam[t_last])) / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_last
        else:
            d = x0
        self._history = [(t, x0)]
        return (ratio * x - alpha_next * factor * d).to(dtype)


def make_scheduler(
    name: str, schedule: Any, steps: int, flavour: str, eta: float | None = None, learned_variance_frac: bool = False
) -> Scheduler:
    """The sampler `name` for a network with this schedule, set to `steps` network evaluations.
    `flavour` is PRIOR or DECODER (dalle2-pytorch's DDIM differs between them); `eta` the
    DDIM noise (default: dalle2-pytorch's, 1 for the prior and the decoder's own)."""
    # A schedule of another family (Karlo's) brings its own ancestral sampler and DDIM variant.
    flavour = getattr(schedule, "ddim_flavour", flavour)
    if name == "ddpm":
        ancestral = getattr(schedule, "ancestral", None)
        scheduler: Scheduler = ancestral() if ancestral is not None else DDPM(schedule, learned_variance_frac)
    elif name == "ddim":
        scheduler = DDIM(schedule, flavour, 1.0 if eta is None else eta)
    elif name == "dpm++2m":
        scheduler = DPMSolverPP2M(schedule)
    else:
        raise ValueError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    scheduler.set_timesteps(steps)
    return scheduler


def unet_scheduler(decoder: Any, index: int, plan: StagePlan, steps: int | None = None) -> Scheduler:
    """The scheduler unet `index` (from 0) of dalle2-pytorch's `decoder` samples with, as `plan`
    says (`steps` in place of its steps); a plan without a DDIM eta takes the decoder's own."""
    eta = decoder.ddim_sampling_eta if plan.ddim_eta is None else plan.ddim_eta
    schedule = decoder.noise_schedulers[index]
    return make_scheduler(
        plan.sampler, schedule, steps or plan.steps, DECODER, eta, decoder.learned_variance_constrain_frac
    )
