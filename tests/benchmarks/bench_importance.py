"""Benchmark the exact per-sample importance engine (a script, not a test).

For each model, on the same data, it times three ways of getting the Fisher (or MAS) sums:

  (a) loop       — the definition: one sample at a time, autograd (``reference.naive_sums``);
  (b) batchmean  — the usual shortcut (e.g. Avalanche's EWC): per mini-batch of size B the
                   gradient ḡ of the mean loss, accumulated as B·ḡ² — not a per-sample statistic;
  (c) exact      — ``cl_tool.importance.importance_sums`` (hooks + layer rules).

and prints samples/s, the ratios loop/exact and exact/batchmean (time per sample), the peak
memory of each variant, and the max relative error of (c) against (a) on the loop's samples.

Every variant runs in a fresh subprocess; its peak memory is the peak resident set size during
the timed run minus the resident size before it (after imports, model, data and a small
warm-up): Linux's resettable VmHWM, else the growth of ``getrusage`` max RSS; on a GPU
``torch.cuda.max_memory_allocated``. The loop may be timed on fewer
samples (``--loop-samples``); its samples/s is then extrapolated to all samples (marked ``*``).

The ratio exact/batchmean is measured separately, in one process that runs batch-mean and exact
alternately for ``--repeats`` rounds (so that a machine shared with other work slows both
alike); it prints the ratio of each round's times, min and median.

Exact labels (``--fisher-labels exact``, Fisher only): for the models of ``--labels-models``
that BackPACK can extend (the paper MLP and CNN, written as ``nn.Sequential``), cl-tool's
exact-label Fisher sums against BackPACK's ``DiagGGNExact`` with a summed cross-entropy (Σ over
the batch of the per-sample GGN diagonals: the same quantity; a mean loss would divide it by
B), both alternately in one process for ``--repeats`` rounds, on ``--labels-samples`` images.
The values are compared first (max relative difference). Needs ``backpack-for-pytorch``
(optional; skipped with a note when it is not installed).

    python tests/benchmarks/bench_importance.py --data ylecun/mnist --samples 2000
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = {
    "mlp": ("mlp", {}, "builtin"),
    "cnn": ("cnn", {}, "builtin"),
    "resnet18": ("resnet18", {}, "timm"),
    "vit": ("vit_tiny_patch16_224", {"img_size": 28, "patch_size": 4}, "timm"),
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_data(folder: str | None, samples: int, seed: int):
    """(x, y): MNIST t10k normalised with the usual mean/std, or random data if no folder."""
    import torch

    if folder:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _mnist import mnist_arrays

        images, labels = mnist_arrays(folder)
        x = torch.from_numpy(images[:samples].copy()).float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)
        return x, torch.from_numpy(labels[:samples].copy())
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, 1, 28, 28, generator=gen), torch.randint(0, 10, (samples,), generator=gen)


def build(name: str, seed: int):
    import torch

    from cl_tool.models import ModelSpec, build_model

    arch, kwargs, source = MODELS[name]
    torch.manual_seed(seed)
    return build_model(ModelSpec(arch=arch, kwargs=kwargs, input_shape=(1, 28, 28), num_classes=10, source=source))


def batches(x, y, size: int):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> int:
    """Reset the peak-RSS mark where Linux allows it; return the current RSS (bytes) or -1."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return -1
    rss = _proc_status_kib("VmRSS")
    return -1 if rss is None else rss * 1024


def peak_bytes(device) -> int:
    """Peak memory so far: CUDA allocator peak, else VmHWM (resettable), else ru_maxrss."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def ratio_worker(args) -> None:
    """Batch-mean and exact alternately in this one process, ``--repeats`` rounds; a JSON line
    with each round's seconds."""
    import torch

    from cl_tool.importance import importance_sums
    from cl_tool.importance.reference import batch_mean_sums

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(args.model, args.seed).to(device)
    x, y = load_data(args.data, args.samples, args.seed)
    data = batches(x, y, args.batch_size)
    kw = {"fisher_labels": "empirical"} if args.method == "fisher" else {"mas_output": "logits"}
    run = {
        "batchmean": lambda: batch_mean_sums(model, data, args.method, device=device, **kw),
        "exact": lambda: importance_sums(
            model, data, args.method, device=device, memory_budget_mb=args.budget_mb, **kw
        ),
    }
    probe = None
    if args.probe_vcpus and device.type == "cpu" and hasattr(os, "sched_setaffinity"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from vcpu_speed import cpu_speeds

        probe = lambda: min(cpu_speeds().values())
    for f in run.values():
        f()  # warm-up on the whole data: allocator, kernels
    times = {k: [] for k in run}
    times["slowest_cpu"] = []  # per round: the slowest CPU's GFLOP/s in the probes around its two passes
    for _ in range(args.repeats):
        speeds = [probe()] if probe else []
        for k, f in run.items():
            start = time.perf_counter()
            f()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[k].append(time.perf_counter() - start)
            if probe:
                speeds.append(probe())
        if probe:
            times["slowest_cpu"].append(min(speeds))
    print(json.dumps(times))


def backpack_sequential(name: str, model):
    """The benchmark model as the ``nn.Sequential`` BackPACK extends (same parameter objects), or None."""
    from torch import nn

    if name == "mlp":
        return model.net
    if name == "cnn":
        return nn.Sequential(*model.features, nn.Flatten(), model.classifier)
    return None


def labels_worker(args) -> None:
    """cl-tool's exact-label Fisher vs BackPACK's DiagGGNExact, alternately in this process."""
    import torch
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact
    from torch import nn

    from cl_tool.importance import importance_sums

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.model, args.seed).eval()
    seq = backpack_sequential(args.model, copy.deepcopy(model))  # extend() hooks its modules: keep them apart
    bp_model = extend(seq).eval()
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    x, y = load_data(args.data, args.labels_samples, args.seed)
    data = batches(x, y, args.batch_size)

    def run_backpack():
        sums = [torch.zeros_like(p) for p in bp_model.parameters()]
        for xb, yb in data:
            loss = loss_fn(bp_model(xb), yb)
            with backpack(DiagGGNExact()):
                loss.backward()
            for s, p in zip(sums, bp_model.parameters()):
                s += p.diag_ggn_exact
                p.grad = None
        return sums

    def run_cl_tool():
        return importance_sums(model, data, "fisher", fisher_labels="exact", memory_budget_mb=args.budget_mb)[0]

    import warnings

    warnings.filterwarnings("ignore", message=".*backward hook.*")
    want, got = run_backpack(), run_cl_tool()
    diff = max(float((got[n] - w).abs().max() / w.abs().max()) for (n, _), w in zip(model.named_parameters(), want))
    times = {"cl-tool": [], "backpack": []}
    for _ in range(args.repeats):
        for k, f in (("cl-tool", run_cl_tool), ("backpack", run_backpack)):
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
    print(json.dumps({"times": times, "max_rel_diff": diff, "samples": x.shape[0]}))


def worker(args) -> None:
    """Run one variant; print a JSON line; save the sums of the loop's samples for the error."""
    import torch

    from cl_tool.importance import importance_sums
    from cl_tool.importance.reference import batch_mean_sums, naive_sums

    if args.worker == "ratio":
        ratio_worker(args)
        return
    if args.worker == "labels":
        labels_worker(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(args.model, args.seed).to(device)
    x, y = load_data(args.data, args.samples, args.seed)
    kw = {"fisher_labels": "empirical"} if args.method == "fisher" else {"mas_output": "logits"}
    run = {
        "loop": lambda b: naive_sums(model, b, args.method, device=device, **kw),
        "batchmean": lambda b: batch_mean_sums(model, b, args.method, device=device, **kw),
        "exact": lambda b: importance_sums(model, b, args.method, device=device, memory_budget_mb=args.budget_mb, **kw),
    }[args.worker]
    n = min(args.loop_samples, args.samples) if args.worker == "loop" else args.samples
    data = batches(x[:n], y[:n], args.batch_size)
    run(batches(x[:2], y[:2], 2))  # warm-up: kernels, lazy initialisation
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = reset_peak() if device.type != "cuda" else -1
    if base < 0:
        base = peak_bytes(device)
    times = []
    for _ in range(1 if args.worker == "loop" else args.repeats):
        start = time.perf_counter()
        sums, count = run(data)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = peak_bytes(device) - base
    if args.worker == "exact" and n > args.loop_samples:
        sums, _ = run(batches(x[: args.loop_samples], y[: args.loop_samples], args.batch_size))
    if args.worker != "batchmean":
        torch.save({k: v.cpu() for k, v in sums.items()}, args.out)
    print(json.dumps({"seconds": min(times), "samples": count, "peak_mb": peak / 2**20}))


def run_variant(args, model: str, variant: str, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--model", model, "--out", str(out)]
    for opt in (
        "samples",
        "batch_size",
        "loop_samples",
        "device",
        "seed",
        "method",
        "repeats",
        "threads",
        "budget_mb",
        "labels_samples",
    ):
        cmd += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
    if args.data:
        cmd += ["--data", args.data]
    if args.keep_freed_memory:
        cmd.append("--keep-freed-memory")
    if args.probe_vcpus:
        cmd.append("--probe-vcpus")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"{model}/{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fp64_error(args, name: str) -> float:
    """Max relative error of the engine vs the loop with both in float64 on ``--check-samples``
    samples: separates the algorithm's exactness from float32 round-off."""
    import torch

    from cl_tool.importance.engine import GradEngine
    from cl_tool.importance.losses import LossSpec
    from cl_tool.importance.reference import naive_sums

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(name, args.seed).double().eval()
    x, y = load_data(args.data, args.check_samples, args.seed)
    data = batches(x.double(), y, args.batch_size)
    kw = {"fisher_labels": "empirical"} if args.method == "fisher" else {"mas_output": "logits"}
    engine = GradEngine(model, LossSpec(args.method, **kw))
    for xb, yb in data:
        engine.add_batch(xb, yb)
    want, _ = naive_sums(model, data, args.method, **kw)
    return max_rel_err(engine.sums, want)


def max_rel_err(got: dict, want: dict) -> float:
    floor = 1e-7 * max(float(w.abs().max()) for w in want.values())
    return max(
        float((got[n].double() - w.double()).abs().max()) / max(float(w.abs().max()), floor) for n, w in want.items()
    )


def min_median(values: list[float], digits: int = 2) -> str:
    return f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f}"


def exact_labels_table(args, names: list[str]) -> None:
    """The exact-labels comparison with BackPACK (see the module docstring)."""
    print()
    print(
        f"# exact labels (Fisher, --fisher-labels exact) vs BackPACK DiagGGNExact: {args.labels_samples} images, "
        f"batch {args.batch_size}, {args.repeats} alternating rounds in one process"
    )
    if args.method != "fisher":
        print("skipped: exact labels are a Fisher mode (--method fisher)")
        return
    if importlib.util.find_spec("backpack") is None:
        print("skipped: backpack-for-pytorch is not installed (pip install backpack-for-pytorch)")
        return
    from importlib.metadata import version

    print(f"backpack-for-pytorch {version('backpack-for-pytorch')}")
    print(
        f"{'model':9} {'cl-tool s':>10} {'backpack s':>10} {'cl-tool/backpack min / median':>30} {'max rel diff':>12}"
    )
    for name in names:
        if name not in ("mlp", "cnn"):
            print(f"{name:9} skipped: BackPACK cannot extend this model (timm modules)")
            continue
        r = run_variant(args, name, "labels", Path(os.devnull))
        t = r["times"]
        ratios = [c / b for c, b in zip(t["cl-tool"], t["backpack"])]
        print(
            f"{name:9} {min(t['cl-tool']):10.3f} {min(t['backpack']):10.3f} {min_median(ratios):>30} {r['max_rel_diff']:12.1e}"
        )
    print(
        "seconds: the fastest round; cl-tool/backpack: ratio of the two times of each round;"
        " max rel diff: max over parameters of max|cl-tool - backpack| / max|backpack| (float32)."
    )


def quiet_rounds(slowest: list[float], ratios: list[float], share: float = 0.7) -> list[float]:
    """The ratios of the rounds whose slowest probed CPU ran at ≥ ``share`` × the fastest probe of the run."""
    best = max(slowest, default=0.0)
    return [r for s, r in zip(slowest, ratios, strict=True) if s >= share * best]


def ratio_table(args) -> None:
    """Per model: the alternating rounds' seconds of batch-mean and exact (min / median) and their ratio;
    with ``--probe-vcpus`` also the ratio over the rounds no vCPU was slowed in (see ``vcpu_speed.py``)."""
    print(f"malloc: {'as cl-tool commands set it' if args.keep_freed_memory else 'glibc defaults'}")
    head = f"{'model':9} {'batch-mean s min / med':>22} {'exact s min / med':>18} {'exact/batchmean min / median':>28}"
    print(head + (f" {'quiet rounds: n, min / median':>30}" if args.probe_vcpus else ""))
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rounds = run_variant(args, name, "ratio", Path(os.devnull))
        bm, ex = rounds["batchmean"], rounds["exact"]
        ratios = [e / b for e, b in zip(ex, bm)]
        line = f"{name:9} {min_median(bm):>22} {min_median(ex):>18} {min_median(ratios):>28}"
        quiet = quiet_rounds(rounds["slowest_cpu"], ratios) if rounds["slowest_cpu"] else []
        if args.probe_vcpus:
            line += f" {f'{len(quiet)}, ' + (min_median(quiet) if quiet else '-'):>30}"
        print(line)
    if args.probe_vcpus:
        print(
            "quiet rounds: every CPU, probed alone before, between and after the round's two passes, ran at"
            " >= 0.7 x the fastest probe of that model's run (vcpu_speed.py: the host slows a vCPU for seconds"
            " at a time, invisibly to the guest)."
        )
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        help="folder with t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz, or a dataset such as ylecun/mnist (default: random data)",
    )
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--models", default="mlp,cnn,resnet18,vit")
    p.add_argument("--device", default="cpu")
    p.add_argument("--method", default="fisher", choices=("fisher", "mas"))
    p.add_argument(
        "--loop-samples",
        type=int,
        default=None,
        help="time the loop on this many samples and extrapolate (default: all)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="time batchmean/exact this many times (fastest reported), and as many alternating rounds for the ratios",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--budget-mb", type=float, default=512)
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="set glibc malloc as cl-tool's commands do (runtime.keep_freed_memory) in every worker",
    )
    p.add_argument(
        "--ratio-only",
        action="store_true",
        help="only the alternating exact / batch-mean rounds of each model (no loop, no throughput, no BackPACK)",
    )
    p.add_argument(
        "--probe-vcpus",
        action="store_true",
        help="with the ratios: probe each CPU's speed around every pass and also report the rounds no CPU was slowed in",
    )
    p.add_argument("--check-samples", type=int, default=16, help="samples for the float64 exactness check (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--labels-models",
        default="mlp,cnn",
        help="models for the exact-labels comparison with BackPACK (empty: skip it)",
    )
    p.add_argument(
        "--labels-samples", type=int, default=None, help="images for the exact-labels comparison (default: --samples)"
    )
    p.add_argument("--worker", choices=("loop", "batchmean", "exact", "ratio", "labels"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.loop_samples is None:
        args.loop_samples = args.samples
    if args.labels_samples is None:
        args.labels_samples = args.samples
    if args.worker:
        if args.keep_freed_memory:
            from cl_tool.runtime import keep_freed_memory

            keep_freed_memory()
        worker(args)
        return

    import torch

    print(
        f"# importance benchmark: method={args.method}, {args.samples} samples "
        f"({'MNIST t10k from ' + args.data if args.data else 'random data'}), batch {args.batch_size}, device {args.device}, "
        f"torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}"
    )
    if args.ratio_only:
        ratio_table(args)
        return
    print(f"{'model':9} {'params':>8} {'variant':10} {'samples':>7} {'seconds':>8} {'samples/s':>10} {'peak MB':>8}")
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if name not in MODELS:
                raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
            params = sum(p.numel() for p in build(name, args.seed).parameters())
            res = {v: run_variant(args, name, v, Path(tmp) / f"{name}-{v}.pt") for v in ("loop", "batchmean", "exact")}
            rounds = run_variant(args, name, "ratio", Path(os.devnull))
            for v, r in res.items():
                star = "*" if v == "loop" and r["samples"] < args.samples else " "
                print(
                    f"{name:9} {params / 1e6:7.2f}M {v:10} {r['samples']:7d} {r['seconds']:8.2f} "
                    f"{r['samples'] / r['seconds']:9.1f}{star} {r['peak_mb']:8.1f}"
                )
            rate = {v: r["samples"] / r["seconds"] for v, r in res.items()}
            err = max_rel_err(torch.load(Path(tmp) / f"{name}-exact.pt"), torch.load(Path(tmp) / f"{name}-loop.pt"))
            err64 = fp64_error(args, name) if args.check_samples > 0 else float("nan")
            ratios = [e / b for e, b in zip(rounds["exact"], rounds["batchmean"])]
            summary.append(
                (
                    name,
                    rate["exact"] / rate["loop"],
                    min_median(ratios),
                    err,
                    err64,
                    res["loop"]["samples"],
                    res["batchmean"]["peak_mb"],
                    res["exact"]["peak_mb"],
                )
            )
    print()
    print(
        f"{'model':9} {'loop/exact':>10} {'exact/batchmean min / median':>28} {'peak MB bm / exact':>18} "
        f"{'rel err fp32':>12} {'rel err fp64':>12}"
    )
    for name, speedup, overhead, err, err64, n_loop, peak_bm, peak_ex in summary:
        note = f"  (loop timed on {n_loop} samples, extrapolated)" if n_loop < args.samples else ""
        print(
            f"{name:9} {speedup:9.1f}x {overhead:>28} {f'{peak_bm:.0f} / {peak_ex:.0f}':>18} {err:12.2e} {err64:12.2e}{note}"
        )
    print(
        "loop/exact: how many times faster the exact engine is than the per-sample loop (per sample);"
        f" exact/batchmean: time of the exact engine over that of the batch-mean approximation in each of {args.repeats}"
        " rounds that alternate the two in one process (min and median);"
        f" rel err: max over parameters of max|exact - loop| / max|loop|, fp32 on the loop's samples as timed,"
        f" fp64 with both in float64 on {args.check_samples} samples."
    )
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    labels = [m.strip() for m in args.labels_models.split(",") if m.strip()]
    if labels:
        exact_labels_table(args, labels)
        print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
