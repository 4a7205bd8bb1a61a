"""Issue 26 item 1: the first command on a new image folder, whole process, against a hand-written torchvision loader.

``--images`` synthetic 256x256 JPEGs in 10 class folders (``bench_data.make_imagefolder``), a model of negligible
compute at 3x224x224 (the built-in ``mlp`` with ``sizes=150528,10``: flatten + one linear layer; built-in decode:
RGB, bilinear resize to 224x224), ``--batch-size`` samples per batch on both sides (evaluate's default, 512). Sides,
each a fresh process, run in interleaved rounds:

* ``cl-default``: ``cl-tool evaluate CKPT --data FOLDER --device cpu`` at the default ``--workers`` and ``--cache``
  (auto) with a cold decoded cache (a new, empty ``--cache-dir`` every round): the first pass decodes every JPEG
  and writes the cache file;
* ``cl-wN``: the same with ``--workers N``;
* ``torch-wN``: ``torchvision.datasets.ImageFolder`` (transform ``Resize((224, 224))`` (bilinear on PIL images) +
  ``ToTensor()`` + ``Normalize`` with the checkpoint's mean/std) + ``DataLoader(num_workers=N)``, the same linear
  layer from the checkpoint, accuracy.

N is every value of ``--workers`` (default: the machine's CPUs, ``os.cpu_count()``). Reported per side: wall time
(min / median over the rounds), peak RSS of the largest process (``ru_maxrss``, what ``/usr/bin/time -f %M``
shows) and peak PSS of the whole process tree (sampled every 50 ms from ``/proc``: workers included, shared pages
counted once); the ratios of the issue's targets per round (cl-default / torch-w<CPUs> ≤ 1, cl-wN / torch-wN ≤ 1/0.95,
peak RSS ≤ 1.1×); the load average before and after. Both sides must report the same accuracy (the same pixels).

    python tests/benchmarks/bench_cold.py --work /tmp/bench_cold                    # 8,000 images, 3 rounds
    python tests/benchmarks/bench_cold.py --work /tmp/bench_cold --images 1000 --rounds 2   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))


def _env(root: Path = ROOT) -> dict:
    return {**os.environ, "PYTHONPATH": str(root), "HF_DATASETS_OFFLINE": "1"}


# ----------------------------------------------------------------------------------------------- the hand-written side


def baseline(folder: str, checkpoint: str, workers: int, batch_size: int) -> None:
    """What a user writes by hand: ImageFolder + DataLoader + the checkpoint's linear layer; prints the accuracy."""
    import torch
    from safetensors import safe_open
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    with safe_open(checkpoint, "pt") as f:
        spec = json.loads(f.metadata()["cl_tool.model"])
        weight, bias = f.get_tensor("net.1.weight"), f.get_tensor("net.1.bias")
    c, h, w = spec["input_shape"]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c * h * w, weight.shape[0]))
    with torch.no_grad():
        model[1].weight.copy_(weight)
        model[1].bias.copy_(bias)
    tf = transforms.Compose(
        [transforms.Resize((h, w)), transforms.ToTensor(), transforms.Normalize(spec["mean"], spec["std"])]
    )
    loader = torch.utils.data.DataLoader(ImageFolder(folder, transform=tf), batch_size=batch_size, num_workers=workers)
    model.eval()
    correct = n = 0
    with torch.inference_mode():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            n += len(y)
    print(json.dumps({"accuracy": correct / n, "samples": n}))


# ----------------------------------------------------------------------------------------------- measuring one process tree


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo.extend(int(c) for c in fh.read().split())
        except OSError:
            pass
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_tree(root: str, argv: list[str]) -> dict:
    """Run ``argv`` with cl-tool from ``root``: wall seconds, CPU seconds (user + system, every process), peak RSS of
    its largest process and peak PSS of its whole tree (MB), its stdout."""
    peak = [0]
    t = time.perf_counter()
    p = subprocess.Popen(
        argv, env=_env(Path(root)), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], sum(_pss_kb(q) for q in _tree(p.pid)))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = p.communicate()
    wall = time.perf_counter() - t
    done.set()
    th.join()
    if p.returncode:
        raise SystemExit(f"{' '.join(argv)} failed (exit {p.returncode}):\n{err[-3000:]}")
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # the whole tree (waited-for descendants included)
    maxrss = ru.ru_maxrss / 1024  # the largest process of the tree
    return {
        "wall_s": wall,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "peak_rss_mb": maxrss,
        "tree_pss_mb": peak[0] / 1024,
        "stdout": out,
    }


def measure(argv: list[str], root: Path = ROOT) -> dict:
    """:func:`run_tree` in a fresh wrapper process, so that ``ru_maxrss`` is this case's alone."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import bench_cold as b;"
        "r = b.run_tree(sys.argv[2], sys.argv[3:]); print(json.dumps(r))"
    )
    p = subprocess.run([sys.executable, "-c", code, str(HERE), str(root), *argv], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stdout[-2000:] + p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def _accuracy(side: str, stdout: str) -> float:
    doc = json.loads(stdout)
    return float(doc["accuracy"] if side.startswith("torch") else doc["accuracy"][0][0])


# ----------------------------------------------------------------------------------------------- driver


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="scratch folder: the images, the checkpoint, the cold caches (required)")
    ap.add_argument("--images", type=int, default=8000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--workers", default=None, help="comma-separated N of the equal-workers sides (default: CPUs)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument(
        "--base",
        type=Path,
        default=None,
        help="another checkout of cl-tool: its cl sides too (base-...), for before/after",
    )
    ap.add_argument("--_baseline", nargs=4, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._baseline:
        folder, ckpt, w, b = a._baseline
        baseline(folder, ckpt, int(w), int(b))
        return
    if a.work is None:
        ap.error("--work is required")
    from bench_data import make_imagefolder

    cpus = os.cpu_count() or 1
    workers = [int(w) for w in a.workers.split(",")] if a.workers else [cpus]
    a.work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    folder = make_imagefolder(a.work / f"images-{a.images}", a.images)
    print(f"# imagefolder of {a.images} JPEGs ready ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    ckpt = a.work / "mlp224.safetensors"
    cl = [sys.executable, "-m", "cl_tool"]
    if not ckpt.exists():
        subprocess.run(
            [*cl, "init", "--arch", "mlp", "--arch-arg", "sizes=150528,10", "--input-shape", "3x224x224"]
            + ["--num-classes", "10", "-o", str(ckpt)],
            env=_env(),
            check=True,
            capture_output=True,
        )
    cache = a.work / "cold-cache"

    def cl_side(extra: list[str]) -> list[str]:
        return [*cl, "evaluate", str(ckpt), "--data", str(folder), "--device", "cpu", "--json"] + [
            *("--batch-size", str(a.batch_size), "--cache-dir", str(cache)),
            *extra,
        ]

    sides: dict[str, list[str]] = {"cl-default": cl_side([])}
    roots = {"cl-default": ROOT}
    if a.base:
        sides["base-default"], roots["base-default"] = cl_side([]), a.base
    for w in workers:
        sides[f"cl-w{w}"] = cl_side(["--workers", str(w)])
        if a.base:
            sides[f"base-w{w}"], roots[f"base-w{w}"] = cl_side(["--workers", str(w)]), a.base
        sides[f"torch-w{w}"] = [sys.executable, str(Path(__file__).resolve()), "--_baseline"] + [
            *(str(folder), str(ckpt), str(w), str(a.batch_size))
        ]
    load_before = os.getloadavg()
    measure(sides[f"torch-w{workers[0]}"])  # untimed: the JPEGs and the libraries in the page cache for every side
    rows: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(a.rounds):
        for name, argv_ in sides.items():  # interleaved
            shutil.rmtree(cache, ignore_errors=True)  # cold: every cl-tool command starts without a decoded cache
            res = measure(argv_, roots.get(name, ROOT))
            res["accuracy"] = _accuracy(name, res.pop("stdout"))
            rows[name].append(res)
            print(
                f"# round {r + 1} {name}: {res['wall_s']:.2f} s, CPU {res['cpu_s']:.2f} s, peak RSS {res['peak_rss_mb']:.0f} MB, "
                f"tree PSS {res['tree_pss_mb']:.0f} MB, load {os.getloadavg()[0]:.2f}",
                file=sys.stderr,
                flush=True,
            )
    shutil.rmtree(cache, ignore_errors=True)
    load_after = os.getloadavg()
    accs = {name: {round(x["accuracy"], 6) for x in rs} for name, rs in rows.items()}
    if len(set().union(*accs.values())) != 1:
        print(f"WARNING: the sides report different accuracies {accs}: not the same pixels", file=sys.stderr)

    def stat(name: str, key: str) -> tuple[float, float]:
        v = [x[key] for x in rows[name]]
        return min(v), statistics.median(v)

    def ratios(num: str, den: str, key: str) -> tuple[float, float]:
        v = [x[key] / y[key] for x, y in zip(rows[num], rows[den], strict=True)]
        return min(v), statistics.median(v)

    print(
        f"{a.images} JPEGs 256x256 -> 3x224x224, batch {a.batch_size}, {a.rounds} rounds, {cpus} CPUs, "
        f"load average {load_before[0]:.2f} before / {load_after[0]:.2f} after"
    )
    print(
        f"  {'side':12s} {'wall min':>9s} {'median':>7s} {'CPU s med':>10s} {'peak RSS MB':>12s} {'tree PSS MB':>12s}"
    )
    for name in sides:
        w, rss, pss = stat(name, "wall_s"), stat(name, "peak_rss_mb"), stat(name, "tree_pss_mb")
        cpu = stat(name, "cpu_s")
        print(f"  {name:12s} {w[0]:9.2f} {w[1]:7.2f} {cpu[1]:10.2f} {rss[1]:12.0f} {pss[1]:12.0f}")
    checks = [("cl-default", f"torch-w{cpus if cpus in workers else workers[0]}", 1.0)]
    checks += [(f"cl-w{w}", f"torch-w{w}", 1 / 0.95) for w in workers]
    if a.base:
        checks += [("cl-default", "base-default", 1.0)] + [(f"cl-w{w}", f"base-w{w}", 1.0) for w in workers]
    result = {"images": a.images, "rounds": a.rounds, "cpus": cpus, "load": [load_before, load_after], "checks": []}
    for num, den, target in checks:
        t_ = ratios(num, den, "wall_s")
        m_ = ratios(num, den, "peak_rss_mb")
        p_ = ratios(num, den, "tree_pss_mb")
        c_ = ratios(num, den, "cpu_s")
        print(
            f"  {num} / {den}: time min {t_[0]:.3f} median {t_[1]:.3f} (target <= {target:.3f}); CPU median {c_[1]:.3f}; "
            f"peak RSS median {m_[1]:.3f}, tree PSS median {p_[1]:.3f} (target <= 1.1)"
        )
        result["checks"].append({"num": num, "den": den, "time": t_, "cpu": c_, "peak_rss": m_, "tree_pss": p_})
    if a.out:
        a.out.write_text(json.dumps({**result, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
