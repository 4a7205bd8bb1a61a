"""The first version's loader: the whole task decoded into one float32 (N, C, H, W) tensor.

No command uses it (every command reads data through ``cl_tool.data.open_task``); it lives in the
tests only, unchanged (``load_task``), as the reference the per-batch pipeline is tested against
(bit-identical for built-in models without augmentation). Images become float32 tensors of the model's input shape (C, H, W): PIL
images are converted to L/RGB and resized (bilinear) when their size differs; array columns are
reshaped when they hold exactly C·H·W values (integer arrays are read as 0..255, float arrays as
0..1). Task-deriving transforms act on the [0, 1] image (``--rotate``, ``--invert``,
``--permute``), then per-channel normalisation (x − mean) / std. The whole task is held in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_tool.data.preprocess import open_image as _decode_image
from cl_tool.data.sources import find_column as _find_column
from cl_tool.data.sources import load_raw as _load_raw
from cl_tool.data.specs import IMAGE_COLUMN_NAMES, LABEL_COLUMN_NAMES, TaskSpec
from cl_tool.data.specs import parse_split as _parse_split
from cl_tool.data.transforms import apply_task_transforms
from cl_tool.errors import BadInputError


@dataclass
class TaskData:
    x: Any  # float32 (N, C, H, W), normalised
    y: Any  # int64 (N,)
    spec: TaskSpec
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def describe(self) -> dict[str, Any]:
        d = self.spec.describe()
        d.update(self.info)
        d["samples"] = len(self)
        return d


def _to_array(value, c: int, h: int, w: int, row: int, source: str):
    import numpy as np

    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = _decode_image(value, row, source)
    if hasattr(value, "convert") and hasattr(value, "size"):  # PIL image
        img = value.convert("L" if c == 1 else "RGB")
        if img.size != (w, h):
            img = img.resize((w, h), resample=2)  # bilinear
        arr = np.asarray(img, dtype=np.float32) / 255.0
        return arr[None] if c == 1 else arr.transpose(2, 0, 1)
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise BadInputError(
            f"Image in row {row} of $data {source} is not a regular array; use an Image column or fixed-size pixel arrays."
        ) from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise BadInputError(
            f"Image in row {row} of $data {source} is not a regular array of numbers (dtype {arr.dtype}); use an Image column or fixed-size pixel arrays."
        )
    scale = 255.0 if np.issubdtype(arr.dtype, np.integer) else 1.0
    arr = arr.astype(np.float32) / scale
    if arr.size == c * h * w:
        if arr.ndim == 3 and arr.shape[-1] == c and arr.shape[0] == h and c != h:
            arr = arr.transpose(2, 0, 1)
        return arr.reshape(c, h, w)
    if arr.ndim in (2, 3):
        from PIL import Image

        hw = arr if arr.ndim == 2 else arr
        u8 = (np.clip(hw, 0, 1) * 255).round().astype(np.uint8)
        return _to_array(
            Image.fromarray(u8 if u8.ndim == 2 or u8.shape[-1] in (3, 4) else u8[..., 0]), c, h, w, row, source
        )
    raise BadInputError(
        f"Image in row {row} of $data {source} has {arr.size} values, but the model needs {c}x{h}x{w}; resize the data or use a matching model."
    )


def load_task(spec: TaskSpec, input_shape: tuple[int, int, int], mean, std, *, progress=None) -> TaskData:
    """Load one task's data as normalised tensors of ``input_shape`` plus int64 labels."""
    import numpy as np
    import torch

    split_name, start, stop = _parse_split(spec.split)
    ds, split_name, _ = _load_raw(spec.source, split_name)
    img_col = _find_column(
        ds, spec.image_column, "image", "$image_column", IMAGE_COLUMN_NAMES, ("Image", "Array2D", "Array3D")
    )
    lab_col = _find_column(ds, spec.label_column, "label", "$label_column", LABEL_COLUMN_NAMES, ("ClassLabel",))
    if img_col == lab_col:
        raise BadInputError(
            f"$data {spec.source}: the image and label columns are both {img_col!r}; set $image_column / $label_column."
        )
    n_total = len(ds)
    idx = range(n_total)[slice(start, stop)]
    if spec.limit is not None:
        idx = idx[: spec.limit]
    if len(idx) == 0:
        raise BadInputError(
            f"$data {spec.source} has no samples{' in the chosen split/slice' if (start, stop) != (None, None) or spec.limit else ''}; give a non-empty dataset."
        )
    if len(idx) != n_total:
        ds = ds.select(idx)
    c, h, w = input_shape
    xs = np.empty((len(ds), c, h, w), dtype=np.float32)
    ys = np.empty((len(ds),), dtype=np.int64)
    ds = ds.select_columns([img_col, lab_col])
    if type(ds.features[img_col]).__name__ == "Image":  # decode here, so a corrupt file is named
        import datasets

        ds = ds.cast_column(img_col, datasets.Image(decode=False))
    row = 0
    for batch in ds.iter(batch_size=1024):
        for img, lab in zip(batch[img_col], batch[lab_col]):
            if lab is None:
                raise BadInputError(f"Row {row} of $data {spec.source} has no label; remove unlabeled rows.")
            try:
                if isinstance(lab, float) and not lab.is_integer():
                    raise ValueError(lab)
                ys[row] = int(lab)
            except (TypeError, ValueError, OverflowError) as exc:
                raise BadInputError(
                    f"Label {lab!r} in row {row} of $data {spec.source} is not an integer class id; encode labels as integers or a ClassLabel."
                ) from exc
            if img is None:
                raise BadInputError(f"Row {row} of $data {spec.source} has no image.")
            xs[row] = _to_array(img, c, h, w, row, spec.source)
            row += 1
        if progress:
            progress(len(batch[lab_col]))
    bad = ~np.isfinite(xs.reshape(len(xs), -1)).all(axis=1)
    if bad.any():
        raise BadInputError(
            f"Image in row {int(np.argmax(bad))} of $data {spec.source} has NaN or infinite pixel values; clean the data."
        )
    x = apply_task_transforms(torch.from_numpy(xs), spec)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (x - m) / s
    info = {
        "split": split_name if start is None and stop is None else spec.split,
        "image_column": img_col,
        "label_column": lab_col,
    }
    if spec.name is None:
        spec.name = Path(spec.source).name or spec.source
    return TaskData(x=x, y=torch.from_numpy(ys), spec=spec, info=info)
