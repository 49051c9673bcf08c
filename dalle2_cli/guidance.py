"""Classifier-free guidance in one batched forward pass instead of two.

dalle2-pytorch's `forward_with_cond_scale` (of `DiffusionPriorNetwork` and of `Unet`) runs the
network twice per sampling step: once conditioned, once with every condition dropped
(`text_cond_drop_prob = image_cond_drop_prob = 1`), then returns
`null + (cond - null) * cond_scale`. Two half-size passes waste the accelerator on small
batches (each launches every kernel twice) and pay Python overhead twice.

While `batched_guidance` is active, both classes' `forward_with_cond_scale` instead:
concatenate the inputs with themselves along the batch, make the keep masks that `forward`
draws with `prob_mask_like` keep the first half and drop the second, run `forward` once,
split, and combine with the same formula. Every operation in both networks is per sample
(attention, group norm, masks), so the result equals the two-pass one up to float rounding.
With `cond_scale == 1` nothing changes: one plain `forward`, as before. A unet that takes no
condition at all (an unconditional upsampler) gets one plain `forward` whatever the scale:
guidance cannot change its output, and dalle2-pytorch would run it twice for nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

# Arguments the caller may pass that we would have to merge with our own masks: when given,
# dalle2-pytorch's own two-pass method runs instead (sampling never passes them).
_DROP_ARGUMENTS = ("text_cond_drop_prob", "image_cond_drop_prob")


def _double(value: Any, batch: int) -> tuple[Any, bool]:
    """(the value with its batch repeated twice, whether it could be)."""
    if not isinstance(value, torch.Tensor):
        return value, True  # None, flags, numbers: the same for both halves
    if value.ndim == 0 or value.shape[0] != batch:
        return value, False
    return torch.cat((value, value)), True


# The batch of the guided forward in flight (innermost last), and dalle2-pytorch's own
# `prob_mask_like`. One function stands in for it, the same object every step, so that a
# torch.compile'd forward (`--compile`) keeps its compiled graph rather than recompiling
# for a new function each step.
_batches: list[int] = []
_original_prob_mask_like: list[Callable[..., torch.Tensor]] = []


def _first_half_kept(shape: tuple[int, ...], prob: float, device: torch.device) -> torch.Tensor:
    batch = _batches[-1]
    if tuple(shape) != (2 * batch,):
        return _original_prob_mask_like[-1](shape, prob, device)
    # Built on the device from arange: no host-to-device copy, no sync.
    return torch.arange(2 * batch, device=device) < batch


@contextlib.contextmanager
def _keep_first_half(module: Any, batch: int) -> Iterator[None]:
    """`prob_mask_like` in dalle2-pytorch's module answers, for the doubled batch, a mask that
    keeps the conditions of the first `batch` samples and drops those of the rest: what the
    conditional pass (drop prob 0) and the null pass (drop prob 1) each got."""
    original = module.prob_mask_like
    _batches.append(batch)
    _original_prob_mask_like.append(original if original is not _first_half_kept else _original_prob_mask_like[-1])
    module.prob_mask_like = _first_half_kept
    try:
        yield
    finally:
        module.prob_mask_like = original
        _batches.pop()
        _original_prob_mask_like.pop()


def _takes_no_condition(net: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
    """True for a unet whose forward never reads the keep masks (an unconditional upsampler):
    there the null pass computes exactly what the conditional one does, so
    `null + (cond - null) * scale` is the conditional output itself, and one pass gives it."""
    if not hasattr(net, "cond_on_image_embeds"):  # the prior network always reads its text
        return False
    reads_image = net.cond_on_image_embeds or (
        getattr(net, "to_image_hiddens", None) is not None and kwargs.get("image_embed") is not None
    )
    reads_text = bool(net.cond_on_text_encodings) and kwargs.get("text_encodings") is not None
    return not reads_image and not reads_text


def _batched_forward_with_cond_scale(module: Any, two_pass: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def forward_with_cond_scale(self: torch.nn.Module, *args: Any, cond_scale: float = 1.0, **kwargs: Any):
        if cond_scale == 1 or _takes_no_condition(self, kwargs):
            return self.forward(*args, **kwargs)
        if not args or not isinstance(args[0], torch.Tensor) or any(k in kwargs for k in _DROP_ARGUMENTS):
            return two_pass(self, *args, cond_scale=cond_scale, **kwargs)
        batch = args[0].shape[0]
        doubled_args, doubled_kwargs, fits = [], {}, True
        for value in args:
            value, ok = _double(value, batch)
            doubled_args.append(value)
            fits &= ok
        for name, value in kwargs.items():
            doubled_kwargs[name], ok = _double(value, batch)
            fits &= ok
        if not fits:  # some tensor is not laid out by sample: leave it to dalle2-pytorch
            return two_pass(self, *args, cond_scale=cond_scale, **kwargs)
        with _keep_first_half(module, batch):
            logits = self.forward(*doubled_args, **doubled_kwargs)
        cond, null = logits[:batch], logits[batch:]
        return null + (cond - null) * cond_scale  # dalle2-pytorch's formula, same operand order

    return forward_with_cond_scale


@contextlib.contextmanager
def batched_guidance(enabled: bool = True) -> Iterator[None]:
    """Within this block, classifier-free guidance in dalle2-pytorch's prior network and decoder
    unets runs as one forward pass over a doubled batch (see the module docstring). It holds
    twice the batch's activations at once: `enabled=False` keeps the two passes."""
    if not enabled:
        yield
        return
    from dalle2_pytorch import dalle2_pytorch as module

    classes = (module.DiffusionPriorNetwork, module.Unet)
    originals = {cls: cls.__dict__["forward_with_cond_scale"] for cls in classes}
    for cls, original in originals.items():
        cls.forward_with_cond_scale = _batched_forward_with_cond_scale(module, original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.forward_with_cond_scale = original
