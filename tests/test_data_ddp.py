"""Two real processes (torch.distributed, gloo) with the batch sampler: each sample is read once per epoch across the ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from cl_tool.data import Preprocess, TaskSpec, open_task
from tests._data_util import imagefolder

ROOT = Path(__file__).resolve().parents[1]

RANK = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from cl_tool.data import GlobalBatchSampler, Preprocess, TaskSpec, open_task
    rank, world, folder, init, out = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    task = open_task(TaskSpec(folder), Preprocess.builtin((3, 16, 16), (0.5,) * 3, (0.2,) * 3), cache="none", workers=1)
    sampler = GlobalBatchSampler(len(task), 4, seed=7, rank=rank, world=world)
    seen = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        mine = [int(i) for b in task.batches(sampler, augment="shift=1", seed=7, epoch=epoch) for i in b.index]
        got = [None] * world
        dist.all_gather_object(got, mine)
        seen.append(got)
    task.close()
    dist.destroy_process_group()
    json.dump(seen, open(out, "w"))
""")


def test_two_processes_see_each_sample_once_per_epoch(tmp_path):
    folder = imagefolder(tmp_path / "data", per_class=7)  # 21 samples: the last global batch is split 1 + 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(r), str(folder), init, str(tmp_path / f"r{r}.json")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    for r in range(2):
        seen = json.loads((tmp_path / f"r{r}.json").read_text())
        for epoch, (a, b) in enumerate(seen):
            assert not set(a) & set(b) and sorted(a + b) == list(range(21)), (epoch, a, b)
        assert seen[0] != seen[1]  # a new order each epoch


def test_overlapping_passes_are_refused(tmp_path):
    import pytest

    folder = imagefolder(tmp_path / "data", per_class=4)
    task = open_task(
        TaskSpec(str(folder)), Preprocess.builtin((3, 8, 8), (0.5,) * 3, (0.2,) * 3), cache="none", workers=0
    )
    first = task.batches(batch_size=2)
    next(first)
    with pytest.raises(RuntimeError, match="another pass over this task is still open"):
        next(task.batches(batch_size=2))
    first.close()
    assert len(list(task.batches(batch_size=2))) == 6
    task.close()


def test_task_specs_inline_keys_override_the_options(tmp_path):
    import pytest

    from cl_tool.data import DataOptions, task_specs
    from cl_tool.errors import UsageError

    (spec,) = task_specs(["a=./x::split=test[:5],permute=3,invert"], DataOptions(split="train", rotate=45.0))
    assert (spec.name, spec.source, spec.split, spec.permute, spec.invert, spec.rotate) == (
        "a",
        "./x",
        "test[:5]",
        3,
        True,
        45.0,
    )
    for raw, phrase in (
        ("x::colour=red", "unknown per-task key"),
        ("x::limit=0", "limit must be at least 1"),
        ("x::rotate=abc", "is not a number"),
        ("::split=a", "needs a path"),
    ):
        with pytest.raises(UsageError, match=phrase):
            task_specs([raw], DataOptions())
