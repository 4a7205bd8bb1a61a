"""The per-batch data pipeline equals the first version's whole-task loader, bit for bit, and behaves as documented."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cl_tool.data import GlobalBatchSampler, Preprocess, TaskSpec, check_labels, open_task
from cl_tool.errors import BadInputError, IncompatibleError
from tests._data_util import arrays, collect, imagefolder, saved_demo
from tests._legacy_load_task import load_task

MNIST_NORM = ((0.1307,), (0.3081,))
RGB_NORM = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(5)
    return {
        "demo": saved_demo(d / "demo"),
        "folder": imagefolder(d / "folder", per_class=4),
        "u8": arrays(d / "u8", rng.integers(0, 256, (12, 28, 28)).tolist(), list(range(12))),
        "float": arrays(d / "float", rng.random((12, 784)).astype(np.float32).tolist(), [i % 10 for i in range(12)]),
        "hwc": arrays(d / "hwc", rng.integers(0, 256, (6, 28, 28, 3)).astype(np.uint8).tolist(), list(range(6))),
        "small": arrays(d / "small", rng.random((6, 14, 14)).tolist(), list(range(6))),  # resized through an image
    }


CASES = [  # (data key, input shape, normalisation)
    ("demo", (1, 28, 28), MNIST_NORM),
    ("folder", (3, 16, 16), RGB_NORM),
    ("folder", (1, 20, 24), MNIST_NORM),
    ("u8", (1, 28, 28), MNIST_NORM),
    ("float", (1, 28, 28), MNIST_NORM),
    ("hwc", (3, 28, 28), RGB_NORM),
    ("small", (1, 28, 28), MNIST_NORM),
]
TRANSFORMS = [
    {},
    {"permute": 7},
    {"rotate": 90.0},
    {"rotate": 33.0},
    {"invert": True},
    {"rotate": -90.0, "invert": True, "permute": 3},
]


@pytest.mark.parametrize("key,shape,norm", CASES, ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}" for c in CASES])
@pytest.mark.parametrize("tf", TRANSFORMS, ids=lambda t: ",".join(f"{k}={v}" for k, v in t.items()) or "plain")
def test_bit_identical_to_the_first_version(data, key, shape, norm, tf, tmp_path):
    ref = load_task(TaskSpec(str(data[key]), **tf), shape, *norm)
    task = open_task(TaskSpec(str(data[key]), **tf), Preprocess.builtin(shape, *norm), cache="none", workers=0)
    idx, x, y = collect(task, batch_size=5)
    task.close()
    assert torch.equal(idx, torch.arange(len(ref)))
    assert x.dtype == torch.float32 and torch.equal(x, ref.x)  # the same float32 bits, not merely close
    assert torch.equal(y, ref.y) and torch.equal(task.labels, ref.y)


def test_split_limit_labels_and_describe_match(data):
    spec = {"split": "test[3:20]", "limit": 9, "permute": 1}
    ref = load_task(TaskSpec(str(data["demo"]), **spec), (1, 28, 28), *MNIST_NORM)
    task = open_task(
        TaskSpec(str(data["demo"]), **spec), Preprocess.builtin((1, 28, 28), *MNIST_NORM), cache="none", workers=0
    )
    assert task.stats["decoded"] == 0 and torch.equal(task.labels, ref.y)  # labels come without decoding an image
    d, old = task.describe(), ref.describe()
    assert len(task) == 9 and d["samples"] == old["samples"] == 9 and d["source"] == old["source"]
    assert d["split"] == "test" and d["subset"] == "rows [3:20], the first 9 of 24" and d["rows_in_split"] == 24
    assert sum(d["classes"].values()) == 9 and d["classes"] == {
        str(k): int((ref.y == k).sum()) for k in ref.y.unique().tolist()
    }
    _, x, _ = collect(task, batch_size=4)
    assert torch.equal(x, ref.x)
    task.close()


@pytest.mark.parametrize("cache", ["none", "ram", "disk", "auto"])
@pytest.mark.parametrize("workers", [0, 2])
def test_cache_modes_and_workers_give_the_same_batches(data, cache, workers, tmp_path):
    ref = load_task(TaskSpec(str(data["folder"]), rotate=90.0), (3, 16, 16), *RGB_NORM)
    task = open_task(
        TaskSpec(str(data["folder"]), rotate=90.0),
        Preprocess.builtin((3, 16, 16), *RGB_NORM),
        cache=cache,
        workers=workers,
        cache_dir=tmp_path / "c",
    )
    with task:
        for epoch in range(3):  # pass 1 fills the cache, passes 2-3 read it
            sampler = GlobalBatchSampler(len(task), 4, seed=9)
            sampler.set_epoch(epoch)
            for b, idx in zip(task.batches(sampler), sampler):
                assert b.index.tolist() == idx
                assert torch.equal(b.x, ref.x[idx]) and torch.equal(b.y, ref.y[idx])
        assert task.stats["decoded"] == (len(task) * 3 if cache == "none" else len(task))
        assert (
            task.cache == {"none": "none", "ram": "ram", "disk": "ram", "auto": "ram"}[cache]
        )  # small: kept in memory


def test_check_labels(data):
    task = open_task(TaskSpec(str(data["u8"])), Preprocess.builtin((1, 28, 28), *MNIST_NORM), cache="none", workers=0)
    check_labels(task, 12)
    with pytest.raises(IncompatibleError, match="has label 11, outside the model's 10 classes"):
        check_labels(task, 10)
    task.close()


def _bad_folder(root):
    imagefolder(root, per_class=3, classes="ab")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_image_is_named(tmp_path, workers):
    root = _bad_folder(tmp_path / "bad")
    with pytest.raises(BadInputError) as ref_err:
        load_task(TaskSpec(str(root)), (3, 16, 16), *RGB_NORM)
    task = open_task(TaskSpec(str(root)), Preprocess.builtin((3, 16, 16), *RGB_NORM), cache="none", workers=workers)
    with pytest.raises(BadInputError) as err:
        collect(task, batch_size=2)
    task.close()
    assert err.value.exit_code == 3 and str(err.value) == str(ref_err.value)
    assert "broken.png cannot be decoded" in str(err.value) and "Traceback" not in str(err.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_images_drops_and_counts(tmp_path, workers):
    root = _bad_folder(tmp_path / "bad")
    pre = Preprocess.builtin((3, 16, 16), *RGB_NORM)
    task = open_task(TaskSpec(str(root)), pre, cache="disk", workers=workers, skip_bad=True, cache_dir=tmp_path / "c")
    idx, x, y = collect(task, batch_size=3)
    assert len(idx) == len(task) - 1 and task.describe()["skipped_images"] == 1
    task.close()
    again = open_task(TaskSpec(str(root)), pre, cache="disk", workers=workers, skip_bad=True, cache_dir=tmp_path / "c")
    idx2, x2, _ = collect(again, batch_size=3)  # from the cache: the bad row is known without decoding
    assert (
        again.stats["decoded"] == 0
        and torch.equal(idx, idx2)
        and torch.equal(x, x2)
        and again.describe()["skipped_images"] == 1
    )
    again.close()
    strict = open_task(TaskSpec(str(root)), pre, cache="disk", workers=workers, cache_dir=tmp_path / "c")
    with pytest.raises(BadInputError, match="broken.png cannot be decoded"):
        collect(strict, batch_size=3)
    strict.close()


@pytest.mark.parametrize(
    "images,match",
    [
        (["abc"] * 3, "not a regular array of numbers"),
        ([[0.5] * 100] * 3, "has 100 values, but the model needs 1x28x28"),
    ],
)
def test_bad_arrays_give_the_first_versions_message(tmp_path, images, match):
    path = arrays(tmp_path / "a", images, [0, 1, 2])
    with pytest.raises(BadInputError, match=match) as ref_err:
        load_task(TaskSpec(str(path)), (1, 28, 28), *MNIST_NORM)
    task = open_task(TaskSpec(str(path)), Preprocess.builtin((1, 28, 28), *MNIST_NORM), cache="none", workers=0)
    with pytest.raises(BadInputError) as err:
        collect(task, batch_size=2)
    assert str(err.value) == str(ref_err.value)
    task.close()


def test_bad_labels_are_named_without_decoding(tmp_path):
    for labels, match in (
        ([0, 1.5, 2], "Label 1.5 in row 1 .* is not an integer class id"),
        ([0, None, 2], "Row 1 of data .* has no label"),
    ):
        path = arrays(tmp_path / f"l{len(match)}", [[0.5] * 784] * 3, labels)
        with pytest.raises(BadInputError, match=match):
            open_task(TaskSpec(str(path)), Preprocess.builtin((1, 28, 28), *MNIST_NORM), cache="none", workers=0)


# ----------------------------------------------------------------------------------------------- order, DDP, resume


def test_sampler_is_trainings_order_and_ranks_see_each_sample_once():
    n, B = 103, 8
    for epoch in range(3):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(5 * 100_003 + epoch))
        s = GlobalBatchSampler(n, B, seed=5)
        s.set_epoch(epoch)
        assert sum(s, []) == order.tolist()
        seen = []
        shares = []
        for rank in range(2):
            r = GlobalBatchSampler(n, B, seed=5, rank=rank, world=2)
            r.set_epoch(epoch)
            shares.append(list(r))
            seen += sum(shares[-1], [])
        assert sorted(seen) == list(range(n))  # every sample exactly once per epoch across the two ranks
        for b, (a, c) in enumerate(zip(*shares)):  # rank 0 takes the first contiguous share of each global batch
            assert a + c == order[b * B : (b + 1) * B].tolist()
    s = GlobalBatchSampler(n, B, seed=5)
    s.set_epoch(2, start_batch=4)
    full = GlobalBatchSampler(n, B, seed=5)
    full.set_epoch(2)
    assert list(s) == list(full)[4:] and len(s) == len(list(full)) - 4


def test_two_ranks_read_each_sample_once_per_epoch(data):
    pre = Preprocess.builtin((1, 28, 28), *MNIST_NORM)
    task = open_task(TaskSpec(str(data["demo"])), pre, cache="none", workers=0)
    for epoch in range(2):
        got = []
        for rank in range(2):
            s = GlobalBatchSampler(len(task), 6, seed=1, rank=rank, world=2)
            s.set_epoch(epoch)
            got += [i for b in task.batches(s) for i in b.index.tolist()]
        assert sorted(got) == list(range(len(task)))
    task.close()


def _state():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_batch_k_is_bit_identical_and_rng_is_untouched(data, workers):
    pre = Preprocess.builtin((1, 28, 28), *MNIST_NORM)
    task = open_task(TaskSpec(str(data["demo"]), permute=2), pre, cache="none", workers=workers)
    before = _state()
    full = list(task.batches(batch_size=8, shuffle=True, seed=3, epoch=1, augment="shift=2"))
    resumed = list(task.batches(batch_size=8, shuffle=True, seed=3, epoch=1, augment="shift=2", start_batch=2))
    after = _state()
    assert torch.equal(before[0], after[0]) and (before[1] == after[1]).all() and before[2] == after[2]
    assert len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a.index, b.index) and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    task.close()


def test_training_resumed_mid_epoch_equals_uninterrupted(data):
    """A tiny SGD run over the new loader, stopped after k batches and resumed, ends with the same weights (CPU, workers 0)."""
    pre = Preprocess.builtin((1, 28, 28), *MNIST_NORM)
    task = open_task(TaskSpec(str(data["demo"])), pre, cache="none", workers=0)

    def run(stop_at=None, state=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(784, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 10)
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        start = (0, 0)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            torch.set_rng_state(state["rng"])
            start = state["pos"]
        for epoch in range(start[0], 2):
            s = GlobalBatchSampler(len(task), 8, seed=4)
            s.set_epoch(epoch, start[1] if epoch == start[0] else 0)
            for k, b in enumerate(task.batches(s, augment="shift=1", seed=4, epoch=epoch), start=s.start_batch):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(b.x), b.y).backward()
                opt.step()
                if stop_at == (epoch, k + 1):
                    return {
                        "model": {n: v.clone() for n, v in model.state_dict().items()},
                        "opt": opt.state_dict(),
                        "rng": torch.get_rng_state(),
                        "pos": (epoch, k + 1),
                    }
        return model.state_dict()

    whole = run()
    resumed = run(state=run(stop_at=(1, 2)))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    task.close()


# ----------------------------------------------------------------------------------------------- augmentation


def test_shift_augmentation_is_seeded_exact_and_worker_independent(data):
    pre = Preprocess.builtin((1, 28, 28), (0.0,), (1.0,))
    spec = TaskSpec(str(data["demo"]))
    plain = open_task(spec, pre, cache="none", workers=0)
    _, x0, _ = collect(plain, batch_size=7)
    runs = {}
    for workers in (0, 2):
        t = open_task(TaskSpec(str(data["demo"])), pre, cache="ram", workers=workers)
        runs[workers] = [collect(t, batch_size=7, augment="shift=3", seed=1, epoch=e)[1] for e in (0, 0, 1)]
        t.close()
    assert torch.equal(runs[0][0], runs[0][1]) and not torch.equal(
        runs[0][0], runs[0][2]
    )  # seeded; new epoch, new shifts
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))  # independent of the number of workers
    other_batching = open_task(TaskSpec(str(data["demo"])), pre, cache="none", workers=0)
    assert torch.equal(
        collect(other_batching, batch_size=5, augment="shift=3", seed=1)[1], runs[0][0]
    )  # per sample, not per batch
    aug = runs[0][0]
    for i in range(len(x0)):  # each image is the original translated by some (dy, dx) in [-3, 3]², zero filled
        src = torch.nn.functional.pad(x0[i, 0], (3, 3, 3, 3))
        assert any(
            torch.equal(aug[i, 0], src[3 - dy : 31 - dy, 3 - dx : 31 - dx])
            for dy in range(-3, 4)
            for dx in range(-3, 4)
        )
    plain.close()
    other_batching.close()


def test_task_transforms_apply_after_augmentation(data):
    pre = Preprocess.builtin((1, 28, 28), (0.0,), (1.0,))
    from cl_tool.data import pixel_permutation

    a = open_task(TaskSpec(str(data["demo"])), pre, cache="none", workers=0)
    p = open_task(TaskSpec(str(data["demo"]), permute=11), pre, cache="none", workers=0)
    _, xa, _ = collect(a, batch_size=8, augment="shift=2", seed=2)
    _, xp, _ = collect(p, batch_size=8, augment="shift=2", seed=2)
    perm = pixel_permutation(11, 784)
    assert torch.equal(
        xp, xa.reshape(len(xa), 1, 784)[:, :, perm].reshape(xa.shape)
    )  # the same permutation of every augmented image
    a.close()
    p.close()
