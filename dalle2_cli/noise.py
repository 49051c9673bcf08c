"""Per-image noise: every image's random draws come from its own seed, whatever batch it is in.

dalle2-pytorch draws its sampling noise with `torch.randn` / `torch.randn_like` on the global
generator, so an image would depend on which other images shared its batch. While
`per_image_noise` is active, those two calls in dalle2-pytorch's module draw each image's
rows of a batch from a generator seeded for that image alone: image S of a batch equals a
lone run with seed S, and a batch can be split in any way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

STAGES = ("prior", "decoder")  # each stage draws from its own stream of the image's seed


def stage_seed(seed: int, stage: str) -> int:
    """A 64-bit seed for one stage of one image, independent of the other stages' draws."""
    state = np.random.SeedSequence([seed, STAGES.index(stage)]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


class _SeededTorch:
    """Stands in for the `torch` module inside dalle2-pytorch: everything is torch's own,
    except that normal noise is drawn per image."""

    def __init__(self, generators: list[torch.Generator]):
        self._generators = generators

    def __getattr__(self, name: str):
        # Called only for names not found on the instance: look each up in torch once, then
        # keep it here, so dalle2-pytorch's many `torch.X` per step cost a plain lookup.
        value = getattr(torch, name)
        self.__dict__[name] = value
        return value

    def randn(self, *size, device=None, dtype=None, **_ignored) -> torch.Tensor:
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], tuple | list | torch.Size) else size
        return self._draw(tuple(shape), device, dtype or torch.get_default_dtype())

    def randn_like(self, like: torch.Tensor, *, device=None, dtype=None, **_ignored) -> torch.Tensor:
        return self._draw(tuple(like.shape), device or like.device, dtype or like.dtype)

    def _draw(self, shape: tuple[int, ...], device, dtype) -> torch.Tensor:
        device = torch.device(device) if device is not None else torch.device("cpu")
        # Drawn on the CPU into one buffer, each image's rows from its own generator (the
        # values `torch.randn` would give: it is `normal_` on a new tensor), no concatenation.
        # For a CUDA device the buffer is pinned and copied without blocking: no host sync.
        pinned = device.type == "cuda"
        noise = torch.empty(shape, pin_memory=pinned)
        count = len(self._generators)
        if not shape or shape[0] % count:
            # Not laid out one block of rows per image: still reproducible, from the first seed.
            noise.normal_(generator=self._generators[0])
        else:
            rows = shape[0] // count  # the prior samples several candidates per image, side by side
            for block, generator in zip(noise.split(rows), self._generators, strict=True):
                block.normal_(generator=generator)
        return noise.to(device=device, dtype=dtype, non_blocking=pinned)


@contextlib.contextmanager
def per_image_noise(seeds: Sequence[int], stage: str) -> Iterator[None]:
    """Within this block, dalle2-pytorch's noise for a batch of len(seeds) images comes from
    those seeds (drawn on the CPU, so the same seed gives the same noise on any device)."""
    from dalle2_pytorch import dalle2_pytorch as module

    generators = [torch.Generator().manual_seed(stage_seed(seed, stage)) for seed in seeds]
    original = module.torch
    module.torch = _SeededTorch(generators)
    try:
        yield
    finally:
        module.torch = original
