"""A whole continual-learning sequence from the shell vs a peer in one Python process (Avalanche's EWC).

3 permuted-MNIST tasks (the first 8,000 images of MNIST's test split, task t permuted with seed t-1; task 1 unpermuted),
MLP 784-300-150-10, Adam 1e-3, batch 100, 6 epochs per task, the Fisher after each task, the accuracy matrix
on the last 2,000 images at the end, from the same initial weights and the same inputs:

* cl-tool: ``init`` once (not timed), then the 7 commands of the sequence as separate processes, as a shell script
  would run them (train-next, importance, train-next, importance --accumulate, train-next, importance --accumulate,
  evaluate), with ``--cache`` as given (the first command decodes and caches the data, the others read the cache);
* cl-tool batch: the same command lines in one ``cl-tool batch FILE`` process (torch imported once);
* Avalanche 0.6.0 (``pip install avalanche-lib``): one process, ``tensors_benchmark`` + ``EWC`` + ``Adam``.

One untimed cl-tool sequence first writes the decoded cache (Avalanche is handed the images decoded too).

Both are whole-process wall times (imports included), rounds interleaved; min and median are reported with the load.

    python tests/benchmarks/bench_sequence.py --data ylecun/mnist --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

AVALANCHE = r"""
import json, sys, time
import numpy as np, torch
from safetensors.torch import load_file
from avalanche.benchmarks import tensors_benchmark
from avalanche.training.supervised import EWC
from avalanche.training.plugins import EvaluationPlugin
from cl_tool.data import pixel_permutation
from cl_tool.models.paper import MLP

arrays, init, epochs, batch, lam, tasks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
data = np.load(arrays)
x = torch.from_numpy(data["images"]).float().div_(255).reshape(-1, 1, 28, 28)
y = torch.from_numpy(data["labels"]).long()
streams = []
for t in range(tasks):
    xt = x.reshape(len(x), -1)[:, pixel_permutation(t, 784)].reshape(-1, 1, 28, 28) if t > 0 else x
    streams.append((xt, y))
bench = tensors_benchmark(train_tensors=[(xt[:8000], yt[:8000]) for xt, yt in streams],
                          test_tensors=[(xt[8000:], yt[8000:]) for xt, yt in streams], task_labels=[0] * tasks)
model = MLP([784, 300, 150, 10])
model.load_state_dict(load_file(init))
strategy = EWC(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), criterion=torch.nn.CrossEntropyLoss(), ewc_lambda=lam,
               train_mb_size=batch, train_epochs=epochs, eval_mb_size=1000, device="cpu", evaluator=EvaluationPlugin(loggers=[]))
for experience in bench.train_stream:
    strategy.train(experience)
model.eval()
with torch.no_grad():
    acc = [float((model(xt[8000:]).argmax(1) == yt[8000:]).float().mean()) for xt, yt in streams]
print(json.dumps({"accuracy": acc}))
"""


def timed(argv: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout


def main() -> None:
    from _mnist import mnist_arrays, mnist_source

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="MNIST IDX folder or a dataset such as ylecun/mnist")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--lam", type=float, default=100.0)
    p.add_argument("--cache", default="auto", help="cl-tool's --cache for every command")
    p.add_argument("--work", default=None)
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-seq-"))
    data, prefix = mnist_source(args.data, work)
    images, labels = mnist_arrays(args.data)
    np_path = work / "mnist.npz"
    import numpy as np

    np.savez(np_path, images=images, labels=labels)
    cl = [sys.executable, "-m", "cl_tool", "-q"]
    a0 = work / "a0.safetensors"
    timed(cl + ["init", "--arch", "mlp", "--arch-arg", "sizes=784,300,150,10", "-o", str(a0), "--force"])
    env_cache = work / "cache"

    def task(t: int, part: str) -> str:
        split = prefix + ("[:8000]" if part == "train" else "[8000:]")
        return f"T{t + 1}={data}::split={split}" + (f",permute={t}" if t else "")

    def cl_sequence(round_: int, batch: bool = False) -> tuple[float, list[float], list[float]]:
        folder = work / f"cl{round_}{'-batch' if batch else ''}"
        folder.mkdir(exist_ok=True)
        common = ["--device", "cpu", "--cache", args.cache]
        steps, prev, sidecar = [], a0, None
        for t in range(args.tasks):
            out = folder / f"t{t + 1}.safetensors"
            pen = (
                ["--penalty", "ewc", "--lambda", str(args.lam), "--importance", str(sidecar)]
                if sidecar
                else ["--penalty", "none"]
            )
            steps.append(
                cl
                + [
                    "train-next",
                    str(prev),
                    "--data",
                    task(t, "train"),
                    "--epochs",
                    str(args.epochs),
                    "--batch-size",
                    "100",
                    "--optimizer",
                    "adam",
                    "--lr",
                    "0.001",
                    *pen,
                    "-o",
                    str(out),
                    "--force",
                    *common,
                ]
            )
            if t < args.tasks - 1:
                side = folder / f"t{t + 1}.importance.safetensors"
                acc = ["--accumulate", str(sidecar)] if sidecar else []
                steps.append(
                    cl
                    + [
                        "importance",
                        str(out),
                        "--data",
                        task(t, "train"),
                        "--method",
                        "fisher",
                        *acc,
                        "-o",
                        str(side),
                        "--force",
                        *common,
                    ]
                )
                sidecar = side
            prev = out
        ckpts = [str(folder / f"t{t + 1}.safetensors") for t in range(args.tasks)]
        steps.append(
            cl
            + [
                "evaluate",
                *ckpts,
                *[x for t in range(args.tasks) for x in ("--data", task(t, "test"))],
                "--json",
                *common,
            ]
        )
        if batch:  # the same lines, one process: `cl-tool batch FILE`
            import shlex

            script = folder / "sequence.txt"
            script.write_text("".join(shlex.join(argv[len(cl) :]) + "\n" for argv in steps))
            dt, out_text = timed(cl + ["batch", str(script)])
            return dt, [dt], json.loads(out_text)["accuracy"][-1]
        times, out_text = [], ""
        for argv in steps:
            dt, out_text = timed(argv)
            times.append(dt)
        return sum(times), times, json.loads(out_text)["accuracy"][-1]

    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; work {work}")
    os.environ["CL_TOOL_CACHE"] = str(env_cache)
    rows: dict[str, list[float]] = {
        "cl-tool (separate commands)": [],
        "cl-tool batch (one process)": [],
        "avalanche (one process)": [],
    }
    cl_sequence(-1)  # untimed: the first command decodes MNIST into the cache; Avalanche gets it decoded too
    for r in range(args.rounds):
        total, per_step, acc = cl_sequence(r)
        rows["cl-tool (separate commands)"].append(total)
        print(
            f"round {r + 1}: cl-tool {total:6.1f} s (steps {', '.join(f'{t:.1f}' for t in per_step)}), final accuracies {[round(a, 4) for a in acc]}",
            flush=True,
        )
        total, _, acc = cl_sequence(r, batch=True)
        rows["cl-tool batch (one process)"].append(total)
        print(f"round {r + 1}: cl-tool batch {total:6.1f} s, final accuracies {[round(a, 4) for a in acc]}", flush=True)
        dt, out = timed(
            [
                sys.executable,
                "-c",
                AVALANCHE,
                str(np_path),
                str(a0),
                str(args.epochs),
                "100",
                str(args.lam),
                str(args.tasks),
            ]
        )
        rows["avalanche (one process)"].append(dt)
        print(
            f"round {r + 1}: avalanche {dt:6.1f} s, final accuracies {[round(a, 4) for a in json.loads(out.strip().splitlines()[-1])['accuracy']]}",
            flush=True,
        )
    print(f"load after: {os.getloadavg()[0]:.2f}")
    for name, values in rows.items():
        print(
            f"{name:>30}: min {min(values):.1f} s, median {statistics.median(values):.1f} s over {len(values)} rounds"
        )


if __name__ == "__main__":
    main()
