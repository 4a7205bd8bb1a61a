"""Issue 21's BatchNorm case, rerun: timm resnet18 (1x28x28) trained on 2,000 MNIST PNGs in an imagefolder, Adam 1e-3,
constant schedule, 3 epochs, with the BatchNorm statistics kept from training (`--bn-stats keep`, the behaviour before
the re-estimation) and re-estimated with the final weights (`--bn-stats recompute`, the default).

For each: train-next's final train-mode accuracy and its eval-mode accuracy of the written model (on the training
data), then `cl-tool evaluate` of the written checkpoint on the same training data and on 2,000 held-out images. A
reproduction, not a test (a few minutes on two CPU cores):

    python tests/benchmarks/bn_stats_resnet.py --mnist FOLDER_WITH_T10K_IDX_FILES [--samples 2000] [--workers 0]

The images are drawn (seeded) from the MNIST files given: the training folder and the held-out folder do not overlap.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def write_imagefolder(images, labels, rows, root: Path) -> Path:
    from PIL import Image

    for i in rows:
        cls = root / str(int(labels[i]))
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").save(cls / f"{i:05d}.png")
    return root


def cl_tool(*args) -> dict:
    """Run ``python -m cl_tool ARGS --json``; its JSON result (the log goes to stderr, shown)."""
    proc = subprocess.run([sys.executable, "-m", "cl_tool", *map(str, args), "--json"], capture_output=True, text=True)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"cl-tool {args[0]} failed with exit {proc.returncode}")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--mnist", required=True, help="folder with t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]"
    )
    ap.add_argument("--samples", type=int, default=2000, help="training images (and as many held-out ones)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", help="also write the figures to this JSON file")
    args = ap.parse_args()

    import numpy as np
    from _mnist import read_idx

    images, labels = read_idx(args.mnist)
    rows = np.random.default_rng(args.seed).permutation(len(labels))
    with tempfile.TemporaryDirectory(prefix="bn-stats-") as tmp:
        tmp = Path(tmp)
        train = write_imagefolder(images, labels, rows[: args.samples], tmp / "train")
        held = write_imagefolder(images, labels, rows[args.samples : 2 * args.samples], tmp / "heldout")
        a0 = tmp / "a0.safetensors"
        cl_tool("init", "--arch", "resnet18", "--input-shape", "1x28x28", "--num-classes", "10", "-o", a0)
        common = ["--data", train, "--penalty", "none", "--optimizer", "adam", "--lr", "1e-3"]
        common += ["--schedule", "constant", "--epochs", args.epochs, "--seed", args.seed, "--workers", args.workers]
        figures = {}
        for mode in ("keep", "recompute"):
            out = tmp / f"{mode}.safetensors"
            res = cl_tool("train-next", a0, *common, "--bn-stats", mode, "-o", out)
            on_train = cl_tool("evaluate", out, "--data", f"train={train}", "--workers", args.workers)
            on_held = cl_tool("evaluate", out, "--data", f"heldout={held}", "--workers", args.workers)
            (final,) = res["final_eval"]
            figures[mode] = {
                "final_train_accuracy_train_mode": res["final_train_accuracy"],
                "final_eval_mode_accuracy": final["accuracy"],
                "eval_mode_samples": final["samples"],
                "evaluate_on_training_data": on_train["accuracy"][0][0],
                "evaluate_on_heldout": on_held["accuracy"][0][0],
                "bn_stats": res["bn_stats"],
            }
    print(f"resnet18 1x28x28, {args.samples} MNIST PNGs, Adam 1e-3 constant, {args.epochs} epochs, seed {args.seed}")
    print(
        f"{'--bn-stats':<12}{'train acc (train mode)':>24}{'eval-mode acc':>15}{'evaluate, train data':>22}"
        f"{'evaluate, held-out':>20}"
    )
    for mode, f in figures.items():
        print(
            f"{mode:<12}{f['final_train_accuracy_train_mode']:>24.4f}{f['final_eval_mode_accuracy']:>15.4f}"
            f"{f['evaluate_on_training_data']:>22.4f}{f['evaluate_on_heldout']:>20.4f}"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
