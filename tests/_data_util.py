"""Tiny datasets for the data-pipeline tests (made in the test, no download)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def saved_demo(path: Path, n: int = 40, seed: int = 0, test: int = 24) -> Path:
    """A DatasetDict (train/test) of 28x28 grey PNG images with ClassLabel labels, saved to ``path``."""
    import datasets

    from cl_tool.demo import make_dataset

    datasets.disable_progress_bars()
    if not path.exists():
        datasets.DatasetDict(
            {"train": make_dataset(n, seed=seed), "test": make_dataset(test, seed=seed + 1)}
        ).save_to_disk(str(path))
    return path


def imagefolder(path: Path, per_class: int = 5, classes: str = "abc", seed: int = 0, ext: str = "png") -> Path:
    """An imagefolder of RGB images of varied sizes (so resizing happens)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (path / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(14, 40)), int(rng.integers(14, 40))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path / c / f"{i}.{ext}")
    return path


def arrays(path: Path, images, labels, column: str = "pixels") -> Path:
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({column: images, "label": labels}).save_to_disk(str(path))
    return path


def collect(task, **kw):
    """(index, x, y) of a whole pass, concatenated."""
    import torch

    bs = list(task.batches(**kw))
    return (torch.cat([b.index for b in bs]), torch.cat([b.x for b in bs]), torch.cat([b.y for b in bs]))
