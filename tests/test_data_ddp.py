"""Two real processes (torch.distributed, gloo) with the batch sampler: each sample is read once per epoch across the ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from cl_tool.data import Preprocess, TaskSpec, open_task, parse_task_spec
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
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(r), str(folder), init, str(tmp_path / f"r{r}.json")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
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
    task = open_task(TaskSpec(str(folder)), Preprocess.builtin((3, 8, 8), (0.5,) * 3, (0.2,) * 3), cache="none", workers=0)
    first = task.batches(batch_size=2)
    next(first)
    with pytest.raises(RuntimeError, match="another pass over this task is still open"):
        next(task.batches(batch_size=2))
    first.close()
    assert len(list(task.batches(batch_size=2))) == 6
    task.close()


def test_parse_task_spec_matches_the_cli_rules(tmp_path):
    import pytest

    from cl_tool.cli._common import data_specs
    from cl_tool.errors import UsageError

    for raw, kw in [("a=./x::split=test[:5],permute=3,invert", {}), ("./y::rotate=90,limit=4,name=b", {"split": "train"}),
                    ("z", {"permute": 2, "rotate": 45.0, "invert": True, "limit": 3, "image_column": "img", "label_column": "lab"})]:
        assert parse_task_spec(raw, **kw) == data_specs([raw], **kw)[0]
    for raw in ("x::colour=red", "x::limit=0", "x::rotate=abc", "::split=a"):
        with pytest.raises(UsageError) as a:
            parse_task_spec(raw)
        with pytest.raises(UsageError) as b:
            data_specs([raw])
        assert str(a.value) == str(b.value)
