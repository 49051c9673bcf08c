"""Peak memory and time for loading a large decoder checkpoint, by loading method.

    python scripts/bench_load.py [--size-mb 600] [--json]

Writes (once, under --work-dir) a random-weight decoder of about --size-mb as a tracker model
save and as safetensors, then loads each in a fresh process and reports peak RSS above the
process's RSS after imports, as a multiple of the file size:
- copy: torch.load (no mmap) and load_state_dict copying into a new model (dalle2-laion's way);
- dalle2-cli .pth: our loader (memory-mapped torch.load, weights adopted, not copied);
- dalle2-cli safetensors: our loader on the converted file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")


def decoder_config(size_mb: int) -> dict:
    # dim scales the unet roughly quadratically; 192 with these settings is ~150M parameters.
    dim = int(192 * (size_mb / 600) ** 0.5) // 16 * 16
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


def write_files(work: Path, size_mb: int) -> tuple[Path, Path]:
    import packaging.version
    import torch
    from dalle2_pytorch.train_configs import DecoderConfig
    from dalle2_pytorch.version import __version__

    from dalle2_cli.checkpoint import read_checkpoint, write_safetensors

    pth, safetensors = work / f"decoder-{size_mb}mb.pth", work / f"decoder-{size_mb}mb.safetensors"
    if not pth.exists():
        work.mkdir(parents=True, exist_ok=True)
        config = decoder_config(size_mb)
        decoder = DecoderConfig(**config).create()
        torch.save(
            {
                "version": packaging.version.parse(__version__),
                "config": {"decoder": config},
                "model": decoder.state_dict(),
            },
            pth,
        )
        del decoder
    if not safetensors.exists():
        write_safetensors(read_checkpoint(pth), safetensors)
    return pth, safetensors


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def measure(method: str, path: Path) -> dict:
    """Runs in the child process: load `path` by `method`, report memory and time."""
    import torch
    from dalle2_pytorch.train_configs import DecoderConfig

    from dalle2_cli.checkpoint import load_weights, new_model, read_checkpoint

    baseline = rss_mb()
    started = time.perf_counter()
    if method == "copy":
        import packaging.version

        with torch.serialization.safe_globals([packaging.version.Version]):
            saved = torch.load(path, map_location="cpu", weights_only=True)
        decoder = DecoderConfig(**saved["config"]["decoder"]).create()
        decoder.load_state_dict(saved["model"])
    else:
        checkpoint = read_checkpoint(path)
        decoder = new_model(DecoderConfig(**checkpoint.config["decoder"]).create, weights_follow=True)
        load_weights(decoder, checkpoint.state_dict, strict=True, what=str(path))
    seconds = time.perf_counter() - started
    checksum = float(sum(p.double().sum() for p in decoder.parameters()))  # touch every weight
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "method": method,
        "file_mb": path.stat().st_size / 2**20,
        "peak_above_baseline_mb": peak - baseline,
        "load_seconds": seconds,
        "checksum": checksum,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=600)
    parser.add_argument("--work-dir", type=Path, default=Path(".bench-load"))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]))))
        return
    pth, safetensors = write_files(args.work_dir, args.size_mb)
    rows = []
    for method, path in (("copy", pth), ("dalle2-cli .pth", pth), ("dalle2-cli safetensors", safetensors)):
        out = subprocess.run(
            [sys.executable, __file__, "--child", method, str(path)], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert len({round(r["checksum"], 3) for r in rows}) == 1, "the methods loaded different weights"
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'method':<24}{'file MB':>9}{'peak RSS MB':>13}{'x file':>8}{'load s':>8}")
    for r in rows:
        ratio = r["peak_above_baseline_mb"] / r["file_mb"]
        print(
            f"{r['method']:<24}{r['file_mb']:>9.0f}{r['peak_above_baseline_mb']:>13.0f}{ratio:>8.2f}"
            f"{r['load_seconds']:>8.2f}"
        )


if __name__ == "__main__":
    main()
