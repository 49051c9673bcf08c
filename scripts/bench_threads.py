"""How CPU thread settings hold up when the machine is shared: the README's quick start
(`dalle2 text2im ... -n 4`), each run a fresh process, idle and beside busy processes.

    python scripts/bench_threads.py                 # 3 rounds, 2 busy processes
    python scripts/bench_threads.py --rounds 5 --busy 2 --json

Settings, taking turns in every round (the machine's noise spreads over all of them):
- `passive`: what `dalle2` does by default: torch's threads (one per core), and
  OMP_WAIT_POLICY=PASSIVE, so that threads waiting at a barrier sleep instead of spinning;
- `spinning`: torch's threads with OpenMP's own default waiting (threads spin 300,000 times
  before they sleep), what torch does when nothing is set;
- `one thread`: --threads 1.
Busy processes are plain Python loops, one per core by default. Prints the median wall time
of each setting, idle and busy, and each setting's ratio to the default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SETTINGS = {
    "passive": ({}, []),
    # libgomp's own default when OMP_WAIT_POLICY is unset: spin 300,000 times, then sleep (a
    # GOMP_SPINCOUNT of the user's own keeps dalle2 from choosing PASSIVE).
    "spinning": ({"GOMP_SPINCOUNT": "300000"}, []),
    "one thread": ({}, ["--threads", "1"]),
}
QUICK_START = ["text2im", "a red circle on a yellow background", "-n", "4", "--seed", "0", "-q", "--overwrite"]


def run_once(env: dict[str, str], extra: list[str], out: str) -> float:
    environment = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    environment.update(env)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dalle2_cli", *QUICK_START, *extra, "-o", out], env=environment, check=True)
    return time.perf_counter() - started


def measure(rounds: int, out: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(rounds):
        for name, (env, extra) in SETTINGS.items():
            times[name].append(run_once(env, extra, out))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy processes beside the runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as out:
        run_once({}, [], out)  # warm the page cache and torch's imports
        results["idle"] = measure(args.rounds, out)
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        try:
            results["busy"] = measure(args.rounds, out)
        finally:
            for process in busy:
                process.kill()
    medians = {when: {name: statistics.median(t) for name, t in times.items()} for when, times in results.items()}
    if args.json:
        print(json.dumps({"rounds": args.rounds, "busy_processes": args.busy, "seconds": results, "median": medians}))
        return
    print(f"quick start, {args.rounds} rounds, {os.cpu_count()} cores; busy: {args.busy} busy processes beside it")
    for when, by_setting in medians.items():
        default = by_setting["passive"]
        cells = ", ".join(f"{name} {s:.1f} s ({s / default:.2f}x)" for name, s in by_setting.items())
        print(f"  {when}: {cells}")


if __name__ == "__main__":
    main()
