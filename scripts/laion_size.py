"""LAION's DALL·E 2 at its real size, with random weights: what loading and sampling cost.

    python scripts/laion_size.py [--cache .laion-size] [--steps 2] [--runs text2im-fp32,text2im-bf16,...]

Builds the published architectures (FACTS.md: the 1.5B-LAION decoder's 957M-parameter unet,
the 24-layer prior, OpenAI's ViT-L/14) through dalle2-pytorch's own config classes, saves
them as LAION's files are (bare state dicts with `prior_config.json` / `decoder_config.json`
beside them; ViT-L/14 as an OpenAI state dict given through `"clip": {"make": "openai",
"load_model_from": ...}`), caches them, then runs each command in a fresh process and prints
its peak RSS, wall time and the ratio to the three files' size, beside dalle2-laion's way of
loading the decoder (plain `torch.load` and `load_state_dict`). Random weights make noise,
not pictures: this measures memory and time, nothing of quality.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PRIOR_NET = {
    "dim": 768,
    "depth": 24,
    "num_timesteps": 1000,
    "max_text_len": 77,
    "num_time_embeds": 1,
    "num_image_embeds": 1,
    "num_text_embeds": 1,
    "dim_head": 64,
    "heads": 32,
    "ff_mult": 4,
    "attn_dropout": 0.05,
    "ff_dropout": 0.05,
    "normformer": True,
}
PRIOR = {
    "net": PRIOR_NET,
    "image_embed_dim": 768,
    "image_size": 224,
    "timesteps": 1000,
    "cond_drop_prob": 0.1,
    "loss_type": "l2",
    "condition_on_text_encodings": True,
}
UNET = {
    "dim": 320,
    "image_embed_dim": 768,
    "text_embed_dim": 768,
    "cond_dim": 512,
    "channels": 3,
    "dim_mults": [1, 2, 3, 4],
    "num_resnet_blocks": 4,
    "attn_heads": 8,
    "attn_dim_head": 64,
    "sparse_attn": True,
    "memory_efficient": True,
    "cond_on_text_encodings": True,
    "self_attn": [False, True, True, True],
}
DECODER = {
    "unets": [UNET],
    "image_sizes": [64],
    "timesteps": 1000,
    "loss_type": "l2",
    "beta_schedule": ["cosine"],
    "learned_variance": True,
}


def build(cache: Path) -> Path:
    """The three files and a config naming them (made once, then reused). Run in a process of
    its own (`--build-only`): a child's peak RSS as the kernel reports it starts from its
    parent's at the fork, so the measuring process must stay small."""
    config_path = cache / "laion-size.json"
    if config_path.exists():
        return config_path
    import torch
    from dalle2_pytorch.train_configs import DecoderConfig, DiffusionPriorConfig

    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, section, config, make in (
        ("prior", "prior", PRIOR, DiffusionPriorConfig),
        ("decoder", "decoder", DECODER, DecoderConfig),
    ):
        model = make(**config).create()
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("clip.")}
        torch.save(state, cache / f"{name}.pth")
        (cache / f"{name}_config.json").write_text(json.dumps({section: config}, indent=2))
        del model, state
        print(f"built {name}: {(cache / f'{name}.pth').stat().st_size / 2**30:.2f} GiB", flush=True)
    import open_clip

    clip = open_clip.create_model("ViT-L-14", pretrained=None)
    torch.save(clip.state_dict(), cache / "clip.pth")
    del clip
    print(f"built clip: {(cache / 'clip.pth').stat().st_size / 2**30:.2f} GiB", flush=True)

    def local(name: str) -> dict:
        return {"load_type": "local", "path": str((cache / name).resolve())}

    config_path.write_text(
        json.dumps(
            {
                "clip": {"make": "openai", "model": "ViT-L/14", "load_model_from": local("clip.pth")},
                "prior": {"load_model_from": local("prior.pth"), "load_config_from": local("prior_config.json")},
                "decoder": {
                    "unet_sources": [
                        {
                            "unet_numbers": [1],
                            "load_model_from": local("decoder.pth"),
                            "load_config_from": local("decoder_config.json"),
                        }
                    ]
                },
            },
            indent=2,
        )
    )
    return config_path


def measured(command: list[str], cwd: Path) -> dict:
    """Run `command` in a fresh process: its exit code, wall seconds, peak RSS (its own, from wait4)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    stdout, stderr = process.stdout.read(), process.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    return {"code": code, "seconds": seconds, "peak_gib": usage.ru_maxrss / 2**20, "stdout": stdout, "stderr": stderr}


def _json_report(stdout: str) -> dict:
    """The CLI's --json report (its last line), or {} for a run that printed none."""
    lines = stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}


LAION_WAY = """
import sys, torch
from dalle2_pytorch.train_configs import DecoderConfig
import json
config = json.load(open(sys.argv[1]))["decoder"]
decoder = DecoderConfig(**config).create()
decoder.load_state_dict(torch.load(sys.argv[2], map_location="cpu", weights_only=True), strict=False)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(".laion-size"))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--runs",
        default="text2im-fp32,text2im-bf16,text2im-fp16,text2im-fp32-low,text2im-bf16-low,variation-fp32,"
        "inpaint-fp32,laion-way",
        help="which runs, comma-separated; a -low run adds --low-memory",
    )
    parser.add_argument(
        "--device", default="cpu", help="cuda: also peak GPU memory, and text2im-fp16-n8 (images/s for -n 8)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cache = args.cache.resolve()
    if args.device != "cpu" and args.runs == parser.get_default("runs"):
        args.runs = "text2im-fp32,text2im-fp16,text2im-fp16-low,text2im-fp16-n8,variation-fp32,inpaint-fp32,laion-way"
    if args.build_only:
        build(args.cache)
        return
    config = args.cache / "laion-size.json"
    if not config.exists():
        subprocess.run([sys.executable, __file__, "--build-only", "--cache", str(args.cache)], check=True)
    files = sum((args.cache / name).stat().st_size for name in ("clip.pth", "prior.pth", "decoder.pth")) / 2**30
    work = args.cache / "runs"
    work.mkdir(exist_ok=True)
    from PIL import Image

    Image.new("RGB", (224, 224), (120, 80, 40)).save(work / "photo.png")
    mask = Image.new("L", (224, 224), 0)
    mask.paste(255, (0, 0, 112, 224))
    mask.save(work / "mask.png")
    steps = ["--prior-steps", str(args.steps), "--decoder-steps", str(args.steps)]
    cli = [sys.executable, "-m", "dalle2_cli"]
    common = ["-c", str(config), "--device", args.device, "-o", "out", "--overwrite", "-q", "--json"]
    commands = {
        "inspect": [*cli, "inspect", str(args.cache / "decoder.pth"), "--json"],
        "laion-way": [
            sys.executable,
            "-c",
            LAION_WAY,
            str(args.cache / "decoder_config.json"),
            str(args.cache / "decoder.pth"),
        ],
    }
    for dtype in ("fp32", "bf16", "fp16"):
        commands[f"text2im-{dtype}"] = [*cli, "text2im", "a corgi", *steps, *common, "--dtype", dtype]
        commands[f"text2im-{dtype}-low"] = [*commands[f"text2im-{dtype}"], "--low-memory"]
    commands["text2im-fp16-n8"] = [*commands["text2im-fp16"], "-n", "8", "--batch-size", "8"]
    commands["variation-fp32"] = [*cli, "variation", "photo.png", "--decoder-steps", str(args.steps), *common]
    commands["inpaint-fp32"] = [*cli, "inpaint", "photo.png", "mask.png", "a red ball", *steps, *common]
    results = {}
    print(f"LAION-size files: {files:.2f} GiB (clip, prior, decoder); {args.steps} sampling steps; {args.device}")
    for name in ["inspect", *args.runs.split(",")]:
        result = measured(commands[name], work)
        results[name] = {k: v for k, v in result.items() if k not in ("stdout", "stderr")}
        report = _json_report(result["stdout"])
        figures = ("peak_gpu_memory_gib", "images_per_second", "seconds")
        results[name].update({f"work_{k}" if k == "seconds" else k: report[k] for k in figures if k in report})
        verdict = "ok" if result["code"] == 0 else f"FAILED ({result['stderr'].strip().splitlines()[-1:]})"
        gpu = f", peak GPU {report['peak_gpu_memory_gib']:.2f} GiB" if "peak_gpu_memory_gib" in report else ""
        rate = f", {report['images_per_second']:.3f} images/s" if "images_per_second" in report else ""
        if "seconds" in report:  # the CLI's own figure: loading, sampling and saving, after start-up
            rate = f" ({report['seconds']:.1f} s loading and sampling){rate}"
        print(
            f"{name:>16}: peak RSS {result['peak_gib']:.2f} GiB ({result['peak_gib'] / files:.2f}x the files), "
            f"{result['seconds']:.1f} s{gpu}{rate}, {verdict}",
            flush=True,
        )
    if args.json:
        print(json.dumps({"files_gib": files, "runs": results}))


if __name__ == "__main__":
    main()
