"""``streaming=True``: a datasets IterableDataset read in source order equals the in-memory pipeline (local sources; no network)."""

from __future__ import annotations

import pytest
import torch

from cl_tool.data import Preprocess, TaskSpec, open_task
from cl_tool.errors import IncompatibleError, UsageError
from tests._data_util import collect, imagefolder, saved_demo
from tests._legacy_load_task import load_task

NORM = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    folder = imagefolder(d / "folder", per_class=5)
    import datasets

    datasets.disable_progress_bars()
    demo = saved_demo(d / "demo", n=30)
    parquet = d / "demo.parquet"
    datasets.load_from_disk(str(demo))["train"].to_parquet(str(parquet))
    return {"folder": folder, "demo": demo, "parquet": parquet}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    "key,shape,spec",
    [
        ("folder", (3, 16, 16), {}),
        ("folder", (3, 16, 16), {"permute": 4, "split": "train[2:13]"}),
        ("demo", (1, 28, 28), {"rotate": 90.0, "limit": 17}),
        ("parquet", (1, 28, 28), {"invert": True}),
    ],
)
def test_streaming_equals_in_memory(sources, workers, key, shape, spec):
    norm = NORM if shape[0] == 3 else ((0.1307,), (0.3081,))
    pre = Preprocess.builtin(shape, *norm)
    ref = load_task(TaskSpec(str(sources[key]), **spec), shape, *norm)
    mem = open_task(TaskSpec(str(sources[key]), **spec), pre, cache="none", workers=0)
    stream = open_task(TaskSpec(str(sources[key]), **spec), pre, cache="none", workers=workers, streaming=True)
    i1, x1, y1 = collect(mem, batch_size=4)
    i2, x2, y2 = collect(stream, batch_size=4)
    assert stream.labels is None  # a stream's labels are not read in advance
    assert torch.equal(i1, i2) and torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(x2, ref.x)
    expected = mem.describe()
    del expected["classes"]  # counted from the labels, which a stream does not know before its pass
    assert stream.describe() == expected
    mem.close()
    stream.close()


def test_stream_shuffle_buffer_is_seeded_and_shards_split_batches(sources):
    pre = Preprocess.builtin((1, 28, 28), (0.0,), (1.0,))
    t = open_task(TaskSpec(str(sources["parquet"])), pre, cache="none", workers=0, streaming=True, shuffle_buffer=16)
    ys = lambda **k: collect(t, batch_size=8, **k)[2].tolist()
    plain = ys()
    a, b, c = ys(shuffle=True, seed=1), ys(shuffle=True, seed=1), ys(shuffle=True, seed=1, epoch=1)
    assert a == b and a != c and sorted(a) == sorted(plain) and a != plain
    w2 = open_task(TaskSpec(str(sources["parquet"])), pre, cache="none", workers=2, streaming=True, shuffle_buffer=16)
    assert collect(w2, batch_size=8, shuffle=True, seed=1)[2].tolist() == a  # independent of the number of workers
    shares = [collect(t, batch_size=8, shard=(r, 2))[0].tolist() for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == list(range(30))
    resumed = collect(t, batch_size=8, start_batch=2)[0].tolist()
    assert resumed == list(range(16, 30))
    t.close()
    w2.close()


def test_stream_labels_are_checked_per_batch(sources):
    from cl_tool.data import check_labels

    t = open_task(
        TaskSpec(str(sources["folder"])), Preprocess.builtin((3, 8, 8), *NORM), cache="none", workers=0, streaming=True
    )
    check_labels(t, 2)
    with pytest.raises(IncompatibleError, match="has label 2, outside the model's 2 classes"):
        collect(t, batch_size=4)
    t.close()


def test_stream_refuses_a_cache_and_an_order(sources):
    pre = Preprocess.builtin((3, 8, 8), *NORM)
    with pytest.raises(UsageError, match="does not apply to streaming"):
        open_task(TaskSpec(str(sources["folder"])), pre, cache="disk", streaming=True)
    t = open_task(TaskSpec(str(sources["folder"])), pre, cache="auto", workers=0, streaming=True)
    with pytest.raises(ValueError):
        t.batches([[0, 1]])
    t.close()
