"""Half precision at load time: which weights take it, and converting a memory-mapped file
without holding it twice (peak memory measured in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dalle2_cli.loading.checkpoint import load_weights, new_model, read_checkpoint
from dalle2_cli.loading.precision import FilePages, cast_parameters, half_precision_keys

LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self and madvise")

# Loads a 96 MiB float32 file (12 layers of 8 MiB) in bfloat16 and reports how far the peak
# resident memory rose above what it was before loading.
LOAD_IN_HALF = """
import json, sys, torch
from dalle2_cli.loading.checkpoint import load_weights, new_model, read_checkpoint
from dalle2_cli.loading import precision

def peak_mib():
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    return int(status["VmHWM"].split()[0]) / 1024

if sys.argv[2] == "keep-pages":
    precision.FilePages.release = lambda self, tensor: None
build = lambda: torch.nn.Sequential(*[torch.nn.Linear(1024, 2048, bias=False) for _ in range(12)])
model = new_model(build, weights_follow=True)
tiny = torch.nn.Linear(2, 2)
load_weights(tiny, {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, True, "warm-up", dtype=torch.bfloat16)
read_checkpoint(sys.argv[1])  # imports and first-use costs, before measuring
before = peak_mib()
load_weights(model, read_checkpoint(sys.argv[1]).state_dict, True, "test", dtype=torch.bfloat16)
assert all(p.dtype == torch.bfloat16 for p in model.parameters())
print(json.dumps({"rise_mib": peak_mib() - before, "sum": float(sum(p.float().sum() for p in model.parameters()))}))
"""


@LINUX
def test_converting_a_memory_mapped_file_hands_its_pages_back(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 2048, bias=False) for _ in range(12)])
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    expected = float(sum(p.to(torch.bfloat16).float().sum() for p in model.parameters()))
    rises = {}
    for mode in ("release", "keep-pages"):
        run = subprocess.run(
            [sys.executable, "-c", LOAD_IN_HALF, str(tmp_path / "weights.pth"), mode],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)
        assert result["sum"] == pytest.approx(expected, rel=1e-6)  # the same weights either way
        rises[mode] = result["rise_mib"]
    # 48 MiB of bfloat16 weights, plus at most a layer's worth of the file's pages at a time;
    # holding the pages, the whole 96 MiB file stays resident beside them.
    assert rises["release"] < 48 + 24
    assert rises["keep-pages"] > 48 + 60


@LINUX
def test_released_pages_of_a_mapped_file_read_back_the_same(tmp_path):
    torch.manual_seed(0)
    torch.save({"w": torch.randn(4096, 1024)}, tmp_path / "w.pth")
    tensor = read_checkpoint(tmp_path / "w.pth").state_dict["w"]
    before = tensor.clone()
    FilePages().release(tensor)
    assert torch.equal(tensor, before)
    # A tensor in ordinary memory is never handed back (its pages would read as zeros).
    plain = torch.randn(4096, 1024)
    copy = plain.clone()
    FilePages().release(plain)
    assert torch.equal(plain, copy)


def test_float32_norms_and_buffers_keep_their_precision():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transformer import LayerNormFp32

    norm = LayerNormFp32(8)
    model = torch.nn.ModuleDict({"linear": torch.nn.Linear(8, 8), "norm": norm})
    model.register_buffer("schedule", torch.linspace(0, 1, 5))
    assert half_precision_keys(model) == {"linear.weight", "linear.bias"}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = new_model(
        lambda: _with_buffer(torch.nn.ModuleDict({"linear": torch.nn.Linear(8, 8), "norm": LayerNormFp32(8)})), True
    )
    load_weights(fresh, state, True, "test", dtype=torch.float16)
    assert fresh["linear"].weight.dtype == torch.float16 and fresh["norm"].weight.dtype == torch.float32
    assert fresh.schedule.dtype == torch.float32 and open_clip is not None


def _with_buffer(model: torch.nn.Module) -> torch.nn.Module:
    model.register_buffer("schedule", torch.zeros(5))
    return model


class LayerNorm(torch.nn.Module):
    """A norm of its own, as CoCa and dalle2-pytorch write them (not torch's class)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, x.shape[-1:], self.gamma)


def test_norms_keep_float32_weights_so_half_models_run_on_any_cpu():
    """torch's CPU norm kernels refuse a float32 input with half weights, whatever the CPU: a
    half model whose residual stream autocast left in float32 failed where the CPU has half
    kernels (and so no float32 copies of the weights)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), LayerNorm(8), torch.nn.GroupNorm(2, 8))
    assert half_precision_keys(model) == {"0.weight", "0.bias"}
    cast_parameters(model, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for x in (torch.randn(2, 8), torch.randn(2, 8, dtype=torch.bfloat16)):
            out = model[3](model[2](model[1](x)).unsqueeze(-1))
            assert out.isfinite().all()
