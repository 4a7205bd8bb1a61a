"""Whole-process global magnitude pruning of vit_base_patch16_224 to 90 %: `cl-tool prune` vs torch.nn.utils.prune.

Both read the same checkpoint (86 M parameters, random init, ~346 MB), prune the same tensors (cl-tool's
default selection: weight matrices and kernels, not biases/norms/embeddings/classifier) globally by |w|,
and write a pruned safetensors file. Each runs in a fresh process; wall time and that process's peak
RSS (os.wait4) are reported, in the same run, on the same machine.

    python tests/benchmarks/bench_prune.py [--arch vit_base_patch16_224] [--sparsity 0.9] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE = r'''
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
'''


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
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-prune-"))
    src = work / "model.safetensors"
    if not src.exists():
        subprocess.run([sys.executable, "-m", "cl_tool", "-q", "init", "--arch", args.arch, "-o", str(src)], check=True)
    print(f"checkpoint {src} ({src.stat().st_size / 1e6:.0f} MB), {os.cpu_count()} CPUs")
    import torch

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for r in range(args.repeats):
        for name, argv in (
            ("cl-tool prune", [sys.executable, "-m", "cl_tool", "-q", "prune", str(src), "--by", "magnitude", "--sparsity", str(args.sparsity),
                               "-o", str(work / "cl.safetensors"), "--force"]),
            ("torch global_unstructured", [sys.executable, "-c", REFERENCE, str(src), str(work / "ref.safetensors"), str(args.sparsity)]),
        ):
            wall, rss, code = run_measured(argv)
            print(f"{name:>26}: {wall:6.1f} s wall, peak RSS {rss:7.0f} MiB{'' if code == 0 else f'  (FAILED, exit {code})'}", flush=True)
    from safetensors.torch import load_file

    a, b = load_file(str(work / "cl.safetensors")), load_file(str(work / "ref.safetensors"))
    pruned_a = sum(int((v == 0).sum()) for v in a.values())
    pruned_b = sum(int((v == 0).sum()) for v in b.values())
    differ = sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in a)
    print(f"zeros: cl-tool {pruned_a:,}, reference {pruned_b:,}; elements pruned by only one of them: {differ}")


if __name__ == "__main__":
    main()
