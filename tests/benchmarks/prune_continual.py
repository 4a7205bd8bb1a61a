"""Pruning a continual learner by its stored scores (issue 23's continual protocols; README "Pruning a continual
learner").

For each seed: a model learns task A (MNIST), its Fisher, MAS and signal sidecars are written, then it learns task B
(the MLP: A's pixels permuted; the CNN: A rotated by 90°) under the stabilized penalty with A's Fisher (every training
run with ``--augment``, default none; shifts come before B's permutation or rotation); the B
sidecars are accumulated onto A's (``importance --accumulate``). The trained model is swept one-shot over
``--levels`` by each score, evaluated on both tasks' test splits (``prune --sweep --data A --data B``: a curve per task
and their mean; BatchNorm statistics re-estimated on both tasks' training rows). At 80 % and 90 % the pruned model
then gets one masked recovery epoch on B under the penalty (``train-next --mask``, accumulated Fisher) and is evaluated
again. Rows (seed, arch, variant, sparsity, phase, A, B, mean) go to ``--out``/continual-ARCH.json; a table of means ±
std is printed.

    python tests/benchmarks/prune_continual.py --data /path/to/mnist --arch mlp --seeds 0,1,2,3,4 --out runs/pc
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from prune_variants import cl_tool  # the same runner (this folder is on sys.path when run as a script)

LEVELS = "0.5,0.7,0.8,0.9,0.95"
RECOVER = (0.8, 0.9)
PROTOCOLS = {  # init options, task B's transform, training options
    "mlp": (
        ["--arch", "mlp", "--arch-arg", "sizes=784,300,150,10"],
        "permute=1",
        ["--optimizer", "adam", "--lr", "0.001"],
    ),
    "cnn": (["--arch", "cnn"], "rotate=90", ["--optimizer", "sgd", "--lr", "0.05"]),
}
LAMBDA = "100"
SIGNAL = ("mean", "l2")


def sidecars(ckpt: Path, data: str, prev: Path | None, args) -> dict[str, Path]:
    """fisher, mas, signal (paper sum-l1 and mean-l2) sidecars of ``ckpt`` on ``data``, accumulated onto ``prev``'s."""
    out = {}
    kinds = {
        "fisher": ["--method", "fisher"],
        "mas": ["--method", "mas"],
        "signal-sum-l1": ["--method", "signal", "--signal-norm", "sum", "--signal-stat", "l1"],
        "signal-mean-l2": ["--method", "signal", "--signal-norm", SIGNAL[0], "--signal-stat", SIGNAL[1]],
    }
    for kind, opts in kinds.items():
        path = ckpt.with_name(f"{ckpt.stem}.{kind}.safetensors")
        acc = ["--accumulate", prev.with_name(f"{prev.stem}.{kind}.safetensors")] if prev else []
        cl_tool("importance", ckpt, *opts, "--data", data, *acc, "--device", args.device, "--force", "-o", path)
        out[kind] = path
    return out


def variants(side: dict[str, Path], side_a: dict[str, Path]) -> list[tuple[str, list[str]]]:
    return [
        ("magnitude/global", ["--by", "magnitude"]),
        ("magnitude/lamp", ["--by", "magnitude", "--scope", "lamp"]),
        ("fisher-A-raw/global", ["--by", "fisher", "--importance", side_a["fisher"]]),
        ("fisher-raw/global", ["--by", "fisher", "--importance", side["fisher"]]),
        ("fisher-saliency/global", ["--by", "fisher", "--importance", side["fisher"], "--rank", "saliency"]),
        ("mas-saliency/global", ["--by", "mas", "--importance", side["mas"], "--rank", "saliency"]),
        ("signal-sum-l1/global", ["--by", "signal", "--importance", side["signal-sum-l1"]]),
        ("signal-mean-l2/global", ["--by", "signal", "--importance", side["signal-mean-l2"]]),
        ("signal-mean-l2/lamp", ["--by", "signal", "--importance", side["signal-mean-l2"], "--scope", "lamp"]),
    ]


def run_seed(seed: int, args, work: Path) -> list[dict]:
    init_opts, b_transform, train_opts = PROTOCOLS[args.arch]
    d = args.data
    train_a, train_b = f"A={d}::split=train", f"B={d}::split=train,{b_transform}"
    test_a, test_b = f"A={d}::split=test", f"B={d}::split=test,{b_transform}"
    score_a = f"A={d}::split=train,sample={args.score_samples}"
    score_b = f"B={d}::split=train,sample={args.score_samples},{b_transform}"
    stem = work / f"{args.arch}{seed}"
    init, a, b = (Path(f"{stem}-{n}.safetensors") for n in ("init", "a", "b"))
    common = ["--epochs", args.epochs, "--seed", seed, "--device", args.device, *train_opts, "--force"]
    common += ["--augment", args.augment]
    cl_tool("init", *init_opts, "--seed", seed, "-o", init, "--force")
    cl_tool("train-next", init, "--data", train_a, *common, "-o", a)
    side_a = sidecars(a, score_a, None, args)
    penalty = ["--penalty", "stabilized", "--lambda", LAMBDA]
    cl_tool("train-next", a, "--data", train_b, *penalty, "--importance", side_a["fisher"], *common, "-o", b)
    side = sidecars(b, score_b, a, args)
    rows = []
    tests = ["--data", test_a, "--data", test_b]
    bn = ["--score-data", score_a, "--score-data", score_b]
    for name, opts in variants(side, side_a):
        if args.variants is not None and name not in args.variants:
            continue
        res = cl_tool("prune", b, *opts, "--sweep", LEVELS, *tests, *bn, "--device", args.device, json_out=True)
        base = res["unpruned"]
        rows.append({"seed": seed, "variant": name, "sparsity": 0.0, "phase": "one-shot", **base})
        for p in res["curves"][opts[1]]:
            rows.append({"seed": seed, "variant": name, "sparsity": p["sparsity"], "phase": "one-shot", **p["tasks"]})
        if name not in args.recover:
            continue
        for s in RECOVER:
            pruned, mask, rec = (Path(f"{stem}-{name.replace('/', '-')}-{s:g}.{k}.safetensors") for k in "pmr")
            cl_tool(
                "prune", b, *opts, "-s", s, *bn, "--device", args.device, "-o", pruned, "--mask-out", mask, "--force"
            )
            cl_tool(
                "train-next", pruned, "--data", train_b, *penalty, "--importance", side["fisher"], "--mask", mask,
                *common[:1], 1, *common[2:], "-o", rec,
            )  # fmt: skip
            ev = cl_tool("evaluate", rec, *tests, "--device", args.device, json_out=True)
            acc = dict(zip(["A", "B"], ev["accuracy"][0], strict=True))
            rows.append({"seed": seed, "variant": name, "sparsity": s, "phase": "recovered", **acc})
    for r in rows:
        r["mean"] = (r["A"] + r["B"]) / 2
    return rows


def table(rows: list[dict]) -> None:
    keys = sorted({(r["variant"], r["phase"]) for r in rows}, key=lambda k: (k[1], k[0]))
    levels = sorted({r["sparsity"] for r in rows})
    print("variant | phase | " + " | ".join(f"{s:g} mean (A / B)" for s in levels))
    for variant, phase in keys:
        cells = []
        for s in levels:
            sel = [r for r in rows if (r["variant"], r["phase"], r["sparsity"]) == (variant, phase, s)]
            if not sel:
                cells.append("–")
                continue
            m = [r["mean"] for r in sel]
            sd = statistics.stdev(m) if len(m) > 1 else 0.0
            a, b = statistics.mean(r["A"] for r in sel), statistics.mean(r["B"] for r in sel)
            cells.append(f"{statistics.mean(m):.3f} ± {sd:.3f} ({a:.3f} / {b:.3f})")
        print(f"{variant} | {phase} | " + " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="MNIST folder with train and test splits")
    parser.add_argument("--arch", choices=sorted(PROTOCOLS), default="mlp")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--score-samples", type=int, default=1000)
    parser.add_argument("--recover", default="magnitude/global,fisher-saliency/global,signal-mean-l2/global")
    parser.add_argument("--augment", default="none", help="train-next --augment of every training run (e.g. shift=2)")
    parser.add_argument("--variants", default=None, help="comma-separated variant names (default: all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("runs/prune_continual"))
    args = parser.parse_args()
    args.recover = set(args.recover.split(","))
    args.variants = None if args.variants is None else set(args.variants.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in map(int, args.seeds.split(",")):
        seed_rows = run_seed(seed, args, args.out)
        with open(args.out / f"continual-{args.arch}.jsonl", "a") as f:
            f.write(json.dumps(seed_rows) + "\n")
        rows += seed_rows
    (args.out / f"continual-{args.arch}.json").write_text(json.dumps(rows, indent=1))
    table(rows)


if __name__ == "__main__":
    main()
