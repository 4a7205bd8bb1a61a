"""Permuted MNIST with the paper's MLP, driven through the CLI: final mean accuracy per penalty and λ.

Protocol: the MNIST test split (10k); first 8,000 images train, last 2,000 test; task 1 as is, tasks
2..T pixel-permuted (seeds 1..T-1); MLP 784-300-150-10; importances (default: empirical Fisher) computed
after each task on its training images and accumulated (summed) over tasks; the next task trains from the
previous checkpoint with the penalty. A run whose training diverges (exit code 5) is reported as such.

Issue 2 figures (Adam 1e-3, 6 epochs, 3 tasks):
    python tests/benchmarks/permuted_mnist.py --data MNIST_DIR --penalties none,stabilized --lams 5000
Issue 4 figures (SGD 0.05, 3 epochs, 3 tasks; plain EWC, stabilized, plain EWC with clipping):
    python tests/benchmarks/permuted_mnist.py --data MNIST_DIR --optimizer sgd --lr 0.05 --epochs 3 \
        --penalties ewc,stabilized,ewc+clip --lams 100,1000,10000

MNIST_DIR is a folder holding t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz.
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
from _mnist import mnist_source


class Diverged(Exception):
    pass


def cl(*args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "cl_tool", *map(str, args), "--json"], capture_output=True, text=True)
    if proc.returncode == 5:
        raise Diverged(proc.stderr.strip().splitlines()[-1])
    if proc.returncode != 0:
        raise SystemExit(f"cl-tool {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


SPLIT_PREFIX = [""]  # "test" for a dataset with MNIST's splits (ylecun/mnist): its test split is t10k


def task(ds: Path, t: int, part: str) -> str:
    split = SPLIT_PREFIX[0] + ("[:8000]" if part == "train" else "[8000:]")
    perm = f",permute={t}" if t > 0 else ""
    return f"T{t + 1}={ds}::split={split}{perm}"


def run_sequence(ds: Path, work: Path, penalty: str, lam: float, args) -> dict:
    """Train T tasks in sequence; return evaluate's JSON (accuracy matrix + summary)."""
    work.mkdir(parents=True, exist_ok=True)
    clip = penalty.endswith("+clip")
    penalty = penalty.removesuffix("+clip")
    prev = work / "init.safetensors"
    cl(
        "init",
        "--arch",
        "mlp",
        "--arch-arg",
        "sizes=784,300,150,10",
        "--input-shape",
        "1x28x28",
        "--seed",
        args.seed,
        "-o",
        prev,
        "--force",
    )
    ckpts, sidecar = [], None
    for t in range(args.tasks):
        out = work / f"task{t + 1}.safetensors"
        extra = (
            ["--penalty", penalty, "--lambda", lam, "--importance", sidecar]
            if t > 0 and penalty != "none"
            else ["--penalty", "none"]
        )
        if clip:
            extra += ["--grad-clip", args.clip]
        si = ["--si-out", work / f"task{t + 1}.si.safetensors"] if args.method == "si" and penalty != "none" else []
        cl(
            "train-next",
            prev,
            "--data",
            task(ds, t, "train"),
            "--epochs",
            args.epochs,
            "--lr",
            args.lr,
            "--optimizer",
            args.optimizer,
            "--batch-size",
            args.batch_size,
            "--seed",
            args.seed,
            "--device",
            args.device,
            "-o",
            out,
            "--force",
            *extra,
            *si,
        )
        if penalty != "none" and t < args.tasks - 1:
            new_sidecar = work / f"task{t + 1}.importance.safetensors"
            if args.method == "si":
                # SI sidecars are written by train-next; sum them over tasks like any other importance
                if sidecar is None:
                    new_sidecar = si[1]
                else:
                    _sum_sidecars(sidecar, si[1], out, new_sidecar)
            else:
                acc = ["--accumulate", sidecar] if sidecar else []
                cl(
                    "importance",
                    out,
                    "--data",
                    task(ds, t, "train"),
                    "--method",
                    args.method,
                    "--device",
                    args.device,
                    "--samples",
                    args.importance_samples,
                    "-o",
                    new_sidecar,
                    "--force",
                    *acc,
                )
            sidecar = new_sidecar
        ckpts.append(out)
        prev = out
    tests = [x for t in range(args.tasks) for x in ("--data", task(ds, t, "test"))]
    return cl("evaluate", *ckpts, *tests, "--device", args.device)


def _sum_sidecars(prev: Path, new: Path, ckpt: Path, out: Path) -> None:
    """Ω_prev + Ω_new for SI, keeping the new sidecar's fingerprint (that of ``ckpt``)."""
    from cl_tool.sidecar import load_sidecar, save_sidecar

    p, n = load_sidecar(prev), load_sidecar(new)
    n.tensors = {k: v + p.tensors[k] for k, v in n.tensors.items()}
    n.tasks = p.tasks + n.tasks
    save_sidecar(out, n, force=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder with the MNIST IDX files (t10k-*) or a dataset such as ylecun/mnist (online)")
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lams", default="5000", help="comma-separated λ values")
    p.add_argument(
        "--penalties",
        default="none,stabilized",
        help="comma-separated: none, ewc, stabilized, ewc+clip, stabilized+clip",
    )
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--method", default="fisher", help="fisher, mas or si")
    p.add_argument("--importance-samples", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default=None, help="folder for checkpoints (default: a temporary folder)")
    p.add_argument("--out-json", default=None, help="also write the results here")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="permuted-mnist-"))
    ds, SPLIT_PREFIX[0] = mnist_source(args.data, work / "mnist")
    results = []
    for pen in args.penalties.split(","):
        for lam in [0.0] if pen == "none" else [float(x) for x in args.lams.split(",")]:
            t0 = time.perf_counter()
            row = {
                "penalty": pen,
                "lambda": lam if pen != "none" else None,
                "method": args.method if pen != "none" else None,
            }
            try:
                res = run_sequence(ds, work / f"{pen}-{lam:g}", pen, lam, args)
                row.update(
                    final_mean_accuracy=res["summary"]["average_accuracy"],
                    bwt=res["summary"]["bwt"],
                    final_row=res["accuracy"][-1],
                    diagonal=[res["accuracy"][i][i] for i in range(args.tasks)],
                )
                text = (
                    f"final mean acc {row['final_mean_accuracy']:.4f}; per task {', '.join(f'{a:.4f}' for a in row['final_row'])}; "
                    f"new-task acc {', '.join(f'{a:.4f}' for a in row['diagonal'])}; BWT {row['bwt']:+.4f}"
                )
            except Diverged as exc:
                row.update(diverged=str(exc))
                text = f"DIVERGED ({exc})"
            row["seconds"] = round(time.perf_counter() - t0, 1)
            results.append(row)
            lam_text = "" if pen == "none" else f" λ={lam:g}"
            print(f"{pen:>16}{lam_text:>10}: {text} [{row['seconds']} s]", flush=True)
    doc = {"protocol": {k: v for k, v in vars(args).items() if k != "work"}, "results": results}
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
