"""How `dalle2 serve` holds up: throughput and latency under concurrent clients, against the
same images made in-process, then a long mixed run with malformed requests.

    python scripts/bench_serve.py -c shapes --clients 1,4,16 --requests 4 --soak 500
    python scripts/bench_serve.py -c shapes --clients 16 --layouts 1x2,2x1 --soak 0

--layouts compares sampling workers on the CPU: WxT is W workers (`serve --workers W`) of T
threads each, every layout a server of its own, measured at each --clients count in turn; each
worker's batches hold at most --max-batch / W images, so that a burst of requests spreads
over the workers.

The server runs as the real `dalle2 serve` in its own process; the in-process figures (one
image alone, and a batch of --max-batch images, as `dalle2 text2im --batch-size` makes them)
come from this process while the server idles, with the threads and OpenMP waiting policy
the CLI uses (so the same as the server's). Each client sends its requests one after
another (n=1, its own seed); figures are images/s and latency percentiles.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx

PROMPTS = ["a red circle", "a blue square on a black background", "a green triangle", "a yellow circle on blue"]


def start_server(config: str, max_batch: int, window_ms: float, threads: int | None, directory: Path, workers: int = 1):
    command = [sys.executable, "-m", "dalle2_cli", "serve", "-c", config, "--port", "0", "--no-page"]
    command += ["--workers", str(workers)]
    command += ["--max-batch", str(max_batch), "--batch-window-ms", str(window_ms), "-o", str(directory), "-q"]
    command += ["--queue-size", "1024"] + (["--threads", str(threads)] if threads else [])
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = process.stderr.readline().split()[2]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not get ready in 5 minutes")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def in_process(config: str, max_batch: int, rounds: int, threads: int | None) -> dict:
    """One image alone, and max_batch images in one batch, as the CLI makes them (best round)."""
    import torch

    from dalle2_cli import DalleModelManager, SamplingSettings, TextToImage, load_config
    from dalle2_cli.io.prompts import Prompt

    if threads:
        torch.set_num_threads(threads)
    manager = DalleModelManager(load_config(config), name=config, log=lambda _: None)
    prompts = [Prompt(PROMPTS[i % len(PROMPTS)], num_images=1, seed=i) for i in range(max_batch)]

    def timed(wanted: list, batch: int) -> float:
        started = time.perf_counter()
        TextToImage(manager, SamplingSettings(batch_size=batch, seed=0)).run(wanted)
        return time.perf_counter() - started

    timed(prompts[:1], 1), timed(prompts, max_batch)  # warm up both shapes
    lone = min(timed(prompts[:1], 1) for _ in range(rounds))
    batch = min(timed(prompts, max_batch) for _ in range(rounds))
    return {"lone_s": lone, "batch_images_per_s": max_batch / batch}


def load(url: str, clients: int, requests: int, seed_base: int) -> dict:
    def client(number: int) -> list[float]:
        latencies = []
        with httpx.Client(timeout=600) as http:
            for k in range(requests):
                body = {"prompt": PROMPTS[(number + k) % len(PROMPTS)], "seed": seed_base + number * 1000 + k}
                started = time.perf_counter()
                answer = http.post(f"{url}/v1/images/generations", json=body)
                answer.raise_for_status()
                latencies.append(time.perf_counter() - started)
        return latencies

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [s for got in pool.map(client, range(clients)) for s in got]
    seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "clients": clients,
        "images": len(latencies),
        "images_per_s": len(latencies) / seconds,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
    }


BAD_REQUESTS = [
    {"prompt": "a red circle", "n": 11},
    {"prompt": "a red circle", "size": "64x32"},
    {"prompt": "a red circle", "sampler": "euler"},
    {"prompt": ""},
    {"n": 1},
    {"prompt": "a red circle", "colour": "red"},
    "not json",
]


def soak(url: str, total: int, clients: int, pid: int) -> dict:
    """`total` requests from `clients`, one in ten malformed; RSS after each tenth."""
    rng = random.Random(0)
    plan = [
        rng.choice(BAD_REQUESTS) if i % 10 == 9 else {"prompt": rng.choice(PROMPTS), "seed": i} for i in range(total)
    ]
    statuses: list[tuple[bool, int]] = []
    memory = []

    def send(i: int) -> None:
        body = plan[i]
        with httpx.Client(timeout=600) as http:
            if isinstance(body, str):  # typed as JSON, so that the parser, not the type check, meets it
                headers = {"Content-Type": "application/json"}
                answer = http.post(f"{url}/v1/images/generations", content=body.encode(), headers=headers)
            else:
                answer = http.post(f"{url}/v1/images/generations", json=body)
        statuses.append((i % 10 != 9, answer.status_code))
        if i % (total // 10) == 0:
            memory.append(rss_mib(pid))

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, range(total)))
    good = [status for ok, status in statuses if ok]
    bad = [status for ok, status in statuses if not ok]
    return {
        "requests": total,
        "good_answered_200": sum(status == 200 for status in good),
        "good": len(good),
        "bad_answered_4xx": sum(400 <= status < 500 for status in bad),
        "bad": len(bad),
        "any_5xx": sum(status >= 500 for _, status in statuses),
        "rss_mib": [round(m) for m in memory],
    }


def layouts(args: argparse.Namespace) -> None:
    """--layouts: each WxT layout's server under the same load, and the in-process batched rate
    with all the threads (what the CLI makes), in one run."""
    reference = in_process(args.config, args.max_batch, args.rounds, args.threads)
    results = []
    for layout in args.layouts.split(","):
        workers, threads = (int(part) for part in layout.split("x"))
        with TemporaryDirectory() as directory:
            batch = max(1, args.max_batch // workers)
            process, url = start_server(
                args.config, batch, args.window_ms, workers * threads, Path(directory), workers=workers
            )
            try:
                for i, clients in enumerate(args.clients.split(",")):
                    run = load(url, int(clients), args.requests, 10_000 * i)
                    results.append({"layout": layout, "max_batch": batch, **run})
            finally:
                process.terminate()
                process.wait(timeout=60)
    if args.json:
        print(json.dumps({"reference": reference, "layouts": results}))
        return
    print(f"in-process (the CLI): a batch of {args.max_batch}: {reference['batch_images_per_s']:.2f} images/s")
    for run in results:
        print(
            f"{run['layout']} (workers x threads, batches of {run['max_batch']}), {run['clients']} clients: "
            f"{run['images_per_s']:.2f} images/s ({run['images_per_s'] / reference['batch_images_per_s']:.2f}x "
            f"the CLI's batched rate), p50 {run['p50_s']:.2f} s, p95 {run['p95_s']:.2f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="shapes")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--window-ms", type=float, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--soak", type=int, default=500, help="requests of the mixed run (0: none)")
    parser.add_argument("--layouts", default=None, help="WxT,...: W workers of T threads each (see above)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    # As the CLI (and so the server) runs torch: waiting threads sleep (dalle2_cli.cli.guard).
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

    if args.layouts:
        layouts(args)
        return
    with TemporaryDirectory() as directory:
        process, url = start_server(args.config, args.max_batch, args.window_ms, args.threads, Path(directory))
        try:
            reference = in_process(args.config, args.max_batch, args.rounds, args.threads)
            runs = [load(url, int(c), args.requests, 10_000 * i) for i, c in enumerate(args.clients.split(","))]
            soaked = soak(url, args.soak, 16, process.pid) if args.soak else None
        finally:
            process.terminate()
            process.wait(timeout=60)
    result = {"reference": reference, "runs": runs, "soak": soaked}
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"in-process: one image alone {reference['lone_s']:.3f} s; a batch of {args.max_batch}: "
        f"{reference['batch_images_per_s']:.2f} images/s"
    )
    for run in runs:
        print(
            f"{run['clients']:>3} clients: {run['images_per_s']:.2f} images/s "
            f"({run['images_per_s'] / reference['batch_images_per_s']:.2f}x in-process batched), "
            f"p50 {run['p50_s']:.3f} s ({run['p50_s'] / reference['lone_s']:.2f}x a lone in-process image), "
            f"p95 {run['p95_s']:.3f} s"
        )
    if soaked:
        print(
            f"soak: {soaked['requests']} requests from 16 clients: {soaked['good_answered_200']}/{soaked['good']} "
            f"good ones answered 200, {soaked['bad_answered_4xx']}/{soaked['bad']} malformed ones 4xx, "
            f"{soaked['any_5xx']} 5xx; server RSS MiB every tenth: {soaked['rss_mib']}"
        )


if __name__ == "__main__":
    main()
