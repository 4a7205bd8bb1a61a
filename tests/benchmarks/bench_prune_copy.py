"""Issue 26 item 4: `cl-tool prune` (global magnitude, 90 %, whole process) against copying the same file with `cp`
and fsync — the I/O floor of writing a pruned copy. Rounds interleaved in one run; min and median of each side and
their ratio, with the load average.

    python tests/benchmarks/bench_prune_copy.py --work /tmp/bpc [--arch vit_base_patch16_224] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_fisher_eval import timed  # the same whole-process timer (this folder is on sys.path as a script)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--arch", default="vit_base_patch16_224")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt, out, copy = args.work / "ckpt.safetensors", args.work / "pruned.safetensors", args.work / "copy.safetensors"
    if not ckpt.exists():
        subprocess.run([sys.executable, "-m", "cl_tool", "init", "--arch", args.arch, "-o", ckpt], check=True)
    prune = [sys.executable, "-m", "cl_tool", "prune", str(ckpt), "--by", "magnitude", "-s", "0.9", "-o", str(out)]
    prune.append("--force")
    cp = ["sh", "-c", f"cp {ckpt} {copy} && sync {copy}"]
    sides: dict[str, list[float]] = {"prune": [], "cp+fsync": []}
    for _ in range(args.rounds):
        sides["cp+fsync"].append(timed(cp))
        sides["prune"].append(timed(prune))
        copy.unlink()
    size = ckpt.stat().st_size / 1e6
    print(f"{args.arch}: {size:.0f} MB, {args.rounds} rounds, load average {os.getloadavg()[0]:.2f}")
    for name, t in sides.items():
        print(f"  {name:9s} min {min(t):.2f} s  median {statistics.median(t):.2f} s")
    ratio = [a / b for a, b in zip(sides["prune"], sides["cp+fsync"], strict=True)]
    print(f"  prune / cp+fsync per round: min {min(ratio):.2f}  median {statistics.median(ratio):.2f}")


if __name__ == "__main__":
    main()
