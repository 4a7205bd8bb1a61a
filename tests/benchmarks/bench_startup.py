"""Time to first step: a one-line train-next against `python -c "import torch"` on the same machine, same run.

``train-next`` of the paper MLP on 512 random 28x28 images, 1 epoch, whole process (interpreter start to exit),
against a process that only imports torch, rounds interleaved; min and median with the load average. The
command's own ``--json`` splits its time into set-up (process start to the first step: imports, checkpoint,
data) and training (first step to last); their medians are printed too. ``--cache none`` (default here) decodes
the data in every round, as a first command on new data would; ``--cache auto`` shows a later command's start.

    python tests/benchmarks/bench_startup.py [--rounds 5] [--cache none|auto]
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
from pathlib import Path


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed:\n{proc.stderr[-3000:]}")
    return dt, proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cache", default="none", choices=("none", "auto"))
    args = p.parse_args()
    env = {**os.environ, "CL_TOOL_CACHE": tempfile.mkdtemp(prefix="bench-cache-")}
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    cl = [sys.executable, "-m", "cl_tool"]
    ckpt, data = work / "init.safetensors", work / "demo"
    timed([*cl, "init", "--arch", "mlp", "-o", str(ckpt)], env)
    timed([*cl, "demo-data", str(data), "--train", "512", "--test", "64"], env)
    train = [
        *cl,
        "train-next",
        str(ckpt),
        "--data",
        f"{data}::split=train",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--penalty",
        "none",
        "--device",
        "cpu",
        "--cache",
        args.cache,
        "-o",
        str(work / "out.safetensors"),
        "--force",
        "--json",
    ]
    torch_only = [sys.executable, "-c", "import torch"]
    timed(train, env)  # warm the file-system cache (and, with --cache auto, the decoded cache)
    walls: dict[str, list[float]] = {"import torch": [], "train-next": []}
    setup, training = [], []
    for _ in range(args.rounds):
        walls["import torch"].append(timed(torch_only, env)[0])
        dt, out = timed(train, env)
        walls["train-next"].append(dt)
        res = json.loads(out)
        setup.append(res["setup_seconds"])
        training.append(res["train_seconds"])
    ratios = [t / i for t, i in zip(walls["train-next"], walls["import torch"])]
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"# time to first step: {args.rounds} interleaved rounds, --cache {args.cache}, load average {load}")
    for name, values in walls.items():
        print(f"{name:14} min {min(values):.2f} s  median {statistics.median(values):.2f} s")
    print(f"train-next ÷ import torch: min {min(ratios):.2f}  median {statistics.median(ratios):.2f}")
    print(
        f"train-next phases (median): set-up {statistics.median(setup):.2f} s, training {statistics.median(training):.2f} s"
    )


if __name__ == "__main__":
    main()
