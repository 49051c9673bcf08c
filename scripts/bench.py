"""Where the time goes: start-up, loading and each sampling stage against its compute floor.

    python scripts/bench.py [-c shapes] [--images 1,8] [--batch 8] [--prior-steps N]
                            [--decoder-steps N ...] [--device cpu|cuda] [--dtype fp16]
                            [--rounds 3] [--threads 1] [--direct] [--compile] [--json]

- start-up: process start to `dalle2 --help` printed, against `python -c "import torch"`
  (median of --repeats subprocesses each, in this run); import time of the inference stack;
- loading: seconds per model (CLIP, prior, decoder) and the files it read;
- per stage of `text2im -n N` (CLIP text encoding, prior, each decoder unet): steps, seconds,
  steps/s, images/s; and the floor: the same network forward calls, with the same inputs and
  batch (guidance's conditional and null passes as two calls where cond scale != 1, as
  dalle2-pytorch runs them), timed alone back to back in this process; ours / floor;
- end to end: images/s of the whole `TextToImage.run` against the floor's sum;
- `--direct`: the same work through a minimal direct dalle2-pytorch script (the models loaded
  by our manager, then `DiffusionPrior.sample` and `Decoder.sample` with the same steps and
  scales), printed beside ours as ours / direct;
- `--compile`: the same `text2im` with the networks torch.compile'd (`dalle2 text2im
  --compile`), printed beside ours as ours / compiled, with the time its warm-up run took
  (compiling included) and the largest pixel difference from ours (float rounding only);
- peak RSS of this process, and peak GPU memory on CUDA.

Every `-n N` is first run once unmeasured (each kind: kernels, allocator and caches warm at
that batch), then measured --rounds times, ours, direct and compiled taking turns, each followed
by its floor; the figures printed are the best of the rounds (the least disturbed by other
work on the machine), the ratios those of the best times, and `--json` also has each round's.
Timings on a shared or busy machine vary: compare ratios from one run, not across runs.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

from dalle2_cli.sampling.progress import NoProgress  # noqa: E402  (rich only: no torch yet)

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


class _Clock(NoProgress):
    """Stage times inside one sampling run: dalle2-pytorch's step loops (through its tqdm, as
    dalle2_cli.sampling.progress hooks them) and CLIP calls, synchronised with the device at each
    stage's start and end only (a sync per stage, never per step)."""

    def __init__(self, sync: Callable[[], None]):
        super().__init__()
        self.sync = sync
        self.stages: dict[str, dict[str, float]] = {}

    def _add(self, label: str, steps: int, seconds: float) -> None:
        stage = self.stages.setdefault(label, {"steps": 0, "seconds": 0.0, "loops": 0})
        stage["steps"] += steps
        stage["seconds"] += seconds
        stage["loops"] += 1

    @contextlib.contextmanager
    def loops(self, labels: list[str]) -> Iterator[None]:
        from dalle2_pytorch import dalle2_pytorch as module

        pending = list(labels)
        clock = self

        def timed(iterable, desc=None, **_ignored):
            if desc is None or not pending:
                return iterable
            label = pending.pop(0)

            def run():
                clock.sync()
                started, steps = time.perf_counter(), 0
                for item in iterable:
                    yield item
                    steps += 1
                clock.sync()
                clock._add(label, steps, time.perf_counter() - started)

            return run()

        original = module.tqdm
        module.tqdm = timed
        try:
            yield
        finally:
            module.tqdm = original

    def wrap(self, owner: Any, name: str, label: str) -> None:
        """Time every call of `owner.name` as one step of stage `label`."""
        method = getattr(owner, name)

        def timed(*args, **kwargs):
            self.sync()
            started = time.perf_counter()
            result = method(*args, **kwargs)
            self.sync()
            self._add(label, 1, time.perf_counter() - started)
            return result

        setattr(owner, name, timed)

    def unwrap(self, owner: Any, name: str) -> None:
        owner.__dict__.pop(name, None)


class _Recorder:
    """Records each guided forward call of the prior network and decoder unets (the inputs of
    the first call of each input shape, and how many calls), to replay them as the floor."""

    def __init__(self):
        self.calls: dict[tuple, dict[str, Any]] = {}
        self._installed: list[Any] = []

    def install(self, net: Any, label: str) -> None:
        import torch

        recorder = self

        def recording(*args, cond_scale=1.0, **kwargs):
            key = (label, cond_scale, *(tuple(v.shape) for v in args if isinstance(v, torch.Tensor)))
            key += tuple((k, tuple(v.shape)) for k, v in kwargs.items() if isinstance(v, torch.Tensor))
            if key not in recorder.calls:
                recorder.calls[key] = {"net": net, "label": label, "args": args, "kwargs": kwargs, "count": 0}
                recorder.calls[key]["cond_scale"] = cond_scale
            recorder.calls[key]["count"] += 1
            # the class's method as it is now: our batched guidance where it is active
            return type(net).forward_with_cond_scale(net, *args, cond_scale=cond_scale, **kwargs)

        net.forward_with_cond_scale = recording
        self._installed.append(net)

    def uninstall(self) -> None:
        for net in self._installed:
            net.__dict__.pop("forward_with_cond_scale", None)
        self._installed.clear()


def _floor(
    recorder: _Recorder, clip_calls: list[tuple[Callable, tuple]], precision, sync
) -> tuple[dict[str, float], set[str]]:
    """Seconds per stage for the recorded forward calls alone, back to back; and the stages
    whose guided null pass is redundant (a unet that takes no condition computes the same
    thing twice: dalle2-pytorch runs it, our batched guidance skips it)."""
    import torch
    from dalle2_cli.sampling.guidance_patch import _takes_no_condition

    floors: dict[str, float] = {}
    redundant: set[str] = set()
    with torch.inference_mode(), precision():
        for call in recorder.calls.values():
            net, args, kwargs = call["net"], call["args"], call["kwargs"]
            passes = (
                [{}] if call["cond_scale"] == 1 else [{}, {"text_cond_drop_prob": 1.0, "image_cond_drop_prob": 1.0}]
            )
            if len(passes) == 2 and _takes_no_condition(net, kwargs):
                redundant.add(call["label"])
            for extra in passes:  # warm-up, unmeasured
                net.forward(*args, **kwargs, **extra)
            sync()
            started = time.perf_counter()
            for _ in range(call["count"]):
                for extra in passes:
                    net.forward(*args, **kwargs, **extra)
            sync()
            floors[call["label"]] = floors.get(call["label"], 0.0) + time.perf_counter() - started
        for function, args in clip_calls:
            function(*args)
            sync()
            started = time.perf_counter()
            function(*args)
            sync()
            floors["CLIP text"] = floors.get("CLIP text", 0.0) + time.perf_counter() - started
    return floors, redundant


def _text2im(manager, settings, count: int, direct: bool, sync) -> dict[str, Any]:
    """One measured `text2im -n count` (ours, or the direct dalle2-pytorch script)."""
    import torch

    from dalle2_cli.loading.clip import tokenize
    from dalle2_cli.sampling.pipelines import TextToImage

    clip, prior, decoder = manager.clip, manager.prior, manager.decoder
    script = TextToImage(manager, settings)
    clock = _Clock(sync)
    recorder = _Recorder()
    recorder.install(prior.net, "prior")
    bars = [f"decoder unet {n + 1}" for n in range(decoder.num_unets)]
    for number, unet in enumerate(decoder.unets):
        recorder.install(unet, bars[number])
    clip_calls: list[tuple[Callable, tuple]] = []
    original_embed_text = clip.embed_text

    def embed_text(*args):
        clip_calls.append((original_embed_text, args))
        return original_embed_text(*args)

    clip.embed_text = embed_text
    clock.wrap(clip, "embed_text", "CLIP text")
    prior_steps, prior_scale = script.prior_settings()
    decoder_steps, decoder_scales = script.decoder_settings()
    try:
        sync()
        started = time.perf_counter()
        if direct:
            # What a user of dalle2-pytorch alone writes: tokens, prior.sample, decoder.sample.
            torch.manual_seed(settings.seed or 0)
            saved = decoder.sample_timesteps
            decoder.sample_timesteps = tuple(decoder_steps)
            try:
                for start in range(0, count, settings.batch_size):
                    size = min(settings.batch_size, count - start)
                    tokens = tokenize(clip, [PROMPT] * size).to(manager.device)
                    with torch.no_grad(), script._precision(), manager.using(prior), clock.loops(["prior"]):
                        embeds = prior.sample(
                            tokens,
                            num_samples_per_batch=settings.num_samples_per_batch,
                            cond_scale=prior_scale,
                            timesteps=prior_steps,
                        )
                    with torch.no_grad(), script._precision(), manager.using(clip, decoder), clock.loops(bars):
                        encodings = clip.embed_text(tokens)[1] if decoder.condition_on_text_encodings else None
                        decoder.sample(image_embed=embeds, text_encodings=encodings, cond_scale=tuple(decoder_scales))
            finally:
                decoder.sample_timesteps = saved
        else:
            script.progress = clock  # our scripts' loops(labels) hook, with a clock behind it
            made = script.run([PROMPT], num_images=count)
        sync()
        total = time.perf_counter() - started
    finally:
        clock.unwrap(clip, "embed_text")
        clip.__dict__.pop("embed_text", None)
        recorder.uninstall()
    pixels = None if direct else [np.asarray(g.image, dtype=np.int16) for g in made]
    floors, redundant = _floor(recorder, clip_calls, script._precision, sync)
    stages = {}
    for label, stage in clock.stages.items():
        floor = floors.get(label)
        stages[label] = {
            **stage,
            "steps_per_s": stage["steps"] / stage["seconds"],
            "images_per_s": count / stage["seconds"],
            "floor_s": floor,
            "over_floor": stage["seconds"] / floor if floor else None,
            "floor_has_redundant_null_pass": label in redundant,
        }
    floor_sum = sum(floors.values())
    return {
        "images": count,
        "pixels": pixels,  # (dropped from the report)
        "seconds": total,
        "images_per_s": count / total,
        "floor_s": floor_sum,
        "floor_images_per_s": count / floor_sum if floor_sum else None,
        "over_floor": total / floor_sum if floor_sum else None,
        "stages": stages,
        "settings": {
            "prior_steps": prior_steps,
            "prior_cond_scale": prior_scale,
            "decoder_steps": decoder_steps,
            "decoder_cond_scale": decoder_scales,
            "batch": settings.batch_size,
        },
    }


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The best (least) time of each figure over the rounds, ratios recomputed from them."""
    best = {key: value for key, value in runs[0].items() if key not in ("stages", "pixels")}
    count = best["images"]
    best["stages"] = {}
    for label, first in runs[0]["stages"].items():
        stage = dict(first)
        stage["seconds"] = min(r["stages"][label]["seconds"] for r in runs)
        floors = [r["stages"][label]["floor_s"] for r in runs]
        stage["floor_s"] = min(floors) if all(floors) else None
        stage["steps_per_s"] = stage["steps"] / stage["seconds"]
        stage["images_per_s"] = count / stage["seconds"]
        stage["over_floor"] = stage["seconds"] / stage["floor_s"] if stage["floor_s"] else None
        best["stages"][label] = stage
    best["seconds"] = min(r["seconds"] for r in runs)
    best["floor_s"] = sum(stage["floor_s"] or 0.0 for stage in best["stages"].values())
    best["images_per_s"] = count / best["seconds"]
    best["floor_images_per_s"] = count / best["floor_s"] if best["floor_s"] else None
    best["over_floor"] = best["seconds"] / best["floor_s"] if best["floor_s"] else None
    best["rounds"] = len(runs)
    best["seconds_each_round"] = [r["seconds"] for r in runs]
    best["over_floor_each_round"] = [r["over_floor"] for r in runs]
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

    def settings(**overrides) -> SamplingSettings:
        values = {
            "prior_steps": args.prior_steps,
            "decoder_steps": args.decoder_steps,
            "prior_cond_scale": args.prior_cond_scale,
            "decoder_cond_scale": args.decoder_cond_scale,
            "batch_size": args.batch,
            "seed": 0,
            "batched_guidance": not args.two_pass,
        }
        return SamplingSettings(**{**values, **overrides})

    managers = {"ours": manager}
    if args.direct:
        managers["direct"] = manager
    if args.compile:
        managers["compiled"] = new_manager(compile=True)
    runs = []
    for count in args.images:
        warmup = {}
        for kind, used in managers.items():  # warm-up at this batch (kernels, allocator, lazy inits, compiling)
            started = time.perf_counter()
            warmup[kind] = _text2im(used, settings(), count, direct=kind == "direct", sync=sync)
            warmup[kind]["warmup_s"] = time.perf_counter() - started
        rounds: dict[str, list[dict[str, Any]]] = {kind: [] for kind in managers}
        for _ in range(args.rounds):
            for kind, used in managers.items():
                rounds[kind].append(_text2im(used, settings(), count, direct=kind == "direct", sync=sync))
        row = {kind: _best(results) for kind, results in rounds.items()}
        for kind in row:
            row[kind]["warmup_s"] = warmup[kind]["warmup_s"]
        if "compiled" in row:
            compiled = rounds["compiled"][-1]["pixels"]
            row["compiled"]["max_pixel_difference_from_ours"] = int(
                max(np.abs(a - b).max() for a, b in zip(rounds["ours"][-1]["pixels"], compiled, strict=True))
            )
        runs.append(row)
    result: dict[str, Any] = {
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
    return result


def _table(result: dict[str, Any]) -> str:
    lines = []
    machine = result["machine"]
    lines.append(
        f"{result['config']} on {machine['device']} ({machine['gpu'] or machine['platform']}, "
        f"{machine['torch_threads']} torch threads, torch {machine['torch']}, {machine['dtype']})"
    )
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
    short = {"direct": "dir", "compiled": "comp"}
    for row in result["runs"]:
        ours = row["ours"]
        others = {kind: run for kind, run in row.items() if kind != "ours"}
        st = ours["settings"]
        lines.append("")
        lines.append(
            f"text2im -n {ours['images']} --batch {st['batch']}: "
            f"prior {st['prior_steps']} steps x{st['prior_cond_scale']}, "
            f"decoder {st['decoder_steps']} steps x{st['decoder_cond_scale']}; "
            f"best of {ours['rounds']} rounds (end to end / floor each round: "
            f"{', '.join(f'{r:.2f}' for r in ours['over_floor_each_round'])})"
        )
        header = f"{'stage':<16}{'steps':>6}{'s':>9}{'steps/s':>9}{'img/s':>9}{'floor s':>9}{'/floor':>8}"
        for kind in others:
            header += f"{kind + ' s':>11}{'ours/' + short[kind]:>10}"
        lines.append(header)
        for label, stage in ours["stages"].items():
            floor = f"{stage['floor_s']:>9.3f}{stage['over_floor']:>8.2f}" if stage["floor_s"] else f"{'-':>9}{'-':>8}"
            mark = "*" if stage.get("floor_has_redundant_null_pass") else ""
            line = (
                f"{label + mark:<16}{stage['steps']:>6}{stage['seconds']:>9.3f}{stage['steps_per_s']:>9.1f}"
                f"{stage['images_per_s']:>9.2f}{floor}"
            )
            for other in others.values():
                theirs = other["stages"].get(label)
                line += f"{theirs['seconds']:>11.3f}{stage['seconds'] / theirs['seconds']:>10.2f}" if theirs else ""
            lines.append(line)
        line = (
            f"{'end to end':<16}{'':>6}{ours['seconds']:>9.3f}{'':>9}{ours['images_per_s']:>9.2f}"
            f"{ours['floor_s']:>9.3f}{ours['over_floor']:>8.2f}"
        )
        for other in others.values():
            line += f"{other['seconds']:>11.3f}{ours['seconds'] / other['seconds']:>10.2f}"
        lines.append(line)
        lines.append(f"{'floor img/s':<16}{'':>6}{'':>9}{'':>9}{ours['floor_images_per_s']:>9.2f}")
        if "direct" in others:
            d = others["direct"]
            lines.append(f"direct end to end / floor {d['over_floor']:.2f} (its own floor)")
        if "compiled" in others:
            c = others["compiled"]
            lines.append(
                f"compiled: warm-up run (compiling included) {c['warmup_s']:.1f} s, "
                f"uncompiled {ours['warmup_s']:.1f} s; "
                f"largest pixel difference from ours {c['max_pixel_difference_from_ours']} (of 255)"
            )
        if any(stage.get("floor_has_redundant_null_pass") for stage in ours["stages"].values()):
            lines.append("* this unet takes no condition: its floor has dalle2-pytorch's redundant null pass")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="shapes")
    parser.add_argument("--images", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prior-steps", type=int)
    parser.add_argument("--decoder-steps", type=int, nargs="+")
    parser.add_argument("--prior-cond-scale", type=float)
    parser.add_argument("--decoder-cond-scale", type=float, nargs="+")
    parser.add_argument("--two-pass", action="store_true", help="guidance as dalle2-pytorch runs it: two passes")
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="the weights' precision")
    parser.add_argument("--keep-resident", action="store_true", help="on a GPU: no stage offloading")
    parser.add_argument("--rounds", type=int, default=3, help="measured runs per -n, ours and direct in turn")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5, help="subprocess runs per start-up median")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up subprocesses")
    parser.add_argument("--direct", action="store_true", help="also run the direct dalle2-pytorch script")
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
