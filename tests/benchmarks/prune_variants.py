"""Which stored score prunes a trained network best (issue 23; README "Pruning by score variant").

For each seed, a model (``--arch``: the paper CNN, resnet18 at 1×28×28 with BatchNorm, both Adam 1e-3 for 2 epochs,
or the small timm ViT of the README's results, 2 blocks of width 64 on 7×7 patches, SGD 0.05 momentum 0.9 for 8
epochs) is trained on an MNIST folder (save_to_disk or imagefolder with train and test splits, ``--data PATH``) with ±2-pixel
shifts, then every score variant is swept over the sparsities 0.5–0.95 (one-shot, ``prune --sweep`` on the test
split; BatchNorm statistics re-estimated on the training split's first ``--score-samples`` rows after masking):

* magnitude — global, layer, lamp, output scope (global also with the statistics kept, ``--bn-stats keep``);
* signal — the paper's (sum, l1) and the per-position means (l1, l2), global; mean-l2 also lamp and output scope;
* fisher and mas sidecars — raw Ω and Ω·w² (``--rank saliency``), global; saliency also lamp.

Signal, Fisher and MAS are computed on the same ``--score-samples`` training rows. Prints mean ± std test accuracy
over the seeds per (variant, bn, sparsity) and writes the rows (``--out``/rows-ARCH.json, one line per seed as it
finishes in rows-ARCH.jsonl). ``--variants`` picks some (default: the eight of ``CORE`` and magnitude with the
statistics kept; ``all``: the 17). Costs seeds × (train + 5 sidecars + a sweep per variant) CLI runs:

    python tests/benchmarks/prune_variants.py --data /path/to/mnist --arch resnet18 --seeds 0,1,2,3,4 --out runs/pv
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

SPARSITIES = "0.5,0.7,0.8,0.9,0.95"
CORE = (  # the variants run by default (--variants all: every one)
    "magnitude/global", "magnitude/lamp", "signal-sum-l1/global", "signal-mean-l2/global", "signal-mean-l2/lamp",
    "fisher-raw/global", "fisher-saliency/global", "mas-saliency/global",
)  # fmt: skip
SIGNAL = [("sum", "l1"), ("mean", "l1"), ("mean", "l2")]
TRAIN = {  # train-next options of each --arch besides --epochs (default 2) and --augment shift=2
    "cnn": [],
    "resnet18": [],
    "vit": ["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9"],  # the small ViT's recipe (Results), 8 epochs
}
EPOCHS = {"vit": 8}
ARCHS = {  # init options of each --arch
    "cnn": ["--arch", "cnn"],
    "resnet18": ["--arch", "resnet18", "--input-shape", "1x28x28", "--num-classes", "10"],
    "vit": [
        "--arch", "vit_tiny_patch16_224", "--input-shape", "1x28x28", "--num-classes", "10", "--arch-arg", "img_size=28",
        "--arch-arg", "patch_size=7", "--arch-arg", "embed_dim=64", "--arch-arg", "depth=2", "--arch-arg", "num_heads=2",
    ],
}  # fmt: skip


def cl_tool(*args, json_out: bool = False):
    """Run ``python -m cl_tool ARGS``; its JSON result when ``json_out``."""
    argv = [sys.executable, "-m", "cl_tool", *map(str, args), *(["--json"] if json_out else [])]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout) if json_out else None


def variants(work: Path, ckpt: Path) -> list[tuple[str, str, list[str]]]:
    """(name, bn mode, prune options) of every variant; the sidecars they need are written by :func:`sidecars`."""
    out = [("magnitude/global", "keep", ["--by", "magnitude", "--scope", "global"])]
    for scope in ("global", "layer", "lamp", "output"):
        out.append((f"magnitude/{scope}", "recompute", ["--by", "magnitude", "--scope", scope]))
    for norm, stat in SIGNAL:
        side = work / f"{ckpt.stem}.signal-{norm}-{stat}.safetensors"
        scopes = ("global", "lamp", "output") if (norm, stat) == ("mean", "l2") else ("global",)
        for scope in scopes:
            opts = ["--by", "signal", "--importance", side, "--scope", scope]
            out.append((f"signal-{norm}-{stat}/{scope}", "recompute", opts))
    for method in ("fisher", "mas"):
        side = work / f"{ckpt.stem}.{method}.safetensors"
        for rank, scope in (("raw", "global"), ("saliency", "global"), ("saliency", "lamp")):
            opts = ["--by", method, "--importance", side, "--scope", scope, "--rank", rank]
            out.append((f"{method}-{rank}/{scope}", "recompute", opts))
    return out


def sidecars(work: Path, ckpt: Path, score: str, device: str, wanted: str) -> None:
    common = ["--data", score, "--device", device, "--force"]
    for norm, stat in SIGNAL:
        if wanted != "all" and f"signal-{norm}-{stat}" not in wanted:
            continue
        out = work / f"{ckpt.stem}.signal-{norm}-{stat}.safetensors"
        cl_tool(
            "importance", ckpt, "--method", "signal", "--signal-norm", norm, "--signal-stat", stat, *common, "-o", out
        )
    for method in ("fisher", "mas"):
        cl_tool("importance", ckpt, "--method", method, *common, "-o", work / f"{ckpt.stem}.{method}.safetensors")


def run_seed(seed: int, args, work: Path) -> list[dict]:
    init, ckpt = work / f"{args.arch}{seed}-init.safetensors", work / f"{args.arch}{seed}.safetensors"
    cl_tool("init", *ARCHS[args.arch], "--seed", seed, "-o", init, "--force")
    cl_tool(
        "train-next", init, "--data", f"{args.data}::split=train", "--epochs", args.epochs or EPOCHS.get(args.arch, 2),
        "--augment", "shift=2", *TRAIN[args.arch],
        "--seed", seed, "--device", args.device, "-o", ckpt, "--force",
    )  # fmt: skip
    train = f"{args.data}::split=train,limit={args.score_samples}"
    sidecars(work, ckpt, train, args.device, args.variants)
    rows = []
    for name, bn, opts in variants(work, ckpt):
        if args.variants != "all" and name not in args.variants.split(","):
            continue
        if bn == "keep" and args.arch == "vit":  # no BatchNorm: keep is recompute
            continue
        res = cl_tool(
            "prune", ckpt, *opts, "--sweep", SPARSITIES, "--data", f"{args.data}::split=test",
            "--score-data", train, "--bn-stats", bn, "--device", args.device, json_out=True,
        )  # fmt: skip
        rows.append({"seed": seed, "variant": name, "bn": bn, "sparsity": 0.0, "accuracy": res["unpruned_accuracy"]})
        for point in next(iter(res["curves"].values())):
            rows.append(
                {"seed": seed, "variant": name, "bn": bn, "sparsity": point["sparsity"], "accuracy": point["accuracy"]}
            )
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
    parser.add_argument("--arch", choices=sorted(ARCHS), default="cnn")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--epochs", type=int, default=None, help="default: 8 for the ViT, 2 otherwise")
    parser.add_argument("--score-samples", type=int, default=1000)
    parser.add_argument("--variants", default=",".join(CORE), help="comma-separated variant names, or all")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("runs/prune_variants"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in map(int, args.seeds.split(",")):
        seed_rows = run_seed(seed, args, args.out)
        with open(args.out / f"rows-{args.arch}.jsonl", "a") as f:
            f.write(json.dumps(seed_rows) + "\n")
        rows += seed_rows
    (args.out / f"rows-{args.arch}.json").write_text(json.dumps(rows, indent=1))
    table(rows)


if __name__ == "__main__":
    main()
