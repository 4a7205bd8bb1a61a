"""The score variants of issue 23 on the paper CNN (first run: seeds 0, 1, 2; README "Pruning the paper CNN by score variant").

Which stored score prunes the paper CNN best: for each seed, the CNN is trained on an MNIST folder (save_to_disk or
imagefolder, ``--data PATH``) with ±2-pixel shifts, then every score variant is swept over the sparsities 0.5–0.95
(one-shot, ``prune --sweep`` on the test split), with and without BatchNorm re-estimation on the training split:

* magnitude — global, layer, output scope;
* signal — every ``--signal-norm`` × ``--signal-stat``, global, layer and output scope (computed on the training
  split's first ``--score-samples`` rows);
* fisher and mas sidecars — ``--rank raw`` and ``--rank saliency``, global and layer scope.

Prints a table of mean ± std test accuracy over the seeds per (variant, bn, sparsity), and writes the rows as JSON
(``--out``). Costs about (seeds × (train + 3 sidecars + 30 sweeps)) CLI runs; run it where a GPU or time is at hand:

    python tests/benchmarks/prune_variants.py --data /path/to/mnist --seeds 0,1,2,3,4 --out runs/prune_variants
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

SPARSITIES = "0.5,0.7,0.8,0.9,0.95"
SIGNAL = [(n, s) for n in ("sum", "mean") for s in ("l1", "l2")]


def cl_tool(*args, json_out: bool = False):
    """Run ``python -m cl_tool ARGS``; its JSON result when ``json_out``."""
    argv = [sys.executable, "-m", "cl_tool", *map(str, args), *(["--json"] if json_out else [])]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout) if json_out else None


def variants(work: Path, ckpt: Path) -> list[tuple[str, list[str]]]:
    """(name, prune options) of every variant; the sidecars they need are written to ``work`` by :func:`sidecars`."""
    out = []
    for scope in ("global", "layer", "output"):
        out.append((f"magnitude/{scope}", ["--by", "magnitude", "--scope", scope]))
        for norm, stat in SIGNAL:
            side = work / f"{ckpt.stem}.signal-{norm}-{stat}.safetensors"
            out.append((f"signal-{norm}-{stat}/{scope}", ["--by", "signal", "--importance", side, "--scope", scope]))
    for method in ("fisher", "mas"):
        side = work / f"{ckpt.stem}.{method}.safetensors"
        for scope in ("global", "layer"):
            for rank in ("raw", "saliency"):
                out.append(
                    (
                        f"{method}-{rank}/{scope}",
                        ["--by", method, "--importance", side, "--scope", scope, "--rank", rank],
                    )
                )
    return out


def sidecars(work: Path, ckpt: Path, score: str, device: str) -> None:
    common = ["--data", score, "--device", device, "--force"]
    for norm, stat in SIGNAL:
        out = work / f"{ckpt.stem}.signal-{norm}-{stat}.safetensors"
        cl_tool(
            "importance", ckpt, "--method", "signal", "--signal-norm", norm, "--signal-stat", stat, *common, "-o", out
        )
    for method in ("fisher", "mas"):
        cl_tool("importance", ckpt, "--method", method, *common, "-o", work / f"{ckpt.stem}.{method}.safetensors")


def run_seed(seed: int, args, work: Path) -> list[dict]:
    init, ckpt = work / f"cnn{seed}-init.safetensors", work / f"cnn{seed}.safetensors"
    cl_tool("init", "--arch", "cnn", "--seed", seed, "-o", init, "--force")
    cl_tool(
        "train-next", init, "--data", f"{args.data}::split=train", "--epochs", args.epochs, "--augment", "shift=2",
        "--seed", seed, "--device", args.device, "-o", ckpt, "--force",
    )  # fmt: skip
    train = f"{args.data}::split=train,limit={args.score_samples}"
    sidecars(work, ckpt, train, args.device)
    rows = []
    for name, opts in variants(work, ckpt):
        for bn in ("recompute", "keep"):
            res = cl_tool(
                "prune", ckpt, *opts, "--sweep", SPARSITIES, "--data", f"{args.data}::split=test",
                "--score-data", train, "--bn-stats", bn, "--device", args.device, json_out=True,
            )  # fmt: skip
            for point in next(iter(res["curves"].values())):
                rows.append({"seed": seed, "variant": name, "bn": bn, **point})
    return rows


def table(rows: list[dict]) -> None:
    levels = sorted({r["sparsity"] for r in rows})
    keys = sorted({(r["variant"], r["bn"]) for r in rows})
    print("variant | bn | " + " | ".join(f"{s:g}" for s in levels))
    for variant, bn in keys:
        cells = []
        for s in levels:
            acc = [r["accuracy"] for r in rows if (r["variant"], r["bn"], r["sparsity"]) == (variant, bn, s)]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            cells.append(f"{statistics.mean(acc):.3f} ± {sd:.3f}")
        print(f"{variant} | {bn} | " + " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="MNIST folder with train and test splits")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--score-samples", type=int, default=2000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("runs/prune_variants"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [r for seed in map(int, args.seeds.split(",")) for r in run_seed(seed, args, args.out)]
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    table(rows)


if __name__ == "__main__":
    main()
