"""Benchmark: cl_tool.pruning.global_masks vs torch.nn.utils.prune.global_unstructured.

Usage::

    python tests/benchmarks/bench_prune_core.py [--model vit_base_patch16_224] [--sparsity 0.9] [--json]

Each method runs in its own subprocess on the same randomly initialised timm model
(``pretrained=False``, seed 0) with the same scores, ``|w|`` of every parameter (the whole
``named_parameters()``, 86.6 M elements for ViT-B/16):

* ``cl_tool``: ``global_masks(scores, s)`` (timed alone), then ``apply_masks`` on the
  parameters (timed as "total");
* ``torch``: ``prune.global_unstructured(..., pruning_method=prune.L1Unstructured,
  importance_scores=scores, amount=k)`` followed by ``prune.remove`` on every parameter,
  with the same integer ``k = floor(s*N + 1/2)``.

Timing is wall-clock of one cold call in a fresh process. On an oversubscribed machine
torch's OpenMP threads spin at barriers while a sibling is descheduled, which can make
2 threads several times slower than 1; ``--threads 1`` measures without that effect, and
the 1-minute load average is printed next to each row.

Peak memory: after building the model and the scores, the worker resets the kernel's
peak-RSS mark (``/proc/self/clear_refs``, value 5), reads the current RSS, runs the method,
and reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` minus that RSS: the extra peak
memory of the operation itself, including its outputs (the masks). If the reset is not
possible the figure is an upper bound and is flagged. Both workers finally hash the zero
pattern of the pruned parameters so the results can be compared element by element.
Not collected by pytest (no ``test_`` prefix); needs timm.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def worker(
    method: str, model_name: str, sparsity: float, dump: str | None = None, repeat: int = 3, threads: int = 0
) -> dict:
    import timm
    import torch
    from torch.nn.utils import prune

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    from cl_tool.pruning import apply_masks, global_masks, num_to_prune

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False)
    model.eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        scores = {n: p.detach().abs() for n, p in params.items()}
    n_all = sum(t.numel() for t in scores.values())
    k = num_to_prune(n_all, sparsity)
    gc.collect()

    reset = _reset_peak()
    rss0 = _status_kb("VmRSS")
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    peak_before = ru0.ru_maxrss
    t0 = time.perf_counter()
    if method == "cl_tool":
        masks = global_masks(scores, sparsity)
        t_masks = time.perf_counter() - t0
        apply_masks(params, masks)
    else:
        pairs, imp = [], {}
        for mod_name, mod in model.named_modules():
            for p_name, _ in mod.named_parameters(recurse=False):
                pairs.append((mod, p_name))
                imp[(mod, p_name)] = scores[f"{mod_name}.{p_name}" if mod_name else p_name]
        prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured, importance_scores=imp, amount=k)
        t_masks = None
        for mod, p_name in pairs:
            prune.remove(mod, p_name)
    t_total = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    peak_after = ru1.ru_maxrss
    cpu_total = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)

    # Warm repeats of global_masks alone (after the peak measurement; not in the peak figure).
    warm = []
    if method == "cl_tool":
        for _ in range(repeat):
            t = time.perf_counter()
            global_masks(scores, sparsity)
            warm.append(time.perf_counter() - t)

    # Validity of the result (not timed). At these sparsities the threshold v > 0, so every
    # zero score is pruned and "weight == 0" is exactly the pruned set.
    import numpy as np

    h = hashlib.sha256()
    zeros = 0
    pruned = {n: (p.detach() == 0) for n, p in model.named_parameters()}
    v = max(float(scores[n][z].max()) for n, z in pruned.items() if bool(z.any()))
    stats = {"pruned_above_v": 0, "kept_below_v": 0, "ties_at_v": 0, "pruned_ties_at_v": 0}
    for n, z in pruned.items():
        sc = scores[n]
        zeros += int(z.sum())
        stats["pruned_above_v"] += int((z & (sc > v)).sum())
        stats["kept_below_v"] += int((~z & (sc < v)).sum())
        stats["ties_at_v"] += int((sc == v).sum())
        stats["pruned_ties_at_v"] += int((z & (sc == v)).sum())
        h.update(z.reshape(-1).numpy().tobytes())
    if dump:
        bits = np.concatenate([z.reshape(-1).numpy() for z in pruned.values()])
        np.save(dump, np.packbits(bits))
    return {
        "method": method,
        "model": model_name,
        "numel": n_all,
        "k": k,
        "threads": torch.get_num_threads(),
        "seconds_masks": t_masks,
        "seconds_total": t_total,
        "cpu_seconds_total": cpu_total,
        "seconds_masks_warm_min": min(warm) if warm else None,
        "loadavg_1min": os.getloadavg()[0],
        "rss_before_mib": rss0 / 1024,
        "peak_increase_mib": (peak_after - rss0) / 1024,
        "peak_reset_ok": bool(reset and peak_before <= rss0 + 1024),
        "zeros_after": zeros,
        "zero_pattern_sha256": h.hexdigest()[:16],
        "threshold_v": v,
        **stats,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads in the workers (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=3, help="warm repeats of global_masks after the measured call")
    ap.add_argument("--json", action="store_true", help="print one JSON object per method")
    ap.add_argument("--worker", choices=["cl_tool", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.sparsity, args.dump, args.repeat, args.threads)))
        return 0
    import numpy as np

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("cl_tool", "torch"):
            dump = os.path.join(tmp, method + ".npy")
            out = subprocess.run(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--worker",
                    method,
                    "--model",
                    args.model,
                    "--sparsity",
                    str(args.sparsity),
                    "--dump",
                    dump,
                    "--repeat",
                    str(args.repeat),
                    "--threads",
                    str(args.threads),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
        a, b = (np.unpackbits(np.load(os.path.join(tmp, m + ".npy"))) for m in ("cl_tool", "torch"))
        differing = int((a != b).sum())
    for r in results:
        r["differing_from_other"] = differing
    if args.json:
        for r in results:
            print(json.dumps(r))
        return 0
    r0 = results[0]
    print(
        f"{args.model}: {r0['numel']:,} scores (|w|), sparsity {args.sparsity} -> k = {r0['k']:,}, {r0['threads']} threads"
    )
    print(f"{'method':40s} {'masks s':>8s} {'total s':>8s} {'CPU s':>7s} {'peak +MiB':>10s} {'load':>5s}")
    for r in results:
        name = (
            "cl_tool global_masks + apply_masks" if r["method"] == "cl_tool" else "torch global_unstructured + remove"
        )
        tm = f"{r['seconds_masks']:.2f}" if r["seconds_masks"] is not None else "-"
        flag = "" if r["peak_reset_ok"] else " (upper bound)"
        print(
            f"{name:40s} {tm:>8s} {r['seconds_total']:8.2f} {r['cpu_seconds_total']:7.2f} {r['peak_increase_mib']:10.0f} {r['loadavg_1min']:5.1f}{flag}"
        )
    if r0["seconds_masks_warm_min"] is not None:
        print(f"cl_tool global_masks warm (min of {args.repeat}): {r0['seconds_masks_warm_min']:.2f} s")
    print(
        f"zeros after pruning: {results[0]['zeros_after']:,} vs {results[1]['zeros_after']:,}; "
        f"elements pruned by one method only: {differing:,}"
    )
    for r in results:
        print(
            f"  {r['method']:8s} threshold v = {r['threshold_v']!r}: {r['ties_at_v']} scores equal v, {r['pruned_ties_at_v']} of them pruned; "
            f"pruned above v: {r['pruned_above_v']}, kept below v: {r['kept_below_v']}"
        )
    print(
        "  (both are valid iff nothing above v is pruned and nothing below v is kept; they may differ only in which tied scores"
        " at v are pruned: cl_tool takes them in parameter order then flat index, torch.topk in an unspecified order)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
