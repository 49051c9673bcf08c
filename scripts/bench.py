"""Where the time goes: start-up, loading, and each sampling stage per network evaluation
against its compute floor.

    python scripts/bench.py [-c shapes] [--images 1,8] [--batch 8] [--sampler ddim]
                            [--prior-steps N] [--decoder-steps N ...] [--device cpu|cuda]
                            [--dtype fp16] [--rounds 3] [--threads 1] [--direct] [--compile] [--json]

- start-up: process start to `dalle2 --help` printed, against `python -c "import torch"`
  (median of --repeats subprocesses each, in this run); import time of the inference stack;
- loading: seconds per model (CLIP, prior, decoder) and the files it read;
- per stage of `text2im -n N` (CLIP text encoding, prior, each decoder unet): steps, network
  evaluations per image (rows through the network: guidance's null branch and the prior's
  candidates count), seconds, seconds per step; and the floor: the same network calls with the
  same inputs, replayed back to back in this process; ours / floor. A stage's time runs from
  the previous progress callback to its own (the device synchronised at each one), so it
  includes the loop's own work between network calls: that is what the ratio is about;
- end to end: images/s of the whole `TextToImage.run` against the floor's sum;
- `--direct`: the same work through dalle2-pytorch's own `DiffusionPrior.sample` and
  `Decoder.sample` (the models loaded by our manager; DDIM or DDPM as it chooses from the
  steps), end to end, printed as ours / direct;
- `--compile`: the networks torch.compile'd (`dalle2 text2im --compile`), end to end, with its
  warm-up time (compiling included) and the largest pixel difference from ours;
- peak RSS of this process, and peak GPU memory on CUDA.

Every `-n N` is first run once unmeasured (kernels, allocator and caches warm at that batch),
then measured --rounds times, the kinds taking turns, each followed by its floor; the figures
are the best of the rounds (the least disturbed by other work on the machine). Compare ratios
from one run, not across runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dalle2_cli.sampling.progress import NoProgress  # rich only: no torch yet

PROMPT = "a red circle on a blue background"


def _median_seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def startup(repeats: int) -> dict[str, float]:
    """Subprocess wall times, medians: `dalle2 --help`, `import torch`, the inference stack."""
    exe = shutil.which("dalle2") or str(Path(sys.executable).with_name("dalle2"))
    helps = _median_seconds([exe, "--help"], repeats)
    torch_import = _median_seconds([sys.executable, "-c", "import torch"], repeats)
    bare = _median_seconds([sys.executable, "-c", "pass"], repeats)
    stack = _median_seconds([sys.executable, "-c", "import dalle2_cli.sampling.pipelines"], repeats)
    return {
        "help_s": helps,
        "import_torch_s": torch_import,
        "help_over_import_torch": helps / torch_import,
        "python_bare_s": bare,
        "import_inference_stack_s": stack - bare,  # the imports alone, interpreter start taken off
    }


class _StageClock(NoProgress):
    """Stage times from the sampling loops' progress callbacks: each callback closes an
    interval that began at the previous one (any stage's) and belongs to its own stage."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.stages: dict[str, dict[str, float]] = {}
        self._last = time.perf_counter()

    def stage(self, label: str, steps: int, loops: int = 1) -> None:
        stage = self.stages.setdefault(label, {"steps": 0, "loops": 0, "seconds": 0.0})
        stage["loops"] += loops
        self.sync()
        self._last = time.perf_counter()

    def advance(self, label: str, steps: int = 1, preview=None) -> None:
        self.sync()
        now = time.perf_counter()
        self.stages[label]["seconds"] += now - self._last
        self.stages[label]["steps"] += steps
        self._last = now


class _Recorder:
    """Records the network calls of each stage (the inputs of the first call of each shape, how
    many calls, how many rows), to replay them back to back as the floor. It wraps `forward` on
    the instances only, for this measurement; nothing of dalle2-pytorch's is touched."""

    def __init__(self):
        self.calls: dict[tuple, dict[str, Any]] = {}
        self.rows: dict[str, int] = {}
        self._wrapped: list[tuple[Any, str]] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        import torch

        method = getattr(owner, name)

        def recording(*args, **kwargs):
            tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
            key = (
                label,
                *(tuple(v.shape) for v in tensors),
                *sorted((k, str(v)) for k, v in kwargs.items() if not isinstance(v, torch.Tensor)),
            )
            call = self.calls.setdefault(
                key, {"call": method, "label": label, "args": args, "kwargs": kwargs, "count": 0}
            )
            call["count"] += 1
            self.rows[label] = self.rows.get(label, 0) + (tensors[0].shape[0] if tensors else 1)
            return method(*args, **kwargs)

        setattr(owner, name, recording)
        self._wrapped.append((owner, name))

    def unwrap(self) -> None:
        for owner, name in self._wrapped:
            owner.__dict__.pop(name, None)
        self._wrapped.clear()

    def floor(self, precision, sync) -> dict[str, float]:
        """Seconds per stage for the recorded calls alone, back to back (after one warm-up each)."""
        import torch

        floors: dict[str, float] = {}
        with torch.inference_mode(), precision():
            for call in self.calls.values():
                run = functools.partial(call["call"], *call["args"], **call["kwargs"])
                run()
                sync()
                started = time.perf_counter()
                for _ in range(call["count"]):
                    run()
                sync()
                floors[call["label"]] = floors.get(call["label"], 0.0) + time.perf_counter() - started
        return floors


def _ours(manager, settings, count: int, sync) -> dict[str, Any]:
    """One measured `text2im -n count` through our pipeline, stage by stage, and its floor."""
    from dalle2_cli.sampling.pipelines import TextToImage

    script = TextToImage(manager, settings)
    script.plan()  # loads what it needs, outside the clock
    clock = _StageClock(sync)
    script.progress = clock
    recorder = _Recorder()
    recorder.wrap(manager.clip, "embed_text", "CLIP")
    recorder.wrap(manager.prior.net, "forward", "prior")
    for number, unet in enumerate(manager.decoder.unets):
        recorder.wrap(unet, "forward", f"decoder unet {number + 1}")
    try:
        sync()
        started = time.perf_counter()
        made = script.run([PROMPT], num_images=count, candidates=1)  # one sampling each, as _direct does
        sync()
        total = time.perf_counter() - started
    finally:
        recorder.unwrap()
    floors = recorder.floor(script._precision, sync)
    stages = {}
    for label, stage in clock.stages.items():
        floor = floors.get(label)
        stages[label] = {
            **stage,
            "steps_per_loop": stage["steps"] / max(stage["loops"], 1),
            "evaluations_per_image": recorder.rows.get(label, 0) / count,
            "seconds_per_step": stage["seconds"] / max(stage["steps"], 1),
            "floor_s": floor,
            "over_floor": stage["seconds"] / floor if floor else None,
        }
    floor_sum = sum(floors.values())
    return {
        "images": count,
        "pixels": [np.asarray(g.image, dtype=np.int16) for g in made],
        "seconds": total,
        "images_per_s": count / total,
        "floor_s": floor_sum,
        "over_floor": total / floor_sum if floor_sum else None,
        "stages": stages,
        "settings": {k: v for k, v in made[0].settings.items() if k.startswith(("prior_", "decoder_", "batch"))},
    }


def _direct(manager, settings, count: int, sync) -> dict[str, Any]:
    """The same images' work as a user of dalle2-pytorch alone writes it: tokens, then
    `prior.sample`, then `decoder.sample`, end to end."""
    import torch

    from dalle2_cli.loading.clip import tokenize
    from dalle2_cli.sampling.pipelines import TextToImage

    script = TextToImage(manager, settings)
    prior_plan, decoder_plans = script.prior_plan(), script.decoder_plans()
    clip, prior, decoder = manager.clip, manager.prior, manager.decoder
    saved = decoder.sample_timesteps
    decoder.sample_timesteps = tuple(p.steps for p in decoder_plans)
    torch.manual_seed(settings.seed or 0)
    try:
        sync()
        started = time.perf_counter()
        for start in range(0, count, settings.batch_size):
            size = min(settings.batch_size, count - start)
            tokens = tokenize(clip, [PROMPT] * size).to(manager.device)
            with torch.no_grad(), script._precision(), manager.using(prior):
                embeds = prior.sample(
                    tokens,
                    num_samples_per_batch=settings.num_samples_per_batch,
                    cond_scale=prior_plan.cond_scale,
                    timesteps=prior_plan.steps,
                )
            with torch.no_grad(), script._precision(), manager.using(clip, decoder):
                encodings = clip.embed_text(tokens)[1] if decoder.condition_on_text_encodings else None
                decoder.sample(
                    image_embed=embeds, text_encodings=encodings, cond_scale=tuple(p.cond_scale for p in decoder_plans)
                )
        sync()
        total = time.perf_counter() - started
    finally:
        decoder.sample_timesteps = saved
    return {"images": count, "seconds": total, "images_per_s": count / total}


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The best (least) time of each figure over the rounds, ratios recomputed from them."""
    best = {key: value for key, value in runs[0].items() if key not in ("stages", "pixels")}
    best["seconds"] = min(r["seconds"] for r in runs)
    best["images_per_s"] = best["images"] / best["seconds"]
    best["rounds"] = len(runs)
    best["seconds_each_round"] = [r["seconds"] for r in runs]
    if "stages" not in runs[0]:
        return best
    best["stages"] = {}
    for label, first in runs[0]["stages"].items():
        stage = dict(first)
        stage["seconds"] = min(r["stages"][label]["seconds"] for r in runs)
        floors = [r["stages"][label]["floor_s"] for r in runs]
        stage["floor_s"] = min(floors) if all(floors) else None
        stage["seconds_per_step"] = stage["seconds"] / max(stage["steps"], 1)
        stage["over_floor"] = stage["seconds"] / stage["floor_s"] if stage["floor_s"] else None
        best["stages"][label] = stage
    best["floor_s"] = sum(stage["floor_s"] or 0.0 for stage in best["stages"].values())
    best["over_floor"] = best["seconds"] / best["floor_s"] if best["floor_s"] else None
    best["evaluations_per_image"] = sum(s["evaluations_per_image"] for s in best["stages"].values())
    return best


def measure(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    import torch

    from dalle2_cli.config import load_config
    from dalle2_cli.loading.manager import DalleModelManager
    from dalle2_cli.sampling.settings import SamplingSettings

    imported = time.perf_counter() - started
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    new_manager = functools.partial(
        DalleModelManager,
        load_config(args.config),
        device=args.device,
        log=lambda _: None,
        dtype=dtype,
        keep_resident=args.keep_resident,
    )
    manager = new_manager()
    cuda = manager.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loads = {}
    for role in ("clip", "prior", "decoder"):  # CLIP first: the prior's load would include it
        started = time.perf_counter()
        getattr(manager, role)
        loads[role] = {
            "seconds": time.perf_counter() - started,
            "files": sorted({p.name for r, p in manager.files.items() if r.split()[0] == role}),
        }
    settings = SamplingSettings(
        prior_steps=args.prior_steps,
        decoder_steps=args.decoder_steps,
        prior_cond_scale=args.prior_cond_scale,
        decoder_cond_scale=args.decoder_cond_scale,
        batch_size=args.batch,
        seed=0,
        batched_guidance=not args.two_pass,
        sampler=args.sampler,
    )
    kinds: dict[str, Callable[[int], dict[str, Any]]] = {"ours": lambda n: _ours(manager, settings, n, sync)}
    if args.direct:
        kinds["direct"] = lambda n: _direct(manager, settings, n, sync)
    if args.compile:
        compiled = new_manager(compile=True)
        kinds["compiled"] = lambda n: _ours(compiled, settings, n, sync)
    runs = []
    for count in args.images:
        warmup = {}
        for kind, run in kinds.items():  # warm-up at this batch (kernels, allocator, lazy inits, compiling)
            started = time.perf_counter()
            run(count)
            warmup[kind] = time.perf_counter() - started
        rounds: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
        for _ in range(args.rounds):
            for kind, run in kinds.items():
                rounds[kind].append(run(count))
        row = {kind: {**_best(results), "warmup_s": warmup[kind]} for kind, results in rounds.items()}
        if "compiled" in row:
            ours, theirs = rounds["ours"][-1]["pixels"], rounds["compiled"][-1]["pixels"]
            row["compiled"]["max_pixel_difference_from_ours"] = int(
                max(np.abs(a - b).max() for a, b in zip(ours, theirs, strict=True))
            )
        runs.append(row)
    return {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "dtype": args.dtype,
            "device": str(manager.device),
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "torch": torch.__version__,
        },
        "config": args.config,
        "import_in_process_s": imported,
        "load": loads,
        "runs": runs,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def _table(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [
        f"{result['config']} on {machine['device']} ({machine['gpu'] or machine['platform']}, "
        f"{machine['torch_threads']} torch threads, torch {machine['torch']}, {machine['dtype']})"
    ]
    if "startup" in result:
        s = result["startup"]
        lines.append(
            f"dalle2 --help {s['help_s']:.3f} s | import torch {s['import_torch_s']:.3f} s | "
            f"ratio {s['help_over_import_torch']:.2f} (target <= 0.33) | "
            f"inference stack imports {s['import_inference_stack_s']:.3f} s"
        )
    for role, load in result["load"].items():
        lines.append(f"load {role:<8}{load['seconds']:>8.3f} s  {', '.join(load['files'])}")
    peak_gpu = f", peak GPU {result['peak_gpu_mb']:.0f} MB" if result["peak_gpu_mb"] is not None else ""
    lines.append(f"peak RSS {result['peak_rss_mb']:.0f} MB{peak_gpu}")
    for row in result["runs"]:
        ours = row["ours"]
        settings = ", ".join(f"{k} {v}" for k, v in ours["settings"].items())
        lines += ["", f"text2im -n {ours['images']}: {settings}; best of {ours['rounds']} rounds"]
        lines.append(f"{'stage':<16}{'steps':>7}{'evals/img':>10}{'s':>9}{'ms/step':>9}{'floor s':>9}{'/floor':>8}")
        for label, stage in ours["stages"].items():
            floor = f"{stage['floor_s']:>9.3f}{stage['over_floor']:>8.2f}" if stage["floor_s"] else f"{'-':>9}{'-':>8}"
            lines.append(
                f"{label:<16}{stage['steps']:>7}{stage['evaluations_per_image']:>10.1f}{stage['seconds']:>9.3f}"
                f"{1000 * stage['seconds_per_step']:>9.2f}{floor}"
            )
        lines.append(
            f"{'end to end':<16}{'':>7}{ours['evaluations_per_image']:>10.1f}{ours['seconds']:>9.3f}{'':>9}"
            f"{ours['floor_s']:>9.3f}{ours['over_floor']:>8.2f}   {ours['images_per_s']:.2f} images/s"
        )
        if "direct" in row:
            d = row["direct"]
            lines.append(
                f"direct dalle2-pytorch: {d['seconds']:.3f} s; ours / direct {ours['seconds'] / d['seconds']:.2f}"
            )
        if "compiled" in row:
            c = row["compiled"]
            lines.append(
                f"compiled: {c['seconds']:.3f} s, ours / compiled {ours['seconds'] / c['seconds']:.2f}; warm-up "
                f"(compiling included) {c['warmup_s']:.1f} s against {ours['warmup_s']:.1f} s; largest pixel "
                f"difference from ours {c['max_pixel_difference_from_ours']} (of 255)"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="shapes")
    parser.add_argument("--images", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++2m"])
    parser.add_argument("--prior-steps", type=int)
    parser.add_argument("--decoder-steps", type=int, nargs="+")
    parser.add_argument("--prior-cond-scale", type=float)
    parser.add_argument("--decoder-cond-scale", type=float, nargs="+")
    parser.add_argument("--two-pass", action="store_true", help="guidance as two passes, as dalle2-pytorch runs it")
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="the weights' precision")
    parser.add_argument("--keep-resident", action="store_true", help="on a GPU: no stage offloading")
    parser.add_argument("--rounds", type=int, default=3, help="measured runs per -n, the kinds in turn")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5, help="subprocess runs per start-up median")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up subprocesses")
    parser.add_argument("--direct", action="store_true", help="also run dalle2-pytorch's own sample loops")
    parser.add_argument("--compile", action="store_true", help="also run text2im --compile (torch.compile)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    first = startup(args.repeats) if not args.no_startup else None  # before this process imports torch
    result = measure(args)
    if first is not None:
        result["startup"] = first
    print(json.dumps(result, indent=2) if args.json else _table(result))


if __name__ == "__main__":
    main()
