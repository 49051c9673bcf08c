"""Half precision: which weights take it, converting them without holding the file twice, and
computing in float32 where the CPU has no half-precision arithmetic."""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch
from torch import nn
from torch.nn.utils import parametrize


def cpu_computes_in(dtype: torch.dtype) -> bool:
    """Whether oneDNN has fast kernels for `dtype` on this CPU (fp32 always). Without them,
    torch runs half-precision convolutions on a slow fallback (measured about 30x fp32 on a
    CPU without AVX512-BF16: scripts/laion_size.py)."""
    checks = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
    if dtype not in checks:
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, checks[dtype])())
    except (AttributeError, RuntimeError):  # an older torch without the check: assume it is fine
        return True


TORCH_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


def _keeps_fp32(module: nn.Module) -> bool:
    """Layers whose weights stay float32, a tiny share of any model. Normalisation layers:
    torch's CPU norm kernels take a half input with float32 weights but refuse a float32 input
    with half ones (which a residual stream left in float32 by autocast brings them); that is
    torch's norms and any layer class named ...Norm (open_clip's, CoCa's and dalle2-pytorch's
    own, and open_clip's LayerNormFp32, which computes in float32 itself). And rotary
    embeddings, whose position frequencies (a parameter nobody calls through the layer) are a
    table that half precision would coarsen."""
    return isinstance(module, TORCH_NORMS) or type(module).__name__.endswith(("Norm", "NormFp32", "RotaryEmbedding"))


def _half_layers(model: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """(prefix, layer, names) of every layer with parameters that half precision stores in
    half: every floating-point parameter but those of normalisation layers (_keeps_fp32).
    Buffers (noise schedules, masks) keep their precision, since sampling arithmetic needs it."""
    layers = []
    for prefix, module in model.named_modules():
        if _keeps_fp32(module):
            continue
        names = [name for name, p in module.named_parameters(recurse=False) if p.is_floating_point()]
        if names:
            layers.append((prefix, module, names))
    return layers


def half_precision_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the parameters that half precision stores in half (_half_layers)."""
    return {f"{prefix}.{name}" if prefix else name for prefix, _, names in _half_layers(model) for name in names}


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Store `model`'s half-precision parameters (see half_precision_keys) in `dtype`, each
    memory-mapped one's file pages handed back once converted."""
    keys = half_precision_keys(model)
    file_pages = FilePages()
    for name, parameter in model.named_parameters():
        if name in keys:
            parameter.data = converted(parameter.data, dtype, file_pages)


def convert_on_first_use(model: nn.Module, dtype: torch.dtype) -> None:
    """Convert each layer's half-precision parameters (_half_layers) to `dtype` when the layer,
    or any layer inside it, first runs (one-shot forward pre-hooks), not before. Memory-mapped
    weights of layers that never run stay on disk: text2im never runs ViT-L/14's image tower,
    0.6 GiB in bf16. Inside too, because dalle2-pytorch calls a unet's and the prior network's
    own `forward` directly (no hooks): their own parameters (the null embeddings guidance
    reads) convert when their first sublayer runs, so that they are in `dtype` as
    `cast_parameters` (--low-memory's way) puts them, and both ways make the same images."""
    file_pages = FilePages()  # the checkpoints are mapped already: read the maps once, not per layer
    for _, layer, names in _half_layers(model):
        handles: list = []

        def convert(module: nn.Module, args: object, layer=layer, names=names, handles=handles) -> None:
            for name in names:
                parameter = layer._parameters.get(name)
                if parameter is None:  # moved by compute_in_fp32's parametrization
                    parameter = layer.parametrizations[name].original
                parameter.data = converted(parameter.data, dtype, file_pages)
            while handles:
                handles.pop().remove()

        handles.extend(inner.register_forward_pre_hook(convert) for inner in layer.modules())


def restore_parameters(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Give `model`'s parameters back the tensors in `weights` (by name), then hand back the
    pages of every memory-mapped one: the stage's copies are freed, the file's pages are read
    again when next touched."""
    file_pages = FilePages()
    for name, parameter in model.named_parameters():
        if name in weights:
            parameter.data = weights[name]
        file_pages.release(parameter.data)
    release_freed_memory()


def converted(tensor: torch.Tensor, dtype: torch.dtype, file_pages: FilePages) -> torch.Tensor:
    """`tensor` in `dtype`. When it lies in a memory-mapped checkpoint, the file's pages it was
    read from are handed back at once: otherwise converting a whole file would hold it resident
    beside its converted copy (1.5x the file for fp32 to bf16, where 0.5x is the goal)."""
    if tensor.dtype == dtype:
        return tensor
    result = tensor.to(dtype)
    file_pages.release(tensor)
    return result


class FilePages:
    """The process's file-backed memory maps (a memory-mapped checkpoint's), read once, and a
    way to hand a tensor's pages in them back to the kernel. Clean pages of a private file map
    are read again from the file if touched later, so this frees memory and loses nothing.
    Linux only; elsewhere it does nothing."""

    MADV_DONTNEED = 4

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        self._madvise = None
        if not sys.platform.startswith("linux"):
            return
        try:
            maps = open("/proc/self/maps").read().splitlines()
            self._madvise = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            return
        self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/") and not fields[5].startswith("/dev/"):
                low, high = (int(address, 16) for address in fields[0].split("-"))
                self.ranges.append((low, high))

    def release(self, tensor: torch.Tensor) -> None:
        if self._madvise is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
            return
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        for low, high in self.ranges:
            if low <= start and end <= high:
                page = mmap.PAGESIZE
                first, last = max(low, start - start % page), min(high, -(-end // page) * page)
                self._madvise(first, last - first, self.MADV_DONTNEED)
                return


ALIGNMENT = 64  # bytes: torch's CPU allocator's, and what vectorised kernels load best from


def aligned_in_memory(model: nn.Module) -> int:
    """Copy every CPU parameter whose data lies off a 64-byte boundary into memory of its own,
    handing the file's pages back (so the peak stays at the file's size). Safetensors files
    align tensors to 8 bytes only, and matrix products on such memory-mapped weights took 8%
    longer on the project's CPU (dalle2-pytorch's .pth files are 64-byte aligned already).
    Returns how many were copied."""
    file_pages = FilePages()
    copied = 0
    for parameter in model.parameters():
        data = parameter.data
        if data.device.type == "cpu" and data.data_ptr() % ALIGNMENT:
            parameter.data = data.clone()
            file_pages.release(data)
            copied += 1
    release_freed_memory()
    return copied


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps large freed blocks (here: a model's
    random initial weights, replaced by the file's) resident otherwise, which doubles the
    peak memory of loading once the file's weights are read."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def compute_dtype(model: nn.Module) -> torch.dtype:
    """What `model`'s layers compute in, so what its inputs should be: float32 where
    compute_in_fp32 hands them float32 copies of half-precision weights (the stored tensors,
    which `parameters()` yields, stay half), else its first floating-point parameter's dtype."""
    if any(parametrize.is_parametrized(module) for module in model.modules()):
        return torch.float32
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


class _Float32(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.float()


def compute_in_fp32(model: nn.Module) -> None:
    """Keep `model`'s half-precision parameters (_half_layers) stored as they are but
    hand every layer a float32 copy of each when it reads it (a torch parametrization): half
    the weights' memory, float32 arithmetic. For CPUs without half-precision kernels, where
    torch's fallback for half convolutions is about 30x slower than float32; the copies cost
    a conversion per weight per use."""
    for _, layer, names in _half_layers(model):
        for name in names:
            parametrize.register_parametrization(layer, name, _Float32(), unsafe=True)
