"""Classifier-free guidance, as an explicit call: `guided(net, x, t, scale, conditions)`.

dalle2-pytorch's networks (`DiffusionPriorNetwork`, `Unet`) drop their conditions inside
`forward`, by keep masks they draw with `prob_mask_like((batch,), 1 - drop_prob)`: all kept
at drop probability 0, none at 1. Guidance needs a conditional and a null prediction, and
`null + (cond - null) * scale`:

- two passes: `forward(drop 0)` and `forward(drop 1)`, as dalle2-pytorch does. No hook.
- one pass over a doubled batch (default: fewer kernel launches, twice the activations): the
  first half must keep its conditions and the second drop them, a mask no drop probability
  gives. This is the one place dalle2-cli reaches into dalle2-pytorch: `prob_mask_like` in its
  module is replaced, once, by a function that answers the half-and-half mask while
  `_keep_first_half` is active in the calling thread (a context variable, so that two threads
  sampling at once each get their own), and calls the original otherwise. Every operation in
  both networks is per sample, so the result equals the two-pass one up to float rounding.

A negative prompt (`null_conditions`): the null branch keeps its text, the negative one, and
drops only the image conditioning, as the null branch drops it.

A unet that takes no condition at all (an unconditional upsampler) gets one plain `forward`
whatever the scale: guidance cannot change its output.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from typing import Any

import torch

# The drop probability that asks for the half-and-half mask. Any value strictly between 0
# and 1 would do (dalle2-pytorch draws random masks there); this one is ours alone.
HALF = 0.5
_doubled_batch: contextvars.ContextVar[int | None] = contextvars.ContextVar("doubled_batch", default=None)
_installed = threading.Lock()
_original: list[Any] = []


def _half_kept(shape: tuple[int, ...], prob: float, device: torch.device) -> torch.Tensor:
    batch = _doubled_batch.get()
    if batch is None or prob != 1 - HALF or tuple(shape) != (2 * batch,):
        return _original[0](shape, prob, device)
    # Built on the device from arange: no host-to-device copy, no sync.
    return torch.arange(2 * batch, device=device) < batch


def _install() -> None:
    with _installed:
        if _original:
            return
        from dalle2_pytorch import dalle2_pytorch as module

        _original.append(module.prob_mask_like)
        module.prob_mask_like = _half_kept


@contextlib.contextmanager
def _keep_first_half(batch: int) -> Iterator[None]:
    _install()
    token = _doubled_batch.set(batch)
    try:
        yield
    finally:
        _doubled_batch.reset(token)


def takes_no_condition(net: torch.nn.Module, conditions: dict[str, Any]) -> bool:
    """True for a unet whose forward never reads its conditions (an unconditional upsampler)."""
    if not hasattr(net, "cond_on_image_embeds"):  # the prior network always reads its text
        return False
    reads_image = net.cond_on_image_embeds or (
        getattr(net, "to_image_hiddens", None) is not None and conditions.get("image_embed") is not None
    )
    reads_text = bool(net.cond_on_text_encodings) and conditions.get("text_encodings") is not None
    return not reads_image and not reads_text


def _doubled(value: Any, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return torch.cat((value, value))
    return value


def guided(
    net: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    scale: float,
    conditions: dict[str, Any],
    null_conditions: dict[str, Any] | None = None,
    batched: bool = True,
) -> torch.Tensor:
    """The network's guided output at (x, t). `conditions` are forward's keyword arguments
    (text and image conditioning, lowres image, self-conditioning); `null_conditions` replace
    some of them in the null branch (a negative prompt's text), which then keeps its text."""
    if scale == 1 or (null_conditions is None and takes_no_condition(net, conditions)):
        return net.forward(x, t, **conditions)
    null = {**conditions, **(null_conditions or {})}
    text_drop = 0.0 if null_conditions else 1.0
    if not batched:
        cond = net.forward(x, t, **conditions)
        null_out = net.forward(x, t, text_cond_drop_prob=text_drop, image_cond_drop_prob=1.0, **null)
        return null_out + (cond - null_out) * scale
    batch = x.shape[0]
    merged = {}
    for name, value in conditions.items():
        other = null.get(name)
        if other is value or not isinstance(value, torch.Tensor):
            merged[name] = _doubled(value, batch)
        else:
            merged[name] = torch.cat((value, other))
    text = HALF if text_drop else 0.0
    with _keep_first_half(batch):
        output = net.forward(
            torch.cat((x, x)), torch.cat((t, t)), text_cond_drop_prob=text, image_cond_drop_prob=HALF, **merged
        )
    cond, null_out = output[:batch], output[batch:]
    return null_out + (cond - null_out) * scale  # dalle2-pytorch's formula, same operand order
