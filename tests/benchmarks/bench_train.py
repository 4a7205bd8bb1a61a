"""train-next's training loop against a hand-written PyTorch loop, and the stabilized penalty's own cost.

For each model (the paper MLP and CNN on 1x28x28, resnet18 on 3x32x32, a small ViT on 1x28x28) and the same
random images (a ``save_to_disk`` dataset this script writes), Adam 1e-3, the same batch size and number of steps:

* ``cl-tool none``: ``cl-tool train-next --penalty none --epochs 1 --json``; samples/s is the command's own
  ``samples_per_s`` (first step to last: data loading and the per-batch pipeline included, start-up excluded),
  after one untimed run per model that writes the decoded cache (the hand loop decodes before its clock too);
* ``hand``: a fresh Python process that loads the same checkpoint, holds the whole task in memory as normalised
  float32 (decoded before timing), and runs ``zero_grad / cross_entropy / backward / step`` over shuffled batches;
  samples/s from the first step to the last;
* ``cl-tool stabilized``: as ``cl-tool none`` with ``--penalty stabilized --lambda 100`` and a magnitude sidecar
  (the penalty's cost does not depend on what Ω holds).

Rounds are interleaved (none, hand, stabilized for every model, then again); min and median over rounds are
printed with the load average. Run it alone: other processes on the machine skew every figure.

    python tests/benchmarks/bench_train.py [--models mlp,cnn,resnet18,vit] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = {
    # name: (init arguments, input shape, batch size, steps)
    "mlp": (["--arch", "mlp", "--arch-arg", "sizes=784,300,150,10"], (1, 28, 28), 100, 300),
    "cnn": (["--arch", "cnn"], (1, 28, 28), 64, 12),
    "resnet18": (["--arch", "resnet18"], (3, 32, 32), 32, 20),
    "vit": (
        ["--arch", "vit_tiny_patch16_224", "--arch-arg", "img_size=28", "--arch-arg", "patch_size=4"],
        (1, 28, 28),
        32,
        20,
    ),
}

HAND = r"""
import json, sys, time
import numpy as np, torch, torch.nn.functional as F
import datasets
from cl_tool.checkpoint import load_model

ckpt_path, data_path, batch, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
ckpt, model = load_model(ckpt_path)
spec = ckpt.spec
ds = datasets.load_from_disk(data_path).with_format("numpy")
x = torch.from_numpy(np.stack(ds["pixels"])).float().div_(255).reshape((-1,) + tuple(spec.input_shape))
mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
std = torch.tensor(spec.std).view(1, -1, 1, 1)
x = (x - mean) / std
y = torch.from_numpy(np.asarray(ds["label"])).long()
model.train()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
order = torch.randperm(len(x))
t0 = time.perf_counter()
seen = 0
for i in range(0, len(x) - batch + 1, batch):
    idx = order[i:i + batch]
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
    seen += len(idx)
dt = time.perf_counter() - t0
print(json.dumps({"samples_per_s": seen / dt, "seconds": dt}))
"""


def run(argv: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def make_data(folder: Path, shape: tuple[int, int, int], n: int) -> Path:
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    path = folder / f"data_{'x'.join(map(str, shape))}_{n}"
    if not path.exists():
        pixels = rng.integers(0, 256, size=(n, int(np.prod(shape))), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n)
        datasets.Dataset.from_dict({"pixels": list(pixels), "label": labels.tolist()}).save_to_disk(str(path))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,cnn,resnet18,vit")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=None, help="train-next --workers (default: the tool's default)")
    args = p.parse_args()
    names = [m for m in args.models.split(",") if m]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CL_TOOL_CACHE": tempfile.mkdtemp(prefix="bench-cache-")}
    cl = [sys.executable, "-m", "cl_tool"]
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    setup = {}
    for name in names:
        init_args, shape, batch, steps = MODELS[name]
        ckpt = work / f"{name}.safetensors"
        run(
            [
                *cl,
                "init",
                *init_args,
                "--input-shape",
                "x".join(map(str, shape)),
                "--num-classes",
                "10",
                "-o",
                str(ckpt),
                "--json",
            ],
            env,
        )
        side = work / f"{name}.importance.safetensors"
        run([*cl, "importance", str(ckpt), "--method", "magnitude", "-o", str(side), "--json"], env)
        setup[name] = (ckpt, side, make_data(work, shape, batch * steps), batch)
    results: dict[str, dict[str, list[float]]] = {
        n: {"cl-tool none": [], "hand": [], "cl-tool stabilized": []} for n in names
    }
    workers = [] if args.workers is None else ["--workers", str(args.workers)]

    def train_next(name: str) -> list[str]:
        ckpt, _, data, batch = setup[name]
        return [
            *cl,
            "train-next",
            str(ckpt),
            "--data",
            str(data),
            "--epochs",
            "1",
            "--batch-size",
            str(batch),
            "--optimizer",
            "adam",
            "--lr",
            "1e-3",
            "--device",
            "cpu",
            *workers,
            "--json",
            "--force",
        ]

    # The hand-written loop holds the task decoded before its clock starts; so does train-next once its decoded
    # cache exists: one untimed run per model writes it.
    for name in names:
        run([*train_next(name), "--penalty", "none", "-o", str(work / "out_none.safetensors")], env)
    for r in range(args.rounds):
        for name in names:
            ckpt, side, data, batch = setup[name]
            common = train_next(name)
            res = run([*common, "--penalty", "none", "-o", str(work / "out_none.safetensors")], env)
            results[name]["cl-tool none"].append(res["samples_per_s"])
            res = run([sys.executable, "-c", HAND, str(ckpt), str(data), str(batch), str(args.threads)], env)
            results[name]["hand"].append(res["samples_per_s"])
            res = run(
                [
                    *common,
                    "--penalty",
                    "stabilized",
                    "--lambda",
                    "100",
                    "--importance",
                    str(side),
                    "-o",
                    str(work / "out_stab.safetensors"),
                ],
                env,
            )
            results[name]["cl-tool stabilized"].append(res["samples_per_s"])
        print(f"round {r + 1}/{args.rounds} done (load average {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    print(
        f"# train-next vs a hand-written loop: {args.threads} threads, {args.rounds} interleaved rounds, "
        f"load average now {' / '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print(
        f"{'model':9} {'batch':>5} {'hand s/s':>16} {'cl-tool s/s':>16} {'cl-tool÷hand':>14} {'stabilized s/s':>16} "
        f"{'penalty cost':>14}"
    )
    for name in names:
        res = results[name]
        ratio = [c / h for c, h in zip(res["cl-tool none"], res["hand"])]
        cost = [1 - s / c for s, c in zip(res["cl-tool stabilized"], res["cl-tool none"])]

        def mm(values, fmt):
            return f"{format(min(values), fmt)}/{format(statistics.median(values), fmt)}"

        print(
            f"{name:9} {setup[name][3]:5d} {mm(res['hand'], ',.0f'):>16} {mm(res['cl-tool none'], ',.0f'):>16} "
            f"{mm(ratio, '.2f'):>14} {mm(res['cl-tool stabilized'], ',.0f'):>16} "
            f"{format(statistics.median(cost), '.1%'):>14}"
        )
    print(
        "samples/s: min/median over rounds; cl-tool÷hand: the ratio of each round, min/median; penalty cost: "
        "median of 1 − stabilized/none per round (a share of the step time)."
    )


if __name__ == "__main__":
    main()
