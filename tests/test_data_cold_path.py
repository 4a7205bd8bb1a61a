"""The first pass over a new task: what its speed-ups must not change (issue 26).

Batches stacked straight into shared memory in a worker hold the pixels ``stack`` gives; the decoded cache gets the
same rows and the same file whether a pass visits rows in order (no copies) or not; identity normalisation is the
arithmetic it skips, bit for bit; a batch a consumer has let go of is freed before the next batch is made.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from tests._data_util import imagefolder


def _arrays(k: int, shape=(3, 5, 4), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(k)]


def test_stack_tensor_in_a_worker_is_shared_memory_with_the_same_pixels(monkeypatch):
    from cl_tool.data import _fetch

    arrays = _arrays(6)
    outside = _fetch.stack_tensor(arrays, (3, 5, 4))
    assert not outside.is_shared() and np.array_equal(outside.numpy(), np.stack(arrays))
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as in a DataLoader worker
    inside = _fetch.stack_tensor(arrays, (3, 5, 4))
    assert inside.is_shared() and inside.dtype == torch.uint8 and inside.shape == (6, 3, 5, 4)
    assert np.array_equal(inside.numpy(), np.stack(arrays))
    mixed = [*arrays[:2], arrays[2].astype(np.float32) / 255.0]  # mixed pixel types: stack's float32 rule
    assert np.array_equal(_fetch.stack_tensor(mixed, (3, 5, 4)).numpy(), _fetch.stack(mixed, (3, 5, 4)))
    assert _fetch.stack_tensor([], (3, 5, 4)).shape == (0, 3, 5, 4)


@pytest.mark.parametrize("ram", [True, False])
def test_cache_rows_and_file_do_not_depend_on_the_order_rows_arrive_in(tmp_path, ram):
    from cl_tool.data.cache import Store

    n, shape = 11, (3, 5, 4)
    pixels = np.stack(_arrays(n, shape, seed=1))
    orders = {
        "in order": [np.arange(0, 4), np.arange(4, 8), np.arange(8, 11)],
        "shuffled, repeated": [np.array([7, 2, 2, 9]), np.array([0, 10, 3, 7]), np.array([1, 4, 5, 6, 8, 8])],
        "gaps": [np.array([0, 2, 4, 6, 8, 10]), np.array([1]), np.array([3, 5, 7, 9])],
    }
    files = {}
    for name, batches in orders.items():
        final = tmp_path / name / "x.cltd"
        final.parent.mkdir()
        st = Store(
            n, shape, labels=np.arange(n) % 3, info={}, parts={"k": 1}, want_ram=ram, final=final, ram_budget=1 << 20
        )
        for idx in batches:
            assert st.put(idx, pixels[idx])
        assert st.complete and st.file_complete
        if ram:
            assert np.array_equal(st.ram, pixels), name
        back = Store.load(final, {"k": 1}, want_ram=True, ram_budget=1 << 20)
        assert np.array_equal(back.ram, pixels), name
        files[name] = final.read_bytes()
    assert len(set(files.values())) == 1  # byte-identical cache files


def test_identity_normalisation_is_the_skipped_arithmetic_bit_for_bit():
    from cl_tool.data.transforms import normalise_, to_unit_float

    x = to_unit_float(torch.arange(256, dtype=torch.uint8).repeat(6).view(2, 3, 16, 16))
    slow = x.clone().sub_(torch.zeros(1, 3, 1, 1)).div_(torch.ones(1, 3, 1, 1))
    fast = normalise_(x, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert fast is x and torch.equal(fast.view(torch.int32), slow.view(torch.int32))
    y = to_unit_float(torch.arange(256, dtype=torch.uint8).repeat(6).view(2, 3, 16, 16))
    normalise_(y, (0.0, 0.0, 0.5), (1.0, 1.0, 1.0))  # one channel not the identity: every channel goes through it
    assert torch.equal(y[:, :2], x[:, :2]) and torch.equal(y[:, 2], x[:, 2] - 0.5)


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluate_frees_a_batch_before_making_the_next(tmp_path, monkeypatch, workers):
    """Peak memory of a pass is one float batch, not two: the loader and evaluate hold no batch while the next is made."""
    from cl_tool.data import Preprocess, TaskSpec, loader, open_task
    from cl_tool.evaluation import evaluate_task

    root = imagefolder(tmp_path / "imgs", per_class=6)
    made: list[weakref.ref] = []
    alive_when_next_made: list[bool] = []
    real = loader.to_unit_float

    def watched(x):
        alive_when_next_made.extend(r() is not None for r in made)
        out = real(x)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(loader, "to_unit_float", watched)
    pre = Preprocess.builtin((3, 8, 8), (0.5,) * 3, (0.25,) * 3)
    with open_task(TaskSpec(str(root)), pre, cache="none", workers=workers) as task:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
        acc, _ = evaluate_task(model, task, device=torch.device("cpu"), batch_size=4)
    assert len(made) == 5 and 0 <= acc <= 1
    assert not any(alive_when_next_made)
