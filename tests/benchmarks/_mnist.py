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
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(a, mode="L") for a in images], "label": labels.tolist()}, features=feats
    )
    ds.save_to_disk(str(out))
    return out


def _given(data: str | None) -> str:
    """``--data`` as given: MNIST has no default location (each machine keeps it where it likes)."""
    if data is None:
        raise SystemExit("give --data: a folder with the MNIST IDX files (t10k-*) or a dataset such as ylecun/mnist")
    return data


def mnist_source(data: str | None, work: str | Path) -> tuple[str, str]:
    """(what to pass to cl-tool's --data, the split name to put before the configs' slices) for ``--data``.

    ``data`` is a folder with the MNIST IDX files (t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]),
    converted once to a datasets folder holding that single split; or a Hugging Face dataset with a test split,
    e.g. ``ylecun/mnist`` (online) or a local save_to_disk copy of it: MNIST's test split is the same 10,000
    images as t10k, in the same order, so the configs' slices pick the same samples either way.
    """
    data = _given(data)
    folder = Path(data)
    if folder.is_dir() and any(folder.glob("t10k-images-idx3-ubyte*")):
        return str(mnist_dataset_dir(folder, Path(work) / "_mnist_dataset")), ""
    if folder.is_dir() and not (folder / "dataset_dict.json").exists():
        return data, ""  # a folder holding one dataset: the slices apply to it directly
    return data, "test"


def mnist_arrays(data: str | None):
    """(uint8 images (10000, 28, 28), int64 labels) of MNIST's test split from an IDX folder or a Hugging Face dataset."""
    import numpy as np

    data = _given(data)
    folder = Path(data)
    if folder.is_dir() and any(folder.glob("t10k-images-idx3-ubyte*")):
        return read_idx(folder)
    import datasets

    ds = datasets.load_from_disk(data)["test"] if folder.is_dir() else datasets.load_dataset(data, split="test")
    images = np.stack([np.asarray(img.convert("L"), dtype=np.uint8) for img in ds["image"]])
    return images, np.asarray(ds["label"], dtype=np.int64)
