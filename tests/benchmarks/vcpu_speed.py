"""Each CPU's speed over time as this machine sees it, and what an evenly split product gets from them.

Every ``--interval`` seconds for ``--seconds`` seconds, one thread pinned to each CPU in turn runs a batched product
shaped like the exact engine's per-sample gradients of resnet18's layer2 on 28² inputs (6 samples of
(128 × 16) · (16 × 1152), fp32; about 5 ms), then all CPUs run it together with torch's threads. Printed: a line per
sample (GFLOP/s of each CPU alone, and of all together), then per CPU the min / median / max and the share of
samples below 0.7 × the fastest sample of any CPU.

Why: on a VM the host can hand a vCPU's physical core to another guest for seconds at a time. The guest's
/proc/stat does not show it (the vCPU still looks busy with our work), and a product split evenly over the threads
then waits for the slow one: all-CPU speed ≈ CPUs × the slowest CPU's. Run it alone, before and after
bench_importance.py, to tell such periods from changes in the code.

    python tests/benchmarks/vcpu_speed.py [--seconds 120] [--interval 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

SLOW = 0.7


def rate(fn, flops: float, repeats: int) -> float:
    """GFLOP/s of ``repeats`` calls of ``fn``."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return repeats * flops / (time.perf_counter() - start) / 1e9


SHAPE = (6, 128, 16, 1152)  # (samples, o, T, i): resnet18's layer2 per-sample gradients on 28² inputs


def cpu_speeds(repeats: int = 10) -> dict[int, float]:
    """GFLOP/s of each CPU alone: this thread pinned to it in turn, torch on one thread, ``repeats`` products
    of :data:`SHAPE` (about 5 ms each). The affinity and torch's thread count are restored."""
    import torch

    cpus = sorted(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    b, o, t, i = SHAPE
    g, a, out = torch.randn(b, o, t), torch.randn(b, t, i), torch.empty(b, o, i)
    flops = 2.0 * b * o * t * i
    speeds = {}
    try:
        torch.set_num_threads(1)
        for c in cpus:
            os.sched_setaffinity(0, {c})
            speeds[c] = rate(lambda: torch.bmm(g, a, out=out), flops, repeats)
    finally:
        os.sched_setaffinity(0, set(cpus))
        torch.set_num_threads(threads)
    return speeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=40, help="products per measurement")
    args = p.parse_args()

    import torch

    if not hasattr(os, "sched_setaffinity"):
        raise SystemExit("vcpu_speed.py: needs os.sched_setaffinity (Linux).")
    cpus = sorted(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    b, o, t, i = SHAPE
    g, a = torch.randn(b, o, t), torch.randn(b, t, i)
    out = torch.empty(b, o, i)
    flops = 2.0 * b * o * t * i

    def product():
        torch.bmm(g, a, out=out)

    samples: dict[str, list[float]] = {f"cpu{c}": [] for c in cpus}
    samples["all"] = []
    print(f"torch {torch.__version__}; CPUs {cpus}; all = {threads} threads unpinned; GFLOP/s")
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        row = []
        for c, speed in cpu_speeds(args.repeats).items():
            samples[f"cpu{c}"].append(speed)
            row.append(f"cpu{c} {speed:5.1f}")
        samples["all"].append(rate(product, flops, args.repeats))
        row.append(f"all {samples['all'][-1]:5.1f}")
        print(time.strftime("%H:%M:%S"), "  ".join(row), flush=True)
        time.sleep(args.interval)
    best = max(max(samples[f"cpu{c}"]) for c in cpus)
    print(
        f"summary over {len(samples['all'])} samples (slow: under {SLOW} x the fastest single-CPU sample, {best:.1f}):"
    )
    for name, values in samples.items():
        line = f"  {name:6} min {min(values):5.1f}  median {statistics.median(values):5.1f}  max {max(values):5.1f}"
        if name != "all":
            line += f"  slow {sum(v < SLOW * best for v in values) / len(values):4.0%}"
        print(line)
    single = [min(samples[f"cpu{c}"][k] for c in cpus) * len(cpus) for k in range(len(samples["all"]))]
    ratio = [x / y for x, y in zip(samples["all"], single, strict=True)]
    print(f"  all ÷ (CPUs × slowest CPU) per sample: median {statistics.median(ratio):.2f}")


if __name__ == "__main__":
    main()
