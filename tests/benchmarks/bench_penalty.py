"""Step time of train-next's training loop with the stabilized penalty vs --penalty none (issue 4).

Same model, data, batch and optimiser; the penalty run adds 2c(θ−θ*) to the gradients with fused
_foreach ops (and keeps θ*, Ω and the coefficients in fp32). Prints ms/step and the overhead.

    python tests/benchmarks/bench_penalty.py [--models resnet18,vit] [--batch-size 32] [--steps 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time


def build(name: str):
    from cl_tool.models import ModelSpec, build_model

    if name == "resnet18":
        spec = ModelSpec(arch="resnet18", input_shape=(3, 64, 64), num_classes=10, source="timm")
    elif name == "vit":
        spec = ModelSpec(
            arch="vit_tiny_patch16_224",
            kwargs={"img_size": 28, "patch_size": 4},
            input_shape=(1, 28, 28),
            num_classes=10,
            source="timm",
        )
    elif name == "mlp":
        spec = ModelSpec(arch="mlp", kwargs={"sizes": "784,300,150,10"}, input_shape=(1, 28, 28), num_classes=10)
    elif name == "cnn":
        spec = ModelSpec(arch="cnn", input_shape=(1, 28, 28), num_classes=10)
    else:
        raise SystemExit(f"unknown model {name}")
    return spec, build_model(spec)


class InMemoryTask:
    """What ``train`` needs of a ``cl_tool.data.Task``, over tensors already in memory (the step alone is timed)."""

    def __init__(self, x, y):
        self.x, self.y, self.num_samples = x, y, len(x)

    def batches(self, *, batch_size, device, **_):
        from types import SimpleNamespace

        for i in range(0, self.num_samples - batch_size + 1, batch_size):
            index = slice(i, i + batch_size)
            yield SimpleNamespace(x=self.x[index].to(device), y=self.y[index].to(device))


def time_steps(name: str, penalty_kind: str, args) -> list[float]:
    import torch

    from cl_tool.penalty import QuadraticPenalty
    from cl_tool.training import TrainConfig, train

    torch.manual_seed(0)
    spec, model = build(name)
    device = torch.device(args.device)
    model.to(device)
    n = args.batch_size * (args.steps + args.warmup)
    x = torch.randn((n,) + tuple(spec.input_shape))
    y = torch.randint(0, 10, (n,))
    params = [p for p in model.parameters() if p.requires_grad]
    pen = None
    if penalty_kind != "none":
        pen = QuadraticPenalty(
            penalty_kind, params, [p.detach() for p in params], [torch.rand_like(p) for p in params], lam=100.0
        )
    stamps: list[float] = []

    def tick(_n=1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    cfg = TrainConfig(optimizer="adam", lr=1e-3, epochs=1, batch_size=args.batch_size, precision=args.precision)
    train(model, InMemoryTask(x, y), cfg, device=device, penalty=pen, progress=tick)
    steps = [b - a for a, b in zip(stamps[:-1], stamps[1:])][args.warmup :]
    return steps


def penalty_ms(name: str, reps: int = 50) -> float:
    """Median time of QuadraticPenalty.add_gradient_ (the whole per-step penalty cost) in ms."""
    import torch

    from cl_tool.penalty import QuadraticPenalty

    _, model = build(name)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    pen = QuadraticPenalty(
        "stabilized", params, [p.detach() + 0.01 for p in params], [torch.rand_like(p) for p in params], lam=100.0
    )
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        pen.add_gradient_(1e-3)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    import torch

    from cl_tool.runtime import keep_freed_memory

    keep_freed_memory()  # as train-next does

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,vit")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="alternate none/stabilized this many times and take medians")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    args = p.parse_args()
    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, batch {args.batch_size}"
    )
    for name in args.models.split(","):
        res = {"none": [], "stabilized": []}
        for _ in range(args.repeats):
            for kind in ("none", "stabilized"):
                res[kind] += time_steps(name, kind, args)
        med = {k: statistics.median(v) * 1000 for k, v in res.items()}
        direct = penalty_ms(name)
        n_params = sum(p.numel() for p in build(name)[1].parameters())
        print(
            f"{name:>9} ({n_params / 1e6:.1f} M params): none {med['none']:.1f} ms/step, stabilized {med['stabilized']:.1f} ms/step, "
            f"overhead {100 * (med['stabilized'] / med['none'] - 1):+.1f} %  (median of {len(res['none'])} steps each); "
            f"the penalty gradient alone: {direct:.2f} ms/step = {100 * direct / med['none']:.2f} % of a step",
            flush=True,
        )


if __name__ == "__main__":
    main()
