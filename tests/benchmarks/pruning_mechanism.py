"""Why the training regime decides signal vs magnitude pruning: measurements on the checkpoints of a pruning run.

For every task-1 checkpoint that ``reproduce.py sample_configs/experiments/pruning_mnist_mlp.toml`` wrote (runs
``dense`` and ``dense-shift2``, every seed), on the 2,000 evaluation images:

* rare units: hidden units (both hidden layers) whose pre-activation is positive on fewer than 5 % of the images;
  their share, and the mean |outgoing weight| of rare units ÷ that of the other units;
* the overlap of the weights that signal and magnitude keep at 90 % (one global ranking over the three weight
  matrices): |kept by both| ÷ |kept by one|;
* among the weights magnitude keeps and signal prunes: the share that leave a rare unit;
* first-layer weights on pixels that are 0 in every evaluation image (MNIST's empty border; signal scores them 0):
  their mean |w| ÷ that of the other first-layer weights, and their share of the 10 % magnitude keeps;
* the share of the 300→150 matrix each ranking keeps at 90 %.

    python tests/benchmarks/pruning_mechanism.py --runs runs/pruning_mnist_mlp --data ylecun/mnist
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def measure(ckpt_path: Path, task) -> dict[str, float]:
    import torch

    from cl_tool.checkpoint import load_model
    from cl_tool.importance import compute_importance

    _, model = load_model(ckpt_path)
    model.eval()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    active = [torch.zeros(m.out_features) for m in linears[:-1]]
    count = 0
    hooks = [
        m.register_forward_hook(lambda m, i, o, k=k: active[k].add_((o > 0).float().sum(0)))
        for k, m in enumerate(linears[:-1])
    ]
    with torch.no_grad():
        for b in task.batches(batch_size=500):
            model(b.x)
            count += len(b.y)
    for h in hooks:
        h.remove()
    rare = [a / count < 0.05 for a in active]
    out_w = [linears[k + 1].weight.detach().abs().mean(0) for k in range(len(rare))]  # mean |outgoing weight| per unit
    rare_w = torch.cat([w[r] for w, r in zip(out_w, rare)])
    other_w = torch.cat([w[~r] for w, r in zip(out_w, rare)])
    signal = compute_importance(model, ((b.x, b.y) for b in task.batches(batch_size=500)), "signal")
    names = [n for n, p in model.named_parameters() if n.endswith("weight")]
    params = dict(model.named_parameters())

    def kept(scores: dict) -> torch.Tensor:
        flat = torch.cat([scores[n].reshape(-1) for n in names])
        k = round(0.1 * flat.numel())
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        mask[flat.topk(k).indices] = True
        return mask

    by_sig = kept(signal)
    by_mag = kept({n: params[n].detach().abs() for n in names})
    # which weights leave a rare unit: the columns of the layer after each hidden layer
    leaves_rare = torch.cat(
        [
            (
                torch.zeros_like(params[n], dtype=torch.bool) if i == 0 else rare[i - 1][None, :].expand_as(params[n])
            ).reshape(-1)
            for i, n in enumerate(names)
        ]
    )
    mag_only = by_mag & ~by_sig
    # first-layer weights whose input pixel is 0 in every evaluation image (MNIST's empty border): signal scores them 0
    pixel_sum = torch.zeros(linears[0].in_features)
    with torch.no_grad():
        for b in task.batches(batch_size=500):
            pixel_sum += b.x.reshape(len(b.x), -1).abs().sum(0)
    dead = pixel_sum == 0
    first = params[names[0]].detach().abs()
    dead_in = torch.cat(
        [
            (dead[None, :].expand_as(first) if i == 0 else torch.zeros_like(params[n], dtype=torch.bool)).reshape(-1)
            for i, n in enumerate(names)
        ]
    )
    sizes = [params[n].numel() for n in names]
    layer2 = slice(sizes[0], sizes[0] + sizes[1])  # the 300→150 matrix
    return {
        "mag_keeps_layer2": float(by_mag[layer2].float().mean()),
        "sig_keeps_layer2": float(by_sig[layer2].float().mean()),
        "dead_pixels": float(dead.float().mean()),
        "dead_weight_ratio": float(first[:, dead].mean() / first[:, ~dead].mean()),
        "mag_kept_dead": float((by_mag & dead_in).sum() / by_mag.sum()),
        "rare_share": float(torch.cat(rare).float().mean()),
        "rare_weight_ratio": float(rare_w.mean() / other_w.mean()) if len(rare_w) else float("nan"),
        "overlap": float((by_sig & by_mag).sum() / (by_sig | by_mag).sum()),
        "mag_only_from_rare": float((mag_only & leaves_rare).sum() / max(1, int(mag_only.sum()))),
    }


def main() -> None:
    from _mnist import mnist_source

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="the --out folder of the pruning_mnist_mlp.toml run")
    p.add_argument("--data", required=True, help="MNIST: ylecun/mnist, a saved copy or an IDX folder")
    p.add_argument("--split", default="[8000:]")
    args = p.parse_args()
    from cl_tool.checkpoint import load_checkpoint
    from cl_tool.data import Preprocess, TaskSpec, open_task

    runs = Path(args.runs)
    source, split_name = mnist_source(args.data, runs)
    print(
        "| run | seeds | rare units | rare ÷ other mean ∣outgoing w∣ | kept-set overlap at 90 % | magnitude-only kept "
        "weights leaving a rare unit | mean ∣w∣ on always-0 pixels ÷ on others | magnitude's kept 10 % on always-0 pixels | share of the 300→150 matrix kept: magnitude / signal |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for run in ("dense", "dense-shift2"):
        ckpts = sorted((runs / run).glob("seed*/task1.safetensors"))
        if not ckpts:
            continue
        pre = Preprocess.for_model(load_checkpoint(ckpts[0]).spec)
        task = open_task(TaskSpec(str(source), split=split_name + args.split), pre, workers=0)
        rows = [measure(c, task) for c in ckpts]
        task.close()

        def pm(key: str, pct: bool = True, rows=rows) -> str:
            values = [r[key] for r in rows]
            m, s = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{100 * m:.1f} ± {100 * s:.1f} %" if pct else f"{m:.2f} ± {s:.2f}"

        print(
            f"| {run} | {len(rows)} | {pm('rare_share')} | {pm('rare_weight_ratio', False)} | {pm('overlap')} | "
            f"{pm('mag_only_from_rare')} | {pm('dead_weight_ratio', False)} | {pm('mag_kept_dead')} | "
            f"{pm('mag_keeps_layer2')} / {pm('sig_keeps_layer2')} |"
        )
        print(f"({run}: pixels 0 in every evaluation image: {pm('dead_pixels')} of the 784)", file=sys.stderr)


if __name__ == "__main__":
    main()
