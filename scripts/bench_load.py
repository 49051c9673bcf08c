"""Peak memory and time of loading a large decoder checkpoint, by loading method.

    python scripts/bench_load.py [--size-mb 1000] [--rounds 3] [--cold] [--json]

Writes (once, under --work-dir) a random-weight decoder of about --size-mb as a tracker model
save (.pth) and as safetensors, then loads it by each method below, every load in a fresh
process, the methods taking turns for --rounds rounds. For each it reports the peak RSS above
the process's RSS after imports (as a multiple of the file size), the load time (to a model
ready to sample, or to a state dict for the `read` rows), and the time to the first use of
every weight (load + a pass over every tensor: memory-mapped weights are only read then):

- read: torch.load          `torch.load(weights_only=True)` of the .pth, a state dict;
- read: safetensors         `safetensors.torch.load_file` of the .safetensors, a state dict;
- copy (dalle2-laion's way) `torch.load` and `load_state_dict` copying into a new model;
- dalle2-cli .pth           our loader (`torch.load(mmap=True, weights_only=True)`, weights
                            adopted by an empty-weight model, not copied);
- dalle2-cli safetensors    our loader on the same weights converted to safetensors.

The summary gives the two loading targets side by side: the peak RSS of our loaders at most
1.3x the file, and safetensors loading at least 3x faster than `torch.load` of the same
weights. Files are in the page cache (just written or read) unless --cold, which drops each
file's cached pages before every load (posix_fadvise DONTNEED: this file only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

METHODS = {  # name: which file it reads
    "read: torch.load": "pth",
    "read: safetensors": "safetensors",
    "copy (dalle2-laion's way)": "pth",
    "dalle2-cli .pth": "pth",
    "dalle2-cli safetensors": "safetensors",
}


def decoder_config(size_mb: int) -> dict:
    # Parameters grow with dim squared; dim 192 with these settings is 865 MB in fp32.
    dim = max(16, round(192 * (size_mb / 865) ** 0.5 / 16) * 16)
    unet = {
        "dim": dim,
        "dim_mults": [1, 2, 3, 4],
        "image_embed_dim": 512,
        "cond_dim": 256,
        "num_resnet_blocks": 3,
        "attn_heads": 8,
        "attn_dim_head": 32,
        "self_attn": [False, False, True, True],
    }
    return {"unets": [unet], "image_sizes": [64], "timesteps": 1000}


def write_files(work: Path, size_mb: int) -> dict[str, Path]:
    import packaging.version
    import torch
    from dalle2_pytorch.train_configs import DecoderConfig
    from dalle2_pytorch.version import __version__

    from dalle2_cli.loading.checkpoint import read_checkpoint, write_safetensors

    files = {"pth": work / f"decoder-{size_mb}mb.pth", "safetensors": work / f"decoder-{size_mb}mb.safetensors"}
    if not files["pth"].exists():
        work.mkdir(parents=True, exist_ok=True)
        config = decoder_config(size_mb)
        decoder = DecoderConfig(**config).create()
        torch.save(
            {
                "version": packaging.version.parse(__version__),
                "config": {"decoder": config},
                "model": decoder.state_dict(),
            },
            files["pth"],
        )
        del decoder
    if not files["safetensors"].exists():
        write_safetensors(read_checkpoint(files["pth"]), files["safetensors"])
    return files


def drop_cached_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS) or its peak (VmHWM), anonymous and file-backed
    (memory-mapped weights count once read). Not `ru_maxrss`: that one keeps the peak of the
    parent process the child was forked from."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def measure(method: str, path: Path) -> dict:
    """Runs in the child process: load `path` by `method`, report memory and time."""
    import packaging.version
    import torch
    from dalle2_pytorch.train_configs import DecoderConfig

    from dalle2_cli.loading.checkpoint import load_weights, new_model, read_checkpoint

    torch.set_num_threads(1)
    baseline = rss_mb()
    started = time.perf_counter()
    if method == "read: torch.load":
        with torch.serialization.safe_globals([packaging.version.Version]):
            tensors = torch.load(path, map_location="cpu", weights_only=True)["model"]
    elif method == "read: safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path), device="cpu")
    elif method == "copy (dalle2-laion's way)":
        with torch.serialization.safe_globals([packaging.version.Version]):
            saved = torch.load(path, map_location="cpu", weights_only=True)
        decoder = DecoderConfig(**saved["config"]["decoder"]).create()
        decoder.load_state_dict(saved["model"])
        del saved
        tensors = decoder.state_dict()
    else:
        checkpoint = read_checkpoint(path)
        decoder = new_model(DecoderConfig(**checkpoint.config["decoder"]).create, weights_follow=True)
        load_weights(decoder, checkpoint.state_dict, strict=True, what=str(path))
        del checkpoint
        tensors = decoder.state_dict()
    loaded = time.perf_counter() - started
    # First use of every weight (memory-mapped pages are read from the file only now); the
    # float32 sums double as a checksum: the methods must have read the same weights.
    checksum = math.fsum(float(t.float().sum()) for t in tensors.values())
    ready = time.perf_counter() - started
    peak = rss_mb("VmHWM")
    return {
        "method": method,
        "file": path.name,
        "file_mb": path.stat().st_size / 2**20,
        "peak_above_baseline_mb": peak - baseline,
        "load_s": loaded,
        "ready_s": ready,
        "checksum": checksum,
    }


def run_child(method: str, path: Path, cold: bool) -> dict:
    if cold:
        drop_cached_pages(path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, str(path)], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(runs: dict[str, list[dict]]) -> dict:
    rows = {}
    for method, results in runs.items():
        first = results[0]
        rows[method] = {
            "file": first["file"],
            "file_mb": first["file_mb"],
            "peak_above_baseline_mb": max(r["peak_above_baseline_mb"] for r in results),
            "peak_over_file": max(r["peak_above_baseline_mb"] for r in results) / first["file_mb"],
            "load_s": statistics.median(r["load_s"] for r in results),
            "ready_s": statistics.median(r["ready_s"] for r in results),
            "load_s_all": [r["load_s"] for r in results],
            "ready_s_all": [r["ready_s"] for r in results],
        }
    torch_load, safetensors = rows["read: torch.load"], rows["read: safetensors"]
    ours_pth, ours_st = rows["dalle2-cli .pth"], rows["dalle2-cli safetensors"]
    copy = rows["copy (dalle2-laion's way)"]
    targets = {
        "peak_over_file_dalle2_cli_pth": ours_pth["peak_over_file"],
        "peak_over_file_dalle2_cli_safetensors": ours_st["peak_over_file"],
        # the same weights, read to a state dict and to first use of every tensor
        "torch_load_over_safetensors_read": torch_load["load_s"] / safetensors["load_s"],
        "torch_load_over_safetensors_ready": torch_load["ready_s"] / safetensors["ready_s"],
        # model ready to sample: dalle2-laion's torch.load + copy against our safetensors loader
        "copy_over_dalle2_cli_safetensors_load": copy["load_s"] / ours_st["load_s"],
        "copy_over_dalle2_cli_safetensors_ready": copy["ready_s"] / ours_st["ready_s"],
        "copy_over_dalle2_cli_pth_ready": copy["ready_s"] / ours_pth["ready_s"],
    }
    return {"rows": rows, "targets": targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1000)
    parser.add_argument("--work-dir", type=Path, default=Path(".bench-load"))
    parser.add_argument("--rounds", type=int, default=3, help="loads per method (medians of times, max of peaks)")
    parser.add_argument("--cold", action="store_true", help="drop each file's cached pages before every load")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]))))
        return
    files = write_files(args.work_dir, args.size_mb)
    runs: dict[str, list[dict]] = {method: [] for method in METHODS}
    for _ in range(args.rounds):
        for method, kind in METHODS.items():
            runs[method].append(run_child(method, files[kind], args.cold))
    checksums = {f"{r['checksum']:.6g}" for results in runs.values() for r in results}
    assert len(checksums) == 1, f"the methods read different weights: {checksums}"
    result = summarize(runs)
    result["cache"] = "cold (pages dropped before each load)" if args.cold else "warm (page cache)"
    result["rounds"] = args.rounds
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.rounds} rounds, methods in turn, each load in a fresh process; files {result['cache']}")
    print(f"{'method':<27}{'file MB':>8}{'peak RSS MB':>12}{'x file':>8}{'load s':>8}{'ready s':>9}")
    for method, r in result["rows"].items():
        print(
            f"{method:<27}{r['file_mb']:>8.0f}{r['peak_above_baseline_mb']:>12.0f}{r['peak_over_file']:>8.2f}"
            f"{r['load_s']:>8.2f}{r['ready_s']:>9.2f}"
        )
    t = result["targets"]
    print(
        f"peak RSS / file size: dalle2-cli .pth {t['peak_over_file_dalle2_cli_pth']:.2f}x, "
        f"safetensors {t['peak_over_file_dalle2_cli_safetensors']:.2f}x (target <= 1.3x)"
    )
    print(
        f"torch.load / safetensors, same weights: {t['torch_load_over_safetensors_read']:.1f}x to a state dict, "
        f"{t['torch_load_over_safetensors_ready']:.1f}x to first use of every weight (target >= 3x)"
    )
    print(
        f"dalle2-laion's torch.load + copy / dalle2-cli safetensors, model ready: "
        f"{t['copy_over_dalle2_cli_safetensors_load']:.1f}x loaded, "
        f"{t['copy_over_dalle2_cli_safetensors_ready']:.1f}x to first use "
        f"(/ dalle2-cli .pth: {t['copy_over_dalle2_cli_pth_ready']:.1f}x)"
    )


if __name__ == "__main__":
    main()
