"""Whole-process global magnitude pruning to 90 %: `cl-tool prune` vs torch.nn.utils.prune, and memory vs checkpoint size.

Both read the same checkpoint (vit_base_patch16_224: 86 M parameters, random init, ~346 MB), prune the
same tensors (cl-tool's default selection: weight matrices and kernels, not biases/norms/embeddings/
classifier) globally by |w|, and write a pruned safetensors file. Each runs in a fresh process; wall
time and that process's peak RSS (os.wait4) are reported, rounds interleaved, in the same run. With
--scale-arch (e.g. vit_large_patch16_224, 3.5x the parameters) cl-tool also prunes that checkpoint,
to show that its peak memory does not grow with the checkpoint (it streams one tensor at a time).

    python tests/benchmarks/bench_prune.py [--arch vit_base_patch16_224] [--scale-arch vit_large_patch16_224] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE = r"""
import sys, torch, timm
from torch.nn.utils import prune
from safetensors.torch import load_file, save_file
from cl_tool.checkpoint import load_checkpoint
from cl_tool.models import classifier_param_names
from cl_tool.pruning import select_prunable
src, dst, sparsity = sys.argv[1], sys.argv[2], float(sys.argv[3])
ckpt = load_checkpoint(src)
model = timm.create_model(ckpt.spec.arch, pretrained=False, num_classes=ckpt.spec.num_classes, **ckpt.spec.kwargs)
model.load_state_dict(ckpt.state)
del ckpt
named = dict(model.named_parameters())
chosen = select_prunable({n: p.detach() for n, p in named.items()}, classifier_names=classifier_param_names(model))
modules = dict(model.named_modules())
targets = [(modules[n.rsplit(".", 1)[0]], n.rsplit(".", 1)[1]) for n in chosen]
prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
for m, attr in targets:
    prune.remove(m, attr)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, dst)
"""


def run_measured(argv: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(err[-2000:], file=sys.stderr)
    return wall, usage.ru_maxrss / 1024, code


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_base_patch16_224")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--work", default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--scale-arch", default=None, help="a larger architecture pruned by cl-tool too (memory vs checkpoint size)"
    )
    p.add_argument("--skip-reference", action="store_true", help="only cl-tool (the reference needs ~5 GiB and ~30 s)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-prune-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoints = {}
    for arch in filter(None, (args.arch, args.scale_arch)):
        src = work / f"{arch}.safetensors"
        if not src.exists():
            subprocess.run([sys.executable, "-m", "cl_tool", "-q", "init", "--arch", arch, "-o", str(src)], check=True)
        checkpoints[arch] = src
        print(f"checkpoint {src} ({src.stat().st_size / 1e6:.0f} MB)")
    src = checkpoints[args.arch]
    # This process must stay small: a child's peak RSS (wait4) includes the pages it shared with this process
    # when it was forked, so importing torch here would add ~450 MiB to every child's figure.
    assert "torch" not in sys.modules, "the benchmark's own process must not import torch"
    torch_info = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__, torch.get_num_threads())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; torch {torch_info[0]}, threads {torch_info[1]}")
    floor = run_measured([sys.executable, "-c", "pass"])[1]
    print(f"peak RSS of an empty Python process started the same way: {floor:.0f} MiB")

    def cl_prune(path: Path, out: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "cl_tool",
            "-q",
            "prune",
            str(path),
            "--by",
            "magnitude",
            "--sparsity",
            str(args.sparsity),
            "-o",
            str(work / out),
            "--force",
        ]

    rows: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        cases = [("cl-tool prune", cl_prune(src, "cl.safetensors"))]
        if not args.skip_reference:
            cases.append(
                (
                    "torch global_unstructured",
                    [sys.executable, "-c", REFERENCE, str(src), str(work / "ref.safetensors"), str(args.sparsity)],
                )
            )
        if args.scale_arch:
            cases.append(
                (f"cl-tool prune {args.scale_arch}", cl_prune(checkpoints[args.scale_arch], "cl_large.safetensors"))
            )
        for name, argv in cases:
            wall, rss, code = run_measured(argv)
            rows.setdefault(name, []).append((wall, rss))
            print(
                f"{name:>40}: {wall:6.1f} s wall, peak RSS {rss:7.0f} MiB{'' if code == 0 else f'  (FAILED, exit {code})'}",
                flush=True,
            )
    print(f"load after: {os.getloadavg()[0]:.2f}")
    for name, values in rows.items():
        walls, rsss = sorted(v[0] for v in values), sorted(v[1] for v in values)
        print(
            f"{name:>40}: wall min {walls[0]:.2f} s median {walls[len(walls) // 2]:.2f} s; peak RSS min {rsss[0]:.0f} MiB "
            f"median {rsss[len(rsss) // 2]:.0f} MiB"
        )
    if args.skip_reference:
        return
    compare = (
        "import sys; from safetensors.numpy import load_file\n"
        "a, b = load_file(sys.argv[1]), load_file(sys.argv[2])\n"
        "za = sum(int((v == 0).sum()) for v in a.values()); zb = sum(int((v == 0).sum()) for v in b.values())\n"
        "d = sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in a)\n"
        "print(f'zeros: cl-tool {za:,}, reference {zb:,}; elements pruned by only one of them: {d}')"
    )
    subprocess.run(
        [sys.executable, "-c", compare, str(work / "cl.safetensors"), str(work / "ref.safetensors")], check=True
    )


if __name__ == "__main__":
    main()
