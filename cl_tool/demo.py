"""Synthetic image-classification data, so the quickstart and the tests need no download.

Each of ``classes`` classes has a fixed prototype: a sum of three Gaussian blobs at random
positions of a ``size``×``size`` canvas. A sample is its class prototype shifted by up to
``max_shift`` pixels, scaled by a random contrast in [0.7, 1.0], plus Gaussian pixel noise,
clipped to [0, 1] and stored as an 8-bit grey image (a ``datasets.Image`` feature with a
``ClassLabel`` label), like MNIST.
"""

from __future__ import annotations

from typing import Any


def make_images(n: int, *, classes: int = 10, size: int = 28, seed: int = 0, noise: float = 0.25, max_shift: int = 3):
    """(uint8 images (n, size, size), int64 labels (n,)) drawn as described in the module docstring."""
    import numpy as np

    proto_rng = np.random.default_rng(12345)  # prototypes are the same for every seed
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    protos = np.zeros((classes, size, size), np.float32)
    for c in range(classes):
        for _ in range(3):
            cy, cx = proto_rng.uniform(size * 0.2, size * 0.8, 2)
            sy, sx = proto_rng.uniform(size * 0.05, size * 0.15, 2)
            protos[c] += np.exp(-((yy - cy) ** 2 / (2 * sy**2) + (xx - cx) ** 2 / (2 * sx**2)))
        protos[c] /= protos[c].max()
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    shifts = rng.integers(-max_shift, max_shift + 1, (n, 2))
    contrast = rng.uniform(0.7, 1.0, n).astype(np.float32)
    imgs = np.empty((n, size, size), np.float32)
    for i in range(n):
        imgs[i] = np.roll(protos[labels[i]], tuple(shifts[i]), axis=(0, 1)) * contrast[i]
    imgs += rng.normal(0, noise, imgs.shape).astype(np.float32)
    return (np.clip(imgs, 0, 1) * 255).round().astype(np.uint8), labels.astype(np.int64)


def make_dataset(n: int, **kwargs: Any):
    """A ``datasets.Dataset`` with columns image (Image) and label (ClassLabel)."""
    import datasets
    from PIL import Image

    imgs, labels = make_images(n, **kwargs)
    classes = kwargs.get("classes", 10)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=classes)})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(a, mode="L") for a in imgs], "label": labels.tolist()}, features=features
    )
