"""Per-image noise: every image's random draws come from its own seed, whatever batch it is in.

`ImageNoise(seeds, stage)` draws each image's rows of a batch from a generator seeded for
that image alone, so image S of a batch equals a lone run with seed S, and a batch can be cut
in any way. Noise is drawn on the CPU (the same seed gives the same noise on any device), into
one buffer that is pinned and copied without blocking on CUDA (no host sync per step).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

STAGES = ("prior", "decoder")  # each stage draws from its own stream of the image's seed


def stage_seed(seed: int, stage: str) -> int:
    """A 64-bit seed for one stage of one image, independent of the other stages' draws."""
    state = np.random.SeedSequence([seed, STAGES.index(stage)]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


class ImageNoise:
    """Standard normal noise for a batch of len(seeds) images (rows laid out image by image;
    the prior samples several candidates per image, side by side)."""

    def __init__(self, seeds: Sequence[int], stage: str):
        self.generators = [torch.Generator().manual_seed(stage_seed(seed, stage)) for seed in seeds]

    def like(self, x: torch.Tensor) -> torch.Tensor:
        return self.draw(tuple(x.shape), x.device, x.dtype)

    def draw(self, shape: tuple[int, ...], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        device = torch.device(device)
        pinned = device.type == "cuda"
        noise = torch.empty(shape, pin_memory=pinned)
        count = len(self.generators)
        if not shape or shape[0] % count:
            # Not laid out one block of rows per image: still reproducible, from the first seed.
            noise.normal_(generator=self.generators[0])
        else:
            rows = shape[0] // count
            for block, generator in zip(noise.split(rows), self.generators, strict=True):
                block.normal_(generator=generator)  # what torch.randn gives: normal_ on a new tensor
        return noise.to(device=device, dtype=dtype, non_blocking=pinned)


class GlobalNoise:
    """Noise from torch's global generator, drawn as dalle2-pytorch draws it (`torch.randn_like`):
    what makes our loops comparable with dalle2-pytorch's, draw for draw."""

    def like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn_like(x)

    def draw(self, shape: tuple[int, ...], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        return torch.randn(shape, device=device, dtype=dtype)


class GeneratorNoise:
    """Noise from torch generators, drawn as diffusers draws it (`randn_tensor`): one generator
    for the whole batch, or one per row. The same generators give diffusers' pipelines and our
    loop the same noise, draw for draw (what the parity tests rely on; also a way to reproduce a
    diffusers run from Python)."""

    def __init__(self, generators: torch.Generator | Sequence[torch.Generator]):
        self.generators = generators if isinstance(generators, torch.Generator) else list(generators)

    def like(self, x: torch.Tensor) -> torch.Tensor:
        return self.draw(tuple(x.shape), x.device, x.dtype)

    def draw(self, shape: tuple[int, ...], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        generators = self.generators
        if isinstance(generators, list) and len(generators) == 1:
            generators = generators[0]
        if isinstance(generators, torch.Generator):
            noise = torch.randn(shape, generator=generators, device=generators.device, dtype=dtype)
        else:
            if len(generators) != shape[0]:
                raise ValueError(f"{len(generators)} generators for {shape[0]} rows: give one per row")
            row = (1, *shape[1:])
            noise = torch.cat([torch.randn(row, generator=g, device=g.device, dtype=dtype) for g in generators])
        return noise.to(device)
