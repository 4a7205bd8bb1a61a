"""Permuted MNIST with the paper's MLP through the CLI: final mean accuracy for --penalty none vs stabilized.

Protocol (issue 2): MNIST test split (10k); first 8,000 images train, last 2,000 test; task 1 as is,
tasks 2..T pixel-permuted (seeds 1..T-1); MLP 784-300-150-10, Adam lr 1e-3, 6 epochs per task;
Fisher (empirical) importances accumulated over tasks; stabilized penalty with λ = --lam.

    python tests/benchmarks/permuted_mnist.py --data ../shared/data/mnist-t10k [--tasks 3] [--lam 5000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mnist import mnist_dataset_dir  # noqa: E402


def cl(*args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "cl_tool", *map(str, args), "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"cl-tool {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def task(ds: Path, t: int, part: str) -> str:
    split = "train[:8000]" if part == "train" else "train[8000:]"
    perm = f",permute={t}" if t > 0 else ""
    return f"T{t + 1}={ds}::split={split}{perm}"


def run_sequence(ds: Path, work: Path, penalty: str, args) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    prev = work / "init.safetensors"
    cl("init", "--arch", "mlp", "--arch-arg", "sizes=784,300,150,10", "--input-shape", "1x28x28", "--seed", args.seed, "-o", prev, "--force")
    ckpts = []
    sidecar = None
    for t in range(args.tasks):
        out = work / f"task{t + 1}.safetensors"
        extra = []
        if t > 0 and penalty != "none":
            extra = ["--penalty", penalty, "--lambda", args.lam, "--importance", sidecar]
        else:
            extra = ["--penalty", "none"]
        cl("train-next", prev, "--data", task(ds, t, "train"), "--epochs", args.epochs, "--lr", args.lr, "--optimizer", "adam",
           "--batch-size", args.batch_size, "--seed", args.seed, "--device", args.device, "-o", out, "--force", *extra)
        if penalty != "none" and t < args.tasks - 1:
            new_sidecar = work / f"task{t + 1}.importance.safetensors"
            acc = ["--accumulate", sidecar] if sidecar else []
            cl("importance", out, "--data", task(ds, t, "train"), "--method", args.method, "--device", args.device, "-o", new_sidecar, "--force", *acc)
            sidecar = new_sidecar
        ckpts.append(out)
        prev = out
    tests = [x for t in range(args.tasks) for x in ("--data", task(ds, t, "test"))]
    return cl("evaluate", *ckpts, *tests, "--device", args.device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with the MNIST IDX files (t10k-*)")
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lam", type=float, default=5000.0)
    p.add_argument("--method", default="fisher")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--penalties", default="none,stabilized")
    p.add_argument("--work", default=None, help="folder for checkpoints (default: a temporary folder)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="permuted-mnist-"))
    ds = mnist_dataset_dir(args.data, work / "mnist")
    results = {}
    for pen in args.penalties.split(","):
        t0 = time.perf_counter()
        res = run_sequence(ds, work / pen, pen, args)
        results[pen] = {"final_mean_accuracy": res["summary"]["average_accuracy"], "bwt": res["summary"]["bwt"],
                        "final_row": res["accuracy"][-1], "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{pen:>11}: final mean accuracy over {args.tasks} tasks = {results[pen]['final_mean_accuracy']:.4f}  "
              f"(per task {', '.join(f'{a:.4f}' for a in res['accuracy'][-1])}; BWT {res['summary']['bwt']:+.4f}; "
              f"{results[pen]['seconds']} s)", flush=True)
    print(json.dumps({"protocol": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
