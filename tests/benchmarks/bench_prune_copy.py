"""Issue 26 item 4: `cl-tool prune` (global magnitude, 90 %, whole process) against copying the same file with `cp`
and fsync — the I/O floor of writing a pruned copy. Rounds interleaved in one run; min and median of each side and
their ratio, with the load average.

Two more sides say where prune's time above the copy goes: ``start-up`` (the same `cl-tool prune` command line on a
checkpoint of 30 parameters: the interpreter, the command's imports, its option parser, the checks and the output's
rename and fsync, all but the work that grows with the file) and ``one-pass floor`` (a fresh Python process that imports numpy, reads
the file once in 4 MiB pieces, zeroes every float32 |w| below a threshold given in advance, writes the result and
fsyncs it: the least work any Python prune that writes its output can do, without finding the threshold, checking or
hashing anything).

    python tests/benchmarks/bench_prune_copy.py --work /tmp/bpc [--arch vit_base_patch16_224] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_fisher_eval import per_round, timed  # the same whole-process timer (this folder is on sys.path as a script)

FLOOR = """
import os, sys, numpy as np
src, dst = sys.argv[1], sys.argv[2]
fi = os.open(src, os.O_RDONLY)
fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
size, off, buf = os.fstat(fi).st_size, 0, np.empty(1 << 20, np.float32)
while off < size:
    n = os.preadv(fi, [memoryview(buf).cast("B")], off)
    f = buf[: n // 4]
    f *= np.abs(f) >= 0.01
    os.pwrite(fo, memoryview(buf).cast("B")[:n], off)
    off += n
os.fsync(fo)
"""


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
    tiny, tiny_out = args.work / "tiny.safetensors", args.work / "tiny-pruned.safetensors"
    if not tiny.exists():
        init = [
            sys.executable,
            "-m",
            "cl_tool",
            "init",
            "--arch",
            "mlp",
            "--arch-arg",
            "sizes=4,4,2",
            "--input-shape",
            "1x2x2",
            "-o",
            tiny,
        ]
        subprocess.run(init, check=True, capture_output=True)
    startup = [*prune[:4], str(tiny), *prune[5:-3], "-o", str(tiny_out), "--force"]
    floor = [sys.executable, "-c", FLOOR, str(ckpt), str(copy)]
    sides: dict[str, list[float]] = {"prune": [], "cp+fsync": [], "start-up": [], "one-pass floor": []}
    for _ in range(args.rounds):
        sides["cp+fsync"].append(timed(cp))
        copy.unlink()
        sides["prune"].append(timed(prune))
        out.unlink()
        sides["start-up"].append(timed(startup))
        sides["one-pass floor"].append(timed(floor))
        copy.unlink()
    size = ckpt.stat().st_size / 1e6
    print(f"{args.arch}: {size:.0f} MB, {args.rounds} rounds, load average {os.getloadavg()[0]:.2f}")
    for name, t in sides.items():
        print(f"  {name:14s} min {min(t):.2f} s  median {statistics.median(t):.2f} s")
    per_round("prune / cp+fsync", sides["prune"], sides["cp+fsync"])


if __name__ == "__main__":
    main()
