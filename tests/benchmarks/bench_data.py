"""Data-path benchmark (issue 14): cl-tool's per-batch pipeline against a hand-written torchvision baseline.

Generates imagefolders of synthetic 256x256 RGB JPEGs (10 classes) at each ``--sizes`` in
``--work``, then measures whole-process wall time and peak RSS (``/usr/bin/time``-like:
``resource.getrusage(RUSAGE_CHILDREN)`` of a wrapper process around each case, so worker
processes count too) of three commands:

* ``evaluate``: a forward pass over the task, accuracy;
* ``importance``: ``importance_sums(..., "fisher", fisher_labels="empirical")`` (the engine ``cl-tool importance`` uses);
* ``train``: one epoch of Adam on shuffled batches (what ``train-next --epochs 1`` does per step),

for ``--models``: ``tiny`` (global average pool + linear: negligible compute, so the data path
is what is measured) and ``resnet18`` (timm, 3x224x224). Both sides use resnet18's timm eval
transform (``timm.data.resolve_data_config`` + ``create_transform``: resize 235 bicubic, centre
crop 224, ImageNet mean/std), the same ``--workers`` and ``--batch-size``, the same model
compute. Sides:

* ``baseline``: ``torchvision.datasets.ImageFolder`` + that transform + ``DataLoader``;
* ``cl``: ``open_task`` + ``Task.batches`` with ``--cache auto`` and a fresh cache folder per
  size and model, run as a shell sequence would (evaluate, importance, train: the first
  command decodes and fills the decoded cache, the later ones read it);
* ``cl-nocache``: the same with ``--cache none`` (every command decodes every JPEG).

* ``cli``: the real commands, as a shell script runs them: ``cl-tool evaluate``, ``cl-tool importance
  --method fisher``, ``cl-tool train-next --epochs 1 --penalty none`` on a checkpoint made by
  ``cl-tool init`` (resnet18: the same timm eval transform; ``tiny``: the built-in ``mlp`` with
  ``sizes=150528,10``, bilinear resize), ``--cache auto`` in a fresh cache folder (the first command
  decodes). Wall time and peak RSS include everything the command does (imports, checkpoint, writing).

Every case is a fresh process; sides are interleaved. The
targets (issue 14): peak RSS at the largest size within 15 % of the smallest for every
command; whole-process time within 1/0.85 of the baseline.

    python tests/benchmarks/bench_data.py --work /tmp/bench_data --sizes 2000,16000 --models tiny,resnet18
    python tests/benchmarks/bench_data.py --work /tmp/bench_data --sizes 200,400 --models tiny   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's cl_tool, also for the cases (PYTHONPATH below)
COMMANDS = ("evaluate", "importance", "train")
SIDES = ("baseline", "cl", "cl-nocache", "cli")

WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.run(sys.argv[1:])\n"
    "print(json.dumps({'rc': p.returncode, 'wall_s': time.perf_counter() - t,"
    " 'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n"
)


# ----------------------------------------------------------------------------------------------- data


def make_imagefolder(folder: Path, n: int, *, classes: int = 10, size: int = 256, seed: int = 0) -> Path:
    """``n`` synthetic JPEGs: smooth random colour fields plus noise (decode cost like photos, ~15-25 KB each)."""
    done = folder / ".complete"
    if done.exists():
        return folder
    import numpy as np
    from PIL import Image

    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (folder / f"class_{c:02d}").mkdir(parents=True)
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        arr = np.asarray(low, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(
            folder / f"class_{i % classes:02d}" / f"{i:06d}.jpg", quality=90
        )
    done.write_text(str(n))
    return folder


# ----------------------------------------------------------------------------------------------- one case (in a fresh process)


def run_case(cfg: dict) -> dict:
    import torch

    from cl_tool.data import GlobalBatchSampler, Preprocess, TaskSpec, open_task
    from cl_tool.models import build_model, default_spec

    t_start = time.perf_counter()
    device = torch.device(
        cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    from cl_tool.data.preprocess import resolve_timm_data_config

    spec = default_spec("resnet18", {}, (3, 224, 224), 10)
    spec.data_config = resolve_timm_data_config(spec.arch, spec.input_shape, spec.mean, spec.std)  # as `init` records
    pre = Preprocess.for_model(spec)  # resnet18's timm data config: both sides preprocess with it
    torch.manual_seed(0)
    if cfg["model"] == "resnet18":
        model = build_model(spec)
    else:
        model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 10))
    model.to(device)
    B, W, cmd = cfg["batch_size"], cfg["workers"], cfg["command"]
    train = cmd == "train"
    task = None

    if cfg["side"] == "baseline":
        from timm.data import create_transform
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(cfg["folder"], transform=create_transform(**pre.data_config, is_training=False))
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=B,
            shuffle=train,
            num_workers=W,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(0),
        )
        n = len(ds)

        def batches():
            for x, y in loader:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    else:
        task = open_task(
            TaskSpec(cfg["folder"]),
            pre,
            cache="auto" if cfg["side"] == "cl" else "none",
            workers=W,
            cache_dir=cfg["cache_dir"],
        )
        n = len(task)

        def batches():
            order = None
            if train:
                order = GlobalBatchSampler(n, B, seed=0)
                order.set_epoch(0)
            for b in task.batches(order, batch_size=B, device=device):
                yield b.x, b.y

    seen = 0
    t0 = time.perf_counter()
    if cmd == "evaluate":
        model.eval()
        correct = 0
        with torch.inference_mode():
            for x, y in batches():
                correct += int((model(x).argmax(1) == y).sum())
                seen += len(y)
    elif cmd == "importance":
        from cl_tool.importance import importance_sums

        _, seen = importance_sums(model, batches(), "fisher", fisher_labels="empirical", device=device)
    else:
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for x, y in batches():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            seen += len(y)
    loop = time.perf_counter() - t0
    info = {"samples": seen, "loop_s": loop, "in_process_s": time.perf_counter() - t_start}
    if task is not None:
        info.update(decoded=task.stats["decoded"], cache=task.cache)
        task.close()
    if seen != n:
        raise SystemExit(f"saw {seen} samples of {n}")
    return info


# ----------------------------------------------------------------------------------------------- driver


def cli_argv(cfg: dict) -> list[str]:
    """The real command for a ``cli`` case (its checkpoint made by ``init_checkpoint``)."""
    work = Path(cfg["cache_dir"]).parent
    common = [
        "--data",
        cfg["folder"],
        "--batch-size",
        str(cfg["batch_size"]),
        "--workers",
        str(cfg["workers"]),
        "--cache",
        "auto",
        "--cache-dir",
        cfg["cache_dir"] + "-cli",  # its own cold cache: not the one the in-process cl side fills
        "--device",
        cfg["device"],
        "--json",
    ]
    ckpt = cfg["checkpoint"]
    cl = [sys.executable, "-m", "cl_tool"]
    if cfg["command"] == "evaluate":
        return [*cl, "evaluate", ckpt, *common]
    if cfg["command"] == "importance":
        return [
            *cl,
            "importance",
            ckpt,
            "--method",
            "fisher",
            *common,
            "-o",
            str(work / "bench.importance.safetensors"),
            "--force",
        ]
    return [
        *cl,
        "train-next",
        ckpt,
        "--epochs",
        "1",
        "--penalty",
        "none",
        "--optimizer",
        "adam",
        "--lr",
        "1e-3",
        *common,
        "-o",
        str(work / "bench_trained.safetensors"),
        "--force",
    ]


def init_checkpoint(work: Path, model: str, env: dict) -> str:
    path = work / f"{model}.safetensors"
    arch = ["--arch", "resnet18"] if model == "resnet18" else ["--arch", "mlp", "--arch-arg", "sizes=150528,10"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cl_tool",
            "init",
            *arch,
            "--input-shape",
            "3x224x224",
            "--num-classes",
            "10",
            "-o",
            str(path),
            "--force",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    return str(path)


def _env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_DATASETS_OFFLINE": "1",
    }


def measure(cfg: dict) -> dict:
    cli = cfg["side"] == "cli"
    case = cli_argv(cfg) if cli else [sys.executable, str(Path(__file__).resolve()), "--_case", json.dumps(cfg)]
    p = subprocess.run([sys.executable, "-c", WRAPPER, *case], env=_env(), capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or len(lines) < (1 if cli else 2) or json.loads(lines[-1])["rc"]:
        raise SystemExit(f"case {cfg} failed:\n{p.stderr[-3000:]}")
    wrapper = json.loads(lines[-1])
    if cli:  # the whole command is the loop: its samples/s include start-up
        return {"samples": cfg["size"], "loop_s": wrapper["wall_s"], **wrapper}
    return {**json.loads(lines[-2]), **wrapper}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", help="scratch folder for the imagefolders and caches (required)")
    ap.add_argument("--sizes", default="2000,16000", help="comma-separated numbers of images")
    ap.add_argument("--models", default="tiny,resnet18", help="tiny and/or resnet18")
    ap.add_argument("--commands", default=",".join(COMMANDS))
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers on both sides (default: cl-tool's default)"
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._case:
        print(json.dumps(run_case(json.loads(a._case))), flush=True)
        return
    if not a.work:
        ap.error("--work is required")
    from cl_tool.data import default_workers

    workers = default_workers() if a.workers is None else a.workers
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in a.sizes.split(",")]
    rows = []
    for size in sizes:
        t = time.perf_counter()
        folder = make_imagefolder(work / f"images-{size}", size)
        print(f"# imagefolder of {size} JPEGs ready ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
        for model in a.models.split(","):
            ckpt = init_checkpoint(work, model, _env()) if "cli" in a.sides.split(",") else None
            cache_dir = work / f"cache-{size}-{model}"
            for d in (cache_dir, Path(f"{cache_dir}-cli")):  # both cl sides start cold: their first command fills it
                shutil.rmtree(d, ignore_errors=True)
            for command in a.commands.split(","):
                for side in a.sides.split(","):  # interleaved
                    cfg = {
                        "side": side,
                        "command": command,
                        "model": model,
                        "folder": str(folder),
                        "cache_dir": str(cache_dir),
                        "workers": workers,
                        "batch_size": a.batch_size,
                        "device": a.device,
                        "size": size,
                        "checkpoint": ckpt,
                    }
                    r = measure(cfg)
                    row = {
                        "size": size,
                        "model": model,
                        "command": command,
                        "side": side,
                        "workers": workers,
                        "wall_s": round(r["wall_s"], 2),
                        "peak_rss_mb": round(r["peak_rss_mb"], 1),
                        "loop_s": round(r["loop_s"], 2),
                        "samples_per_s": round(r["samples"] / max(r["loop_s"], 1e-9), 1),
                        **({"decoded": r["decoded"], "cache": r["cache"]} if "decoded" in r else {}),
                    }
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
            for d in (cache_dir, Path(f"{cache_dir}-cli")):
                shutil.rmtree(d, ignore_errors=True)
    checks = []
    small, large = min(sizes), max(sizes)
    for row in rows:
        if row["side"] == "baseline":
            continue
        base = next(
            r for r in rows if r["side"] == "baseline" and all(r[k] == row[k] for k in ("size", "model", "command"))
        )
        checks.append(
            {
                **{k: row[k] for k in ("size", "model", "command", "side")},
                "time_vs_baseline": round(row["wall_s"] / base["wall_s"], 3),
                "time_ok(<=1/0.85)": row["wall_s"] <= base["wall_s"] / 0.85,
            }
        )
    if large != small:
        for row in rows:
            if row["size"] == large:
                s = next(
                    r for r in rows if r["size"] == small and all(r[k] == row[k] for k in ("model", "command", "side"))
                )
                checks.append(
                    {
                        **{k: row[k] for k in ("model", "command", "side")},
                        "rss_large_vs_small": round(row["peak_rss_mb"] / s["peak_rss_mb"], 3),
                        "rss_ok(<=1.15)": row["peak_rss_mb"] <= 1.15 * s["peak_rss_mb"],
                    }
                )
    result = {"machine": {"cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0]}, "rows": rows, "checks": checks}
    hdr = (
        f"{'size':>6} {'model':>8} {'command':>10} {'side':>10} {'wall s':>8} {'peak MB':>8} {'loop s':>7} {'img/s':>7}"
    )
    print(hdr)
    for r in rows:
        print(
            f"{r['size']:>6} {r['model']:>8} {r['command']:>10} {r['side']:>10} {r['wall_s']:>8.2f} {r['peak_rss_mb']:>8.0f} {r['loop_s']:>7.2f} {r['samples_per_s']:>7.0f}"
        )
    for c in checks:
        print(json.dumps(c))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
