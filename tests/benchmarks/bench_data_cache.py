"""Why cl-tool has its own decoded cache: ``datasets``' map cache vs cl_tool.data.cache on MNIST 10k.

Both sides decode with the same function (``Preprocess.decode``: PNG → uint8 1x28x28) into a
cache file under a cache folder (never the data folder):

* datasets: ``Dataset.map(decode, batched=True, features={x: Array3D((1,28,28), uint8)},
  cache_file_name=<cache>/hf_decoded.arrow)``; a later command calls the same map, which
  finds the file; batches are read with ``ds.with_format("numpy")[indices]``.
* cl-tool: ``open_task(cache="disk")``; the first pass of ``Task.batches`` fills the file; a
  later command's ``open_task`` finds it by key; rows are read with ``os.pread``
  (``ram_budget=0``) or from memory (the default for a task this small).

Measured: first pass (decode + write), second-command start (a fresh process, from
interpreter start to the first batch in hand, imports included), and shuffled batch reads
(B=256) of the finished cache. Both children import torch first, as every command does.
Also (``today_command`` vs ``cl_command_cold``/``_warm``): one command's whole data path on the
same data, the first version's ``load_task`` + tensor slicing against ``open_task`` +
``Task.batches`` (3 shuffled epochs of B=64 and an eval pass of B=512, permuted task), with a
cold decoded cache and then as a later command would see it. Each measurement runs in its own process, the sides
interleaved, ``--repeats`` times; medians are reported with the load average (the machine
is shared: compare the ratios, not the absolute numbers).

    python tests/benchmarks/bench_data_cache.py --mnist DIR --work /tmp/bench_cache
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

CHILD = r"""
import json, os, sys, time
T0 = float(sys.argv[3])
mode, work = sys.argv[1], sys.argv[2]
B = 256
import torch  # every command imports it (the model); both sides pay it

def decode_fn():
    from cl_tool.data import Preprocess
    pre = Preprocess.builtin((1, 28, 28), (0.1307,), (0.3081,))
    def decode(batch):
        return {"x": [pre.decode(v, 0, "mnist") for v in batch["image"]]}
    return decode

def hf_open():
    import datasets
    datasets.disable_progress_bars()
    ds = datasets.load_from_disk(work + "/mnist").cast_column("image", datasets.Image(decode=False))
    feats = datasets.Features({"x": datasets.Array3D((1, 28, 28), "uint8"), "label": ds.features["label"]})
    return ds.map(decode_fn(), batched=True, batch_size=1000, features=feats, remove_columns=["image"],
                  cache_file_name=work + "/cache/hf_decoded.arrow", load_from_cache_file=True, desc=None)

def cl_open(budget):
    from cl_tool.data import Preprocess, TaskSpec, open_task
    return open_task(TaskSpec(work + "/mnist"), Preprocess.builtin((1, 28, 28), (0.1307,), (0.3081,)), cache="disk", workers=0,
                     cache_dir=work + "/cache", ram_budget=budget)

def perms(n, k=3):
    import numpy as np
    return [np.random.default_rng(s).permutation(n) for s in range(k)]

out = {}
if mode == "hf_first":
    t = time.perf_counter(); ds = hf_open(); out["first_pass_s"] = time.perf_counter() - t
elif mode == "hf_second":
    ds = hf_open()
    import numpy as np
    x = np.asarray(ds.with_format("numpy")[np.arange(B)]["x"])
    out["start_to_first_batch_s"] = time.time() - T0
    ds = ds.with_format("numpy")
    t = time.perf_counter(); n = 0
    for p in perms(len(ds)):
        for i in range(0, len(p), B):
            n += len(ds[p[i:i + B]]["x"])
    out["shuffled_rows_per_s"] = n / (time.perf_counter() - t)
elif mode == "cl_first":
    t = time.perf_counter(); task = cl_open(0)
    for b in task.batches(batch_size=B):
        pass
    task.close(); out["first_pass_s"] = time.perf_counter() - t
elif mode in ("cl_second_pread", "cl_second_ram"):
    budget = 0 if mode.endswith("pread") else 256 << 20
    task = cl_open(budget)
    b = next(task.batches(batch_size=B))
    out["start_to_first_batch_s"] = time.time() - T0
    assert task.stats["decoded"] == 0
    from cl_tool.data.cache import read_rows
    st = task._store
    t = time.perf_counter(); n = 0
    for p in perms(len(task)):
        for i in range(0, len(p), B):
            rows = st.ram[p[i:i + B]] if st.ram is not None else read_rows((None, str(st.final)), st.shape, st.dtype, p[i:i + B])
            n += len(rows)
    out["shuffled_rows_per_s"] = n / (time.perf_counter() - t)
    t = time.perf_counter(); n = 0
    for e in range(3):
        for b in task.batches(batch_size=B, shuffle=True, epoch=e):  # what training sees: + float, normalise
            n += len(b.index)
    out["shuffled_batches_rows_per_s"] = n / (time.perf_counter() - t)
    task.close()
elif mode in ("today_command", "cl_command"):  # what one command's data path costs: load, 3 training epochs (B=64), one eval pass (B=512)
    from cl_tool.data import GlobalBatchSampler, Preprocess, TaskSpec, load_task, open_task
    t = time.perf_counter()
    if mode == "today_command":
        task = load_task(TaskSpec(work + "/mnist", permute=1), (1, 28, 28), (0.1307,), (0.3081,))
        out["load_s"] = time.perf_counter() - t
        n = len(task)
        for e in range(3):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(e))
            for i in range(0, n, 64):
                idx = order[i:i + 64]
                xb, yb = task.x[idx], task.y[idx]
        for i in range(0, n, 512):
            xb = task.x[i:i + 512]
    else:
        task = open_task(TaskSpec(work + "/mnist", permute=1), Preprocess.builtin((1, 28, 28), (0.1307,), (0.3081,)), workers=0,
                         cache_dir=work + "/cache")
        out["load_s"] = time.perf_counter() - t
        for e in range(3):
            s = GlobalBatchSampler(len(task), 64, seed=0)
            s.set_epoch(e)
            for b in task.batches(s):
                pass
        for b in task.batches(batch_size=512):
            pass
        out["decoded"] = task.stats["decoded"]
        task.close()
    out["data_path_s"] = time.perf_counter() - t
    out["process_s"] = time.time() - T0
print(json.dumps(out))
"""


def child(mode: str, work: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(work), repr(t0)], env=env, capture_output=True, text=True, timeout=900
    )
    if p.returncode:
        raise SystemExit(f"{mode} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", required=True, help="folder with the MNIST t10k IDX files")
    ap.add_argument("--work", required=True, help="scratch folder (the MNIST save_to_disk copy and both caches)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the JSON result here too")
    ap.add_argument(
        "--no-commands",
        dest="commands",
        action="store_false",
        help="skip the per-command comparison with the first version's load_task",
    )
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from _mnist import mnist_dataset_dir

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    mnist_dataset_dir(a.mnist, work / "mnist")
    runs: dict[str, list[dict]] = {}
    load = []
    for _ in range(a.repeats):
        for side in ("hf", "cl"):  # interleaved
            shutil.rmtree(work / "cache", ignore_errors=True)
            (work / "cache").mkdir()
            load.append(os.getloadavg()[0])
            runs.setdefault(f"{side}_first", []).append(child(f"{side}_first", work))
            for mode in ["hf_second"] if side == "hf" else ["cl_second_pread", "cl_second_ram"]:
                runs.setdefault(mode, []).append(child(mode, work))
        if a.commands:  # a command's whole data path, today vs open_task (cold cache, then a later command)
            shutil.rmtree(work / "cache", ignore_errors=True)
            runs.setdefault("today_command", []).append(child("today_command", work))
            runs.setdefault("cl_command_cold", []).append(child("cl_command", work))
            runs.setdefault("cl_command_warm", []).append(child("cl_command", work))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    size = {p.name: p.stat().st_size for p in (work / "cache").iterdir()} if (work / "cache").exists() else {}
    result = {
        "samples": 10_000,
        "batch": 256,
        "repeats": a.repeats,
        "load_avg_1min": [round(v, 2) for v in load],
        "cpus": os.cpu_count(),
        "median": med,
        "last_cl_cache_file_bytes": size,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
