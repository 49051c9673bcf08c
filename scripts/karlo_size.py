"""Kakao Brain's Karlo at its real size, with random weights: what loading and sampling cost, for
dalle2-cli and for diffusers' `UnCLIPPipeline` built from the same files in the same run.

    python scripts/karlo_size.py [--cache .karlo-size] [--steps 2] [--runs ...] [--device cpu|cuda]

Builds Karlo's published architectures (FACTS.md: the 1,022M prior, the 885M 64 px decoder,
the two 692M super-resolution unets, ViT-L/14's text tower) with diffusers' and transformers'
own classes and saves them as the hub has them (`save_pretrained`, safetensors), then runs in
fresh processes:

- `dalle2 text2im -c FOLDER` in fp32, bf16 and bf16 --low-memory: peak RSS against the files;
- the same sampling from Python, ours and diffusers' (prior, decoder and super-resolution each
  `--steps` network evaluations, guided as by default): seconds spent sampling, so the ratio
  is per network evaluation; and diffusers' peak RSS, fp32 and bf16.

Random weights make noise, not pictures: this measures memory and time, nothing of quality.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from laion_size import _json_report, measured  # noqa: E402 - the sibling script's process measuring

PUBLISHED = {
    "prior": 1022,
    "text_proj": 8,
    "decoder": 885,
    "super_res_first": 692,
    "super_res_last": 692,
    "text_encoder": 124,
}
RESNET_BLOCKS = ("ResnetDownsampleBlock2D",) * 4
DECODER = {
    "sample_size": 64,
    "layers_per_block": 3,
    "down_block_types": ["ResnetDownsampleBlock2D", *["SimpleCrossAttnDownBlock2D"] * 3],
    "up_block_types": [*["SimpleCrossAttnUpBlock2D"] * 3, "ResnetUpsampleBlock2D"],
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "block_out_channels": [320, 640, 960, 1280],
    "in_channels": 3,
    "out_channels": 6,
    "cross_attention_dim": 1536,
    "attention_head_dim": 64,
    "resnet_time_scale_shift": "scale_shift",
    "class_embed_type": "identity",
}
SUPER_RES = {
    "sample_size": 256,
    "layers_per_block": 3,
    "down_block_types": list(RESNET_BLOCKS),
    "up_block_types": ["ResnetUpsampleBlock2D"] * 4,
    "block_out_channels": [320, 640, 960, 1280],
    "in_channels": 6,
    "out_channels": 3,
    "add_attention": False,
}
PRIOR = {"num_attention_heads": 32, "attention_head_dim": 64, "num_layers": 20, "embedding_dim": 768}
TEXT_PROJ = {
    "clip_extra_context_tokens": 4,
    "clip_embeddings_dim": 768,
    "time_embed_dim": 1280,
    "cross_attention_dim": 1536,
}
TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 0,
}
SCHEDULERS = {
    "prior_scheduler": {"variance_type": "fixed_small_log", "prediction_type": "sample", "clip_sample_range": 5.0},
    "decoder_scheduler": {"variance_type": "learned_range", "prediction_type": "epsilon"},
    "super_res_scheduler": {"variance_type": "fixed_small_log", "prediction_type": "epsilon"},
}


def build(folder: Path) -> None:
    """Karlo's text-to-image pipeline, random weights, as `save_pretrained` writes it."""
    import torch
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from tests.tiny_karlo import tokenizer

    torch.manual_seed(0)
    makers = {
        "text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TEXT)),
        "prior": lambda: PriorTransformer(**PRIOR),
        "text_proj": lambda: UnCLIPTextProjModel(**TEXT_PROJ),
        "decoder": lambda: UNet2DConditionModel(**DECODER),
        "super_res_first": lambda: UNet2DModel(**SUPER_RES),
        "super_res_last": lambda: UNet2DModel(**SUPER_RES),
    }
    index = {"_class_name": "UnCLIPPipeline", "_diffusers_version": "0.12.0"}
    for name, make in makers.items():
        with torch.no_grad():
            model = make()
            if name == "prior":
                model.clip_std.fill_(1.0)
        count = sum(p.numel() for p in model.parameters()) / 1e6
        model.save_pretrained(str(folder / name))
        size = sum(f.stat().st_size for f in (folder / name).glob("*.safetensors")) / 2**30
        print(
            f"built {name}: {count:,.0f}M parameters (published: {PUBLISHED.get(name, '-')}M), {size:.2f} GiB",
            flush=True,
        )
        library = "transformers" if name == "text_encoder" else ("unclip" if name == "text_proj" else "diffusers")
        index[name] = [library, type(model).__name__]
        del model
    for name, config in SCHEDULERS.items():
        UnCLIPScheduler(**config).save_pretrained(str(folder / name))
        index[name] = ["diffusers", "UnCLIPScheduler"]
    tokenizer(folder / "tokenizer")
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


# Sampling timed from Python, both ways: the same evaluations (guided prior and decoder, the
# super-resolution unguided), one image, loading left out.
TIMED = """
import time
def timed(module, name, seconds):
    # Sum of the seconds spent in each network's forward, and how many calls.
    forward = module.forward
    def measured(*args, **kwargs):
        started = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            total, calls = seconds.get(name, (0.0, 0))
            seconds[name] = (total + time.perf_counter() - started, calls + 1)
    module.forward = measured
"""
# Sampling timed from Python, both ways: the same evaluations (guided prior and decoder, the
# super-resolution unguided), one image, loading left out; and each network's forward timed.
OURS = (
    TIMED
    + """
import json, sys, time, torch
from dalle2_cli.config import load_config
from dalle2_cli.loading.manager import DalleModelManager
from dalle2_cli.sampling.pipelines import TextToImage
from dalle2_cli.sampling.settings import SamplingSettings
folder, steps, dtype, device = sys.argv[1], int(sys.argv[2]), getattr(torch, sys.argv[3]), sys.argv[4]
manager = DalleModelManager(load_config(folder), device=device, dtype=dtype, log=lambda _: None)
settings = SamplingSettings(seed=0, prior_steps=steps, decoder_steps=[steps, steps], num_samples_per_batch=1)
script = TextToImage(manager, settings)
script.plan()
# Weights read in before timing, as diffusers' from_pretrained has them (ours are memory-mapped,
# read from the file at their first use): what is timed is the network evaluations.
for model in (manager.clip, manager.prior, manager.decoder):
    for parameter in model.parameters():
        parameter.data.sum()
networks = {}
decoder = manager.decoder
for name, net in (("prior", manager.prior.net), ("decoder", decoder.decoder),
                  ("super_res_first", decoder.super_res_first), ("super_res_last", decoder.super_res_last)):
    timed(net, name, networks)
started = time.perf_counter()
script.run(["a corgi"])
print(json.dumps({"sampling_seconds": time.perf_counter() - started, "networks": networks}))
"""
)
DIFFUSERS = (
    TIMED
    + """
import json, sys, time, torch, logging
logging.disable(logging.WARNING)
from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPScheduler
from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer
folder, steps, dtype, device = sys.argv[1], int(sys.argv[2]), getattr(torch, sys.argv[3]), sys.argv[4]
load = lambda cls, name: cls.from_pretrained(folder, subfolder=name, torch_dtype=dtype)
scheduler = lambda name: UnCLIPScheduler.from_pretrained(folder, subfolder=name)
pipe = UnCLIPPipeline(
    prior=load(PriorTransformer, "prior"), decoder=load(UNet2DConditionModel, "decoder"),
    text_proj=load(UnCLIPTextProjModel, "text_proj"), text_encoder=load(CLIPTextModelWithProjection, "text_encoder"),
    tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
    super_res_first=load(UNet2DModel, "super_res_first"), super_res_last=load(UNet2DModel, "super_res_last"),
    prior_scheduler=scheduler("prior_scheduler"), decoder_scheduler=scheduler("decoder_scheduler"),
    super_res_scheduler=scheduler("super_res_scheduler"),
).to(device)
pipe.set_progress_bar_config(disable=True)
networks = {}
for name in ("prior", "decoder", "super_res_first", "super_res_last"):
    timed(getattr(pipe, name), name, networks)
started = time.perf_counter()
pipe("a corgi", prior_num_inference_steps=steps, decoder_num_inference_steps=steps,
     super_res_num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
print(json.dumps({"sampling_seconds": time.perf_counter() - started, "networks": networks}))
"""
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(".karlo-size"))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--runs",
        default="text2im-fp32,text2im-fp32-low,text2im-bf16,text2im-bf16-low,ours-fp32,diffusers-fp32,ours-bf16,"
        "diffusers-bf16",
        help="which runs, comma-separated",
    )
    parser.add_argument("--device", default="cpu", help="cuda: also peak GPU memory (fp16 runs) and images/s")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder = args.cache.resolve() / "karlo-v1-alpha"
    if not (folder / "model_index.json").exists():
        build(folder)
    files = sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / 2**30
    work = args.cache.resolve() / "runs"
    work.mkdir(exist_ok=True)
    steps = ["--prior-steps", str(args.steps), "--decoder-steps", f"{args.steps},{args.steps}"]
    cli = [sys.executable, "-m", "dalle2_cli", "text2im", "a corgi", "-c", str(folder), *steps]
    cli += ["--device", args.device, "-o", "out", "--overwrite", "-q", "--json"]
    commands = {
        "text2im-fp32": [*cli, "--dtype", "fp32"],
        "text2im-fp32-low": [*cli, "--dtype", "fp32", "--low-memory"],
        "text2im-bf16": [*cli, "--dtype", "bf16"],
        "text2im-bf16-low": [*cli, "--dtype", "bf16", "--low-memory"],
        "text2im-fp16": [*cli, "--dtype", "fp16"],
    }
    for dtype, name in (("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16")):
        for who, code in (("ours", OURS), ("diffusers", DIFFUSERS)):
            commands[f"{who}-{dtype}"] = [sys.executable, "-c", code, str(folder), str(args.steps), name, args.device]
    print(
        f"Karlo-size files: {files:.2f} GiB; {args.steps} evaluations per stage; {args.device}",
        flush=True,
    )
    results = {}
    for name in args.runs.split(","):
        result = measured(commands[name], work)
        report = _json_report(result["stdout"])
        results[name] = {**{k: v for k, v in result.items() if k not in ("stdout", "stderr")}, **report}
        verdict = "ok" if result["code"] == 0 else f"FAILED ({result['stderr'].strip().splitlines()[-1:]})"
        sampling = f", sampling {report['sampling_seconds']:.1f} s" if "sampling_seconds" in report else ""
        gpu = f", peak GPU {report['peak_gpu_memory_gib']:.2f} GiB" if "peak_gpu_memory_gib" in report else ""
        print(
            f"{name:>18}: peak RSS {result['peak_gib']:.2f} GiB ({result['peak_gib'] / files:.2f}x the files), "
            f"{result['seconds']:.1f} s in all{sampling}{gpu}, {verdict}",
            flush=True,
        )
    for dtype in ("fp32", "bf16", "fp16"):
        ours, theirs = results.get(f"ours-{dtype}", {}), results.get(f"diffusers-{dtype}", {})
        if "sampling_seconds" in ours and "sampling_seconds" in theirs:
            ratio = ours["sampling_seconds"] / theirs["sampling_seconds"]
            print(f"sampling time, ours / diffusers' ({dtype}, same evaluations): {ratio:.2f}x")
            for name, (seconds, calls) in ours.get("networks", {}).items():
                other, other_calls = theirs["networks"].get(name, (0.0, 0))
                if calls and other_calls:
                    each, other_each = seconds / calls, other / other_calls
                    ratio = each / other_each
                    print(f"  {name}: {each:.2f} s per evaluation, diffusers' {other_each:.2f} s ({ratio:.2f}x)")
    if args.json:
        print(json.dumps({"files_gib": files, "runs": results}))


if __name__ == "__main__":
    main()
