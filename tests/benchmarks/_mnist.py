"""Turn the MNIST IDX files (t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) into a save_to_disk folder."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path


def read_idx(folder: str | Path):
    import numpy as np

    folder = Path(folder)

    def _open(stem):
        for name in (stem + ".gz", stem):
            if (folder / name).exists():
                return gzip.open(folder / name, "rb") if name.endswith(".gz") else open(folder / name, "rb")
        raise SystemExit(f"{folder} has no {stem}[.gz]; pass the folder with the MNIST IDX files.")

    with _open("t10k-images-idx3-ubyte") as fh:
        magic, n, h, w = struct.unpack(">IIII", fh.read(16))
        images = np.frombuffer(fh.read(), dtype=np.uint8).reshape(n, h, w)
    with _open("t10k-labels-idx1-ubyte") as fh:
        magic, n2 = struct.unpack(">II", fh.read(8))
        labels = np.frombuffer(fh.read(), dtype=np.uint8).astype(np.int64)
    assert n == n2
    return images, labels


def mnist_dataset_dir(idx_folder: str | Path, out: str | Path) -> Path:
    """Write (once) a Dataset with columns image (Image) and label (ClassLabel) to ``out``; return it."""
    out = Path(out)
    if (out / "dataset_info.json").exists():
        return out
    import datasets
    from PIL import Image

    datasets.disable_progress_bars()
    images, labels = read_idx(idx_folder)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a, mode="L") for a in images], "label": labels.tolist()}, features=feats)
    ds.save_to_disk(str(out))
    return out
