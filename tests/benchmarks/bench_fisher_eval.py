"""Issue 26 item 2: `cl-tool importance --method fisher` against `cl-tool evaluate` on the same task, whole process
minus start-up (a `cl-tool info` of the checkpoint: imports and reading it), rounds interleaved; min and median of
each side and of the ratio Fisher / evaluate, with the load average.

With ``--busy``, every round is run twice, quiet and then beside a process spinning one core (a pure-Python loop),
and each side's slowdown busy / quiet is reported with the ratio of the two slowdowns (Fisher's ÷ evaluate's).

    python tests/benchmarks/bench_fisher_eval.py --data MNIST_FOLDER --work /tmp/bfe [--samples 8000] [--rounds 3] [--busy]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - t


def per_round(label: str, a: list[float], b: list[float]) -> list[float]:
    """Print ``label: min … median …`` of the per-round ratios a / b and return them."""
    ratio = [x / y for x, y in zip(a, b, strict=True)]
    print(f"  {label} per round: min {min(ratio):.2f}  median {statistics.median(ratio):.2f}")
    return ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a folder with a train split of at least --samples images")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--arch", default="cnn")
    p.add_argument("--samples", type=int, default=8000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache", default="auto", help="--cache of both commands (auto: warmed by one evaluate first)")
    p.add_argument("--busy", action="store_true", help="also run each round beside a process spinning one core")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.work / f"{args.arch}.safetensors"
    cl = [sys.executable, "-m", "cl_tool"]
    if not ckpt.exists():
        subprocess.run([*cl, "init", "--arch", args.arch, "-o", ckpt], check=True)
    data = f"{args.data}::split=train,limit={args.samples}"
    common = ["--data", data, "--device", "cpu", "--cache", args.cache, "--cache-dir", str(args.work / "cache")]
    sides = {
        "start-up": [*cl, "info", str(ckpt)],
        "evaluate": [*cl, "evaluate", str(ckpt), *common],
        "fisher": [
            *cl,
            "importance",
            str(ckpt),
            "--method",
            "fisher",
            *common,
            "-o",
            str(args.work / "f.st"),
            "--force",
        ],
    }
    conditions = ("quiet", "busy") if args.busy else ("quiet",)
    times = {(c, k): [] for c in conditions for k in sides}
    timed(sides["evaluate"])  # fills the decoded cache (auto), so every timed round reads it
    for _ in range(args.rounds):
        for condition in conditions:
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "busy" else None
            try:
                for name, argv in sides.items():
                    times[condition, name].append(timed(argv))
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
    load = os.getloadavg()[0]
    print(f"{args.arch}, {args.samples} samples, --cache {args.cache}, {args.rounds} rounds, load average {load:.2f}")
    net = {}
    for condition in conditions:
        print(f" {condition}:")
        for name in sides:
            t = times[condition, name]
            print(f"  {name:9s} min {min(t):.2f} s  median {statistics.median(t):.2f} s")
        start = times[condition, "start-up"]
        for k in ("evaluate", "fisher"):
            net[condition, k] = [t - s for t, s in zip(times[condition, k], start, strict=True)]
        per_round("fisher / evaluate (minus start-up)", net[condition, "fisher"], net[condition, "evaluate"])
    if args.busy:
        slow = {
            k: per_round(f"{k} slowdown busy / quiet", net["busy", k], net["quiet", k]) for k in ("evaluate", "fisher")
        }
        per_round("Fisher's slowdown / evaluate's", slow["fisher"], slow["evaluate"])


if __name__ == "__main__":
    main()
